"""ShortGPT's block influence: how much each layer turns the residual, ``BI_l = 1 − mean_t cos(h_l, h_{l+1})``."""

from __future__ import annotations

import numpy as np
import torch

from depthcache.evaluate.encoding import encode_prompt, last_logits_only, left_padded, pad_id
from depthcache.model import Capture, Structure


def block_influence(model: torch.nn.Module, structure: Structure, tokenizer, texts: list[str],  # noqa: ANN001
                    batch_size: int, device: str) -> np.ndarray:
    """BI of every layer over the real tokens of ``texts`` (h_L: the residual before the final norm), float64."""
    depth = structure.n_layers
    total, count = np.zeros(depth), 0
    for start in range(0, len(texts), batch_size):
        seqs = [encode_prompt(tokenizer, t) for t in texts[start:start + batch_size]]
        ids, mask, positions = left_padded(seqs, pad_id(tokenizer), device)
        with Capture(model, structure, range(depth), ("resid",), torch.float32) as cap, torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                  **last_logits_only(model))
            h = torch.cat([cap.stacked("resid_pre"), cap.resid_final.unsqueeze(0)])[:, mask.bool()]
            total += torch.nn.functional.cosine_similarity(h[:-1], h[1:], dim=-1).double().sum(-1).cpu().numpy()
        count += int(mask.sum())
    return 1.0 - total / count

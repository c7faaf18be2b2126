"""Hand-written PyTorch hooks + np.save: resid_pre, attn_out, mlp_out of every layer, float32, one file per batch
and site (real tokens only, (layer, token, d_model)), the obvious script a researcher writes."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import Clock, arguments, batches, fresh_folder, pad_id, token_windows


def main() -> None:
    args = arguments(__doc__)
    out = fresh_folder(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    records: dict[str, list[torch.Tensor]] = {"resid_pre": [], "attn_out": [], "mlp_out": []}

    def keep(name: str, tensor: torch.Tensor) -> None:
        records[name].append(tensor.detach())

    for layer in layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: keep("resid_pre", args[0] if args else
                                                                     kwargs["hidden_states"]), with_kwargs=True)
        layer.self_attn.register_forward_hook(lambda m, args, output: keep("attn_out", output[0]))
        layer.mlp.register_forward_hook(lambda m, args, output: keep("mlp_out", output))
    windows = token_windows(tokenizer, args.max_tokens, args.seq_len)
    clock = Clock()
    with torch.inference_mode():
        for b, (ids, mask) in enumerate(batches(windows, args.batch_size, args.seq_len, pad_id(tokenizer))):
            clock.start()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.flatten().bool()
            for name, tensors in records.items():
                stacked = torch.stack(tensors).flatten(1, 2)[:, real]
                np.save(out / f"batch{b:05d}_{name}.npy", stacked.numpy())
                tensors.clear()
    clock.write(args.timings, "hooks", sum(map(len, windows)))


if __name__ == "__main__":
    main()

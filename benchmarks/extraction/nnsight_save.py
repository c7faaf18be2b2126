"""nnsight: one trace per batch saving resid_pre, attn_out and mlp_out of every layer with .save(), then torch.save
of each batch (real tokens only, (layer, token, d_model) per site, float32)."""

from __future__ import annotations

import torch
import nnsight
from nnsight import TransformersModel

from common import Clock, arguments, batches, fresh_folder, pad_id, token_windows


def main() -> None:
    args = arguments(__doc__)
    out = fresh_folder(args.out)
    model = TransformersModel(args.model_dir, task="text-generation", dtype=torch.float32, dispatch=True)
    tokenizer = model.tokenizer
    windows = token_windows(tokenizer, args.max_tokens, args.seq_len)
    clock = Clock()
    with torch.inference_mode():
        for b, (ids, mask) in enumerate(batches(windows, args.batch_size, args.seq_len, pad_id(tokenizer))):
            clock.start()
            with model.trace({"input_ids": ids, "attention_mask": mask}, use_cache=False):
                saved = nnsight.save({"resid_pre": [], "attn_out": [], "mlp_out": []})
                for layer in model.model.layers:
                    saved["resid_pre"].append(layer.input)
                    saved["attn_out"].append(layer.self_attn.output[0])
                    saved["mlp_out"].append(layer.mlp.output)
            real = mask.flatten().bool()
            torch.save({site: torch.stack(tensors).flatten(1, 2)[:, real] for site, tensors in saved.items()},
                       out / f"batch{b:05d}.pt")
    clock.write(args.timings, "nnsight", sum(map(len, windows)))


if __name__ == "__main__":
    main()

"""TransformerLens's TransformerBridge: run_with_cache over resid_pre, attn_out and mlp_out of every layer, then
torch.save of each batch's cache (real tokens only, (layer, token, d_model) per site, float32)."""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoTokenizer

from common import Clock, arguments, batches, fresh_folder, pad_id, token_windows

SITES = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


def main() -> None:
    args = arguments(__doc__)
    out = fresh_folder(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    bridge = TransformerBridge.boot_transformers(args.model_dir, device="cpu", dtype=torch.float32,
                                                 tokenizer=tokenizer)
    n_layers = bridge.cfg.n_layers
    names = [f"blocks.{layer}.{hook}" for hook in SITES.values() for layer in range(n_layers)]
    windows = token_windows(tokenizer, args.max_tokens, args.seq_len)
    clock = Clock()
    with torch.inference_mode():
        for b, (ids, mask) in enumerate(batches(windows, args.batch_size, args.seq_len, pad_id(tokenizer))):
            clock.start()
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
            real = mask.flatten().bool()
            saved = {site: torch.stack([cache[f"blocks.{layer}.{hook}"] for layer in range(n_layers)])
                     .flatten(1, 2)[:, real] for site, hook in SITES.items()}
            torch.save(saved, out / f"batch{b:05d}.pt")
    clock.write(args.timings, "transformerlens", sum(map(len, windows)))


if __name__ == "__main__":
    main()

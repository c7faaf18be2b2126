"""The floor: a plain forward pass over the same batches (float32, inference mode), nothing captured or saved."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import Clock, arguments, batches, pad_id, token_windows


def main() -> None:
    args = arguments(__doc__)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    windows = token_windows(tokenizer, args.max_tokens, args.seq_len)
    clock = Clock()
    with torch.inference_mode():
        for ids, mask in batches(windows, args.batch_size, args.seq_len, pad_id(tokenizer)):
            clock.start()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    clock.write(args.timings, "forward", sum(map(len, windows)))


if __name__ == "__main__":
    main()

"""The built-in two-hop task scored by ``evaluate prune``'s own loop and by lm-evaluation-harness (backend
``depthcache``), step by step with layers removed: prints both, side by side, as a Markdown table.

    python examples/lm-eval/compare_two_hop.py --model smollm2-135m --n 20 --layers 20-29 --steps 3
"""

from __future__ import annotations

import argparse
import tempfile

from depthcache.evaluate import PruneOptions, evaluate_prune
from depthcache.evaluate.harness import write_harness_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=20, help="two-hop-facts chains (each gives 3-4 items)")
    parser.add_argument("--layers", default="20-29")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="two-hop-harness-")
    names = write_harness_task("two-hop-facts", folder, n=args.n)
    common = dict(model=args.model, layers=args.layers, steps=args.steps, device=args.device, batch_size=16)
    own = evaluate_prune(PruneOptions(task="two-hop-facts", n=args.n, **common))
    harness = evaluate_prune(PruneOptions(harness=",".join(names), include_path=folder, n=None, **common))
    print(f"{args.model}, two-hop-facts n={args.n} ({own.sizes['item']} items), removal order last-first over "
          f"{args.layers}\n")
    print("| removed | acc (own) | acc (harness) | exact match (own) | exact match (harness) | gold log-prob (own) "
          "| gold log-prob (harness) |")
    print("|---|---|---|---|---|---|---|")
    for step in range(own.sizes["step"]):
        print(f"| {own.removed.values[step] or 'none'} | {own.choice_accuracy.values[step]:.4f} | "
              f"{harness['two_hop_facts_mc.acc'].values[step]:.4f} | {own.exact_match_rate.values[step]:.4f} | "
              f"{harness['two_hop_facts_gen.exact_match'].values[step]:.4f} | "
              f"{own.mean_gold_logprob.values[step]:.4f} | {harness['two_hop_facts_ll.gold_logprob'].values[step]:.4f} |")


if __name__ == "__main__":
    main()

"""Layer skipping: a full ``--skip each`` extraction vs its ideal cost, and what reusing the baseline prefix saves.

    python benchmarks/skip_bench.py [--tokens 1024] [--model smollm2-135m] [--dir runs/skipbench]

Measured in one process with the model loaded once (not timed): (a) the baseline extraction of exactly
``--tokens`` tokens, (b) ``--skip each`` over those tokens feeding the baseline's stored residual into the skipped
layer (prefix reuse, the default), (c) the same runs recomputing every layer. The ideal of a run skipping layer s
is the baseline time × the fraction of layers it computes ((L − s) / L with reuse, 1 without), so
ideal(b) = T(a) × (L + 1) / 2 and ideal(c) = T(a) × L. Also: how far the skip-effects results of (b) and (c)
differ, since (b) starts from the stored (bf16-rounded) residual instead of the exact one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def timed(fn, *args, **kwargs) -> float:  # noqa: ANN001 - any callable
    """Seconds one call takes."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def warm_up(loaded, device: str) -> None:  # noqa: ANN001 - a LoadedModel
    """One untimed forward batch, so first-call costs do not land in the baseline's time."""
    import torch

    with torch.inference_mode():
        loaded.model(input_ids=torch.zeros((8, 128), dtype=torch.long, device=device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default="runs/skipbench")
    args = parser.parse_args()

    from depthcache.analyze import run
    from depthcache.extraction.engine import ExtractOptions, extract
    from depthcache.extraction.skip_runs import SkipOptions, extract_skips
    from depthcache.model.architectures import architecture_for, decoder_layers
    from depthcache.model.loading import load_model

    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    reuse, recompute = folder / "reuse.zarr", folder / "recompute.zarr"
    opts = ExtractOptions(out=str(reuse), model=args.model, max_tokens=args.tokens, device=args.device, progress=False)
    loaded = load_model(args.model, device=args.device)
    depth = len(decoder_layers(loaded.model, architecture_for(loaded.model)))
    warm_up(loaded, args.device)
    load_before = os.getloadavg()
    t_base = timed(extract, opts, loaded)
    shutil.copytree(reuse, recompute)
    skip = SkipOptions("each", tokens=args.tokens)
    t_reuse = timed(extract_skips, opts, skip, loaded)
    t_recompute = timed(extract_skips, replace(opts, out=str(recompute)),
                        SkipOptions("each", tokens=args.tokens, prefix="recompute"), loaded)
    load_after = os.getloadavg()
    start = time.perf_counter()
    effects = {name: run("skip-effects", str(store)) for name, store in (("reuse", reuse), ("recompute", recompute))}
    t_analysis = (time.perf_counter() - start) / 2
    diff = {var: float(np.nanmax(np.abs(effects["reuse"][var].values - effects["recompute"][var].values)))
            for var in ("max_effect", "mean_effect", "later_effect", "output_l2_max", "logprob_change_mean")}
    ideal_reuse, ideal_recompute = t_base * (depth + 1) / 2, t_base * depth
    print(json.dumps({
        "model": args.model, "tokens": args.tokens, "layers": depth, "runs": depth,
        "baseline_s": round(t_base, 2), "skip_each_reuse_s": round(t_reuse, 2),
        "skip_each_recompute_s": round(t_recompute, 2),
        "ideal_reuse_s": round(ideal_reuse, 2), "ideal_recompute_s": round(ideal_recompute, 2),
        "ratio_reuse_vs_ideal": round(t_reuse / ideal_reuse, 3),
        "ratio_recompute_vs_ideal": round(t_recompute / ideal_recompute, 3),
        "prefix_reuse_saving": round(1 - t_reuse / t_recompute, 3), "skip_effects_analysis_s": round(t_analysis, 2),
        "reuse_vs_recompute_max_abs_diff": diff,
        "later_effect_reuse": [round(float(v), 3) for v in effects["reuse"].later_effect.values],
        "loadavg_before": load_before, "loadavg_after": load_after,
    }, indent=1))


if __name__ == "__main__":
    main()

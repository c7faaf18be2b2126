"""A plain numpy script computing what ``depthcache analyze contributions -p include_first=true`` reports (relative
contribution and cosine of attention, MLP and the whole layer, norms, turning; mean/std/max over tokens per layer)
from the hooks script's .npy files: the yardstick for the analysis's whole-process time.

    python contributions_npy.py FOLDER [--save OUT.npz]   (--save: also write count, mean, std and max)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def quantities(h: np.ndarray, a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(11, layer, token) float64: rel attn/mlp/layer, cos attn/mlp/layer, norm attn/mlp/layer/resid, turn cos."""
    d, mid = a + m, h + a
    dot = lambda x, y: np.einsum("ltd,ltd->lt", x, y).astype(np.float64)  # noqa: E731
    hh, aa, mm, dd, ah, dh, ii, mi = dot(h, h), dot(a, a), dot(m, m), dot(d, d), dot(a, h), dot(d, h), \
        dot(mid, mid), dot(m, mid)
    nh, na, nm, nd, ni = np.sqrt(hh), np.sqrt(aa), np.sqrt(mm), np.sqrt(dd), np.sqrt(ii)
    n_next = np.sqrt(np.maximum(hh + 2 * dh + dd, 0.0))
    return np.stack([na / nh, nm / ni, nd / nh, ah / (na * nh), mi / (nm * ni), dh / (nd * nh), na, nm, nd, nh,
                     (hh + dh) / (n_next * nh)])


def main() -> None:
    folder = Path(sys.argv[1])
    count, total, squares, biggest = 0, 0.0, 0.0, -np.inf
    for resid in sorted(folder.glob("*_resid_pre.npy")):
        stem = resid.name.removesuffix("_resid_pre.npy")
        q = quantities(np.load(resid), np.load(folder / f"{stem}_attn_out.npy"), np.load(folder / f"{stem}_mlp_out.npy"))
        count += q.shape[-1]
        total = total + q.sum(-1)
        squares = squares + (q * q).sum(-1)
        biggest = np.maximum(biggest, q.max(-1))
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    names = ("rel_attn", "rel_mlp", "rel_layer", "cos_attn", "cos_mlp", "cos_layer", "norm_attn", "norm_mlp",
             "norm_layer", "norm_resid", "turn_cos")
    if "--save" in sys.argv:
        np.savez(sys.argv[sys.argv.index("--save") + 1], count=count, mean=mean, std=std, max=biggest)
    for name, mu, sd, mx in zip(names, mean, std, biggest):
        print(f"{name:<11} mean {np.array2string(mu, precision=4)}\n{'':<11} std {np.array2string(sd, precision=4)}"
              f"\n{'':<11} max {np.array2string(mx, precision=4)}")


if __name__ == "__main__":
    main()

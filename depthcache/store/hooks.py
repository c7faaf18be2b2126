"""TransformerLens hook names ↔ store arrays: ``blocks.{l}.hook_resid_pre`` is ``resid_pre.sel(layer=l)``.

The mapping (documented in docs/api.md) matches a model loaded with ``HookedTransformer.from_pretrained_no_processing``
(no folded or centred weights): ``hook_resid_pre``, ``hook_attn_out`` and ``hook_mlp_out`` of block l are the stored
arrays at layer l, ``hook_resid_post`` of block l is ``resid_pre`` of layer l + 1 (``resid_final`` after the last
block), and ``ln_final.hook_normalized`` is the final norm of ``resid_final`` before its weight and bias.
"""

from __future__ import annotations

import re

import numpy as np
import xarray as xr

from depthcache.errors import DepthcacheError

LAYERED_HOOKS = {"hook_resid_pre": "resid_pre", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out",
                 "hook_resid_post": "resid_pre"}
FINAL_NORM_HOOK = "ln_final.hook_normalized"
BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(hook_[a-z_]+)")


def hook_name(array: str, layer: int | None = None) -> str:
    """The TransformerLens name of a stored array at a layer: ('attn_out', 3) → 'blocks.3.hook_attn_out'."""
    if array == "resid_final":
        raise DepthcacheError("resid_final is blocks.{L-1}.hook_resid_post of an L-layer model: use hook_name("
                              "'resid_post', L - 1)")
    names = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
             "resid_post": "hook_resid_post"}
    if array not in names or layer is None:
        raise DepthcacheError(f"no TransformerLens name for {array!r} at layer {layer}: arrays with one are "
                              f"{', '.join(names)} (with a layer)")
    return f"blocks.{int(layer)}.{names[array]}"


def parse_hook(name: str) -> tuple[str, int | None]:
    """'blocks.3.hook_mlp_out' → ('hook_mlp_out', 3); 'ln_final.hook_normalized' → (that, None)."""
    if name == FINAL_NORM_HOOK:
        return name, None
    match = BLOCK_HOOK.fullmatch(name)
    if not match or match.group(2) not in LAYERED_HOOKS:
        raise DepthcacheError(f"{name!r} is not a TransformerLens hook a store holds: use blocks.L.hook_resid_pre, "
                              f"blocks.L.hook_attn_out, blocks.L.hook_mlp_out, blocks.L.hook_resid_post or "
                              f"{FINAL_NORM_HOOK}")
    return match.group(2), int(match.group(1))


def model_depth(ds: xr.Dataset) -> int:
    """Number of layers of the model a store came from (from its provenance attributes)."""
    try:
        return int(ds.attrs["depthcache"]["model"]["n_layers"])
    except (KeyError, TypeError) as exc:
        raise DepthcacheError("this dataset has no depthcache provenance: open it with depthcache.open(STORE)") from exc


def stored_layers(ds: xr.Dataset) -> list[int]:
    """The model layers the dataset stores (its ``layer`` coordinate)."""
    return [int(v) for v in ds["layer"].values] if "layer" in ds.coords else []


def hook_names(ds: xr.Dataset) -> list[str]:
    """Every TransformerLens hook name this dataset can give, in block order."""
    layers, depth = stored_layers(ds), model_depth(ds)
    names = []
    for layer in layers:
        names += [f"blocks.{layer}.{hook}" for hook, array in LAYERED_HOOKS.items()
                  if array in ds and hook != "hook_resid_post"]
    for layer in range(depth):
        if resid_post_source(ds, layer, layers, depth) is not None:
            names.append(f"blocks.{layer}.hook_resid_post")
    if "resid_final" in ds and "final_norm" in ds.attrs:
        names.append(FINAL_NORM_HOOK)
    return sorted(names, key=hook_order)


def hook_order(name: str) -> tuple[int, int]:
    """Sort key: by block, then in the order a forward pass reaches the hooks; the final norm last."""
    hook, layer = parse_hook(name)
    order = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    return (10**9, 0) if layer is None else (layer, order.index(hook))


def resid_post_source(ds: xr.Dataset, layer: int, layers: list[int], depth: int) -> tuple[str, int | None] | None:
    """Where block ``layer``'s output is stored: resid_pre of the next layer, resid_final after the last, or None."""
    if layer == depth - 1 and "resid_final" in ds:
        return "resid_final", None
    if layer + 1 in layers and "resid_pre" in ds:
        return "resid_pre", layer + 1
    return None


def final_normalized(resid: xr.DataArray, kind: str, eps: float) -> xr.DataArray:
    """The final norm without its weight and bias (TransformerLens' ``hook_normalized``), lazily in float32."""
    x = resid.astype(np.float32)
    if kind == "layernorm":
        x = x - x.mean("d_model")
    return x / np.sqrt((x * x).mean("d_model") + np.float32(eps))


def select_hook(ds: xr.Dataset, name: str) -> xr.DataArray:
    """The stored activations TransformerLens calls ``name``, as a lazy (token, d_model) DataArray."""
    hook, layer = parse_hook(name)
    if layer is None:
        norm = ds.attrs.get("final_norm")
        if "resid_final" not in ds or not isinstance(norm, dict):
            raise DepthcacheError(f"{name} needs resid_final and the final norm: open the store with "
                                  "depthcache.open(STORE) and extract it with --sites including resid")
        return final_normalized(ds["resid_final"], norm["kind"], norm["eps"]).rename(name)
    layers, depth = stored_layers(ds), model_depth(ds)
    if layer >= depth:
        raise DepthcacheError(f"{name}: the model has {depth} layers (blocks 0..{depth - 1})")
    if hook == "hook_resid_post":
        source = resid_post_source(ds, layer, layers, depth)
        if source is None:
            raise DepthcacheError(f"{name} is resid_pre of layer {layer + 1}, which this store lacks "
                                  f"(stored layers: {layers})")
        array, at = source
    else:
        array, at = LAYERED_HOOKS[hook], layer
    if array not in ds:
        raise DepthcacheError(f"{name} is {array}, which this store lacks: extract with --sites including "
                              f"{'resid' if array.startswith('resid') else array.split('_')[0]}")
    if at is not None and at not in layers:
        raise DepthcacheError(f"{name} needs layer {at}, which this store lacks (stored layers: {layers})")
    selected = ds[array] if at is None else ds[array].sel(layer=at, drop=True)
    return selected.rename(name)

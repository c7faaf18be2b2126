"""Discover where a decoder keeps its layers, what each layer adds to the residual, and how its head is computed.

No table of families: one short probe forward records, for every decoder layer, which direct child modules run and
which tensors flow between them. From that data flow (and the config) follow the attention and MLP modules, whether
what a branch adds is a post-norm's output (Gemma 2/3, OLMo 2), whether the MLP reads the layer input (parallel
residual), the final norm and its formula (probed numerically: RMSNorm or LayerNorm, weight w or 1 + w), a residual
branch multiplier, the embedding scale, and the logits' scale and soft-cap. The load check (``model.check``) then
proves the result on every layer.
"""

from __future__ import annotations

import inspect
import math
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from depthcache.errors import DepthcacheError
from depthcache.model.multimodal import language_model_class

PROBE_TOKENS = 16
MIXER = re.compile(r"att|mixer|mamba|conv|ssm|retention|temporal|lstm")
MLP = re.compile(r"mlp|feed_?forward|ffn|^ff$|moe|expert")
HYPER = re.compile(r"hyper_?connection|altup")  # several residual streams mixed per layer (Gemma 3n's AltUp)
CAMEL_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+")  # the words of a class name: xLSTMLayer: x, LSTM, Layer
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
RESIDUAL_ARGUMENTS = ("residual", "input_tensor")
EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon")
EPS_GUESSES = (1e-5, 1e-6, 1e-8, 1e-12)  # for norms that hard-code their epsilon (OLMo's LayerNorm)
SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


@dataclass(frozen=True)
class Structure:
    """A decoder's discovered layout: module paths, what each branch adds, and the head's formula.

    ``attn[l]``/``mlp[l]`` are paths relative to layer l of the modules whose outputs, times ``branch_scale``, are
    ADDED to the residual: the layer's token mixers (attention, Mamba, convolution, recurrence) and its channel
    mixers (MLP, MoE, shared expert), '+'-joined where a layer has several (Falcon-H1's Mamba beside attention) and
    empty where it has none (a Mamba block has no MLP). This is the store's branch table. Logits = softcap(logit_scale · unembed(final_norm(resid_final))), with the final norm
    ``norm_kind`` of the residual times (``norm_offset`` + weight) plus bias.
    """

    model_type: str
    class_name: str
    layers: str
    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    final_norm: str
    norm_kind: str  # "rmsnorm" or "layernorm"
    norm_eps: float
    norm_offset: float = 0.0  # 1.0: the norm multiplies by (1 + weight) (Gemma)
    parallel: bool = False  # the MLP reads the layer input h, not h + attn_out
    attn_post_norm: bool = False  # what attention adds is a norm's output (sandwich / post-norm)
    mlp_post_norm: bool = False
    attn_adds_residual: bool = False  # the attention module returns residual + what it adds (BLOOM)
    mlp_adds_residual: bool = False
    branch_scale: float = 1.0  # the layer adds branch_scale · (attn + mlp) (Granite's residual_multiplier)
    part_scales: tuple[tuple[str, float], ...] = ()  # (branch module path, its own factor): Falcon-H1's multipliers
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    embed_scale: float | None = None  # resid_pre[0] = embed_scale · embedding row, when it is a pure scale
    tied_embeddings: bool = False
    moe_layers: tuple[int, ...] = ()
    layer_types: tuple[str, ...] | None = None  # the config's per-layer attention kinds (sliding, full, linear)
    sliding_window: int | None = None
    attn_classes: tuple[str, ...] = ()  # per layer: the token mixer's class (hybrids mix attention kinds)
    language_model: str | None = None  # a multimodal wrapper's (class_name) language model: its class
    input_norm: str | None = None  # a norm only layer 0 applies to its input (RWKV's pre_ln): resid_pre[0] is its output
    idle_layers: tuple[int, ...] = ()  # the checkpoint's layers a text forward never runs, removed at load (Mllama)
    head_dense: str | None = None  # BERT-style heads: norm(activation(dense(final_norm(x)))) is what is unembedded
    head_activation: str | None = None  # one of ACTIVATIONS
    head_norm: str | None = None

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.attn)

    def paths(self, role: str, layer: int) -> tuple[str, ...]:
        """The modules of branch role ``attn`` or ``mlp`` that layer ``layer`` adds (none, one or several)."""
        joined_paths = (self.attn if role == "attn" else self.mlp)[layer]
        return tuple(joined_paths.split("+")) if joined_paths else ()

    def scale(self, role: str, layer: int, part: int) -> float:
        """The factor the layer multiplies the output of module ``part`` of branch ``role`` by before adding it."""
        if not self.part_scales:  # the hot path of every capture hook: one module per role, one factor
            return self.branch_scale
        return self.branch_scale * dict(self.part_scales).get(self.paths(role, layer)[part], 1.0)

    def branch_part(self, path: str, layer: int) -> tuple[str, int]:
        """(role, index) of branch module ``path`` in layer ``layer``; the one-line refusal when it has none."""
        for role in ("attn", "mlp"):
            if path in self.paths(role, layer):
                return role, self.paths(role, layer).index(path)
        raise DepthcacheError(f"layer {layer} of {self.class_name} has no branch {path!r}: its branches are "
                              f"{', '.join(self.branch_names(layer)) or 'none'} (or skip layer, attn or mlp)")

    def branch_names(self, layer: int | None = None) -> list[str]:
        """The branch modules of one layer (None: of any layer), in table order: what a skip may name."""
        layers = range(self.n_layers) if layer is None else (layer,)
        names = [p for i in layers for role in ("attn", "mlp") for p in self.paths(role, i)]
        return list(dict.fromkeys(names))

    @property
    def roles(self) -> tuple[str, ...]:
        """The branch roles some layer has: ``attn``, ``mlp`` or both (a Mamba model has no ``mlp``)."""
        return tuple(role for role in ("attn", "mlp") if any(self.attn if role == "attn" else self.mlp))

    def pruned(self, keep: tuple[int, ...]) -> Structure:
        """The structure of a copy that keeps only the layers ``keep`` (renumbered 0..)."""
        types = None if self.layer_types is None else tuple(self.layer_types[i] for i in keep)
        return replace(self, attn=tuple(self.attn[i] for i in keep), mlp=tuple(self.mlp[i] for i in keep),
                       moe_layers=tuple(new for new, old in enumerate(keep) if old in self.moe_layers),
                       layer_types=types, attn_classes=tuple(self.attn_classes[i] for i in keep))

    def attrs(self) -> dict[str, Any]:
        """JSON attributes for the store (``model.structure``)."""
        out = asdict(self)
        out["part_scales"] = [list(pair) for pair in self.part_scales]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def not_a_decoder(model: torch.nn.Module, reason: str) -> DepthcacheError:
    """The one-line refusal for models whose layers are not branches added to one residual stream."""
    config = getattr(model, "config", None)
    return DepthcacheError(f"{type(model).__name__} ({getattr(config, 'model_type', '?')}) is not a "
                           f"residual-stream decoder: {reason}")


def submodule(root: torch.nn.Module, dotted: str) -> Any:
    """``root.a.b`` for ``dotted == 'a.b'``."""
    return root.get_submodule(dotted) if dotted else root


def decoder_layers(model: torch.nn.Module, structure: Structure | None = None) -> torch.nn.ModuleList:
    """The model's list of decoder layers."""
    return submodule(model, (structure or structure_of(model)).layers)


def n_layers(model: torch.nn.Module) -> int:
    """Number of decoder layers of a loaded model."""
    return structure_of(model).n_layers


def first_tensor(value: Any) -> Any:
    """The hidden-state tensor of a module output (attention returns ``(out, weights)``, MoE ``(out, router)``)."""
    return value[0] if isinstance(value, (tuple, list)) and value else value


def first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor a module was called on: its first positional argument, else ``hidden_states`` or ``x``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "hidden_state"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def is_norm(module: torch.nn.Module) -> bool:
    """A normalisation layer: by type, or by a class name saying norm with no attention or MLP after it (DBRX's
    ``NormAttentionNorm`` holds the attention: no norm), ending in norm or holding no weighted module but norms
    (``RobertaPreLayerNormOutput`` is its model's output projection; AXK2's ``GatedRMSNorm`` with its gate MLP and
    Mamba's ``RMSNormGated`` are norms)."""
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return True
    name = type(module).__name__
    words = [w.lower() for w in CAMEL_WORD.findall(name)]
    if "norm" not in words:
        return "norm" in name.lower()  # a lowercase or fused name (layernorm)
    after = words[words.index("norm") + 1:]
    if any(MIXER.match(w) or MLP.search(w) for w in after):
        return False
    return not after or all(is_norm(c) or next(c.parameters(), None) is None for c in module.children())


def is_dropout(module: torch.nn.Module) -> bool:
    """A dropout layer (the identity in eval mode)."""
    return isinstance(module, torch.nn.Dropout) or "dropout" in type(module).__name__.lower()


@dataclass(eq=False)
class Call:
    """One call of a hooked module during the probe: order, path, input and output tensors (``output`` is the
    object itself, to follow the data flow; ``value`` a copy, safe from later in-place additions)."""

    order: int
    path: str
    module: torch.nn.Module
    input: torch.Tensor | None
    residual: torch.Tensor | None = None  # the ``residual`` argument of a module that adds it itself (BLOOM)
    output: Any = None
    value: torch.Tensor | None = None
    streams_in: int = 0  # tensor arguments of the first input's shape (a reversible layer takes two)
    streams_out: int = 0  # returned tensors of that shape

    @property
    def added(self) -> torch.Tensor:
        """What this call adds to the residual: its output, less the residual it was given if it adds one."""
        return self.value if self.residual is None else self.value - self.residual


def residual_argument(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The value of the module's ``residual`` parameter (``input_tensor`` in BERT-style output projections), for
    modules that add the residual themselves (BLOOM)."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    name = next((n for n in RESIDUAL_ARGUMENTS if n in names), None)
    if name is None:
        return None
    index = names.index(name)
    value = kwargs.get(name, args[index] if index < len(args) else None)
    return value if isinstance(value, torch.Tensor) else None


@dataclass
class Trace:
    """The probe's record of every hooked call, in call order, each tagged with its group: ("block", l) for decoder
    layer l, ("child", l) for its direct children (a child list's entries included), ("inner", l) for the modules
    below those, ("outside", None) for modules outside the layers. A module shared by several layers (Zamba's shared
    transformer) is recorded in the layer that is running."""

    calls: list[tuple[tuple[str, int | None], Call]] = field(default_factory=list)
    running: dict[tuple[int, tuple[str, int | None]], list[Call]] = field(default_factory=dict)
    layer: list[int] = field(default_factory=list)  # the decoder layers running now (innermost last)

    def enter(self, group: tuple[str, int | None], path: str, module: torch.nn.Module, args: tuple,
              kwargs: dict) -> None:
        """Record a call as it starts (a layer's module only while that layer runs)."""
        if group[0] == "block":
            self.layer.append(group[1])
        elif group[0] != "outside" and (not self.layer or self.layer[-1] != group[1]):
            return
        call = Call(len(self.calls), path, module, first_input(args, kwargs), residual_argument(module, args, kwargs))
        call.streams_in = same_shape(call.input, (*args, *kwargs.values()))
        self.calls.append((group, call))
        self.running.setdefault((id(module), group), []).append(call)

    def leave(self, group: tuple[str, int | None], module: torch.nn.Module, output: Any) -> None:
        """Record a call's output (and a copy of it) as it returns."""
        calls = self.running.get((id(module), group))
        if not calls:  # a shared module's call recorded under another layer
            return
        call = calls.pop()
        if group[0] == "block":
            self.layer.pop()
        call.output = first_tensor(output)
        call.streams_out = same_shape(call.input, output if isinstance(output, tuple) else (output,))
        if isinstance(call.output, torch.Tensor):
            call.value = call.output.clone()

    def group(self, kind: str, layer: int | None = None) -> list[Call]:
        """The calls of one group, in call order."""
        return [call for group, call in self.calls if group == (kind, layer)]

    def block(self, layer: int) -> Call | None:
        """The (last) call of decoder layer ``layer``, or None if it did not run."""
        calls = self.group("block", layer)
        return calls[-1] if calls else None

    def runs(self, layer: int) -> int:
        """How many times decoder layer ``layer`` ran."""
        return len(self.group("block", layer))


def same_shape(like: torch.Tensor | None, values: tuple) -> int:
    """How many of ``values`` are tensors of ``like``'s shape."""
    return 0 if like is None else sum(isinstance(v, torch.Tensor) and v.shape == like.shape for v in values)


def layer_children(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """A layer's direct children by path, the entries of a child list or dict in place of the list (LongCat-Flash
    keeps its two attentions in ``self_attn.0`` and ``self_attn.1``)."""
    out = []
    for name, child in block.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            out.extend((f"{name}.{key}", entry) for key, entry in child.named_children())
        else:
            out.append((name, child))
    return out


@contextmanager
def tracing(model: torch.nn.Module, layers_path: str) -> Iterator[Trace]:
    """Hooks recording the data flow of a forward through the layers at ``layers_path`` and the modules after them."""
    trace = Trace()
    blocks = submodule(model, layers_path)
    handles = []

    def watch(module: torch.nn.Module, path: str, group: tuple[str, int | None]) -> None:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: trace.enter(group, path, m, args, kwargs), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda m, args, output: trace.leave(group, m, output)))

    for index, block in enumerate(blocks):
        watch(block, f"{layers_path}.{index}", ("block", index))
        children = layer_children(block)
        for name, child in children:
            watch(child, name, ("child", index))
        direct = {name for name, _ in children}
        for name, inner in block.named_modules():
            if name and name not in direct and not isinstance(inner, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                watch(inner, name, ("inner", index))
    inside = {id(m) for m in blocks.modules()} | {id(m) for m in ancestors(model, layers_path)}
    for path, module in model.named_modules():
        if id(module) not in inside:
            watch(module, path, ("outside", None))
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def ancestors(model: torch.nn.Module, path: str) -> list[torch.nn.Module]:
    """The modules on the way from the model down to ``path`` (the model included)."""
    parts = path.split(".") if path else []
    return [submodule(model, ".".join(parts[:i])) for i in range(len(parts))]


def layer_count(config: Any) -> int | None:
    """The decoder's layer count from its (text) config."""
    counts = layer_counts(config)
    return counts[0] if counts else None


def layer_counts(config: Any) -> list[int]:
    """Every layer count the config gives, in key order (LongCat-Flash's num_hidden_layers counts its two-attention
    layers twice; num_layers counts them once)."""
    values = [getattr(config, key, None) for key in LAYER_COUNT_KEYS]
    return list(dict.fromkeys(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0))


def probe_ids(model: torch.nn.Module, n: int = PROBE_TOKENS) -> torch.Tensor:
    """A fixed (1, n) input spread over the vocabulary, on the model's device."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    return (torch.arange(n, device=device) * 7919 + 11).remainder(vocab).unsqueeze(0)


def run_probe(model: torch.nn.Module, layers_path: str, ids: torch.Tensor) -> tuple[Trace, torch.Tensor]:
    """Forward ``ids`` once with tracing hooks; the trace and the model's logits."""
    with torch.inference_mode(), tracing(model, layers_path) as trace:
        logits = model(input_ids=ids, use_cache=False).logits
    return trace, logits


def layer_list(model: torch.nn.Module, count: int) -> list[str]:
    """Paths of the module lists with ``count`` entries: candidates for the decoder layers."""
    return [path for path, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and len(module) == count]


def branch_role(call: Call, family: str = "") -> str | None:
    """The role of a layer's child: ``attn`` for a token mixer (attention, Mamba, convolution, recurrence), ``mlp``
    for a channel mixer (MLP, MoE, shared expert), None for anything else (cross-attention to another modality
    included; the load check proves it adds nothing on text). The class name decides before the attribute name:
    Nemotron-H calls every block's branch ``mixer``, be it Mamba, attention or an MLP. ``family``: the model's class
    name, whose leading words the child's class shares are no clue (xLSTMFeedForward is an MLP, not an LSTM)."""
    words = own_words(type(call.module).__name__, family)
    if "cross" in words:  # cross-attention to another modality (Evolla's adapter): on text alone it adds nothing
        return None
    if any(MIXER.match(word) for word in words):  # by word: GptOssMLP has no "ssm"
        return "attn"  # before the MLP test: Qwen2MoeAttention is attention
    if MLP.search("".join(words)):  # anywhere: NemotronHMoE
        return "mlp"
    for role, pattern in (("attn", MIXER), ("mlp", MLP)):
        if pattern.search(attribute_name(call.path)):
            return role
    return None


def attribute_name(path: str) -> str:
    """The attribute a module sits under, lowercase: the last part of its path that is no list index."""
    return next((part for part in reversed(path.lower().split(".")) if not part.isdigit()), "")


def own_words(kind: str, family: str) -> list[str]:
    """The lowercase words of class name ``kind`` after those it shares, from the start, with ``family``."""
    words, shared = [w.lower() for w in CAMEL_WORD.findall(kind)], [w.lower() for w in CAMEL_WORD.findall(family)]
    common = next((i for i, (a, b) in enumerate(zip(words, shared)) if a != b), min(len(words), len(shared)))
    return words[common:]


def branch_modules(model: torch.nn.Module, block: Call, calls: list[Call], layer: int
                   ) -> tuple[list[Call], list[Call]]:
    """The calls of the token mixers and of the channel mixers among a layer's direct children, in call order.
    A layer may have several of either (Falcon-H1: Mamba beside attention; Granite 4: an MoE and a shared MLP) or
    none of one (Mamba: a mixer alone), but at least one branch."""
    plain = [c for c in calls if not is_norm(c.module) and not is_dropout(c.module)
             and not isinstance(c.module, torch.nn.Identity)]
    for path, child in block.module.named_children():  # by module: AltUp runs through methods, not forward
        if HYPER.search(type(child).__name__.lower()):
            raise not_a_decoder(model, f"layer {layer} keeps several residual streams ({path}: "
                                f"{type(child).__name__}), not one vector")
    for call in plain:
        kind = type(call.module).__name__
        if "residual" in kind.lower():
            raise not_a_decoder(model, f"layer {layer} rewrites the residual stream itself ({call.path}: {kind}, "
                                "a gate, scale or attention over it): the stream is not a sum of what the layers add")
    roles = {id(c): branch_role(c, type(model).__name__) for c in plain}
    for call in plain:  # a branch module reading another's output post-processes it (Inkling's short convolutions)
        if any(call.input is other.output for other in plain if other is not call and roles[id(other)]):
            roles[id(call)] = None
    mixers = unique_paths([c for c in plain if roles[id(c)] == "attn"])
    mlps = unique_paths([c for c in plain if roles[id(c)] == "mlp"])
    if mixers and not mlps and len(plain) > len(mixers):  # OPT/BioGPT: fc1, activation, fc2 in the layer itself
        last = mixers[-1]
        after = [c for c in calls if c.order > last.order and not is_norm(c.module) and not is_dropout(c.module)
                 and isinstance(c.output, torch.Tensor)]
        width = last.input.shape[-1] if last.input is not None else None
        mlps = [c for c in after if c.output.shape[-1] == width][-1:] if len(after) >= 2 else []
    if not mixers and not mlps:
        raise not_a_decoder(model, f"layer {layer} ({type(block.module).__name__}) has no attention, mixer or MLP "
                            "among its direct children")
    return mixers, mlps


def unique_paths(calls: list[Call]) -> list[Call]:
    """The first call of each module path, in call order (a module called twice is one branch)."""
    seen: set[str] = set()
    return [c for c in calls if not (c.path in seen or seen.add(c.path))]


def added_output(calls: list[Call], branch: Call, family: str = "") -> Call:
    """The call whose output the layer adds for a branch: the branch itself, the norm applied to its output, or a
    module post-processing it (Inkling's short convolution of the attention output)."""
    if branch.residual is not None:
        return branch
    tensor, found = branch.output, branch
    for call in (c for c in calls if c.order > branch.order):  # calls are in call order
        if call.input is not tensor:
            continue
        if is_norm(call.module) or call.residual is not None:  # a post-norm, or a projection adding the residual
            return call
        if not is_dropout(call.module) and branch_role(call, family) is None:
            break
        tensor, found = call.output, (found if is_dropout(call.module) else call)
    return found


def mlp_entry(calls: list[Call], mixer: Call, mlp: Call) -> Call:
    """The first call of the MLP branch (the MLP module, or fc1 for OPT-style layers)."""
    if MLP.search(mlp.path.lower()):
        return mlp
    branch = [c for c in calls if mixer.order < c.order <= mlp.order and not is_norm(c.module)
              and not is_dropout(c.module) and c.path != mixer.path]
    return min(branch, key=lambda c: c.order)


def reads_layer_input(calls: list[Call], block: Call, mixer: Call, entry: Call) -> bool:
    """True when the MLP branch reads the layer input (directly or through its own norm): a parallel residual."""
    sources = [s for s in (block.input, mixer.input) if s is not None]
    feeders = [c for c in calls if c.output is entry.input and is_norm(c.module)]
    return any(entry.input is s for s in sources) or any(f.input is s for f in feeders for s in sources)


def contains_experts(module: torch.nn.Module) -> bool:
    """A mixture-of-experts MLP: it has experts (a list or fused 3-D expert weights) or a router."""
    names = [n.lower() for n, _ in module.named_modules()] + [n.lower() for n, _ in module.named_parameters()]
    return "expert" in type(module).__name__.lower() or any("expert" in n or "router" in n for n in names)


def numeric_config_values(config: Any, pattern: str) -> list[float]:
    """Positive numbers of the config whose keys match ``pattern`` (candidates for a scale)."""
    values = []
    for key, value in config.to_dict().items():
        if re.search(pattern, key) and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            values.append(float(value))
    return values


def fit_tolerance(model: torch.nn.Module) -> float:
    """Relative tolerance of a scale fitted from the model's activations: 1e-3, or a few roundings of a half dtype."""
    return max(1e-3, 4 * torch.finfo(next(model.parameters()).dtype).eps)


def snap(value: float, candidates: list[float], tol: float) -> float | None:
    """The candidate within relative ``tol`` of ``value`` (the config's exact number), or None."""
    for candidate in candidates:
        if abs(value - candidate) <= tol * max(abs(candidate), 1e-12):
            return candidate
    return None


def fitted_scale(target: torch.Tensor, basis: torch.Tensor) -> float:
    """The least-squares s in target ≈ s · basis (float64)."""
    t, b = target.double().flatten(), basis.double().flatten()
    return float((t @ b) / (b @ b).clamp_min(1e-300))


def branch_scales(model: torch.nn.Module, text: Any, block: Call, branches: list[Call], stream: torch.Tensor,
                  unclaimed: list[Call] = ()) -> tuple[float, ...]:
    """Per branch, the factor the layer multiplies it by before adding it, from the config: one for all (Granite's
    residual_multiplier, MiniCPM's depth scale), else one per branch (Falcon-H1's ssm_out_multiplier and
    attention_out_multiplier, applied in the layer after the modules return). ``stream``: the residual the layer
    adds to (its input, or its input norm's output); ``unclaimed``: the layer's other non-norm children, named when
    nothing fits."""
    out, inp = block.value, stream
    added = sum(b.added.reshape(inp.shape).double() for b in branches)
    scale = fitted_scale(out.double() - inp.double(), added)
    candidates = [1.0, *numeric_config_values(text, r"residual")]
    depth_scale = getattr(text, "scale_depth", None)
    if isinstance(depth_scale, (int, float)) and layer_count(text):
        candidates.append(float(depth_scale) / math.sqrt(layer_count(text)))
    found = snap(scale, candidates, fit_tolerance(model))
    if found is not None:
        return (found,) * len(branches)
    if len(branches) > 1:
        columns = torch.stack([b.added.reshape(inp.shape).double().flatten() for b in branches], 1)
        fitted = torch.linalg.lstsq(columns, (out.double() - inp.double()).flatten().unsqueeze(1)).solution
        per_branch = [snap(float(v), [*candidates, *numeric_config_values(text, r"multiplier")],
                           fit_tolerance(model)) for v in fitted.squeeze(1)]
        if all(v is not None for v in per_branch):
            return tuple(per_branch)
    parts = [inp.double().flatten(), *(b.added.reshape(inp.shape).double().flatten() for b in branches)]
    columns = torch.stack(parts, 1)  # out = a · residual + Σ b_i · branch_i ?
    coefficients = torch.linalg.lstsq(columns, out.double().flatten().unsqueeze(1)).solution.squeeze(1)
    misfit = float((out.double().flatten() - columns @ coefficients).abs().max())
    a, *b = coefficients.tolist()
    if misfit <= fit_tolerance(model) * float(out.double().abs().max()) and abs(a - 1) > fit_tolerance(model):
        if all(abs(a - v) <= fit_tolerance(model) * abs(a) for v in b):  # Beam: residual and branches alike
            raise not_a_decoder(model, f"layer 0 multiplies the whole residual stream by {a:.4g}: the stream "
                                "is not a sum of what the layers add")
        raise not_a_decoder(model, f"layer 0 multiplies the residual it adds to by {a:.4g} (MiniMax's alpha): the "
                            "stream is not a sum of what the layers add")
    others = [c.path for c in unclaimed]
    if others:  # children that are neither a known branch nor a norm
        raise not_a_decoder(model, f"layer 0 adds more than its known branches ({', '.join(b.path for b in branches)}"
                            f"): its children {', '.join(others)} are no attention, mixer or MLP depthcache knows")
    if misfit > 1e-2 * float(out.double().abs().max()):
        raise not_a_decoder(model, "layer 0's output is not its input plus its branches' outputs with any factors: "
                            "it rescales, interpolates or normalises the stream between them")
    raise not_a_decoder(model, f"layer 0 adds its branches times {scale:.4g}, a factor no config value explains")


def final_norm_call(model: torch.nn.Module, trace: Trace, last: Call) -> Call:
    """The module that reads the last layer's output: the final norm."""
    output = first_tensor(last.output)
    readers = [c for c in trace.group("outside") if c.order > last.order and c.input is output]
    if not readers:
        raise not_a_decoder(model, "no final norm reads the last layer's output")
    reader = min(readers, key=lambda c: c.order)
    if not is_norm(reader.module):
        raise not_a_decoder(model, f"the last layer's output goes to {reader.path} ({type(reader.module).__name__}),"
                            " not to a final norm")
    return reader


def norm_eps(norm: torch.nn.Module, text: Any) -> float | None:
    """The norm's epsilon: an attribute of the module, else the config's; None when neither has one."""
    for name in EPS_ATTRS:
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    for key in EPS_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def norm_formula(x: torch.Tensor, kind: str, eps: float, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> torch.Tensor:
    """RMSNorm or LayerNorm of x (float64) times ``weight`` plus ``bias``."""
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    out = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
    return out + bias if bias is not None else out


def norm_parameters(norm: torch.nn.Module, d_model: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The norm's weight (ones when it has none) and bias, as float64 CPU tensors."""
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    w = torch.ones(d_model, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    return w, (None if bias is None else bias.detach().double().cpu())


def probe_norm(model: torch.nn.Module, norm: torch.nn.Module, eps: float | None, d_model: int
               ) -> tuple[str, float, float]:
    """Which formula the final norm computes, found numerically on small inputs (where epsilon matters too):
    (rmsnorm | layernorm, weight offset 0 | 1, epsilon: the given one, else the best of EPS_GUESSES)."""
    param = next(model.parameters())
    x = 1e-3 * (torch.randn(4, d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5)
    with torch.inference_mode():
        y = norm(x.to(param.device, param.dtype)).double().cpu()
    x = x.to(param.dtype).double()  # what the norm saw
    weight, bias = norm_parameters(norm, d_model)
    errors = {(kind, offset, e): float((norm_formula(x, kind, e, weight + offset, bias) - y).abs().max())
              for kind in ("rmsnorm", "layernorm") for offset in (0.0, 1.0)
              for e in ((eps,) if eps is not None else EPS_GUESSES)}
    best = min(errors, key=errors.get)
    if errors[best] > 0.05 * float(y.abs().max()):
        raise not_a_decoder(model, f"the final norm {type(norm).__name__} is neither an RMSNorm nor a LayerNorm "
                            f"(error {errors[best]:.3g})")
    return best


def head_matrix(model: torch.nn.Module, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unembedding (vocab, d_model) and its bias (the first ``rows`` tokens if given), on the model's device."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise not_a_decoder(model, "it has no output embedding")
    bias = getattr(head, "bias", None)
    return head.weight.detach()[:rows], (None if bias is None else bias.detach()[:rows])


def logit_transform(model: torch.nn.Module, text: Any, normed: torch.Tensor, logits: torch.Tensor
                    ) -> tuple[float, float | None]:
    """(scale, soft-cap) with logits = cap·tanh(scale·raw/cap): the cap from the config, the scale fitted (on the
    first 4096 tokens of the vocabulary) and matched to a config value (Cohere's logit_scale, Granite's
    1/logits_scaling)."""
    caps = [getattr(text, key, None) for key in SOFTCAP_KEYS]
    cap = next((float(c) for c in caps if isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0), None)
    weight, bias = head_matrix(model, 4096)
    raw = normed.double() @ weight.double().T
    raw = raw + bias.double() if bias is not None else raw
    if logits.shape[1] != raw.shape[1]:
        raise not_a_decoder(model, f"its layers run on {raw.shape[1]} positions for {logits.shape[1]} positions of "
                            "logits: not one next-token prediction per position the layers see (a prompt or "
                            "positions of its own)")
    if logits.shape[:-1] != raw.shape[:-1] or logits.shape[-1] < raw.shape[-1]:
        raise not_a_decoder(model, f"its logits {tuple(logits.shape)} are not the unembedding of the final norm's "
                            f"output {tuple(normed.shape)}")
    z = logits[..., :raw.shape[-1]].double()
    if cap is not None:
        keep = z.abs() < 0.9 * cap
        raw, z = raw[keep], cap * torch.atanh(z[keep] / cap)
    scale = fitted_scale(z, raw)
    if float((z - scale * raw).abs().max()) > 10 * fit_tolerance(model) * float(z.abs().max()):
        raise not_a_decoder(model, "its logits are not a scaled unembedding of the final norm's output (the head "
                            "transforms it first)")
    values = numeric_config_values(text, r"logit|lm_head|output_mult")
    base = getattr(text, "dim_model_base", None)  # MiniCPM divides the last residual by hidden_size / dim_model_base
    if isinstance(base, (int, float)) and getattr(text, "hidden_size", None):
        values.append(float(base) / float(text.hidden_size))
    found = snap(scale, [1.0, *values, *(1.0 / v for v in values)], fit_tolerance(model))
    if found is None:
        raise not_a_decoder(model, f"its logits are the unembedding times {scale:.4g}, a factor no config value "
                            "explains")
    return found, cap


ACTIVATIONS = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


def head_transform(model: torch.nn.Module, trace: Trace, norm_call: Call, text: Any) -> dict[str, Any] | None:
    """The transform a BERT-style head applies between the final norm and the unembedding (Megatron-BERT,
    ModernBERT's decoder, XLM-RoBERTa-XL): a dense layer, an activation (a module or a function, found numerically)
    and a norm, as Structure fields plus ``value`` (what the unembedding reads); None when the unembedding reads
    the final norm's output."""
    head = model.get_output_embeddings()
    reads = [c for c in trace.group("outside") if c.module is head and c.order > norm_call.order]
    if not reads or head is None or equal(reads[0].input, norm_call.value):
        return None
    later = [c for c in trace.group("outside") if norm_call.order < c.order < reads[0].order]
    dense = next((c for c in later if isinstance(c.module, torch.nn.Linear) and equal(c.input, norm_call.value)),
                 None)
    norm = next((c for c in later if is_norm(c.module) and equal(reads[0].input, c.value)), None)
    if dense is None or norm is None or dense.value.shape != norm_call.value.shape:
        return None  # logit_transform names the failure
    d_model = int(norm_call.value.shape[-1])
    kind, offset, eps = probe_norm(model, norm.module, norm_eps(norm.module, text), d_model)
    weight, bias = norm_parameters(norm.module, d_model)
    for name, function in ACTIVATIONS.items():
        x = function(dense.value.double())
        out = norm_formula(x, kind, eps, weight + offset, bias)
        if float((out - reads[0].input.double()).abs().max()) <= 1e-4 * float(reads[0].input.abs().max()):
            return {"head_dense": dense.path, "head_activation": name, "head_norm": norm.path,
                    "value": reads[0].input}
    return None


def equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same values (the head reads a view of the final norm's output, not the tensor itself)."""
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def embedding_scale(model: torch.nn.Module, ids: torch.Tensor, first: torch.Tensor) -> float | None:
    """c with resid_pre[0] = c · embedding row when that holds (Gemma: sqrt(d_model)), else None."""
    rows = model.get_input_embeddings().weight.detach()[ids].double()
    scale = fitted_scale(first.double(), rows)
    if float((first.double() - scale * rows).abs().max()) > fit_tolerance(model) * float(first.double().abs().max()):
        return None
    return float(f"{scale:.6g}")


def layer_types(text: Any, count: int) -> tuple[str, ...] | None:
    """The config's per-layer attention kinds, when it lists one per layer."""
    types = getattr(text, "layer_types", None)
    return tuple(str(t) for t in types) if isinstance(types, (list, tuple)) and len(types) == count else None


def pick_layers(model: torch.nn.Module, counts: list[int]) -> tuple[str, Trace, torch.Tensor, torch.Tensor]:
    """The decoder-layer list (one with a configured layer count that a text forward runs), its trace, ids and
    logits."""
    ids = probe_ids(model)
    for count, path in ((count, path) for count in counts for path in layer_list(model, count)):
        try:
            trace, logits = run_probe(model, path, ids)
        except Exception as exc:  # noqa: BLE001 - any family's forward may fail in its own way
            if "pixel_values" in str(exc):  # BLIP-2, InstructBLIP, IDEFICS: the text model reads image features
                raise not_a_decoder(model, "its forward needs an image (pixel_values), not text alone") from exc
            raise DepthcacheError(f"{type(model).__name__} ({model.config.model_type}): a forward of "
                                  f"{ids.shape[1]} tokens fails ({type(exc).__name__}: {exc})") from exc
        if all(trace.block(i) is not None and trace.block(i).output is not None for i in range(count)):
            return path, trace, ids, logits
        idle = [i for i in range(count) if trace.block(i) is None]
        if 0 < len(idle) < count and all(trace.runs(i) == 1 for i in range(count) if i not in idle):
            drop_idle_layers(model, path, idle)
            trace, dropped = run_probe(model, path, ids)
            if not torch.equal(dropped, logits):
                raise not_a_decoder(model, f"its layers {idle} do not run on text, and removing them changes the "
                                    "logits")
            return path, trace, ids, logits
    looped = looping_layers(model, ids)
    if looped:
        raise not_a_decoder(model, f"its layers ({looped}) run several times per forward (in cycles or loops): a "
                            "layer has no single place in one residual stream's depth")
    raise not_a_decoder(model, f"no list of {' or '.join(map(str, counts))} layers runs on a text input")


def between_layers(model: torch.nn.Module, trace: Trace, count: int) -> None:
    """Refuse a model whose stream is not one vector passed from layer to layer: a norm between the layers
    (post-LN with the layers' parts in separate lists, XLM), or layers that take and return two streams
    (reversible residual layers, Reformer)."""
    norms = {id(c.output) for c in trace.group("outside") if is_norm(c.module) and c.output is not None}
    for layer in range(1, count):
        if id(trace.block(layer).input) in norms:
            raise not_a_decoder(model, f"the stream entering layer {layer} is a norm's output: it normalises the "
                                "residual stream between layers (post-LN)")
    first = trace.block(0)
    if first.streams_in >= 2 and first.streams_out >= 2:
        raise not_a_decoder(model, "its layers take and return two residual streams (a reversible residual), "
                            "not one vector")


def kv_reusing_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """The layers that attend with another layer's keys and values (Gemma 3n/4's ``num_kv_shared_layers``, Mistral
    Large 4's and Kolibri's ``kv_source_layers``), from the config."""
    text = model.config.get_text_config()
    count = len(decoder_layers(model))
    sources = getattr(text, "kv_source_layers", None)
    if isinstance(sources, (list, tuple)) and len(sources) == count:
        return tuple(i for i, source in enumerate(sources) if source != i)
    shared = getattr(text, "num_kv_shared_layers", 0)
    return tuple(range(count - shared, count)) if isinstance(shared, int) and 0 < shared <= count else ()


def check_layer_subset(model: torch.nn.Module, keep: tuple[int, ...] | list[int]) -> None:
    """Refuse running or keeping only the layers ``keep`` when one of them reuses keys and values that a dropped
    earlier layer computes: its attention would read nothing (a KeyError deep in the model) or another layer's."""
    kept = set(keep)
    reusing = [r for r in kv_reusing_layers(model) if r in kept and any(d not in kept for d in range(r))]
    if reusing:
        raise DepthcacheError(
            f"{type(model).__name__} shares keys and values across layers (layers {', '.join(map(str, reusing))} "
            "reuse those of earlier layers): runs from a later layer and pruned copies are not supported for it")


_IDLE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, ...]] = weakref.WeakKeyDictionary()


def drop_idle_layers(model: torch.nn.Module, path: str, idle: list[int]) -> None:
    """Remove the layers a text forward never runs (Mllama's cross-attention layers, which attend to an image) from
    the layer list, so every remaining layer runs once: the config's layer count, each attention's ``layer_idx``
    (its KV-cache slot) and any list of exactly those indices in the config or the list's owner (which told the
    forward to skip them: emptied) follow. The original indices are kept for ``Structure.idle_layers``."""
    parent, _, attr = path.rpartition(".")
    owner, text = submodule(model, parent), model.config.get_text_config()
    count = len(getattr(owner, attr))
    kept = [layer for i, layer in enumerate(getattr(owner, attr)) if i not in idle]
    for holder in (owner, text):
        for name, value in list(vars(holder).items()):
            if (isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value)
                    and sorted(v for v in value if v < count) == idle):  # indices past the list never applied
                setattr(holder, name, type(value)())
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    setattr(owner, attr, torch.nn.ModuleList(kept))
    for key in LAYER_COUNT_KEYS:
        if getattr(text, key, None) == len(kept) + len(idle):
            setattr(text, key, len(kept))
    _IDLE[model] = tuple(idle)


def looping_layers(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """The path of a module list whose every entry runs more than once in one forward (HRM's cycles), or None."""
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    runs: dict[int, int] = {}
    handles = [entry.register_forward_pre_hook(lambda m, args: runs.__setitem__(id(m), runs.get(id(m), 0) + 1))
               for _, layers in lists for entry in layers]
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return next((path for path, layers in lists if all(runs.get(id(e), 0) > 1 for e in layers)), None)


def input_norm(trace: Trace, count: int) -> Call | None:
    """A norm that only layer 0 has and applies to its input before anything else (RWKV's ``pre_ln``): the
    residual stream starts at its output, so that is ``resid_pre[0]``."""
    if count < 2:  # one layer: nothing to tell an input norm from the layer's own
        return None
    block, calls = trace.block(0), trace.group("child", 0)
    later = {c.path for layer in range(1, count) for c in trace.group("child", layer)}
    first = min(calls, key=lambda c: c.order, default=None)
    if first is None or not is_norm(first.module) or first.input is not block.input or first.path in later:
        return None
    return first


def unscaled_stream(model: torch.nn.Module) -> None:
    """Turn off RWKV's inference-time halving of the residual stream every ``rescale_every`` layers (an fp16 overflow
    guard that divides the output weights to match): the same logits up to the norms' epsilon, and a stream that is the plain
    sum of what the layers add. Refused when a forward in eval mode has already rescaled the weights."""
    config = model.config.get_text_config()
    every_n = getattr(config, "rescale_every", 0)
    if not isinstance(every_n, int) or every_n <= 0 or every_n >= (layer_count(config) or 0):
        return
    inner = next((m for m in model.modules() if hasattr(m, "layers_are_rescaled")), None)
    if inner is None or inner.layers_are_rescaled:
        raise not_a_decoder(model, f"it halves the residual stream every {every_n} layers (rescale_every); load it "
                            "with rescale_every=0 before any forward in eval mode")
    config.rescale_every = 0


def discover(model: torch.nn.Module) -> Structure:
    """The model's Structure, found from its module tree, one probe forward and its config."""
    config = getattr(model, "config", None)
    if config is None:
        raise DepthcacheError(f"{type(model).__name__} has no config: not a transformers model")
    model_type = str(getattr(config, "model_type", "?"))
    unscaled_stream(model)
    if getattr(config, "is_encoder_decoder", False):
        raise not_a_decoder(model, "it is an encoder-decoder")
    text = config.get_text_config()
    counts = layer_counts(text)
    if not counts:
        stacks = [k for k, v in text.to_dict().items() if isinstance(v, dict) and k.endswith("_config")]
        raise not_a_decoder(model, "its config gives no layer count" + (
            f": its layers are split over several stacks ({', '.join(stacks)})" if stacks else ""))
    path, trace, ids, logits = pick_layers(model, counts)
    count = len(submodule(model, path))
    between_layers(model, trace, count)
    layers = [layer_branches(model, trace, layer) for layer in range(count)]
    entry = input_norm(trace, count)
    stream = trace.block(0).input if entry is None else entry.value  # the residual layer 0 adds to
    scales = branch_scales(model, text, trace.block(0), layers[0].added, stream,
                           unclaimed_children(trace.group("child", 0), layers[0]))  # the layers before the head
    last = trace.block(count - 1)
    norm_call = final_norm_call(model, trace, last)
    d_model = int(first_tensor(last.output).shape[-1])
    kind, offset, eps = probe_norm(model, norm_call.module, norm_eps(norm_call.module, text), d_model)
    transform = head_transform(model, trace, norm_call, text)
    scale, cap = logit_transform(model, text, norm_call.value if transform is None else transform.pop("value"),
                                 logits)
    types = layer_types(text, count)
    return Structure(
        model_type=model_type, class_name=type(model).__name__, layers=path,
        attn=tuple(joined(b.attn_added) for b in layers), mlp=tuple(joined(b.mlp_added) for b in layers),
        final_norm=norm_call.path, norm_kind=kind, norm_eps=eps, norm_offset=offset,
        parallel=every(b.parallel for b in layers),
        attn_post_norm=every(is_norm(a.module) for b in layers for a in b.attn_added),
        mlp_post_norm=every(is_norm(a.module) for b in layers for a in b.mlp_added),
        attn_adds_residual=every(a.residual is not None for b in layers for a in b.attn_added),
        mlp_adds_residual=every(a.residual is not None for b in layers for a in b.mlp_added),
        **scales_fields(layers[0], scales),
        logit_scale=scale, logit_softcap=cap, embed_scale=embedding_scale(model, ids[0], stream[0]),
        tied_embeddings=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        moe_layers=tuple(i for i, b in enumerate(layers) if any(contains_experts(m.module) for m in b.mlps)),
        layer_types=types, sliding_window=attention_window(text, types),
        attn_classes=tuple("+".join(type(m.module).__name__ for m in b.mixers) for b in layers),
        language_model=language_model_class(model, path), idle_layers=_IDLE.get(model, ()),
        input_norm=None if entry is None else entry.path, **(transform or {}))


@dataclass(frozen=True, eq=False)
class Branches:
    """One layer's data flow: its token mixers and channel mixers (call order), the calls whose outputs it adds for
    each, and whether its MLP reads the layer input."""

    mixers: list[Call]
    mlps: list[Call]
    attn_added: list[Call]
    mlp_added: list[Call]
    parallel: bool | None  # None: the layer has no token mixer or no MLP

    @property
    def added(self) -> list[Call]:
        """Every call whose output the layer adds."""
        return [*self.attn_added, *self.mlp_added]


def layer_branches(model: torch.nn.Module, trace: Trace, layer: int) -> Branches:
    """What the probe saw of one decoder layer, or the refusal when it is not branches added to a residual."""
    children, inner, block = trace.group("child", layer), trace.group("inner", layer), trace.block(layer)
    if any(first_tensor(block.output) is c.output for c in [*children, *inner] if is_norm(c.module)):
        raise not_a_decoder(model, f"layer {layer} normalises the residual stream itself (post-LN)")
    family = type(model).__name__
    calls = flattened(model, children, inner, family)
    mixers, mlps = branch_modules(model, block, calls, layer)
    parallel = (reads_layer_input(calls, block, mixers[0], mlp_entry(calls, mixers[-1], mlps[0]))
                if mixers and mlps else None)
    pairs = [(c, added_output(calls, c, family)) for c in (*mixers, *mlps)]
    feeding = feeders(model, block, [added for _, added in pairs])
    kept = [(c, added) for (c, added), feeds in zip(pairs, feeding) if not feeds]
    mixers, mlps = [c for c, _ in kept if c in mixers], [c for c, _ in kept if c in mlps]
    attn_added, mlp_added = [a for c, a in kept if c in mixers], [a for c, a in kept if c in mlps]
    mlp_added, side = completed(model, block, calls, [*mixers, *mlps], attn_added, mlp_added, family)
    return Branches(mixers, [*mlps, *side], attn_added, mlp_added, parallel)


def completed(model: torch.nn.Module, block: Call, calls: list[Call], branches: list[Call], attn_added: list[Call],
              mlp_added: list[Call], family: str) -> tuple[list[Call], list[Call]]:
    """The channel mixers' added outputs and any side branch, when the layer's own are not yet its whole output:
    a norm of the sum of several channel mixers (Gemma 4's MoE block: the dense MLP's and the experts' outputs,
    each normed, summed and normed again), and the layer's last child that is no known branch, norm or dropout,
    added through its norm (Gemma 4's per-layer-input gate, a position-wise branch: a channel mixer). The first
    combination that makes out = a · input + b · what is added, exactly (the factors are branch_scales' to
    explain); the layer's own when none does."""
    if block.input is None or not (attn_added or mlp_added):
        return mlp_added, []
    out, inp = first_tensor(block.value).double().flatten(), block.input.double().flatten()
    tol = fit_tolerance(model) * float(out.abs().max())

    def fits(added: list[Call]) -> bool:  # out = a · input + b · Σ added, for any factors (checked later)
        if any(a.value is None or a.added.numel() != out.numel() for a in added):
            return False
        columns = torch.stack([inp, sum(a.added.double().flatten() for a in added)], 1)
        solution = torch.linalg.lstsq(columns, out.unsqueeze(1)).solution
        return float((out - (columns @ solution).squeeze(1)).abs().max()) <= tol

    if fits([*attn_added, *mlp_added]):
        return mlp_added, []
    last = max((c.order for c in (*branches, *mlp_added)), default=-1)
    sums = [[c] for c in calls if len(mlp_added) > 1 and is_norm(c.module) and c.order > last
            and c.value is not None and c.value.numel() == out.numel()]
    claimed = {c.path for c in (*branches, *attn_added, *mlp_added)}
    others = [c for c in calls if c.path not in claimed and not is_norm(c.module) and not is_dropout(c.module)
              and isinstance(c.value, torch.Tensor) and c.value.shape == block.input.shape]
    sides = [[]] + ([[others[-1]]] if others else [])
    for merged in (mlp_added, *sums):
        for side in sides:
            extra = [added_output(calls, c, family) for c in side]
            if fits([*attn_added, *merged, *extra]):
                return [*merged, *extra], side
    return mlp_added, []


def feeders(model: torch.nn.Module, block: Call, added: list[Call]) -> list[bool]:
    """Per branch, True when the layer's output is its input plus the other branches exactly and this one's
    coefficient is zero: it only feeds another branch (Zamba's shared transformer feeds its Mamba's input)."""
    shape = block.input.shape if block.input is not None else None
    if len(added) < 2 or shape is None or any(a.value is None or a.added.numel() != block.input.numel()
                                              for a in added):
        return [False] * len(added)
    columns = torch.stack([a.added.reshape(shape).double().flatten() for a in added], 1)
    target = (first_tensor(block.value).double() - block.input.double()).flatten()
    coefficients = torch.linalg.lstsq(columns, target.unsqueeze(1)).solution.squeeze(1)
    tol = fit_tolerance(model)
    if float((target - columns @ coefficients).abs().max()) > tol * float(target.abs().max()):
        return [False] * len(added)
    zero = [abs(float(c)) <= tol and bool(columns[:, i].any())  # a branch adding zeros here proves nothing
            for i, c in enumerate(coefficients)]
    return zero if not all(zero) else [False] * len(added)


def flattened(model: torch.nn.Module, children: list[Call], inner: list[Call], family: str) -> list[Call]:
    """A layer's children, each child that is itself a residual block (DBRX's NormAttentionNorm adds the attention
    to its input; Zamba's Mamba decoder layer its Mamba) replaced by its own children: the branches are inside."""
    out: list[Call] = []
    for call in children:
        own = direct_inner(call, inner)
        if own and is_residual_block(model, call, own, family):
            out.extend(flattened(model, own, inner, family))
        else:
            out.append(call)
    return sorted(out, key=lambda c: c.order)


def direct_inner(call: Call, inner: list[Call]) -> list[Call]:
    """The recorded calls of the direct children of ``call``'s module."""
    prefix = call.path + "."
    return [c for c in inner if c.path.startswith(prefix) and "." not in c.path[len(prefix):]]


def is_residual_block(model: torch.nn.Module, call: Call, own: list[Call], family: str) -> bool:
    """True when the child returns its input plus what its own attention, mixer or MLP children add (exactly, up
    to rounding): a residual block nested in the layer."""
    if call.value is None or call.input is None or call.value.shape != call.input.shape or is_norm(call.module):
        return False
    branches = [c for c in own if not is_norm(c.module) and not is_dropout(c.module) and branch_role(c, family)]
    added = [a.added for a in unique_paths([added_output(own, b, family) for b in branches])]
    if not added or any(a is None or a.numel() != call.value.numel() for a in added):
        return False
    total = sum(a.reshape(call.value.shape).double() for a in added)
    misfit = (call.value.double() - call.input.double() - total).abs().max()
    return float(total.abs().max()) > 0 and float(misfit) <= fit_tolerance(model) * float(call.value.abs().max())


def joined(calls: list[Call]) -> str:
    """One layer's paths of a role, as the structure stores them: '+'-joined ('' for none)."""
    return "+".join(c.path for c in calls)


def unclaimed_children(calls: list[Call], layer: Branches) -> list[Call]:
    """A layer's children that are neither norms, dropouts nor part of a branch (its modules or added outputs)."""
    claimed = {c.path for c in (*layer.mixers, *layer.mlps, *layer.added)}
    return [c for c in unique_paths(calls) if c.path not in claimed and not is_norm(c.module)
            and not is_dropout(c.module) and isinstance(c.output, torch.Tensor)]


def scales_fields(first: Branches, scales: tuple[float, ...]) -> dict[str, Any]:
    """The Structure fields of layer 0's branch scales: one ``branch_scale`` when they agree, else ``part_scales``
    naming each branch module (relative path) that is not added times 1."""
    if len(set(scales)) <= 1:
        return {"branch_scale": scales[0] if scales else 1.0}
    return {"part_scales": tuple((call.path, value) for call, value in zip(first.added, scales) if value != 1.0)}


def every(flags: Iterator[bool | None]) -> bool:
    """True when every known flag is true and at least one is known (None: the layer has no such branch)."""
    known = [f for f in flags if f is not None]
    return bool(known) and all(known)


def attention_window(text: Any, types: tuple[str, ...] | None) -> int | None:
    """The sliding window, when some layer uses one: every layer (no layer types) or the sliding ones."""
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    return window if types is None or any("sliding" in t for t in types) else None


_DISCOVERED: weakref.WeakKeyDictionary[torch.nn.Module, Structure] = weakref.WeakKeyDictionary()


def structure_of(model: torch.nn.Module) -> Structure:
    """The model's Structure, discovered once per model object."""
    found = _DISCOVERED.get(model)
    if found is None:
        found = _DISCOVERED[model] = discover(model)
    return found


def remember(model: torch.nn.Module, structure: Structure) -> None:
    """Record a model's structure (after pruning it in place, say) so it is not rediscovered."""
    _DISCOVERED[model] = structure


def model_head(model: torch.nn.Module, structure: Structure) -> dict[str, Any]:
    """The head as the store records it (float32 numpy, the keys of ``store.head.read_head``): the final norm's
    weight with any offset folded in (Gemma's 1 + w), its bias, the unembedding, the logits' scale and soft-cap."""
    d_model = int(model.get_output_embeddings().weight.shape[1])
    weight, bias = norm_parameters(submodule(model, structure.final_norm), d_model)
    unembed, unembed_bias = head_matrix(model)
    return {"norm_kind": structure.norm_kind, "eps": structure.norm_eps,
            "norm_weight": (weight + structure.norm_offset).float().numpy(),
            "norm_bias": None if bias is None else bias.float().numpy(),
            "unembed": unembed.float().cpu().numpy(),
            "unembed_bias": None if unembed_bias is None else unembed_bias.float().cpu().numpy(),
            "logit_scale": structure.logit_scale, "logit_softcap": structure.logit_softcap,
            "transform": None if structure.head_dense is None else head_transform_arrays(model, structure, d_model)}


def head_transform_arrays(model: torch.nn.Module, structure: Structure, d_model: int) -> dict[str, Any]:
    """A BERT-style head's transform as the store records it: the dense layer's weight and bias, the activation,
    the norm's kind, epsilon, weight (offset folded in) and bias (float32 numpy)."""
    dense, norm = submodule(model, structure.head_dense), submodule(model, structure.head_norm)
    kind, offset, eps = probe_norm(model, norm, norm_eps(norm, model.config.get_text_config()), d_model)
    weight, bias = norm_parameters(norm, d_model)
    return {"activation": structure.head_activation, "norm_kind": kind, "eps": eps,
            "dense_weight": dense.weight.detach().float().cpu().numpy(),
            "dense_bias": None if dense.bias is None else dense.bias.detach().float().cpu().numpy(),
            "norm_weight": (weight + offset).float().numpy(),
            "norm_bias": None if bias is None else bias.float().numpy()}

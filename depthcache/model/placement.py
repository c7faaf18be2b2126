"""Where a model's weights live and in which precision it computes: one device, a device map over several GPUs, the
host and disk (accelerate's dispatch, as ``from_pretrained(device_map=...)`` does), and ``--model-dtype``.

One ``Placement`` carries the options every command that runs a model takes (``--device-map``, ``--max-memory``,
``--offload-folder``, ``--model-dtype``); ``load_model(spec, device, placement=...)`` loads with it. A dispatched
model keeps some weights off its execution device (on the meta device, read from the host or disk on each
forward): ``onloaded`` brings a few modules' weights in while code reads them directly (the load check's head).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from depthcache.errors import DepthcacheError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device-map strategies
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}
HOST_SHARE = 0.9  # of the host's free memory a default --max-memory gives the weights, as transformers does
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")
_GPU = re.compile(r"(?:cuda:)?(\d+)")


@dataclass(frozen=True)
class Placement:
    """The placement options of one run (all None: the whole model on ``--device``, float32 on CPU, bf16 on CUDA).

    ``device_map``: a strategy (auto, balanced, balanced_low_0, sequential) or a JSON file mapping module names to
    devices; ``max_memory``: 'cuda:0=70GiB,cpu=100GiB'; ``offload_folder``: where weights beyond memory go;
    ``model_dtype``: float32, bfloat16 or float16. Checked when made: a bad value is one clear line."""

    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    model_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.model_dtype is not None and self.model_dtype not in MODEL_DTYPES:
            raise DepthcacheError(f"unknown --model-dtype {self.model_dtype!r}; choose from {', '.join(MODEL_DTYPES)}")
        parse_max_memory(self.max_memory)
        read_device_map(self.device_map)

    @property
    def dispatched(self) -> bool:
        """Whether the model is placed by a device map rather than moved whole onto one device."""
        return any(v is not None for v in (self.device_map, self.max_memory, self.offload_folder))

    def dtype(self, device: str) -> torch.dtype:
        """The precision the model computes in: as asked, else float32 on CPU and bfloat16 on CUDA."""
        if self.model_dtype is not None:
            return MODEL_DTYPES[self.model_dtype]
        return torch.bfloat16 if uses_cuda(self, device) else torch.float32

    def load_kwargs(self, device: str, host_free: int | None = None) -> dict[str, Any]:
        """``from_pretrained``'s placement keywords (none for a single device). ``--device cpu`` keeps weights off
        GPUs; without --max-memory the host gets ``HOST_SHARE`` of ``host_free`` (its free memory by default)."""
        if not self.dispatched:
            return {}
        memory = parse_max_memory(self.max_memory)
        if not uses_cuda(self, device) and not memory:
            memory = {"cpu": int(HOST_SHARE * (psutil.virtual_memory().available if host_free is None
                                               else host_free))}
        kwargs: dict[str, Any] = {"device_map": read_device_map(self.device_map) or "auto"}
        if memory:
            kwargs["max_memory"] = memory
        if self.offload_folder is not None:
            kwargs["offload_folder"] = str(Path(self.offload_folder).expanduser())
        return kwargs


def placed_attrs(model: torch.nn.Module) -> dict[str, Any]:
    """What a store records of where a model ran: its compute dtype and, if dispatched, its modules per device."""
    placed = device_counts(model)
    return {"model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **({"device_map": placed} if placed else {})}


def uses_cuda(placement: Placement, device: str) -> bool:
    """Whether the model computes on CUDA: ``--device`` cuda, or auto (or a device map) where CUDA is present."""
    if device.startswith("cuda"):
        return True
    if device == "auto" or placement.dispatched and device != "cpu":
        return torch.cuda.is_available()
    return False


def parse_size(text: str, where: str) -> int:
    """'70GiB', '512MB', '1.5TB' or a number of bytes → bytes."""
    found = _SIZE.fullmatch(text.lower())
    if not found or found.group(2) not in UNITS:
        raise DepthcacheError(f"--max-memory {where}: {text!r} is no size; write e.g. 70GiB, 512MiB or 8GB")
    return int(float(found.group(1)) * UNITS[found.group(2)])


def parse_max_memory(text: str | None) -> dict[int | str, int]:
    """'cuda:0=70GiB,cpu=100GiB' → accelerate's max_memory ({0: bytes, 'cpu': bytes}); None or '' → {}."""
    memory: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        gpu = _GPU.fullmatch(key)
        if not sep or not (gpu or key == "cpu"):
            raise DepthcacheError(f"--max-memory: {part!r} is not DEVICE=SIZE with DEVICE cpu or cuda:N, e.g. "
                                  "cuda:0=70GiB,cpu=100GiB")
        memory[int(gpu.group(1)) if gpu else "cpu"] = parse_size(size, key)
    return memory


def read_device_map(spec: str | None) -> str | dict[str, int | str] | None:
    """A strategy name as it is, or a JSON file's {module name: device} with devices as accelerate takes them
    (GPU index, 'cpu', 'disk')."""
    if spec is None or spec in STRATEGIES:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DepthcacheError(f"--device-map {spec!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a JSON file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DepthcacheError(f"--device-map {spec}: not readable JSON ({error})") from error
    if not isinstance(raw, dict) or not raw:
        raise DepthcacheError(f"--device-map {spec}: expected a JSON object mapping module names to devices")
    return {str(name): map_device(device, spec) for name, device in raw.items()}


def map_device(device: Any, spec: str) -> int | str:
    """One device of a device-map file: a GPU index (N or 'cuda:N'), 'cpu' or 'disk'."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str) and device in ("cpu", "disk"):
        return device
    if isinstance(device, str) and (gpu := _GPU.fullmatch(device)):
        return int(gpu.group(1))
    raise DepthcacheError(f"--device-map {spec}: device {device!r} is not a GPU index, 'cuda:N', 'cpu' or 'disk'")


def device_counts(model: torch.nn.Module) -> dict[str, int]:
    """Modules per device of a dispatched model's device map ({} for a model on one device)."""
    counts: dict[str, int] = {}
    for device in (getattr(model, "hf_device_map", None) or {}).values():
        name = f"cuda:{device}" if isinstance(device, int) else str(device)
        counts[name] = counts.get(name, 0) + 1
    return counts if len(counts) > 1 or set(counts) & {"disk"} else {}


def main_device(model: torch.nn.Module) -> str:
    """The device inputs go to and outputs come back on: a dispatched model's first GPU in its map, else the host;
    an undispatched model's parameters' device."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        gpus = [d for d in placed.values() if isinstance(d, int) or str(d).startswith("cuda")]
        return (f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else str(gpus[0])) if gpus else "cpu"
    parameter = next(iter(model.parameters()), None)
    return "cpu" if parameter is None else str(parameter.device)


def offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate keeps this module's own weights off its execution device (read in for each forward)."""
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


@contextmanager
def onloaded(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Inside, the offloaded ones of ``modules`` hold their weights on their execution device (as during their
    forward), so code may read or call them directly; afterwards they are offloaded again."""
    with ExitStack() as stack:
        for module in modules:
            if offloaded(module):
                hook = module._hf_hook
                hook.pre_forward(module)
                hook.offload = False
                stack.callback(restore_offload, module)
        yield


def restore_offload(module: torch.nn.Module) -> None:
    """Send a module brought in by ``onloaded`` back to the meta device, offloaded as before."""
    module._hf_hook.offload = True
    module._hf_hook.post_forward(module, None)


def outer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules outside every ModuleList: embeddings, final norm, unembedding (not the decoder layers)."""
    inner = {id(sub) for m in model.modules() if isinstance(m, torch.nn.ModuleList) for sub in m.modules()}
    return [m for m in model.modules() if id(m) not in inner]


def state_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on the host) of a model's state dict, in name order, offloaded weights read in one module at
    a time (so a model larger than memory is walked, never held)."""
    modules = dict(model.named_modules())
    for name in sorted(model.state_dict(keep_vars=True)):
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        with onloaded([module]):
            yield name, getattr(module, attr).detach().cpu()


def weight_bytes(folder: Path, dtype: torch.dtype) -> int | None:
    """Bytes of a model folder's parameters and buffers in ``dtype`` (floating tensors), built on the meta device
    from its config: what its weights take once loaded, known before loading; None where transformers cannot build
    it from its config alone (the load itself then says why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError, RuntimeError):
        return None
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
    return total


def make_resident(modules: list[torch.nn.Module]) -> None:
    """Keep the offloaded ones of ``modules`` on their execution device for good (a model depthcache loaded keeps
    its embeddings, final norm and unembedding in memory: code that reads them or asks where the model's first
    parameter lives then works as on an undispatched model)."""
    for module in modules:
        if offloaded(module):
            module._hf_hook.pre_forward(module)
            module._hf_hook.offload = False

"""Mixture-of-experts layouts: where an architecture keeps its routed experts, in memory and on disk.

transformers (v5) holds the routed experts of a layer fused in two 3-D parameters of one experts module,
``gate_up_proj`` and ``down_proj``, and PEFT's ``target_parameters`` adapters name those.  Most checkpoints
on disk still store one 2-D tensor per expert and projection (``mlp.experts.{e}.gate_proj.weight``;
Mixtral: ``block_sparse_moe.experts.{e}.w1.weight``), which transformers concatenates at load time;
gpt-oss and Llama 4 store the fused tensors themselves.  This module is the one place that knows those
names, how gate and up share ``gate_up_proj`` (concatenated, or interleaved for gpt-oss), which way a
fused tensor is oriented, and what PEFT makes of it (the experts module's ``is_transposed`` attribute).

Torch-free: config dicts and tensor names in, layouts and names out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .arch import config_value
from .errors import CheckpointError

# The order in which transformers' experts classes register their parameters.  PEFT wraps the
# first-registered targeted parameter first, so when several parameters of one experts module are
# targeted, the innermost wrapper (``experts.base_layer.lora_A``) is the earliest in this order.
EXPERT_PARAM_ORDER = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

MAX_EXPERTS = 2**20  # top-k's bound where neither config.json nor the tensors say how many experts there are
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
ACTIVE_EXPERTS_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")


@dataclass(frozen=True)
class MoeLayout:
    """How one architecture family stores its routed experts."""

    name: str
    experts: str = "mlp.experts"  # the experts module inside a decoder layer, in memory
    # fused parameter -> the per-expert module names it is made of on disk, in order along its output
    # dimension; empty when the checkpoint stores the fused tensors themselves
    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()  # in-memory path segment -> on-disk segment (Mixtral)
    interleaved: bool = False  # gate/up alternate along gate_up_proj's output dim (gpt-oss)
    stored_in_out: bool = False  # fused tensors are (E, in, out), used as x @ P[e]; else (E, out, in)
    peft_transposed: bool = False  # the experts module's ``is_transposed`` (absent counts as False in PEFT)
    router: str = "mlp.gate"

    @property
    def per_expert_on_disk(self) -> bool:
        return bool(self.parts)

    def to_disk(self, path: str) -> str:
        """An in-memory module path under its on-disk name (Mixtral's ``mlp`` is ``block_sparse_moe``)."""
        out = f".{path}."
        for mem, disk in self.renames:
            out = out.replace(f".{mem}.", f".{disk}.")
        return out[1:-1]

    def from_disk(self, path: str) -> str:
        out = f".{path}."
        for mem, disk in self.renames:
            out = out.replace(f".{disk}.", f".{mem}.")
        return out[1:-1]

    def part(self, p: ExpertParam, e: int, part: str) -> ExpertPart:
        """Where expert ``e``'s ``part`` (``gate_proj``, ``w3``...) of the fused parameter ``p`` lives: the stored
        tensor (the fused one, slab ``e``; or expert ``e``'s own 2-D tensor), its rows in the expert's (d1, d2)
        slab of the in-memory parameter, and its name as a per-expert module on disk.  The one place that
        answers it: routes ask here instead of re-deriving names, orders and slices."""
        parts = self.parts.get(p.param, ())
        if part not in parts:
            raise KeyError(f"{self.name} has no part {part!r} in {p.param} (parts: {', '.join(parts) or 'none'})")
        i = parts.index(part)
        if p.fused:
            rows = part_slices(self, [p.shape[0] // len(parts)] * len(parts))[i]
            tensor, slab = p.fused, e
        else:
            rows, tensor, slab = part_slices(self, p.part_rows)[i], p.per_expert[e][i], None
        count = len(range(*rows.indices(p.shape[0])))
        return ExpertPart(tensor, slab, rows, count, f"{self.to_disk(p.module)}.{e}.{part}")


@dataclass(frozen=True)
class ExpertPart:
    """One expert's part of a fused parameter, located (:meth:`MoeLayout.part`)."""

    tensor: str  # the stored tensor that holds it
    slab: int | None  # its index along a fused tensor's first dimension; None: a per-expert tensor of its own
    rows: slice  # its rows in the expert's (d1, d2) slab of the in-memory parameter (a step where interleaved)
    count: int  # how many rows that is (a per-expert module's out_features)
    module: str  # the per-expert module on disk, ``<experts>.<e>.<part>`` (as per-expert adapters name it)


_QWEN2_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
QWEN2_MOE = MoeLayout("qwen2_moe", parts=_QWEN2_PARTS)
MIXTRAL = MoeLayout(
    "mixtral",
    parts={"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
    renames=(("mlp", "block_sparse_moe"),),
)
GPT_OSS = MoeLayout("gpt_oss", interleaved=True, stored_in_out=True, peft_transposed=True, router="mlp.router")
LLAMA4 = MoeLayout("llama4", experts="feed_forward.experts", stored_in_out=True, router="feed_forward.router")

# model_type -> layout: transformers' conversion_mapping (``_MODEL_TO_CONVERSION_PATTERN``) and the
# experts classes that have no conversion (fused on disk).
_BY_MODEL_TYPE: dict[str, MoeLayout] = {
    **dict.fromkeys(
        (
            "qwen2_moe",
            "qwen3_moe",
            "qwen3_next",
            "qwen3_omni_moe",
            "qwen3_omni_moe_thinker",
            "qwen3_omni_moe_text",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "olmoe",
            "flex_olmo",
            "glm4_moe",
            "glm4_moe_lite",
            "glm4v_moe",
            "glm_moe_dsa",
            "dots1",
            "ernie4_5_moe",
            "hunyuan_v1_moe",
            "longcat_flash",
            "exaone_moe",
            "cohere2_moe",
            "afmoe",
            "solar_open",
            "sarvam_mla",
            "mellum",
            "beam",
        ),
        QWEN2_MOE,
    ),
    "mixtral": MIXTRAL,
    "minimax": MIXTRAL,
    "minimax_m2": MIXTRAL,
    "gpt_oss": GPT_OSS,
    "llama4": LLAMA4,
    "llama4_text": LLAMA4,
}


def layout_for(config: dict[str, Any] | None, keys: Iterable[str] = ()) -> MoeLayout | None:
    """The experts layout of a model: from ``model_type``, else recognised from per-expert tensor names."""
    model_type = config_value(config, "model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    for k in keys:
        if _PER_EXPERT.search(k):
            return MIXTRAL if ".block_sparse_moe." in k else QWEN2_MOE
    return None


_PER_EXPERT = re.compile(r"\.experts\.\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_EXPERT_INDEX = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<part>[^.]+)$")


def wrapper_depths(paths: Iterable[str]) -> dict[str, int]:
    """PEFT's ParamWrapper depth of each targeted expert parameter (``module.param``): several on one module
    nest, the last-registered outermost (depth 0, ``experts.lora_A``), the others under ``base_layer``."""
    by_module: dict[str, list[str]] = {}
    for path in paths:
        mod, _, param = path.rpartition(".")
        by_module.setdefault(mod, []).append(param)
    out = {}
    for mod, names in by_module.items():
        ordered = sorted(names, key=EXPERT_PARAM_ORDER.index)
        for i, name in enumerate(ordered):
            out[f"{mod}.{name}"] = len(ordered) - 1 - i
    return out


def per_expert_regex(experts: str, part: str) -> str:
    """A regex for the per-expert modules ``<experts>.<e>.<part>`` of every expert that also matches
    ``<experts>.<part>``: the name PEFT's conversion of per-expert adapters probes a ``target_modules`` regex
    with, so that the experts are not dropped."""
    return rf"{re.escape(experts)}(?:\.\d+)?\.{re.escape(part)}"


def part_slices(layout: MoeLayout | None, part_rows: list[int]) -> list[slice]:
    """Where each part (gate, up) lies along a fused parameter's output dimension: one block after the
    other, or every n-th row from the part's index when the layout interleaves them."""
    if layout is not None and layout.interleaved and len(part_rows) > 1:
        return [slice(i, None, len(part_rows)) for i in range(len(part_rows))]
    out, start = [], 0
    for n in part_rows:
        out.append(slice(start, start + n))
        start += n
    return out


def num_experts(config: dict[str, Any] | None) -> int | None:
    for k in NUM_EXPERTS_KEYS:
        v = config_value(config, k)
        if isinstance(v, int) and v > 0:
            return v
    return None


def active_experts(config: dict[str, Any] | None, experts: int | None = None, source: Any = None) -> int | None:
    """Routed experts each token goes through (``num_experts_per_tok``): an integer from 1 to E, the config's
    expert count or ``experts`` (the tensors' own; the smaller of the two); anything else is refused by name (``source``: the file)
    rather than counting every expert.  A per-layer list (Hunyuan's ``moe_topk``) is not read: None."""
    for k in ACTIVE_EXPERTS_KEYS:
        v = config_value(config, k)
        if v is None or isinstance(v, list):
            continue
        known = [x for x in (num_experts(config), experts) if x]
        e = min(known) if known else None
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= (e or MAX_EXPERTS)):
            shown = json.dumps(v)[:40]
            raise CheckpointError(
                f"{k} must be an integer from 1 to {e or MAX_EXPERTS} (the routed experts of a layer), not {shown}",
                path=source,
                hint="fix it in config.json",
            )
        return v
    return None


def split_expert_module(module: str) -> tuple[str, int, str] | None:
    """``model.layers.0.mlp.experts.3.gate_proj`` -> (``model.layers.0.mlp.experts``, 3, ``gate_proj``)."""
    m = _EXPERT_INDEX.match(module)
    return (m["experts"], int(m["e"]), m["part"]) if m else None


# -- where the experts of a base live ----------------------------------------------------------------


@dataclass
class ExpertParam:
    """One fused expert parameter of one layer, as the base stores it.

    ``fused`` is the key of the 3-D tensor (E, d1, d2) when the base stores it fused; otherwise
    ``per_expert[e]`` lists the 2-D (out, in) tensors of expert ``e`` in the order they stack along
    the parameter's output dimension (gate rows then up rows)."""

    module: str  # in-memory experts module, e.g. model.layers.0.mlp.experts
    param: str  # gate_up_proj | down_proj
    experts: int
    shape: tuple[int, int]  # one expert's slab of the in-memory parameter, (d1, d2)
    fused: str | None = None
    per_expert: list[list[str]] = field(default_factory=list)
    part_rows: list[int] = field(default_factory=list)  # per-expert: rows of each part ((out, in) tensors)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.param}"

    def keys(self) -> list[str]:
        return [self.fused] if self.fused else [k for ks in self.per_expert for k in ks]


def find_expert_params(shapes: dict[str, tuple[int, ...]], layout: MoeLayout | None) -> dict[str, ExpertParam]:
    """Every fused expert parameter of a base (``module.param`` in memory -> where it lives), from its
    tensor names and shapes.  Fused 3-D tensors are found under any layout; per-expert tensors need
    the layout's part names."""
    found: dict[str, ExpertParam] = {}
    params = tuple(p for p in EXPERT_PARAM_ORDER if not p.endswith("_bias"))
    for key, shape in shapes.items():
        mod, _, param = key.rpartition(".")
        if param in params and len(shape) == 3 and mod.endswith("experts"):
            mem = layout.from_disk(mod) if layout else mod
            found[f"{mem}.{param}"] = ExpertParam(mem, param, shape[0], (shape[1], shape[2]), fused=key)
    if layout is None or not layout.parts:
        return found
    by_part = {part: (param, i) for param, parts in layout.parts.items() for i, part in enumerate(parts)}
    grouped: dict[tuple[str, str], dict[int, dict[int, str]]] = {}
    for key in shapes:
        mod, _, leaf = key.rpartition(".")
        hit = split_expert_module(mod) if leaf == "weight" else None
        if hit is None or hit[2] not in by_part:
            continue
        experts, e, part = hit
        param, i = by_part[part]
        grouped.setdefault((layout.from_disk(experts), param), {}).setdefault(e, {})[i] = key
    for (mem, param), per in grouped.items():
        n = len(layout.parts[param])
        complete = sorted(per) == list(range(len(per))) and all(len(v) == n for v in per.values())
        if not complete:
            continue
        keys = [[per[e][i] for i in range(n)] for e in range(len(per))]
        rows = [shapes[k][0] for k in keys[0]]
        cols = {shapes[k][1] for ks in keys for k in ks if len(shapes[k]) == 2}
        if len(cols) == 1 and all(
            len(shapes[k]) == 2 and shapes[k][0] == r for ks in keys for k, r in zip(ks, rows, strict=True)
        ):
            found[f"{mem}.{param}"] = ExpertParam(
                mem, param, len(per), (sum(rows), cols.pop()), per_expert=keys, part_rows=rows
            )
    return found


def expert_tensor_experts(shapes: dict[str, tuple[int, ...]], layout: MoeLayout | None) -> dict[str, int]:
    """Base tensor key -> the number of experts it is one of (per-expert tensors) or holds (fused)."""
    out: dict[str, int] = {}
    for p in find_expert_params(shapes, layout).values():
        if p.fused:
            out[p.fused] = p.experts
        for keys in p.per_expert:
            for k in keys:
                out[k] = p.experts
    return out


def memory_names(shapes: dict[str, tuple[int, ...]], layout: MoeLayout | None) -> dict[str, list[str]]:
    """The base's tensors under the names transformers gives them in memory (what PEFT's in-model state dict
    uses): each key -> the stored tensors it is made of, in order.  Per-expert tensors become one fused
    parameter (gate rows, then up rows, expert after expert), placed where its first tensor was; Mixtral's
    ``block_sparse_moe`` is ``mlp``."""
    per_expert = [p for p in find_expert_params(shapes, layout).values() if p.per_expert]
    first = {p.per_expert[0][0]: p for p in per_expert}
    taken = {k for p in per_expert for k in p.keys()}
    out: dict[str, list[str]] = {}
    for key in shapes:
        if key in first:
            out[first[key].path] = first[key].keys()
        elif key not in taken:
            out[layout.from_disk(key) if layout else key] = [key]
    return out

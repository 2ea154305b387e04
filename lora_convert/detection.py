"""Which storage form a checkpoint is in, and the evidence — from headers only.

Only ``--base`` comparisons read tensor data (to tell a base from a merged model)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .arch import layout_of, short_name
from .config import TUNER_PEFT_TYPES, AdapterConfig
from .inputs import load_source, open_local, resolve
from .inventory import ROTATION_TUNERS, Inventory, LoraModule
from .io.reader import ADAPTER_WEIGHTS, Checkpoint, named_adapters
from .module_match import match_modules
from .moe_layouts import split_expert_module


@dataclass
class ModuleGroup:
    """All modules of one kind (``q_proj``) in one adapter."""

    name: str
    count: int
    layers: list[int]
    ranks: list[int]
    alphas: list[float]
    scalings: list[float]
    # LyCORIS files: the algorithm of each module of the group (lora, loha, lokr, full); None (and left out of
    # the JSON) where every module is LoRA
    algorithms: list[str] | None = None


@dataclass
class ExpertGroup:
    """LoRA on routed experts: one entry per fused parameter (PEFT target_parameters: one A/B pair shared by
    the E experts of a layer) or per projection of per-expert modules (one pair per expert)."""

    name: str  # gate_up_proj, down_proj (fused) or gate_proj, w1, ... (per expert)
    layout: str  # "fused" | "per-expert"
    count: int  # LoRA modules: layers (fused) or layers × experts (per expert)
    layers: list[int]
    experts: list[int]  # E per layer
    ranks: list[int]  # per expert
    b_layout: str | None = None  # fused: rank_major (PEFT) | grouped_by_expert
    b_layout_assumed: bool = False  # no lora_B_layout marker: PEFT's packing assumed
    nested: bool = False  # fused: an inner ParamWrapper (keys under experts.base_layer)


@dataclass
class AdapterSummary:
    name: str
    target_modules: list[str]
    layers: list[int]
    ranks: list[int]
    lora_alpha: float | None
    use_rslora: bool
    dora: bool
    lora_bias: bool
    modules_to_save: list[str]
    saved_layers: list[str]  # base layers saved whole in the adapter (embeddings of a resized vocab, biases)
    trainable_tokens: dict[str, int]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules: list[ModuleGroup]
    lora_parameters: int
    experts: list[ExpertGroup] = field(default_factory=list)
    # another PEFT tuner (LoHa, LoKr): its peft_type, its modules' factor layouts and its config's key parameters
    tuner: dict[str, Any] = field(default_factory=dict)


@dataclass
class DetectResult:
    form: str  # adapter | unmerged | plain | base | merged | fine-tuned (the last three need --base)
    path: str
    layout: str
    files: list[str]
    tensors: int
    total_bytes: int
    dtypes: dict[str, int]
    dialect: str = "peft"
    adapters: list[AdapterSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    differs_from_base: list[str] = field(default_factory=list)
    base_comparison: dict[str, Any] | None = None
    module_prefixes: dict[str, str] = field(default_factory=dict)  # part -> prefix (VLM layouts, diffusion components)
    base_match: dict[str, Any] | None = None  # adapter + --base: how its modules match the base's names
    quantization: dict[str, Any] | None = None  # a quantized checkpoint: scheme, weights, bytes (io/quantized.summary)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for a in out["adapters"]:  # only another tuner's adapters carry the key: LoRA documents stay as they were
            if not a["tuner"]:
                del a["tuner"]
            for g in a["modules"]:  # only LyCORIS files say which algorithm each module group uses
                if g["algorithms"] is None:
                    del g["algorithms"]
        return out


def _summarise(
    ck: Checkpoint, inv: Inventory, name: str, cfg: AdapterConfig | None, warnings: list[str]
) -> AdapterSummary:
    mods = inv.modules(name)
    groups: dict[str, list] = {}
    params = 0
    for m in mods.values():
        groups.setdefault(m.name, []).append(m)
        if m.tuner != "lora":  # LoHa/LoKr: the factors PEFT trains, as stored
            params += m.factor_params
            continue
        if m.trained_params is not None:  # another tuner read as LoRA (AdaLoRA's lora_E): its own count
            params += m.trained_params
            continue
        params += m.stored_rank * (m.in_features + m.out_features)
        if m.magnitude_key:
            params += m.out_features
        if m.bias_key:
            params += m.out_features
    mg = []
    for g, ms in sorted(groups.items()):
        added = [m for m in ms if m.tuner not in ROTATION_TUNERS]  # a rotation has no alpha and no scaling
        alphas = sorted({cfg.alpha_for(m.config_key) for m in added}) if cfg else []
        scal = sorted({round(m.scaling, 6) for m in added if m.scaling is not None})
        algos = sorted({m.tuner for m in ms})
        mg.append(
            ModuleGroup(
                g,
                len(ms),
                sorted({m.layer for m in ms if m.layer is not None}),
                sorted({m.rank for m in ms}),
                alphas,
                scal,
                None if algos == ["lora"] else algos,
            )
        )
    replace = inv.replace.get(name, {})
    saved = inv.saved_layers.get(name, set())
    for bk, k in replace.items():
        if bk not in saved:  # layers PEFT saves whole (save_embedding_layers) are not trained parameters
            params += ck.info(k).numel
    tokens = {short_name(m): ck.info(k).shape[0] for m, k in inv.tokens.get(name, {}).items()}
    for k in inv.tokens.get(name, {}).values():
        params += ck.info(k).numel
    warnings += inv.warnings.get(name, [])
    warnings += [str(e) for e in inv.problems.get(name, [])]  # conversions refuse these; detect reports them
    if cfg is not None:
        has_mag = any(m.magnitude_key for m in mods.values())
        if cfg.use_dora and mods and not has_mag:
            warnings.append(f"adapter {name}: use_dora is set but no lora_magnitude_vector tensors were found")
        if has_mag and not cfg.use_dora:
            warnings.append(f"adapter {name}: DoRA magnitude tensors found but use_dora is false in the config")
        for reason in cfg.unsupported_reasons():
            warnings.append(f"adapter {name}: not plain LoRA: {reason}")
    return AdapterSummary(
        name=name,
        target_modules=sorted(groups),
        layers=sorted({m.layer for m in mods.values() if m.layer is not None}),
        ranks=sorted({m.rank for m in mods.values()}),
        lora_alpha=cfg.lora_alpha if cfg else None,
        use_rslora=bool(cfg.use_rslora) if cfg else False,
        dora=any(m.magnitude_key for m in mods.values()),
        lora_bias=any(m.bias_key for m in mods.values() if m.tuner == "lora"),  # (a full diff's diff_b is none)
        modules_to_save=sorted({k.rsplit(".", 1)[0] for k in replace if k not in inv.saved_layers.get(name, ())}),
        saved_layers=sorted(inv.saved_layers.get(name, ())),
        trainable_tokens=tokens,
        rank_pattern=dict(cfg.rank_pattern) if cfg else {},
        alpha_pattern=dict(cfg.alpha_pattern) if cfg else {},
        modules=mg,
        lora_parameters=params,
        experts=expert_groups(mods.values()),
        tuner={**tuner_summary(mods.values(), cfg), **inv.tuner.get(name, {})},  # (dialects/additive's tuners: both)
    )


def expert_groups(mods: Iterable[LoraModule]) -> list[ExpertGroup]:
    """The expert LoRA of one adapter, grouped by parameter (fused) or projection (per expert)."""
    fused: dict[str, list[LoraModule]] = {}
    per: dict[str, dict[str, set[int]]] = {}  # projection -> experts module -> expert indices
    per_mods: dict[str, list[LoraModule]] = {}
    for m in mods:
        if m.kind == "experts":
            fused.setdefault(m.name, []).append(m)
        elif (hit := split_expert_module(m.module)) is not None:
            experts, e, part = hit
            per.setdefault(part, {}).setdefault(experts, set()).add(e)
            per_mods.setdefault(part, []).append(m)
    out = [
        ExpertGroup(
            name,
            "fused",
            len(ms),
            sorted({m.layer for m in ms if m.layer is not None}),
            sorted({m.experts for m in ms}),
            sorted({m.rank for m in ms}),
            "/".join(sorted({m.b_layout for m in ms})),
            any(m.b_layout_assumed for m in ms),
            any(m.nest for m in ms),
        )
        for name, ms in sorted(fused.items())
    ]
    for part, by_experts in sorted(per.items()):
        ms = per_mods[part]
        out.append(
            ExpertGroup(
                part,
                "per-expert",
                len(ms),
                sorted({m.layer for m in ms if m.layer is not None}),
                sorted({max(es) + 1 for es in by_experts.values()}),
                sorted({m.rank for m in ms}),
            )
        )
    return out


def detect(
    path: str | Path, *, base: str | Path | None = None, adapter: str | None = None, progress: bool = False
) -> DetectResult:
    """Say which form ``path`` is in: adapter, unmerged, plain (or, with ``base``: base, merged, fine-tuned).
    ``progress``: a bar while a plain checkpoint is compared with ``base`` (the only step that reads data).

    A folder of adapters PEFT saved together is described whole: every adapter is listed, under the name
    ``--adapter`` takes (``default`` at the top, the others in subfolders named after them)."""
    first, others = _adapter_folders(resolve(path)) if adapter is None else (None, [])
    res = _detect_one(path, base, adapter or first, progress)
    if first is not None:
        res.files = [f"{first}/{f}" for f in res.files]
    for name in others:
        _add_adapter_folder(res, _detect_one(path, None, name), name)
    return res


def _adapter_folders(root: Path) -> tuple[str | None, list[str]]:
    """(the subfolder adapter to read first, the other subfolder adapters) of a folder of adapters: PEFT
    saves ``default`` at the top and each other adapter in a subfolder named after it."""
    subs = named_adapters(root)
    if not subs:
        return None, []
    if any((root / f).is_file() for f in ADAPTER_WEIGHTS):
        return None, subs
    if any(p.is_file() and p.suffix in (".safetensors", ".bin") for p in root.iterdir()):
        return None, []  # a model with adapters stored beside it: the model is what is described
    return subs[0], subs[1:]


def _add_adapter_folder(res: DetectResult, sub: DetectResult, name: str) -> None:
    res.adapters += sub.adapters
    res.files += [f"{name}/{f}" for f in sub.files]
    res.tensors += sub.tensors
    res.total_bytes += sub.total_bytes
    for k, v in sub.dtypes.items():
        res.dtypes[k] = res.dtypes.get(k, 0) + v
    res.warnings += [w for w in sub.warnings if w not in res.warnings]


def _detect_one(path: str | Path, base: str | Path | None, adapter: str | None, progress: bool = False) -> DetectResult:
    ck, inv = load_source(path, adapter=adapter)
    with ck:
        warnings: list[str] = []
        if inv.form in ("adapter", "unmerged") and not inv.configs:
            warnings.append("no adapter_config.json: rank comes from the tensors, alpha and scaling are unknown")
        res = DetectResult(
            form=inv.form,
            path=str(path),
            layout=ck.layout,
            files=[str(f.relative_to(ck.root)) if f.is_relative_to(ck.root) else str(f) for f in ck.files],
            tensors=len(ck.tensors),
            total_bytes=ck.total_bytes,
            dtypes=ck.dtypes(),
            dialect=inv.dialect,
            warnings=warnings,
        )
        res.quantization = _quantization(ck, warnings)
        for name in inv.adapters:
            res.adapters.append(_summarise(ck, inv, name, inv.config(name), warnings))
        if inv.old_layout:
            warnings.append("older PEFT layout: base weights at <module>.weight beside the LoRA tensors")
        res.module_prefixes = layout_of(m for name in inv.adapters for m in inv.modules(name))
        if base is not None and inv.form == "plain":
            _compare_with_base(ck, resolve(base), res, progress)
        elif base is not None and inv.form == "adapter":
            _match_base(inv, resolve(base), res)
    return res


def _match_base(inv: Inventory, base_path: Path, res: DetectResult) -> None:
    """How an adapter's modules find the base's tensors (headers only): prefixes read differently,
    parts left out, modules that match nothing or more than one tensor."""
    with open_local(base_path) as b:
        mods = sorted({m for name in inv.adapters for m in inv.modules(name)})
        match = match_modules(mods, b.tensors, spelled=inv.spelled, config=b.config)
    res.base_match = match.to_dict()
    res.warnings += match.notes()
    if match.unmatched:
        res.warnings.append(f"{len(match.unmatched)} module(s) match no tensor of the base, e.g. {match.unmatched[0]}")
    for m, hits in list(match.ambiguous.items())[:1]:
        res.warnings.append(
            f"{len(match.ambiguous)} module(s) can be read as several base modules: {m} is {' or '.join(hits)}"
        )


def _quantization(ck: Checkpoint, warnings: list[str]) -> dict[str, Any] | None:
    """The quantization of a checkpoint, from headers; one that cannot be read is a warning here (merge
    refuses it with the error)."""
    from .errors import LoraConvertError
    from .io.quantized import find_layout, summary

    try:
        layout = find_layout(ck)
    except LoraConvertError as exc:
        warnings.append(f"quantized, but not in a layout lora-convert reads: {exc}")
        return None
    return summary(ck, layout) if layout is not None else None


def _compare_with_base(ck: Checkpoint, base_path: Path, res: DetectResult, progress: bool = False) -> None:
    """Tensor-by-tensor comparison with a base: equal everywhere is ``base``; a difference of low
    effective rank in every changed weight is ``merged`` (a LoRA folded in); anything else —
    full-rank changes, or only norms/biases/resized tables — is ``fine-tuned``."""
    from .compare import analyse_difference  # effective rank per module; imported late (torch, SVD)

    with open_local(base_path) as b:
        res.base_comparison = analyse_difference(ck, b, progress=progress)
    res.differs_from_base = list(res.base_comparison.get("changed", []))
    if not res.differs_from_base:
        res.form = "base"
        return
    k = res.base_comparison.get("k", 64)
    weights = [e for e in res.base_comparison["modules"].values() if e["kind"] in ("linear", "embedding", "lm_head")]

    def low(e: dict) -> bool:  # low next to the matrix: at most half of what the shape (and k) allow
        cap = min(k, *e["shape"]) // 2
        r, gap = e.get("rank_at_energy"), e.get("rank_at_gap")
        return (r is not None and r <= cap) or (gap is not None and gap <= cap)

    low_rank = bool(weights) and all(low(e) for e in weights)
    res.form = "merged" if low_rank else "fine-tuned"


def tuner_summary(modules: Iterable[LoraModule], cfg: AdapterConfig | None) -> dict[str, Any]:
    """A LoHa/LoKr adapter's type and what shapes its ΔW: the config's conv and decomposition switches and,
    per factor layout (``hada_w1_a+hada_w1_b+...``), how many modules use it."""
    tuned = [m for m in modules if m.tuner != "lora"]
    if not tuned or cfg is None or cfg.peft_type not in TUNER_PEFT_TYPES:  # LyCORIS files say it per module group
        return {}
    layouts: dict[str, int] = {}
    for m in tuned:
        k = "+".join(m.factors)
        layouts[k] = layouts.get(k, 0) + 1
    raw = cfg.raw if cfg is not None else {}
    keys = ("alpha", "use_effective_conv2d", "decompose_both", "decompose_factor", "rank_dropout", "module_dropout")
    return {
        "peft_type": tuned[0].tuner.upper(),
        "layouts": dict(sorted(layouts.items())),
        **{k: raw[k] for k in keys if k in raw},
    }

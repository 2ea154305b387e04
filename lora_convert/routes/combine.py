"""combine: several adapters -> one adapter, as PEFT's ``add_weighted_adapter`` makes it.

One module at a time, in the model's registration order (:func:`..module_order.registration_key`): the
sources' factors are read (small), combined by :mod:`..combine_math`, written, and dropped, so memory
is one module's factors (an SVD method: one module's ΔW and its SVD).  The result equals what
``torch.manual_seed(S); model.add_weighted_adapter(names, weights, "new", combination_type=...)``
saves for a PeftModel holding the source adapters, loaded the usual way (fp32 factors), bit for bit:

* the output config is the first source's with ``r = lora_alpha = new rank``, the union of the
  target modules and no rank/alpha patterns; the factors are fp32;
* the seed (``--seed``, default 0) reproduces PEFT's dare masks when the architecture's module order
  is the one :data:`..module_order.REGISTRATION_ORDER` knows (Llama/Mistral/Qwen/Gemma-style decoders, GPT-2):
  PEFT draws first the new adapter's initial values, then one mask per source factor (or ΔW), module
  by module in that order;
* a single source is combined linearly, whatever the method (PEFT does the same);
* LAPACK's SVD rounds differently with another number of threads: the svd methods match a PEFT run
  with the same ``torch.get_num_threads()`` (the combine computes with the caller's).

Refused, where reproducing PEFT would be wrong: DoRA sources (PEFT gives the result a magnitude
computed from the new adapter's random init, not from the sources), ``modules_to_save`` and trainable
tokens (PEFT keeps a fresh copy of the base module: the trained copy is lost), ``lora_bias`` (PEFT
leaves the bias at its init), sources whose ``layers_to_transform``/``layers_pattern``/
``exclude_modules`` differ (PEFT copies the first's and silently drops the others' modules), unequal
ranks for the factor methods.  rsLoRA sources are combined as PEFT does, but written with
``use_rslora: false``: PEFT keeps ``use_rslora`` with ``lora_alpha = r``, which scales the result
by √r.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import combine_math, lora_math, module_order
from ..bounds import seed_ok
from ..combine_math import FACTOR_METHODS, METHODS, PRUNING_METHODS, RANDOM_METHODS, SIGN_METHODS, SVD_METHODS
from ..dialects.peft_keys import Role, format_key
from ..errors import AdapterError, OptionError, RouteError, UnsupportedError, Where
from ..errors import option_name as _opt
from ..inventory import LoraModule
from ..pipeline import Buffers, Job
from ..stack import AdapterInput
from .common import check_finite, copy_job, same_tensor
from .plan import Plan, Request

FP32 = torch.float32
FP32_MAX = torch.finfo(FP32).max
FULL_SVD_BYTES = 1 << 30  # PEFT's full_matrices=True SVD up to this size of U or Vh; reduced beyond (≈ 1 ulp off)
REPLAYABLE_INITS = (True, False, "gaussian")


@dataclass
class CombineOptions:
    """``method`` (one of combine_math.METHODS), ``density`` for the pruning methods, ``rank`` (svd
    methods' new rank, default the largest source rank), ``seed`` (dare), ``svd_clamp`` (a quantile in
    [0, 1]) and ``majority_sign`` (total | frequency: ties' sign election)."""

    method: str
    density: float | None = None
    rank: int | None = None
    seed: int = 0
    svd_clamp: float | None = None
    majority_sign: str = "total"

    def validate(self) -> CombineOptions:
        if self.method not in METHODS:
            raise OptionError(f"unknown {_opt('method')} {self.method!r} (choose from {', '.join(METHODS)})")
        svd = self.method in SVD_METHODS
        method, density, rank, clamp = (_opt(k) for k in ("method", "density", "rank", "svd_clamp"))
        checks = [
            (self.method not in PRUNING_METHODS or self.density is not None, f"{method} {self.method} needs {density}"),
            (self.density is None or 0 < self.density <= 1, f"{density} must be in (0, 1]"),
            (self.density is None or self.method in PRUNING_METHODS, f"{density} does not apply to {self.method}"),
            (self.rank is None or svd, f"{rank} applies to the svd methods, not {self.method}"),
            (self.rank is None or self.rank >= 1, f"{rank} must be at least 1"),
            (self.svd_clamp is None or svd, f"{clamp} applies to the svd methods, not {self.method}"),
            (self.svd_clamp is None or 0 <= self.svd_clamp <= 1, f"{clamp} is a quantile in [0, 1]"),
            (self.majority_sign in SIGN_METHODS, f"{_opt('majority_sign')} must be total or frequency"),
            (seed_ok(self.seed), f"{_opt('seed')} must be an integer from 0 to 2**64 - 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message)
        return self


@dataclass
class _Module:
    """One module of the new adapter and the sources that have a LoRA on it (in source order)."""

    path: str
    kind: str  # linear | embedding
    n_in: int
    n_out: int
    parts: list[tuple[AdapterInput, LoraModule]] = field(default_factory=list)


def plan_combine(req: Request, opts: CombineOptions) -> Plan:
    """The combined adapter's jobs (two per module: A computes both factors, B hands its half over)."""
    sources = req.stack
    warnings = _check_sources(sources)
    method = opts.method
    if len(sources) == 1 and method != "linear":
        warnings.append("one adapter: combined linearly, as PEFT's add_weighted_adapter does for any method")
        method = "linear"
    modules = _modules(sources)
    _check_products(sources)
    new_rank = _new_rank(sources, modules, method, opts)
    state = _State(opts, method, new_rank, modules, sources)
    jobs: list[Job] = []
    for m in modules:
        jobs += _module_jobs(m, state)
    jobs += _saved_layers(sources)
    if state.reduced:
        warnings.append(
            f"{state.reduced} module(s) too large for PEFT's full-matrices SVD in {FULL_SVD_BYTES >> 30} GB: "
            "reduced SVD used (the factors may differ from PEFT's by about one ulp)"
        )
    config, more = _adapter_config(sources, modules, state, req)
    labels = ", ".join(f"`{s.label}` × {s.weight:g}" for s in sources)
    head = f"combined by {method} (PEFT add_weighted_adapter) from {labels}; rank {new_rank}"
    return Plan(
        "adapter",
        jobs,
        stem="adapter_model",
        sharded=False,
        tokenizer_from=[sources[0].ck.root],
        adapter_config=config,
        warnings=warnings + more,
        base_model=config.get("base_model_name_or_path"),
        card_lines=lambda total: [head, f"{len(modules)} LoRA modules, {total:,} bytes", *warnings, *more],
        card_config=sources[0].ck.config,
        op_counts={"combine": len(modules)},
    )


def _check_sources(sources: list[AdapterInput]) -> list[str]:
    """Refuse what PEFT gets wrong; say what is written differently from PEFT."""
    warnings: list[str] = []
    for inp in sources:
        cfg, inv = inp.config, inp.inventory
        assert cfg is not None
        cfg.check_supported()
        where: Where = {"path": inp.ck.root}
        tuned = next((m for m in inv.modules(inp.name).values() if m.tuner != "lora"), None)
        if tuned is not None:  # another tuner (routes.refuse_untaken refuses every one by name first: a backstop)
            raise UnsupportedError(
                f"a {cfg.peft_type} adapter (module {tuned.module}) cannot be combined: PEFT's add_weighted_adapter "
                "combines LoRA factors",
                hint="merge the adapters into the base one after the other instead",
                path=inp.ck.root,
                tensor=tuned.a_key,
            )
        if any(m.magnitude_key for m in inv.modules(inp.name).values()) or cfg.use_dora:
            raise UnsupportedError(
                "DoRA adapters cannot be combined: PEFT's add_weighted_adapter gives the result a magnitude "
                "computed from the new adapter's random initial factors, not from the sources",
                hint="merge them one at a time instead",
                **where,
            )
        saved = inv.saved_layers.get(inp.name, set())
        replaced = sorted(set(inv.replace.get(inp.name, {})) - saved) + sorted(inv.tokens.get(inp.name, {}))
        if replaced:
            raise UnsupportedError(
                f"{replaced[0]} is saved whole (modules_to_save or trainable tokens): PEFT's add_weighted_adapter "
                "gives the result a fresh copy of the base module, so the trained one would be lost",
                hint="merge the adapters instead (several adapters in one merge)",
                **where,
            )
        if cfg.lora_bias or any(m.bias_key for m in inv.modules(inp.name).values()):
            raise UnsupportedError(
                "lora_bias adapters cannot be combined: PEFT combines only the weights and leaves lora_B's bias "
                "at its initial value",
                **where,
            )
    first = sources[0].config
    assert first is not None
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "fan_in_fan_out"):
        values = {repr(_field(s, key)) for s in sources}
        if len(values) > 1:
            raise UnsupportedError(
                f"the adapters differ in {key}: PEFT's add_weighted_adapter copies the first adapter's and "
                "drops the others' modules that it excludes",
                path=sources[1].ck.root,
            )
    if any(s.config is not None and s.config.use_rslora for s in sources):
        warnings.append(
            "rsLoRA sources: each one's α/√r is folded into the factors; the result is written with "
            "use_rslora false (PEFT keeps use_rslora with lora_alpha = r, which scales it by √r)"
        )
    return warnings


def _field(inp: AdapterInput, key: str) -> Any:
    cfg = inp.config
    assert cfg is not None
    return getattr(cfg, key, None) if key in cfg.__dataclass_fields__ else cfg.raw.get(key)


def _modules(sources: list[AdapterInput]) -> list[_Module]:
    """The union of the sources' LoRA modules, in registration order; shapes must agree."""
    found: dict[str, _Module] = {}
    for inp in sources:
        for path, m in inp.inventory.modules(inp.name).items():
            have = found.get(path)
            if have is None:
                have = found[path] = _Module(path, m.kind, m.in_features, m.out_features)
            elif (have.kind, have.n_in, have.n_out) != (m.kind, m.in_features, m.out_features):
                raise AdapterError(
                    f"adapters for different base models: {path} is {have.kind} {have.n_out}x{have.n_in} in "
                    f"{have.parts[0][0].label}, {m.kind} {m.out_features}x{m.in_features} here",
                    path=inp.ck.root,
                    tensor=m.a_key,
                )
            have.parts.append((inp, m))
    if not found:
        raise RouteError("the adapters hold no LoRA modules to combine")
    return sorted(found.values(), key=lambda mod: module_order.registration_key(mod.path))


def _check_products(sources: list[AdapterInput]) -> None:
    """Each source's weight × scaling multiplies its factors in fp32 (cat: A·w·s; the factor methods:
    ±√|w·s|; svd: w·s·B·A): a product beyond float32 would write Inf factors, refused by name up front."""
    for i, inp in enumerate(sources):
        for lm in inp.inventory.modules(inp.name).values():
            s = float(lm.scaling or 0.0)
            ws = inp.weight * s
            if not math.isfinite(ws) or abs(ws) > FP32_MAX:
                raise RouteError(
                    f"adapter {i + 1} ({inp.label!r}): weight {inp.weight:g} × scaling {s:g} = {ws:g} is beyond "
                    f"float32 (|w·s| ≤ {FP32_MAX:.4g}), which the combined factors are written in",
                    path=inp.ck.root,
                    tensor=lm.a_key,
                    hint="give a smaller weight",
                )


def _check_output(m: _Module, what: str, t: torch.Tensor) -> torch.Tensor:
    """Finite factors, or one error naming the output tensor and the source whose weight is largest."""
    if not lora_math.all_finite(t):
        inp, lm = max(m.parts, key=lambda p: abs(p[0].weight * float(p[1].scaling or 0.0)))
        raise AdapterError(
            f"{what} overflows float32 (NaN or Inf): the weights × scalings × factors are too "
            f"large (largest here: adapter {inp.label!r} × {inp.weight:g})",
            path=inp.ck.root,
            tensor=lm.a_key,
            hint="give smaller weights",
        )
    return t


def _config_rank(inp: AdapterInput) -> int:
    """PEFT's rank of a source: ``max(r, *rank_pattern.values())``."""
    cfg = inp.config
    assert cfg is not None
    return max([cfg.r, *[int(v) for v in cfg.rank_pattern.values()]])


def _new_rank(sources: list[AdapterInput], modules: list[_Module], method: str, opts: CombineOptions) -> int:
    ranks = [_config_rank(s) for s in sources]
    if method == "cat":
        return sum(ranks)
    if method in SVD_METHODS:
        new = opts.rank or max(ranks)
        for m in modules:
            if new > min(m.n_in, m.n_out):
                raise RouteError(f"{_opt('rank')} {new} exceeds {m.path}'s smaller dimension {min(m.n_in, m.n_out)}")
        return new
    for m in modules:
        got = {lm.rank for _, lm in m.parts}
        if len(set(ranks)) > 1 or len(got) > 1:
            raise RouteError(
                f"{method} needs adapters of one rank, got {', '.join(f'{s.label}: r={r}' for s, r in zip(sources, ranks, strict=True))}"
                + (f" ({m.path} has ranks {sorted(got)})" if len(got) > 1 else ""),
                hint=f"use {_opt('method')} cat (exact) or an svd method",
            )
    return ranks[0]


@dataclass
class _State:
    """Shared by a run's jobs: the options, the generator (dare), the factors between a module's two jobs."""

    opts: CombineOptions
    method: str
    new_rank: int
    modules: list[_Module]
    sources: list[AdapterInput]
    gen: torch.Generator | None = None
    replayed: bool = False
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    reduced: int = 0
    threads: int = field(default_factory=torch.get_num_threads)  # the caller's: PEFT runs with it

    def generator(self) -> torch.Generator | None:
        """dare's generator, after the draws PEFT makes creating the new adapter (all modules, once)."""
        if self.method not in RANDOM_METHODS:
            return None
        if not self.replayed:
            self.replayed = True
            self.gen = torch.Generator().manual_seed(self.opts.seed)
            first = self.sources[0].config
            assert first is not None
            for m in self.modules:
                combine_math.replay_init(self.gen, m.kind, self.new_rank, m.n_in, m.n_out, first.init_lora_weights)
        return self.gen


def _out_rank(m: _Module, state: _State) -> int:
    if state.method in FACTOR_METHODS:
        return m.parts[0][1].rank
    return state.new_rank


def _module_jobs(m: _Module, state: _State) -> list[Job]:
    roles = (Role.EMBED_A, Role.EMBED_B) if m.kind == "embedding" else (Role.LORA_A, Role.LORA_B)
    a_name, b_name = format_key(m.path, roles[0]), format_key(m.path, roles[1])
    r = _out_rank(m, state)

    def a_blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        # LAPACK's SVD (and possibly a GEMM) rounds differently with another thread count: compute
        # with the caller's, as PEFT does, not with the one the pipeline leaves to its workers.
        before = torch.get_num_threads()
        torch.set_num_threads(state.threads)
        try:
            a, b = _combine(m, state)
        finally:
            torch.set_num_threads(before)
        state.pending[b_name] = _check_output(m, f"the combined factor {b_name}", b)
        yield _check_output(m, f"the combined factor {a_name}", a)

    def b_blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        yield state.pending.pop(b_name)

    return [
        Job(a_name, FP32, (r, m.n_in), a_blocks, "combine"),
        Job(b_name, FP32, (m.n_out, r), b_blocks, "lora"),
    ]


def _factors(inp: AdapterInput, lm: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """A source's factors as PEFT holds them after loading: fp32."""
    a = check_finite(inp.ck.read(lm.a_key), inp.ck, lm.a_key).to(FP32)
    b = check_finite(inp.ck.read(lm.b_key), inp.ck, lm.b_key).to(FP32)
    return a, b


def _combine(m: _Module, state: _State) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's (A, B), as PEFT computes them."""
    opts, method = state.opts, state.method
    gen = state.generator()
    weights = [inp.weight for inp, _ in m.parts]
    scalings = [float(lm.scaling) for _, lm in m.parts]  # type: ignore[arg-type]
    factors = [_factors(inp, lm) for inp, lm in m.parts]
    if method == "cat":
        parts = [(a, b, w, s) for (a, b), w, s in zip(factors, weights, scalings, strict=True)]
        return combine_math.cat_factors(parts, state.new_rank)
    if method in FACTOR_METHODS:
        return combine_math.combine_factors(
            [a for a, _ in factors],
            [b for _, b in factors],
            weights,
            scalings,
            method,
            density=opts.density,
            sign_method=opts.majority_sign,
            gen=gen,
        )
    transpose = m.kind == "embedding" or bool(_field(m.parts[0][0], "fan_in_fan_out"))
    deltas = [
        combine_math.peft_delta(a, b, s, transpose=transpose) for (a, b), s in zip(factors, scalings, strict=True)
    ]
    base = method.removesuffix("_svd")
    delta = combine_math.merge_tasks(
        deltas,
        torch.tensor(weights),
        "linear" if base == "svd" else base,
        density=opts.density,
        sign_method=opts.majority_sign,
        gen=gen,
    )
    del deltas
    _check_output(m, f"the combined ΔW of {m.path}", delta)  # a NaN/Inf ΔW fails the SVD (LAPACK does not converge)
    if transpose:
        delta = delta.T
    full = max(delta.shape) ** 2 * delta.element_size() <= FULL_SVD_BYTES
    state.reduced += not full
    return combine_math.svd_factors(delta, state.new_rank, clamp=opts.svd_clamp, full_matrices=full)


def _saved_layers(sources: list[AdapterInput]) -> list[Job]:
    """Embedding layers PEFT saved whole beside their LoRA (``save_embedding_layers``): the base's own,
    saved again with the result as PEFT saves the loaded model's; the sources must agree on them."""
    jobs: list[Job] = []
    first: dict[str, tuple[AdapterInput, str]] = {}
    for inp in sources:
        replace = inp.inventory.replace.get(inp.name, {})
        for key in sorted(inp.inventory.saved_layers.get(inp.name, set()) & set(replace)):
            have = first.get(key)
            if have is None:
                first[key] = (inp, replace[key])
                jobs.append(copy_job(inp.ck, replace[key], replace[key], op="save"))
            elif not same_tensor((have[0].ck, have[1]), (inp.ck, replace[key])):
                raise AdapterError(
                    f"saved layer {key} differs from {have[0].label}'s (a resized vocabulary?): the adapters were "
                    "not trained on one base model",
                    path=inp.ck.root,
                    tensor=replace[key],
                )
    return jobs


def _adapter_config(
    sources: list[AdapterInput], modules: list[_Module], state: _State, req: Request
) -> tuple[dict[str, Any], list[str]]:
    """The first source's config with PEFT's changes: r = lora_alpha = new rank, the union of the targets,
    no patterns; use_rslora off; a rank pattern only where a module's rank is not r (PEFT would write a
    config its own loader rejects there)."""
    first = sources[0].config
    assert first is not None
    d = first.to_dict()
    d.update(
        r=state.new_rank,
        lora_alpha=state.new_rank,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        target_modules=_targets(sources),
        inference_mode=True,
    )
    notes: list[str] = []
    odd = {m.path: _out_rank(m, state) for m in modules if _out_rank(m, state) != state.new_rank}
    if odd:
        d["rank_pattern"] = {re.escape(p): r for p, r in odd.items()}
        d["alpha_pattern"] = dict(d["rank_pattern"])
        notes.append(f"{len(odd)} module(s) keep their own rank (rank_pattern): the sources' rank_pattern")
    return d, notes


def _targets(sources: list[AdapterInput]) -> list[str] | str:
    """PEFT's union of target_modules: sets are united (written sorted), regexes joined with ``|``."""
    values = [_field(s, "target_modules") for s in sources]
    if all(isinstance(v, str) for v in values):
        return "|".join(f"({v})" for v in values)
    if all(isinstance(v, list | tuple | set) for v in values):
        return sorted({str(x) for v in values for x in v})
    raise UnsupportedError(
        "the adapters mix target_modules given as a list and as a regex; PEFT's add_weighted_adapter refuses that",
        path=sources[0].ck.root,
    )

"""verify: is MERGED the merge of the adapter(s) into BASE?  Tensor by tensor, from the files alone.

The merge's own planner (:func:`.merge.merge_ops`) says what every tensor should be — which LoRAs,
replacements, trainable tokens, lora_bias, tied heads — and its row merge (:class:`.merge.RowMerge`)
computes each expected block, exactly what ``merge`` would write, beside the same rows of BASE and
MERGED.  The blocks are read ahead through the pipeline (jobs that write nothing), so memory stays
at a few blocks whatever the model size, and the three files stream at disk speed.

Each tensor gets one status:

* ``ok`` — every element within the tolerance of the expected merge;
* ``not applied`` — a tensor the adapter changes equals the base;
* ``wrong scale`` — it equals ``base + c·ΔW`` for some ``c ≠ 1`` (c printed: ``√r`` means α/√r was used
  for α/r, ``2`` that the adapter was applied twice);
* ``changed outside the adapter`` — a tensor the adapter does not touch differs from the base;
* ``mismatch`` — changed, but not into ``base + c·ΔW`` for any c;
* ``shape mismatch``, ``missing`` (in BASE, not in MERGED), ``unexpected`` (in MERGED only).

Tolerance, in ulps of MERGED's dtype at each element's magnitude (:mod:`..closeness`): ``--ulps``
(default 2) plus one per adapter beyond the first.  lora-convert's merge is exact to 0 ulps; PEFT's
``merge_and_unload`` rounds ΔW before adding it (embeddings in half precision), computes ΔW in a
different order and, with several adapters, rounds after each one — a few ulps at most.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import arch, lora_math
from ..closeness import Agreement, significand_bits
from ..errors import RouteError, UnsupportedError, option_name
from ..io.quantized import find_layout
from ..io.reader import Checkpoint
from ..pipeline import Buffers, Job, Read, execute
from ..progress import progress_bar
from .common import COPY_BLOCK
from .merge import MergeOps, RowMerge, _KeyOps, bias_value, block_plan, merge_ops, prepare_rows
from .plan import Request

DEFAULT_ULPS = 2.0
OK = "ok"
Done = Callable[[Agreement], None]


@dataclass
class TensorCheck:
    """One tensor of MERGED against what the merge should have written."""

    tensor: str
    status: str
    detail: str = ""
    ulps: float | None = None  # largest distance from the expected value, in ulps of MERGED's dtype
    scale: float | None = None  # c in merged − base ≈ c·ΔW (tensors with a plain LoRA)


@dataclass
class Verification:
    """What ``verify`` found: one check per tensor, and the logits comparison when asked for."""

    merged: str
    base: str
    adapters: list[dict[str, Any]]  # {"adapter": ref, "weight": w}
    tolerance_ulps: float
    checks: list[TensorCheck] = field(default_factory=list)
    logits: dict[str, Any] | None = None  # see lora_convert.logits_check
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        logits_ok = self.logits is None or self.logits.get("ok") is not False
        return all(c.status == OK for c in self.checks) and logits_ok

    def counts(self) -> dict[str, int]:
        return dict(Counter(c.status for c in self.checks))

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items(), key=lambda kv: kv[0] != OK))
        what = " + ".join(
            f"{a['adapter']}" + (f" × {a['weight']:g}" if a["weight"] != 1 else "") for a in self.adapters
        )
        verdict = "equals" if self.ok else "is NOT"
        line = f"{len(self.checks)} tensors: {counts}. MERGED {verdict} BASE + {what} (tolerance {self.tolerance_ulps:g} ulps)"
        if self.logits is not None:
            line += f"; logits: {self.logits.get('summary', '')}"
        return line

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, counts=self.counts(), summary=self.summary())
        return d


def _check_tolerance(merged: Checkpoint, ulps: float, tol: float) -> None:
    """Refuse a tolerance that no longer tells a merge from any other model: 2^(p-2) ulps of a p-bit significand
    are a quarter of the value itself (bf16: 64 ulps; fp32: 2^22), and ``--ulps 1e300`` passed a random model."""
    floats = {info.dtype for info in merged.tensors.values() if info.is_float}
    if not floats:
        return
    dtype = min(floats, key=significand_bits)
    cap = 2.0 ** (significand_bits(dtype) - 2)
    if tol >= cap:
        name = str(dtype).removeprefix("torch.")
        raise RouteError(
            f"{option_name('ulps')} {ulps:g}: a tolerance of {tol:g} ulps is at least a quarter of each value in "
            f"MERGED's {name} weights (it must be less than {cap:.0f}), so any model would pass",
            hint="a correct merge is within a few ulps; the default is 2",
        )


def verify_merge(
    req: Request, merged: Checkpoint, *, ulps: float = DEFAULT_ULPS, progress: bool = False
) -> Verification:
    """Check every tensor of ``merged`` against the merge ``req`` describes (BASE + its adapters)."""
    layout = find_layout(merged)
    if layout is not None:  # a --requantize output holds the scheme's rounding besides ΔW, per block
        raise UnsupportedError(
            f"MERGED is quantized ({layout.scheme}): verify compares float weights within a few ulps, and a "
            "re-quantized merge differs from BASE + ΔW by the scheme's own rounding",
            path=merged.root,
            tensor=next(iter(layout.tensors), None),
            hint="verify the merge written without --requantize (its re-quantization error is in that run's report)",
        )
    mo = merge_ops(req)
    inputs = req.adapters_in()
    tol = ulps + len(inputs) - 1
    _check_tolerance(merged, ulps, tol)
    result = Verification(
        str(merged.root),
        str(req.base_ref or req.ref),
        [{"adapter": inp.label, "weight": inp.weight} for inp in inputs],
        tol,
    )
    found: dict[str, TensorCheck] = {}
    jobs: list[Job] = []
    targets = _targets(mo, merged)
    with progress_bar(progress, len(targets), "verifying", unit="tensors") as advance:
        for key, mk in targets:
            check = _static_check(key, mk, mo, merged)
            if check is not None:
                found[key] = check
                advance(1)
                continue
            assert mk is not None

            def done(ag: Agreement, key: str = key, mk: str = mk) -> None:
                found[key] = _classify(key, ag, mo.ops[key], tol, _on_experts(mo, key))
                if mk != key and found[key].status != OK:
                    found[key].detail += (
                        f" (MERGED ties it to {mk}, so whatever changed that tensor changed this one too; "
                        "a merge that changes only one side must untie them)"
                    )
                advance(1)

            jobs.append(_check_job(key, mk, mo.ops[key], mo, merged, done))
        execute(jobs, None)
    result.checks = [found[key] for key, _ in targets]
    seen = {mk for _, mk in targets if mk is not None}
    result.checks += [
        TensorCheck(k, "unexpected", "in MERGED, but the merge of BASE + adapter writes no such tensor")
        for k in merged.tensors
        if k not in seen
    ]
    return result


def _targets(mo: MergeOps, merged: Checkpoint) -> list[tuple[str, str | None]]:
    """(expected tensor, the MERGED tensor that holds it or None).  A head that MERGED ties to its
    embedding is that embedding; a head stored beside an embedding the merge keeps tied must equal it."""
    head_tied = arch.HEAD_KEY not in merged.tensors and arch.ties_embeddings(merged.config, head_stored=False)
    emb = arch.input_embedding_key(merged.tensors)
    out: list[tuple[str, str | None]] = []
    for k in mo.keys:
        if k in merged.tensors:
            out.append((k, k))
        elif k == arch.HEAD_KEY and head_tied and emb is not None:
            out.append((k, emb))
        else:
            out.append((k, None))
    if mo.tied is not None and mo.tied[1] not in mo.keys and mo.tied[1] in merged.tensors:
        out.append((mo.tied[1], mo.tied[1]))
    return out


def _static_check(key: str, mk: str | None, mo: MergeOps, merged: Checkpoint) -> TensorCheck | None:
    """What the headers alone decide: missing tensors, shapes."""
    if mk is None:
        return TensorCheck(key, "missing", "in BASE, but not in MERGED")
    src_ck, src_key = mo.ops[key].source
    want, got = tuple(src_ck.info(src_key).shape), tuple(merged.info(mk).shape)
    if want != got:
        return TensorCheck(key, "shape mismatch", f"MERGED has {list(got)}, the merge writes {list(want)}")
    return None


def _on_experts(mo: MergeOps, key: str) -> bool:
    return mo.experts is not None and key in mo.experts.targets


def _classify(key: str, ag: Agreement, o: _KeyOps, tol: float, experts: bool = False) -> TensorCheck:
    worst = round(ag.worst, 3)
    if ag.worst <= tol:
        return TensorCheck(key, OK, ulps=worst, scale=_scale(ag))
    if ag.nonfinite:  # (a NaN made the fit's sums NaN: it read as "wrong scale c = nan")
        return TensorCheck(key, "mismatch", f"holds {ag.nonfinite} NaN/Inf values of {ag.elements}", worst)
    if not (experts or o.loras or o.bias_adds or o.tokens is not None or o.replaced):
        return TensorCheck(
            key, "changed outside the adapter", f"{_fmt(ag.worst)} ulps from the base, which it should equal", worst
        )
    if ag.worst_base <= tol:
        return TensorCheck(key, "not applied", "equals the base: the adapter's change is not in it", worst)
    c = ag.scale()
    if c is not None and ag.fits(tol):
        return TensorCheck(key, "wrong scale", f"equals base + c·ΔW with c = {c:.4g}{_scale_hint(c, o)}", worst, c)
    if ag.worst_alt is not None and ag.worst_alt <= tol:
        return TensorCheck(key, "mismatch", "equals base + ΔW without DoRA's magnitude rescaling", worst)
    return TensorCheck(key, "mismatch", f"{_fmt(ag.worst)} ulps from the expected merge, and not base + c·ΔW", worst, c)


def _scale(ag: Agreement) -> float | None:
    c = ag.scale()
    return round(c, 6) if c is not None else None


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def _scale_hint(c: float, o: _KeyOps) -> str:
    """Name the usual culprits when c is one of them."""
    r = o.loras[0].module.rank if len(o.loras) == 1 else None
    known = [(2.0, "2", "the adapter applied twice?"), (-1.0, "-1", "ΔW subtracted?")]
    if r is not None and r > 1:
        known += [
            (math.sqrt(r), f"√r, r = {r}", "α/√r (rsLoRA) used for α/r?"),
            (1 / math.sqrt(r), f"1/√r, r = {r}", "α/r used for α/√r (rsLoRA)?"),
        ]
    for value, name, why in known:
        if abs(c / value - 1) < 1e-2:
            return f" (≈ {name}: {why})"
    return ""


def _check_job(key: str, mk: str, o: _KeyOps, mo: MergeOps, merged: Checkpoint, done: Done) -> Job:
    if _on_experts(mo, key):
        return _mirror_job(key, mk, mo.job(key, None), mo.base.where(key), merged, done)
    if o.loras or o.tokens is not None:
        return _rows_job(key, mk, o, mo, merged, done)
    if o.bias_adds:
        return _bias_job(key, mk, o, merged, done)
    return _flat_job(key, mk, o, mo, merged, done)


def _rows_job(key: str, mk: str, o: _KeyOps, mo: MergeOps, merged: Checkpoint, done: Done) -> Job:
    """A LoRA (or token) tensor: the expected rows, computed as the merge computes them, beside the
    base's and MERGED's rows; ΔW's rows for the scale fit."""
    src_ck, src_key = o.source
    shape = tuple(src_ck.info(src_key).shape)
    cols = math.prod(shape[1:])  # a conv weight's rows are its flattened (out, in·k·k) matrix's
    mdtype = merged.info(mk).dtype
    plan = block_plan(o, shape, mdtype)
    pairs = [(r, Read(merged, mk, r.start, r.stop)) for r in plan]

    def reads() -> list[Read]:
        return (plan if o.dora else []) + [x for pair in pairs for x in pair]

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        rm = prepare_rows(o, shape, mo.conv1d, buf, plan)
        plain = RowMerge(rm.deltas, tokens=rm.tokens) if o.dora else None  # DoRA without its rescaling
        ag = Agreement(mdtype)
        for r, mr in pairs:
            w, m = buf.read(r), buf.read(mr)
            n = w.shape[0]
            acc = buf.scratch("acc", (n, cols), torch.float32)
            want = rm.rows(w, r.start, buf.scratch("expected", tuple(w.shape), mdtype), acc)
            alt = plain.rows(w, r.start, buf.scratch("alt", tuple(w.shape), mdtype), acc) if plain else None
            x = lora_math.delta_rows(rm.deltas, r.start, r.stop) if rm.deltas and not o.dora else None
            ag.add(m, want, w, x, alt)
            buf.give_back(w)
            buf.give_back(m)
        done(ag)
        return
        yield  # a generator that writes nothing

    return Job(key, torch.float32, (), run, "verify", reads=reads, writes=False)


def _flat_job(key: str, mk: str, o: _KeyOps, mo: MergeOps, merged: Checkpoint, done: Done) -> Job:
    """A tensor the merge copies (or replaces): MERGED must hold it, cast to MERGED's dtype."""
    src_ck, src_key = o.source
    info, minfo = src_ck.info(src_key), merged.info(mk)
    numel = info.nbytes // info.itemsize
    step = max(1, COPY_BLOCK // max(info.itemsize, minfo.itemsize))
    base = mo.base.where(key) if o.replaced and key in mo.base else None
    if base is not None and tuple(base[0].info(base[1]).shape) != tuple(info.shape):
        base = None  # a resized replacement: nothing to compare with

    def blocks() -> list[tuple[Read, Read | None, Read]]:
        return [
            (
                Read(src_ck, src_key, s, min(s + step, numel), flat=True),
                Read(base[0], base[1], s, min(s + step, numel), flat=True) if base else None,
                Read(merged, mk, s, min(s + step, numel), flat=True),
            )
            for s in range(0, numel, step)
        ]

    def reads() -> list[Read]:
        return [r for trio in blocks() for r in trio if r is not None]

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        ag = Agreement(minfo.dtype)
        for rs, rb, rm in blocks():
            s = buf.read(rs)
            b = buf.read(rb) if rb is not None else None
            m = buf.read(rm)
            ag.add(m, s.to(minfo.dtype), b if b is not None else (None if o.replaced else s))
            for t in (s, b, m):
                if t is not None:
                    buf.give_back(t)
        done(ag)
        return
        yield

    return Job(key, torch.float32, (), run, "verify", reads=reads, writes=False)


def _mirror_job(key: str, mk: str, inner: Job, base: tuple[Checkpoint, str], merged: Checkpoint, done: Done) -> Job:
    """A tensor the merge writes with a job of its own (MoE experts, merged slab by slab): that job's blocks,
    exactly as the merge writes them, against MERGED's and BASE's elements at the same offsets."""
    mdtype = merged.info(mk).dtype

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        ag = Agreement(mdtype)
        offset = 0
        for out in inner.blocks(buf):
            n = out.numel()
            m = merged.read_flat(mk, offset, offset + n).view(out.shape)
            b = base[0].read_flat(base[1], offset, offset + n).view(out.shape)
            ag.add(m, out.to(mdtype), b)
            buf.give_back(out)
            offset += n
        done(ag)
        return
        yield

    return Job(key, torch.float32, (), run, "verify", reads=inner.reads, writes=False)


def _bias_job(key: str, mk: str, o: _KeyOps, merged: Checkpoint, done: Done) -> Job:
    """A bias with lora_bias added (small: read whole)."""

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        m = merged.read(mk)
        ag = Agreement(m.dtype)
        ag.add(m, bias_value(o).to(m.dtype), o.source[0].read(o.source[1]))
        done(ag)
        return
        yield

    return Job(key, torch.float32, (), run, "verify", writes=False)

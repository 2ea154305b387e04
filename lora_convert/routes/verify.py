"""verify: is MERGED the merge of the adapter(s) into BASE?  Tensor by tensor, from the files alone.

The merge's own planner (:func:`.merge_engine.merge_ops`) says what every tensor should be — which LoRAs,
replacements, trainable tokens, lora_bias, tied heads — and its row merge (:class:`.merge_engine.RowMerge`)
computes each expected block, exactly what ``merge`` would write, beside the same rows of BASE and
MERGED.  The blocks are read ahead through the pipeline (jobs that write nothing), so memory stays
at a few blocks whatever the model size, and the three files stream at disk speed.

Each tensor gets one status:

* ``ok`` — every element within the tolerance of the expected merge;
* ``not applied`` — a tensor the adapter changes equals the base;
* ``wrong scale`` — it equals ``base + c·ΔW`` for a ``c`` measurably ``≠ 1`` (c printed with its uncertainty:
  ``√r`` means α/√r was used for α/r, ``2`` that the adapter was applied twice);
* ``changed outside the adapter`` — a tensor the adapter does not touch differs from the base;
* ``mismatch`` — changed, but not into ``base + c·ΔW`` for any c;
* ``shape mismatch``, ``missing`` (in BASE, not in MERGED), ``unexpected`` (in MERGED only).

* ``not finite`` — MERGED holds NaN or Inf (how many elements is said).

The tolerance is an error bound per element, derived from what a merge computes, so that every
correct merge passes whatever order its arithmetic took, and a wrong one fails by many bounds.  With
u = 2⁻²⁴ (fp32's unit roundoff), uₘ MERGED's dtype's, P = |s|·(|B|·|A|) the absolute product beside ΔW
(computed per block as a matmul of the factors' absolute values), n adapters of ranks rᵢ and
γ_r = r·u/(1 − r·u), an element passes when

    |merged − expected| ≤ ulpₘ(max(|merged|, |expected|)) + w·|W| + Σ pᵢ·Pᵢ

* ``ulpₘ``: the two results are rounded to MERGED's dtype, each by at most half an ulp;
* ``pᵢ = 2·(γ_rᵢ + (n+1)·u) + n·uₘ``: each of the two computations (ours, PEFT's or any correct one)
  makes a rank-rᵢ fp32 dot product in any order (γ_rᵢ·Pᵢ), the scaling (u·Pᵢ) and n fp32 additions;
  PEFT may round each ΔWᵢ to the weight's dtype before adding it (uₘ·Pᵢ: bf16 and fp16 bases, and
  embeddings) and, with several adapters, rounds after each one but the last ((n−1)·uₘ);
* ``w = 2n·u + (n−1)·uₘ`` (+ uₘ where BASE is finer than MERGED: W may be rounded to MERGED's dtype
  first) — the same additions and roundings, on W's share.

DoRA's ``f·(W + ΔW)`` with ``f = m/‖W + ΔW‖`` has ``|f|·(2u·|W| + (2γ_r + 6u + uₘ)·P) + 2ρ·|expected|``
instead of the last two terms: the elementwise error of W + ΔW scaled by f, and the norm's relative
error ρ = ½γ_(L+1) + 4u (+ uₘ in half precision, where PEFT may hold W + ΔW in the weight's dtype)
+ ((r+4)·u + uₘ)·‖P‖/‖W + ΔW‖ per output feature (L the norm's length, ‖P‖ ≤ |s|·‖B_row‖·‖A‖_F): a sum
of squares in any order is within γ_(L+1), its square root halves that.  Copies must be exact up to
one ulp; a quantized BASE is read dequantized (W is what dequantization gives); lora_bias is the
merge bound with rank 0.  The bound is worst-case and order-free: it is loose by design for wide
reductions (fp32 DoRA on 4096-wide rows: about 2.4e-4 relative), tight for the rounding to bf16.

``--slack K`` multiplies the bound, ``--ulps N`` adds N ulps of MERGED's dtype (both 0 to 10⁶); whatever
they say, an element's tolerance never grows beyond 1/16 of its magnitude (max of |expected|, |W|) by
them, so no option makes an unrelated model pass.  ``wrong scale`` needs the least-squares c of
``merged − base ≈ c·ΔW`` to fit (root-mean-square residual within the tolerances) and to lie further
from 1 than its uncertainty √(Σ tol² / Σ ΔW²) (by Cauchy–Schwarz at least Σ tol·|ΔW| / Σ ΔW², the shift
every element off by its full tolerance in one direction could cause); it is printed as
``c = 1.0010 ± 0.0001``; a tensor off the bound whose c is within that of 1 is a ``mismatch``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import arch, lora_math, oft_math
from ..closeness import Agreement, dora_bound, merge_bound
from ..errors import UnsupportedError
from ..io.quantized import find_layout
from ..io.reader import Checkpoint
from ..pipeline import Buffers, Job, Read
from .common import COPY_BLOCK
from .merge_engine import KeyOps, MergeOps, RowMerge, bias_value, block_plan, merge_ops, prepare_rows
from .plan import Request

OK = "ok"
Done = Callable[[Agreement], None]
_EXACT_IN_FP32 = (torch.bfloat16, torch.float16, torch.float32)  # base dtypes fp32 holds exactly
Bounder = Callable[[torch.Tensor, int, torch.Tensor, int], torch.Tensor]  # (W rows, start, expected, cols)


@dataclass
class TensorCheck:
    """One tensor of MERGED against what the merge should have written."""

    tensor: str
    status: str
    detail: str = ""
    ulps: float | None = None  # largest distance from the expected value, in ulps of MERGED's dtype
    bound: float | None = None  # largest distance from the expected value, in units of the element's error bound
    scale: float | None = None  # c in merged − base ≈ c·ΔW (tensors with a plain LoRA)
    scale_uncertainty: float | None = None  # how far c may lie from the true scale by rounding alone


@dataclass
class Verification:
    """What ``verify`` found: one check per tensor, and the logits comparison when asked for."""

    merged: str
    base: str
    adapters: list[dict[str, Any]]  # {"adapter": ref, "weight": w}
    slack: float  # the error bound's multiplier (--slack)
    tolerance_ulps: float  # ulps of MERGED's dtype allowed beyond the bound (--ulps)
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
        tol = "the error bound" if self.slack == 1 else f"{self.slack:g} × the error bound"
        if self.tolerance_ulps:
            tol += f" + {self.tolerance_ulps:g} ulps"
        line = f"{len(self.checks)} tensors: {counts}. MERGED {verdict} BASE + {what} (tolerance: {tol})"
        if self.logits is not None:
            line += f"; logits: {self.logits.get('summary', '')}"
        return line

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, counts=self.counts(), summary=self.summary())
        return d


class VerifyPass:
    """verify's recomputation as a pre-pass (:class:`~.plan.Prepass`): planned from headers (the merge's own
    plan, the tensors to check, what the headers alone decide), run by the assembly's
    :func:`~lora_convert.assemble.run_prepass` in jobs that write nothing; :meth:`result` is then the verdict."""

    label, unit = "verifying", "tensors"

    def __init__(self, req: Request, merged: Checkpoint, slack: float, ulps: float) -> None:
        self.merged, self.slack, self.ulps = merged, slack, ulps
        self.mo = merge_ops(req)
        self.result_ = Verification(
            str(merged.root),
            str(req.base_ref or req.ref),
            [{"adapter": inp.label, "weight": inp.weight} for inp in req.adapters_in()],
            slack,
            ulps,
        )
        self.targets = _targets(self.mo, merged)
        self.found: dict[str, TensorCheck] = {}  # expected tensor -> its check (static ones from the headers)
        for key, mk in self.targets:
            check = _static_check(key, mk, self.mo, merged)
            if check is not None:
                self.found[key] = check

    def size(self) -> int:
        return len(self.targets)

    def threads(self) -> int | None:
        return None

    def _agreement(self, dtype: torch.dtype, buf: Buffers | None = None) -> Agreement:
        scratch = buf.scratch if buf is not None else None
        return Agreement(dtype, slack=self.slack, extra_ulps=self.ulps, scratch=scratch)

    def jobs(self, advance: Callable[[int], None]) -> list[Job]:
        mo, found = self.mo, self.found
        jobs: list[Job] = []
        for key, mk in self.targets:
            if key in found:
                advance(1)
                continue
            assert mk is not None

            def done(ag: Agreement, key: str = key, mk: str = mk) -> None:
                found[key] = _classify(key, ag, mo.ops[key], _on_experts(mo, key))
                if mk != key and found[key].status != OK:
                    found[key].detail += (
                        f" (MERGED ties it to {mk}, so whatever changed that tensor changed this one too; "
                        "a merge that changes only one side must untie them)"
                    )
                advance(1)

            jobs.append(_check_job(key, mk, mo.ops[key], mo, self.merged, done, self._agreement))
        return jobs

    def result(self) -> Verification:
        """One check per expected tensor, in order, then MERGED's tensors the merge does not write."""
        result = self.result_
        result.checks = [self.found[key] for key, _ in self.targets]
        seen = {mk for _, mk in self.targets if mk is not None}
        result.checks += [
            TensorCheck(k, "unexpected", "in MERGED, but the merge of BASE + adapter writes no such tensor")
            for k in self.merged.tensors
            if k not in seen
        ]
        return result


def plan_verify(req: Request, merged: Checkpoint, *, slack: float = 1.0, ulps: float = 0.0) -> VerifyPass:
    """The check of every tensor of ``merged`` against the merge ``req`` describes (BASE + its adapters), each
    element within ``slack`` × its error bound + ``ulps`` ulps (see the module docstring), planned from headers:
    the assembly runs it (:func:`~lora_convert.assemble.run_prepass`), then :meth:`VerifyPass.result` says."""
    layout = find_layout(merged)
    if layout is not None:  # a --requantize output holds the scheme's rounding besides ΔW, per block
        raise UnsupportedError(
            f"MERGED is quantized ({layout.scheme}): verify compares float weights within their rounding error, "
            "and a re-quantized merge differs from BASE + ΔW by the scheme's own rounding",
            path=merged.root,
            tensor=next(iter(layout.tensors), None),
            hint="verify the merge written without --requantize (its re-quantization error is in that run's report)",
        )
    return VerifyPass(req, merged, slack, ulps)


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


def _classify(key: str, ag: Agreement, o: KeyOps, experts: bool = False) -> TensorCheck:
    c, dc = ag.scale(), ag.scale_uncertainty()
    numbers = dict(
        ulps=round(ag.worst_ulps, 3),
        bound=round(ag.worst_bound, 3),
        scale=round(c, 6) if c is not None else None,
        scale_uncertainty=float(f"{dc:.3g}") if dc is not None else None,
    )

    def check(status: str, detail: str = "") -> TensorCheck:
        return TensorCheck(key, status, detail, **numbers)

    if ag.nonfinite:
        return check("not finite", f"{ag.nonfinite} of {ag.elements} elements of MERGED are NaN or Inf")
    if ag.worst <= 1:
        return check(OK)
    beyond = f"{ag.beyond} of {ag.elements} elements beyond their tolerance (at worst {_fmt(ag.worst)}× it)"
    if not (experts or o.loras or o.bias_adds or o.bias_scales or o.tokens is not None or o.replaced):
        return check("changed outside the adapter", f"{beyond}; it should equal the base")
    if ag.worst_base <= 1:
        return check("not applied", "equals the base: the adapter's change is not in it")
    if c is not None and dc is not None and ag.scale_is_wrong():
        return check("wrong scale", f"equals base + c·ΔW with c = {_pm(c, dc)}{_scale_hint(c, o)}")
    if ag.worst_alt is not None and ag.worst_alt <= 1:
        return check("mismatch", "equals base + ΔW without DoRA's magnitude rescaling")
    if c is not None and dc is not None and ag.fits():
        return check("mismatch", f"{beyond}; the scale fits c = {_pm(c, dc)}, so it is no scale error")
    return check("mismatch", f"{beyond}, and not base + c·ΔW for any c")


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def _pm(c: float, dc: float) -> str:
    """``c ± dc`` with the decimals dc's two leading digits need (four at least)."""
    digits = 4 if dc <= 0 or not math.isfinite(dc) else min(12, max(4, 1 - math.floor(math.log10(dc))))
    return f"{c:.{digits}f} ± {dc:.{digits}f}"


def _scale_hint(c: float, o: KeyOps) -> str:
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


def _check_job(
    key: str, mk: str, o: KeyOps, mo: MergeOps, merged: Checkpoint, done: Done, agreement: Callable[..., Agreement]
) -> Job:
    if _on_experts(mo, key):
        return _mirror_job(key, mk, mo, merged, done, agreement)
    if o.loras or o.tokens is not None:
        return _rows_job(key, mk, o, mo, merged, done, agreement)
    if o.bias_adds or o.bias_scales:  # lora_bias added, or IA³'s b ⊙ l on an output-side layer
        return _bias_job(key, mk, o, merged, done, agreement)
    return _flat_job(key, mk, o, mo, merged, done, agreement)


def _merge_bounder(
    deltas: list[lora_math.RowDelta], mdtype: torch.dtype, base_dtype: torch.dtype, buf: Buffers
) -> Bounder:
    """The arithmetic part of a plain merge's bound (:func:`..closeness.merge_bound`), per row block:
    w·|W| + Σ pᵢ·Pᵢ — for a LoRA Pᵢ = |sᵢ|·(|leftᵢ| @ |rightᵢ|), one matmul of absolute values beside the
    merge's own; for LoHa/LoKr the same formula on the factors' absolute values (``RowDelta.magnitude``)."""
    mb = merge_bound([d.depth for d in deltas], mdtype, base_dtype)
    mags = [d.magnitude(p) for d, p in zip(deltas, mb.terms, strict=True)]

    def tile(w: torch.Tensor, start: int, want: torch.Tensor, cols: int) -> torch.Tensor:
        n = w.numel() // cols
        t = buf.scratch("bound", (n, cols), torch.float32)
        if w.dtype == torch.float32:  # widened already (the rows job): |W| in one pass
            torch.abs(w.view(n, cols), out=t).mul_(mb.w)
        else:
            t.copy_(w.view(n, cols)).abs_().mul_(mb.w)
        for m in mags:
            m.add_rows(t, start, start + n)
        return t

    return tile


def _rotation_bounder(rot: oft_math.Rotation, mdtype: torch.dtype, base_dtype: torch.dtype, buf: Buffers) -> Bounder:
    """OFT's, BOFT's and HRA's bound: each merged entry is a dot product of a row with R's entries, which are
    themselves sums (the Cayley-Neumann series, a solve, the WY product) — :func:`..closeness.merge_bound` for
    one term of the rotation's ``depth``, on P = |W|·|R|ᵀ (the rotation applied to absolute values), plus w·|W|."""
    mb = merge_bound([rot.depth], mdtype, base_dtype)
    mag = rot.magnitude()

    def tile(w: torch.Tensor, start: int, want: torch.Tensor, cols: int) -> torch.Tensor:
        n = w.numel() // cols
        t = buf.scratch("bound", (n, cols), torch.float32)
        mag.rotate_(t.copy_(w.view(n, cols)).abs_(), start).mul_(mb.terms[0])
        return t.add_(w.view(n, cols).abs().float(), alpha=mb.w)

    return tile


def _dora_bounder(rm: RowMerge, mdtype: torch.dtype, buf: Buffers) -> Bounder:
    """DoRA's bound (:func:`..closeness.dora_bound`): the merge bound of W + ΔW scaled by |f| = |m|/‖W + ΔW‖,
    plus the norm's relative error ρ (per output feature) on the expected value."""
    (d,) = rm.deltas
    assert isinstance(d, lora_math.DeltaFactors), "DoRA is LoRA's"
    assert rm.norms is not None
    rows_norm = rm.row_scale is not None  # nn.Linear: a norm per stored row; Conv1D/Embedding: per column
    f = (rm.row_scale if rows_norm else rm.col_scale).abs()  # type: ignore[union-attr]
    db = dora_bound(d.rank, d.right.shape[1] if rows_norm else d.left.shape[0], mdtype)
    s = abs(d.scaling)
    if rows_norm:  # ‖P_row i‖ ≤ |s|·‖left_i‖·‖right‖_F
        pn = torch.linalg.vector_norm(d.left, dim=1) * (s * float(torch.linalg.vector_norm(d.right)))
    else:  # ‖P_col j‖ ≤ |s|·‖left‖_F·‖right_j‖
        pn = torch.linalg.vector_norm(d.right, dim=0) * (s * float(torch.linalg.vector_norm(d.left)))
    rho2 = (pn / rm.norms * db.rho_p + db.rho) * 2
    left, right = d.left.abs(), d.right.abs()

    def tile(w: torch.Tensor, start: int, want: torch.Tensor, cols: int) -> torch.Tensor:
        n = w.numel() // cols
        t = buf.scratch("bound", (n, cols), torch.float32)
        t.copy_(w.view(n, cols)).abs_().mul_(db.w)
        t.addmm_(left[start : start + n], right, alpha=db.p * s)
        if rows_norm:
            t.mul_(f[start : start + n].unsqueeze(1))
            t.addcmul_(want.view(n, cols).abs().float(), rho2[start : start + n].unsqueeze(1))
        else:
            t.mul_(f.unsqueeze(0))
            t.addcmul_(want.view(n, cols).abs().float(), rho2.unsqueeze(0))
        return t

    return tile


def _rows_job(
    key: str, mk: str, o: KeyOps, mo: MergeOps, merged: Checkpoint, done: Done, agreement: Callable[..., Agreement]
) -> Job:
    """A LoRA (or token) tensor: the expected rows, computed as the merge computes them, beside the
    base's and MERGED's rows, each element's bound, and ΔW's rows for the scale fit."""
    src_ck, src_key = o.source
    shape = tuple(src_ck.info(src_key).shape)
    cols = math.prod(shape[1:])  # a conv weight's rows are its flattened (out, in·k·k) matrix's
    mdtype = merged.info(mk).dtype
    base_dtype = src_ck.info(src_key).dtype
    plan = block_plan(o, shape, mdtype)
    pairs = [(r, Read(merged, mk, r.start, r.stop)) for r in plan]

    def reads() -> list[Read]:
        return (plan if o.dora else []) + [x for pair in pairs for x in pair]

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        rm = prepare_rows(o, shape, mo.conv1d, buf, plan)
        plain = RowMerge(rm.deltas, tokens=rm.tokens) if o.dora else None  # DoRA without its rescaling
        bounder: Bounder | None = None
        if o.dora:
            bounder = _dora_bounder(rm, mdtype, buf)
        elif rm.deltas:
            bounder = _merge_bounder(rm.deltas, mdtype, base_dtype, buf)
        elif rm.rotation is not None:
            bounder = _rotation_bounder(rm.rotation, mdtype, base_dtype, buf)
        ag = agreement(mdtype, buf)
        widen = not o.dora and base_dtype in _EXACT_IN_FP32
        for r, mr in pairs:
            stored, m = buf.read(r), buf.read(mr)
            w, n = stored, stored.shape[0]
            if widen and not (w.dtype == torch.float32 and w.is_contiguous()):
                # W in fp32 once (exactly: bf16/fp16 widen without rounding), for the tile, ΔW, the bound and
                # the base comparison, which would each widen it again; the same numbers, one pass fewer each
                w = buf.scratch("w32", tuple(w.shape), torch.float32).copy_(w)
            acc = buf.scratch("acc", (n, cols), torch.float32)
            want = rm.rows(w, r.start, buf.scratch("expected", tuple(w.shape), mdtype), acc)
            x = None  # fp32 ΔW rows, for the fit: the merge's tile less W
            if rm.deltas and not o.dora:
                x = torch.sub(acc, w.view(n, cols), out=buf.scratch("delta", (n, cols), torch.float32))
            alt = plain.rows(w, r.start, buf.scratch("alt", tuple(w.shape), mdtype), acc) if plain else None
            bound = bounder(w, r.start, want, cols) if bounder is not None else None
            ag.add(m, want, w, bound, x, alt)
            buf.give_back(stored)
            buf.give_back(m)
        done(ag)
        return
        yield  # a generator that writes nothing

    return Job(key, torch.float32, (), run, "verify", reads=reads, writes=False)


def _flat_job(
    key: str, mk: str, o: KeyOps, mo: MergeOps, merged: Checkpoint, done: Done, agreement: Callable[..., Agreement]
) -> Job:
    """A tensor the merge copies (or replaces): MERGED must hold it, cast to MERGED's dtype (one ulp)."""
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
        ag = agreement(minfo.dtype, buf)
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


def _mirror_job(
    key: str, mk: str, mo: MergeOps, merged: Checkpoint, done: Done, agreement: Callable[..., Agreement]
) -> Job:
    """A tensor the merge writes with a job of its own (MoE experts, merged slab by slab): that job's blocks,
    exactly as the merge writes them, against MERGED's and BASE's elements at the same offsets, with the
    merge bound of each slab's ΔW factors."""
    assert mo.experts is not None
    experts = mo.experts
    inner = mo.job(key, None)
    bck, bkey = mo.base.where(key)
    shape = tuple(bck.info(bkey).shape)
    slab_rows, d2 = (shape[1], shape[2]) if len(shape) == 3 else shape
    mdtype, base_dtype = merged.info(mk).dtype, bck.info(bkey).dtype

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        ag = agreement(mdtype, buf)
        offset = 0
        slab, bounder = -1, None
        for out in inner.blocks(buf):
            n = out.numel()
            e, start = divmod(offset // d2, slab_rows)
            if e != slab:
                slab, delta = e, experts.slab_delta(key, e, shape)
                bounder = _merge_bounder([delta], mdtype, base_dtype, buf) if delta is not None else None
            m = merged.read_flat(mk, offset, offset + n).view(out.shape)
            b = bck.read_flat(bkey, offset, offset + n).view(out.shape)
            bound = bounder(b, start, out, d2) if bounder is not None else None
            ag.add(m, out.to(mdtype), b, bound)
            buf.give_back(out)
            offset += n
        done(ag)
        return
        yield

    return Job(key, torch.float32, (), run, "verify", reads=inner.reads, writes=False)


def _bias_job(key: str, mk: str, o: KeyOps, merged: Checkpoint, done: Done, agreement: Callable[..., Agreement]) -> Job:
    """A bias with lora_bias added (small: read whole): the merge bound with rank-0 terms |s|·|lora_B.bias|.  IA³'s
    b ⊙ l alone is one fp32 product, computed as the merge computes it: no bound beyond MERGED's rounding."""

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        m = merged.read(mk)
        base = o.source[0].read(o.source[1])
        mb = merge_bound([0] * len(o.bias_adds), m.dtype, base.dtype)
        bound = base.to(torch.float32).abs().mul_(mb.w)
        for lo, p in zip(o.bias_adds, mb.terms, strict=True):
            assert lo.module.bias_key is not None
            bound.add_(
                lo.ck.read(lo.module.bias_key).to(torch.float32).abs().reshape(bound.shape), alpha=p * abs(lo.scaling)
            )
        ag = agreement(m.dtype, buf)
        ag.add(m, bias_value(o).to(m.dtype), base, bound)
        done(ag)
        return
        yield

    return Job(key, torch.float32, (), run, "verify", writes=False)

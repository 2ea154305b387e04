"""``detect --base``: how a plain checkpoint differs from a base, tensor by tensor — which tensors
changed, which module kinds in which layers, and the effective rank of each change (a merged LoRA
shows a low rank, a full fine-tune does not)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import svd
from .arch import config_value, layer_index, short_name, tensor_kind
from .difference import DELTA_BLOCK, Difference, row_blocks
from .fmt import ranges
from .io.reader import Checkpoint, TensorInfo
from .progress import progress_bar


def analyse_difference(
    tuned_ck: Checkpoint, base_ck: Checkpoint, *, energy: float = 0.999, k: int = 64, progress: bool = False
) -> dict[str, Any]:
    """Which tensors differ from the base, which module kinds in which layers, and the effective rank.

    Reads both checkpoints whole (every tensor they share) and factors each changed weight: ``progress``
    shows a bar counting the tuned checkpoint's bytes compared."""
    model_config = tuned_ck.config or base_ck.config
    vocab = config_value(model_config, "vocab_size")
    changed: list[str] = []
    modules: dict[str, dict[str, Any]] = {}
    names = [n for n in tuned_ck.tensors if n in base_ck.tensors]
    for name in tuned_ck.tensors:
        if name not in base_ck.tensors:
            changed.append(name)
    nbytes = sum(tuned_ck.info(n).nbytes for n in names)
    blocks = _Blocks()
    with progress_bar(progress, nbytes, "comparing with the base") as advance, _kernel_threads():
        for name in names:
            entry = _compare_one(tuned_ck, base_ck, name, vocab, energy, k, blocks)
            advance(tuned_ck.info(name).nbytes)
            if entry is not None:
                changed.append(name)
                modules[name] = entry
    changed += [n for n in base_ck.tensors if n not in tuned_ck.tensors]
    return {
        "changed": changed,
        "modules": modules,
        "k": k,
        "summary": _summary(changed, modules, model_config, energy, k),
    }


class _Blocks:
    """Two byte buffers the row blocks of both checkpoints are read into, reused from block to block and tensor
    to tensor (grown when a block is larger): a fresh tensor per block is an allocation and its page faults,
    for every 2–4 MB read."""

    def __init__(self) -> None:
        self.raw = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]

    def rows(self, side: int, ck: Checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
        info = ck.info(name)
        if not info.shape:
            return ck.read(name)
        nbytes = ck.span(name, start, stop)[1]
        if self.raw[side].numel() < nbytes:
            self.raw[side] = torch.empty(nbytes, dtype=torch.uint8)
        return ck.read_rows(name, start, stop, out=self.raw[side][:nbytes].view(info.dtype))


def _compare_one(
    tuned_ck: Checkpoint,
    base_ck: Checkpoint,
    name: str,
    vocab: int | None,
    energy: float,
    k: int,
    blocks: _Blocks | None = None,
) -> dict[str, Any] | None:
    """One tensor both checkpoints hold: None when equal, else its entry (kind, shape; for a weight a LoRA
    can carry, the effective rank and the relative change)."""
    ta, tb = tuned_ck.info(name), base_ck.info(name)
    if ta.shape != tb.shape:
        return {"kind": "resized", "shape": [list(tb.shape), list(ta.shape)]}
    kind = tensor_kind(name, tuple(ta.shape), vocab)
    factor = kind != "other" and ta.is_float and tb.is_float
    tuned, base = tuned_ck.rows_of(name), base_ck.rows_of(name)
    norm = _StoredNorm(ta) if factor else None
    diff = Difference(tuned, base, keep=factor, measure_tuned=norm is not None and norm.ok)
    blocks = blocks or _Blocks()
    for s, e in row_blocks(tuned.shape):
        diff.add(s, blocks.rows(0, tuned_ck, name, s, e), blocks.rows(1, base_ck, name, s, e))
        if norm is not None and diff.tuned_sq is not None:
            norm.add(s, diff.tuned_sq)
    d = diff.result()
    if d is None:
        return None
    entry: dict[str, Any] = {"kind": kind, "shape": list(ta.shape)}
    if factor:
        # ‖ΔW‖²_F once: result() measured it on this same 2-D ΔW (a weight a LoRA carries is 2-D), the
        # very number the SVD's energies and the relative change would each measure again
        total = diff.total if diff.total is not None else svd.frobenius_sq(d)
        er, gap = svd.effective_rank(d, energy, k=k, total=total)
        stored = norm.result() if norm is not None else None
        entry.update(
            rank_at_energy=er,
            rank_at_gap=gap,
            relative_change=(
                total / max(stored if stored is not None else _frobenius_sq_stored(tuned_ck, name), 1e-300)
            )
            ** 0.5,
        )
    return entry


@contextmanager
def _kernel_threads() -> Iterator[None]:
    """The whole comparison on all cores but one, as the merge's kernels run (``pipeline.execute``): its
    copies, sums, QR and skinny GEMMs gain little from a second thread, and on a busy 2-core machine an
    oversubscribed OpenMP thread spins — a 32000×74 QR took 10× the wall time with 2 threads beside other
    work than with 1, and the difference pass's copies and sums doubled the CPU time.  The norms' sums
    (whose digits ``relative_change`` prints) split the same way on every machine with as many cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _StoredNorm:
    """‖W_tuned‖²_F from the rows the difference pass reads anyway, added exactly as
    :func:`_frobenius_sq_stored` adds them (same fp32 block sums, same order of the fp64 additions), so
    the relative change costs no second read of the tuned tensor.  Where that function's blocks do not
    fall on the difference's (a 2-D tensor whose read blocks are not whole multiples of the difference's
    row blocks, or any other shape), ``result()`` is None and the caller reads again."""

    def __init__(self, info: TensorInfo) -> None:
        shape = tuple(info.shape)
        self.ok = len(shape) == 2 and shape[0] > 0 and shape[1] > 0
        self.blocks: list[float] = []
        self.current = 0.0
        if not self.ok:
            return
        rows, cols = shape
        self.step = max(1, DELTA_BLOCK // max(1, info.nbytes // rows))  # _frobenius_sq_stored's read blocks
        diff_step = max(1, DELTA_BLOCK // (4 * cols))  # row_blocks' step: each block one of frobenius_sq's sums
        self.ok = diff_step == max(1, (1 << 20) // cols) and (self.step % diff_step == 0 or self.step >= rows)

    def add(self, start: int, block_sq: float) -> None:
        """The rows from ``start``: their Σ W² (``frobenius_sq`` of them, which the difference measured)."""
        if not self.ok:
            return
        if start % self.step == 0 and start:
            self.blocks.append(self.current)
            self.current = 0.0
        self.current += block_sq

    def result(self) -> float | None:
        if not self.ok:
            return None
        return sum([*self.blocks, self.current])


def _frobenius_sq_stored(ck: Checkpoint, name: str) -> float:
    """‖W‖²_F of a stored tensor, read in row blocks (fp64 accumulation)."""
    info = ck.info(name)
    rows = info.shape[0] if info.shape else 1
    step = max(1, DELTA_BLOCK // max(1, info.nbytes // max(1, rows)))
    if not info.shape:
        return svd.frobenius_sq(ck.read(name).to(torch.float32))
    return sum(svd.frobenius_sq(ck.read_rows(name, s, s + step).to(torch.float32)) for s in range(0, rows, step))


def _summary(
    changed: list[str], modules: dict[str, dict[str, Any]], model_config: dict[str, Any] | None, energy: float, k: int
) -> str:
    if not changed:
        return "identical to the base"
    n_layers = config_value(model_config, "num_hidden_layers")
    kinds: dict[str, set[int]] = {}
    outside: list[str] = []
    ranks: list[int | None] = []
    gaps: list[int | None] = []
    other = 0
    for name, e in modules.items():
        if e["kind"] == "other":
            other += 1
            continue
        mod = name[: -len(".weight")] if name.endswith(".weight") else name
        li = layer_index(mod)
        if li is None:
            outside.append(short_name(mod))
        else:
            kinds.setdefault(short_name(mod), set()).add(li)
        if e["kind"] != "resized":
            ranks.append(e.get("rank_at_energy"))
            gaps.append(e.get("rank_at_gap"))
    parts = []
    by_layers: dict[tuple[int, ...], list[str]] = {}
    for kname, ls in sorted(kinds.items()):
        by_layers.setdefault(tuple(sorted(ls)), []).append(kname)
    for layer_set, knames in by_layers.items():
        if n_layers and len(layer_set) == n_layers:
            where = f"in all {n_layers} layers"
        else:
            where = f"in layers {ranges(list(layer_set))}"
        parts.append(f"{', '.join(knames)} {where}")
    if outside:
        parts.append(", ".join(sorted(set(outside))))
    text = "; ".join(parts) + " changed" if parts else "only tensors a LoRA cannot carry changed"
    if other:
        text += f" (+{other} norm/bias/1-D tensor(s))"
    if ranks:
        if all(r is not None for r in ranks):
            rmax = max(r for r in ranks if r is not None)
            text += f"; rank ≤ {rmax} at {energy * 100:g}% energy"
            if rmax <= k // 2:
                text += f": looks like a merged LoRA of r={rmax}"
        else:
            text += f"; rank > {k} at {energy * 100:g}% energy in some modules (a full fine-tune, or rounding noise)"
            known_gaps = [g for g in gaps if g is not None]
            if known_gaps and len(known_gaps) == len(gaps):
                text += (
                    f"; but the spectrum drops by ≥10× after rank {max(known_gaps)}: likely a merged LoRA of "
                    f"r={max(known_gaps)} plus rounding"
                )
    return text

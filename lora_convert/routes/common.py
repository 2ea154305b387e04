"""Pieces every route uses: the copy job, the base-tensor view, matching adapter modules to the base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import lora_math
from ..errors import AdapterError, option
from ..io.reader import Checkpoint
from ..module_match import match_modules
from ..pipeline import Buffers, Job, Read

COPY_BLOCK = 1 << 20  # bytes per block of a plain copy: cache-sized, like the merge's output blocks


def copy_job(ck: Checkpoint, src: str, name: str, dtype: torch.dtype | None = None, op: str = "copy") -> Job:
    """``src`` of ``ck`` written as ``name``, bytes untouched (floats cast to ``dtype`` when given)."""
    info = ck.info(src)
    out_dtype = dtype if (dtype is not None and info.is_float) else info.dtype
    numel = info.nbytes // info.itemsize
    blockwise = bool(info.shape) and numel > 0
    step = max(1, COPY_BLOCK // info.itemsize)  # a copy is a byte range: bounded pieces, any shape

    def reads() -> list[Read]:
        return [Read(ck, src, s, min(s + step, numel), flat=True) for s in range(0, numel, step)] if blockwise else []

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        if not blockwise:
            w = ck.read(src)
            out = w.to(out_dtype)
            if not lora_math.all_finite(out) and lora_math.all_finite(w):
                _overflow(ck, src, out_dtype)
            yield out
            return
        for r in reads():
            w = buf.read(r)
            if out_dtype == info.dtype:
                yield w  # the read block goes to the writer as it is, and back to its pool from there
            else:
                out = buf.out(tuple(w.shape), out_dtype).copy_(w)
                if not lora_math.all_finite(out) and lora_math.all_finite(w):
                    _overflow(ck, src, out_dtype)
                buf.give_back(w)
                yield out

    return Job(name, out_dtype, info.shape, blocks, op, reads=reads)


def _overflow(ck: Checkpoint, key: str, dtype: torch.dtype) -> None:
    """A finite tensor that the cast to the output dtype turns into Inf (float16 ends at 65504)."""
    name = str(dtype).removeprefix("torch.")
    raise AdapterError(
        f"holds values beyond {name}'s range: written in {name} they would be Inf",
        path=ck.info(key).file,
        tensor=key,
        hint=f"write bf16 or fp32 ({option('dtype', 'bf16')})",
    )


def check_finite(t: torch.Tensor, ck: Checkpoint, key: str) -> torch.Tensor:
    if not lora_math.all_finite(t):
        raise AdapterError("holds NaN or Inf values", path=ck.root, tensor=key)
    return t


def same_tensor(a: tuple[Checkpoint, str], b: tuple[Checkpoint, str]) -> bool:
    """Bit-equal stored tensors, compared in row blocks (embeddings can be GBs)."""
    (ca, ka), (cb, kb) = a, b
    ia, ib = ca.info(ka), cb.info(kb)
    if ia.shape != ib.shape or ia.dtype_name != ib.dtype_name:
        return False
    rows = ia.shape[0] if ia.shape else 1
    step = max(1, COPY_BLOCK * 16 // max(1, ia.nbytes // max(1, rows)))
    return all(torch.equal(ca.read_rows(ka, s, s + step), cb.read_rows(kb, s, s + step)) for s in range(0, rows, step))


class BaseView:
    """Base tensors by their plain key, wherever they live (a base checkpoint, or inside an unmerged one)."""

    def __init__(self, ck: Checkpoint, mapping: dict[str, str] | None = None) -> None:
        self.ck = ck
        self.map = mapping if mapping is not None else {k: k for k in ck.tensors}

    def __contains__(self, key: str) -> bool:
        return key in self.map

    def keys(self) -> list[str]:
        return list(self.map)

    def where(self, key: str) -> tuple[Checkpoint, str]:
        return self.ck, self.map[key]


def remap_modules(
    modules: list[str],
    base: BaseView,
    what: str,
    adapter_root: Path,
    *,
    spelled: bool = False,
    config: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    kept: bool = False,
) -> dict[str, str]:
    """Module path in the adapter -> base key prefix, read across the layouts that spell one model
    differently (:mod:`~lora_convert.module_match`: VLM prefixes, a base saved without its
    ``base_model_prefix``, kohya's '_' spelling, SGM block numbers).  Modules of a part the base does not
    hold (a text encoder beside a UNet, a vision tower beside a text-only model) are left out of the
    mapping; ``notes`` receives what was read differently or left out (``kept``: by a route that keeps
    them under their own names).  Errs on ambiguous and unmatched modules."""
    match = match_modules(modules, base.keys(), spelled=spelled, config=config)
    if match.ambiguous:
        m, hits = next(iter(match.ambiguous.items()))
        raise AdapterError(
            f"{len(match.ambiguous)} of {len(modules)} {what} can be read as more than one module of the base: "
            f"{m} is {' or '.join(hits)}",
            path=adapter_root,
            hint="the names alone cannot say which is meant; rename the adapter's keys to the base's",
        )
    missing = match.unmatched
    if missing:
        hint = _prefix_hint(missing, set(base.keys()))
        sample = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise AdapterError(
            f"{len(missing)} of {len(modules)} {what} match no tensor of the base: {sample}",
            path=adapter_root,
            hint=hint or "is this adapter for this base model?",
        )
    if notes is not None:
        notes += match.notes(kept=kept)
    return match.mapping


def _prefix_hint(missing: list[str], keys: set[str]) -> str | None:
    m = missing[0]
    parts = m.split(".")
    for k in sorted(keys):
        kp = k.split(".")[:-1]
        for cut in range(1, min(3, len(parts))):
            if kp == parts[cut:]:
                return (
                    f"the adapter's keys carry an extra {'.'.join(parts[:cut])!r} prefix: expected e.g. {'.'.join(kp)}"
                )
        for cut in range(1, min(3, len(kp))):
            if kp[cut:] == parts:
                return f"the adapter's keys lack the {'.'.join(kp[:cut])!r} prefix the base uses: expected e.g. {'.'.join(kp)}"
    return None

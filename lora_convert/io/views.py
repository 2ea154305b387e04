"""Tensors of a file presented in another byte order than the one stored.

MLX stores LoRA factors transposed against PEFT (``lora_a`` is Aᵀ, ``lora_b`` is Bᵀ).  Rather than
teach every route a second orientation, the MLX dialect swaps those tensors' :class:`TensorInfo` for
views whose shape is the transposed one and whose bytes are the transposed tensor's: every route
(merge, split, attach, GGUF, MLX) then reads PEFT's ``A (r, in)`` and ``B (out, r)``.

A view reads its tensor whole on first use and keeps it while it is being read, as
:class:`~.sources.BinSource` does for non-contiguous tensors: LoRA factors are small, and block
reads of one tensor then cost one transposition, not one per block.  Torch is imported only then.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .safetensors_format import TensorInfo
from .sources import TensorSource

if TYPE_CHECKING:
    import torch


class TransposedSource(TensorSource):
    """2-D tensors of other sources, seen transposed.  :meth:`view` makes the :class:`TensorInfo`."""

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}
        self._stored: dict[str, TensorInfo] = {}  # view name -> the tensor as stored
        self._held: tuple[str, torch.Tensor] | None = None  # (name, transposed bytes) being read
        self._lock = threading.Lock()  # the pipeline's reader and worker may both read

    def view(self, info: TensorInfo) -> TensorInfo:
        """``info`` seen transposed (``info`` must be 2-D, and not a view already)."""
        if len(info.shape) != 2 or isinstance(info.source, TransposedSource):
            raise ValueError(f"{info.name}: only a stored 2-D tensor can be viewed transposed")
        self._stored[info.name] = info
        self.path = info.file
        rows, cols = info.shape
        return TensorInfo(info.name, info.dtype_name, (cols, rows), info.file, 0, info.nbytes, self)

    def infos(self) -> dict[str, TensorInfo]:
        return {}  # views are made by the dialect that needs them, never listed from a file

    def _bytes_of(self, name: str) -> torch.Tensor:
        import torch

        with self._lock:
            held = self._held
            if held is None or held[0] != name:
                st = self._stored[name]
                raw = st.source.read_into(st, 0, st.nbytes, None).view(st.dtype).reshape(st.shape)
                flat = raw.t().contiguous().reshape(-1).view(torch.uint8) if raw.numel() else raw.view(torch.uint8)
                held = self._held = (name, flat)
            return held[1]

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        piece = self._bytes_of(info.name)[start : start + nbytes]
        return piece.clone() if buf is None else buf.copy_(piece)

    def close(self) -> None:
        self._held = None


class ScaledSource(TensorSource):
    """2-D tensors cut to their leading rows and columns and multiplied by a vector along one axis, seen as
    float32: the LoRA factors that other PEFT tuners fold their vectors into.  AdaLoRA's ``lora_A ⊙ lora_E``
    (``E`` scales A's rows) and VeRA's ``λ_d ⊙ vera_A[:r, :in]`` / ``λ_b ⊙ vera_B[:out, :r]`` are then
    plain LoRA factors to every route, and ``ΔW = scaling · B'·A'`` is the tuner's own ``get_delta_weight``.

    The product is taken in float32, as PEFT takes it for float32 weights; for bf16/fp16 factors and
    vectors it is exact in float32 (the mantissas' product fits).  A view is read whole on first use and
    kept while it is being read, as :class:`TransposedSource`'s are."""

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}
        self._parts: dict[str, tuple[TensorInfo, TensorInfo | None, int, tuple[int, int]]] = {}
        self._stored: dict[str, TensorInfo] = {}
        self._held: tuple[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def view(
        self,
        name: str,
        factor: TensorInfo,
        scale: TensorInfo | None,
        axis: int,
        shape: tuple[int, int],
        stored: TensorInfo | None = None,
    ) -> TensorInfo:
        """``factor[:shape[0], :shape[1]]`` times ``scale`` (a vector of ``shape[axis]`` numbers, any shape
        with that many elements) along ``axis``, named ``name``; ``stored`` is the tensor stored under
        ``name`` (``factor`` when None: AdaLoRA's A; VeRA's views take the names of its λ vectors, since
        its factors are shared).  The caller checks the shapes fit."""
        for t in (factor, scale, stored):
            if t is not None and isinstance(t.source, (ScaledSource, TransposedSource)):
                raise ValueError(f"{t.name}: a view cannot be viewed again")
        if len(factor.shape) != 2:
            raise ValueError(f"{factor.name}: only a stored 2-D tensor can be viewed scaled")
        self._parts[name] = (factor, scale, axis, shape)
        self._stored[name] = stored or factor
        self.path = factor.file
        return TensorInfo(name, "F32", shape, factor.file, 0, 4 * shape[0] * shape[1], self)

    def stored(self, name: str) -> TensorInfo:
        """The factor a view was made from, as stored (what a route writing the tuner's own layout copies)."""
        return self._stored[name]

    def reads(self, name: str) -> list[TensorInfo]:
        """The stored tensors a view reads whole: its factor and its scale (VeRA's shared ``vera_A`` and a layer's
        ``λ_d``), what a dry run counts as read rather than the view's own float32 size."""
        factor, scale, _, _ = self._parts[name]
        return [factor] if scale is None else [factor, scale]

    def infos(self) -> dict[str, TensorInfo]:
        return {}

    def _bytes_of(self, name: str) -> torch.Tensor:
        import torch

        def whole(info: TensorInfo) -> torch.Tensor:
            raw = info.source.read_into(info, 0, info.nbytes, None).view(info.dtype).reshape(info.shape)
            return raw.to(torch.float32)

        with self._lock:
            held = self._held
            if held is None or held[0] != name:
                factor, scale, axis, (rows, cols) = self._parts[name]
                t = whole(factor)[:rows, :cols]
                if scale is not None:
                    vec = whole(scale).reshape(-1)
                    t = t * (vec.reshape(-1, 1) if axis == 0 else vec.reshape(1, -1))
                held = self._held = (name, t.contiguous().reshape(-1).view(torch.uint8))
            return held[1]

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        piece = self._bytes_of(info.name)[start : start + nbytes]
        return piece.clone() if buf is None else buf.copy_(piece)

    def close(self) -> None:
        self._held = None


def stored_tensors(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """``tensors`` with every view (transposed or scaled) replaced by the tensor as stored: what a route that
    writes a tuner's own layout copies byte for byte."""
    out = dict(tensors)
    for name, info in tensors.items():
        if isinstance(info.source, ScaledSource):
            out[name] = info.source.stored(name)
        elif isinstance(info.source, TransposedSource):
            out[name] = info.source._stored[name]
    return out

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

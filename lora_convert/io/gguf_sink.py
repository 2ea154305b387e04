"""The :class:`~.writer.TensorSink` of one GGUF file, written with the ``gguf`` package (llama.cpp's own
gguf-py): the plan's tensor infos and the caller's key/values first, then each tensor as it comes.

The tensors arrive in fp32 and are stored in the ``outtype`` asked for: ``f32``, ``f16``, ``bf16``
(``gguf.quants``' round-to-nearest-even) or ``q8_0`` — which quantizes blocks of 32 along a row, so a
tensor whose rows are not a multiple of 32 long is stored ``f16``, as llama.cpp's converters do.

``gguf`` is an optional dependency (``pip install 'lora-convert[gguf]'``); only this module and the
GGUF route import it.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError, RouteError
from ..third_party import import_quietly
from .writer import PlannedTensor

if TYPE_CHECKING:
    import torch

OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def require_gguf() -> Any:
    """The ``gguf`` module, or a RouteError that says how to install it."""
    try:
        gguf = import_quietly("gguf")
    except ImportError:
        raise RouteError(
            "writing GGUF needs the gguf package", hint="pip install 'lora-convert[gguf]' (or pip install gguf)"
        ) from None
    return gguf


class GgufSink:
    """Writes planned tensors into the GGUF file ``path``, with ``metadata`` as its key/values.

    ``metadata`` values are stored by their Python type: str as STRING, float as FLOAT32, int as UINT32
    (``general.architecture`` comes from ``arch``).  Tensors must arrive whole."""

    def __init__(self, path: Path, *, arch: str, metadata: dict[str, Any], outtype: str = "f32") -> None:
        if outtype not in OUTTYPES:
            raise ValueError(f"unknown outtype {outtype!r}")
        self.path, self.arch, self.metadata, self.outtype = Path(path), arch, metadata, outtype
        self._writer: Any = None
        self._plan: list[PlannedTensor] = []
        self._types: list[Any] = []
        self._pos = 0

    def qtype(self, shape: tuple[int, ...]) -> Any:
        """The ggml type a tensor of ``shape`` is stored in."""
        gguf = require_gguf()
        t = gguf.GGMLQuantizationType[OUTTYPES[self.outtype]]
        block = gguf.GGML_QUANT_SIZES[t][0]
        if shape and shape[-1] % block:
            return gguf.GGMLQuantizationType.F16
        return t

    def open(self, plan: list[PlannedTensor]) -> None:
        import numpy as np

        gguf = require_gguf()
        w = gguf.GGUFWriter(self.path, self.arch)
        for key, value in self.metadata.items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_uint32(key, int(value))
        self._plan, self._types = list(plan), [self.qtype(p.shape) for p in plan]
        for p, t in zip(self._plan, self._types, strict=True):
            nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(p.shape, t)) if p.shape else 4
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=t)
        self._writer = w
        with self._guard():
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """A failed write is the same one-line error the safetensors sink gives (disk full: by name)."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(
                    "disk full while writing", path=self.path, hint="free space or write elsewhere"
                ) from None
            raise OutputError(f"write failed: {exc.strerror or exc}", path=self.path) from None

    def write(self, name: str, data: torch.Tensor) -> None:
        """The whole tensor ``name`` (fp32), in plan order."""
        import torch

        gguf = require_gguf()
        if self._pos >= len(self._plan) or self._plan[self._pos].name != name:
            raise ValueError(f"{name}: written out of plan order")
        p, t = self._plan[self._pos], self._types[self._pos]
        if tuple(data.shape) != p.shape:
            raise ValueError(f"{name}: a GGUF tensor is written whole, got {tuple(data.shape)} of {p.shape}")
        arr = data.detach().to(torch.float32).contiguous().numpy()
        q = gguf.quants.quantize(arr, t)
        # What GGUFWriter.write_tensor_data does, but through the Python file: numpy's tofile writes through a
        # C stdio copy of the descriptor whose failed flush (a full disk) is lost, leaving a short file, exit 0.
        w = self._writer
        (fout,) = w.fout
        with self._guard():
            w.write_padding(fout, fout.tell())
            fout.write(memoryview(q.tobytes()))
            w.write_padding(fout, q.nbytes)
        self._pos += 1

    def close(self) -> list[str]:
        if self._pos != len(self._plan):
            raise ValueError(f"{self._plan[self._pos].name}: planned but not written")
        w, self._writer = self._writer, None
        with self._guard():
            w.close()
        return [self.path.name]

    def abort(self) -> None:
        if self._writer is not None:
            w, self._writer = self._writer, None
            try:
                w.close()
            except OSError:
                pass

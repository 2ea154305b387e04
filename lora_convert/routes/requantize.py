"""``merge --requantize``: merged weights written back in the base's own quantization.

A merged weight arrives from its merge job as fp32 blocks (never rounded to bf16 first).  The stream of
its scheme gathers them into bands — a row of 128-blocks for fp8, a whole number of bitsandbytes
blocks, one expert for MXFP4 — quantizes each band as it is complete and passes it on; the scales or
block maxima it computed follow as the next tensors.  Memory is one band.  A scheme whose scale needs
the whole tensor (one scale per tensor; bitsandbytes' double-quantized block maxima, whose offset is
their mean) takes two passes over the merge instead of holding the tensor.

Every band is dequantized again and compared with what went in: the error the re-quantization adds is
reported per module, next to the size of the LoRA's change (a re-quantization error as large as the
change leaves little of it).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..io.quantized import QuantizedTensor, scale_values
from ..io.reader import Checkpoint
from ..pipeline import Buffers, Job
from ..quant import bnb, fp8, mxfp4
from .common import copy_job
from .report import TextTable

BAND_ELEMENTS = 1 << 20  # values per band where the scheme allows any whole number of rows or blocks
_WIDEST_FLOAT = -1.2345678901234567e-123  # the longest repr json gives a float: sizes a 4-bit quant state


@dataclass
class ModuleError:
    """What re-quantizing one merged weight cost."""

    tensor: str
    scheme: str
    shape: list[int]
    rel_error: float = 0.0  # ‖dequant(quant(W')) − W'‖ / ‖W'‖, W' the fp32 merged weight
    max_error: float = 0.0
    delta: float | None = None  # ‖ΔW‖ / ‖W'‖ of the LoRA (None: DoRA, replaced weights, tokens)
    _sq: list[float] = field(default_factory=lambda: [0.0, 0.0], repr=False)

    def add(self, got: torch.Tensor, want: torch.Tensor) -> None:
        diff = got.float() - want
        self._sq[0] += float(torch.linalg.vector_norm(diff, dtype=torch.float64) ** 2)
        self._sq[1] += float(torch.linalg.vector_norm(want, dtype=torch.float64) ** 2)
        if diff.numel():
            self.max_error = max(self.max_error, float(diff.abs().max()))

    def finish(self, delta_norm: float | None) -> None:
        norm = math.sqrt(self._sq[1])
        self.rel_error = math.sqrt(self._sq[0]) / norm if norm else 0.0
        self.delta = delta_norm / norm if delta_norm is not None and norm else None

    @property
    def error_vs_delta(self) -> float | None:
        return self.rel_error / self.delta if self.delta else None


@dataclass
class Requantization:
    """The per-module report of ``--requantize``."""

    scheme: str
    modules: list[ModuleError] = field(default_factory=list)
    copied: int = 0  # quantized weights the LoRA did not touch, copied byte for byte

    def to_dict(self) -> dict[str, Any]:
        mods = []
        for m in self.modules:
            d = {k: v for k, v in asdict(m).items() if not k.startswith("_")}
            d["error_vs_delta"] = m.error_vs_delta
            mods.append(d)
        return {"requantized": {"scheme": self.scheme, "copied": self.copied, "modules": mods}}

    def table(self) -> tuple[list[str], list[list[str]]]:
        head = ["tensor", "shape", "rel. error", "max error", "‖ΔW‖/‖W‖", "error/ΔW"]
        rows = [
            [
                m.tensor,
                "x".join(map(str, m.shape)),
                f"{m.rel_error:.3e}",
                f"{m.max_error:.3e}",
                "-" if m.delta is None else f"{m.delta:.3e}",
                "-" if m.error_vs_delta is None else f"{m.error_vs_delta:.3g}",
            ]
            for m in self.modules
        ]
        return head, rows

    def tables(self) -> list[TextTable]:
        head, rows = self.table()
        return [
            TextTable(f"re-quantized ({self.scheme}); {self.copied} untouched quantized weights copied", head, rows)
        ]

    def summary_lines(self, total_bytes: int) -> list[str]:
        return []

    def notes(self) -> list[str]:
        return []

    def markdown(self) -> str:
        head, rows = self.table()
        lines = ["## Re-quantization error", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)


# -- streams: one per scheme -------------------------------------------------------------------------------------
class _Stream:
    """Quantizes one weight band by band; keeps the companions it computes until the weight is done."""

    band: int  # elements per band
    two_pass: bool = False  # needs a first pass over the merged weight (see :meth:`observe`)
    err: ModuleError

    def __init__(self, t: QuantizedTensor, raw: Checkpoint) -> None:
        self.t, self.raw = t, raw
        self.err = ModuleError(t.name, t.scheme, list(t.shape))

    def weight_spec(self) -> tuple[str, torch.dtype, tuple[int, ...]]:
        info = self.raw.info(self.t.stored["weight"])
        return info.name, info.dtype, tuple(info.shape)

    def computed(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Stored companions this stream computes (the others are copied as they are)."""
        return {}

    def observe(self, values: torch.Tensor, first: int) -> None:
        """First pass (``two_pass`` streams)."""

    def start(self) -> None:
        """Between the two passes."""

    def quantize(self, values: torch.Tensor, first: int) -> torch.Tensor:
        raise NotImplementedError

    def companion(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class _Fp8(_Stream):
    """fp8 with block, per-channel or per-tensor scales (``fp8`` and compressed-tensors)."""

    def __init__(self, t: QuantizedTensor, raw: Checkpoint, qc: dict[str, Any]) -> None:
        super().__init__(t, raw)
        rows, cols = t.shape
        self.block = t.params["block"]
        self.whole = self.block[0] >= rows and rows > 1  # one scale row for the whole tensor
        self.two_pass = self.whole and self.block[1] >= cols
        per_band = max(1, BAND_ELEMENTS // cols)
        band_rows = per_band if self.whole else self.block[0] * max(1, per_band // self.block[0])
        self.band = band_rows * cols
        self.ct = t.scheme == "ct-fp8"
        self.ue8m0 = qc.get("scale_fmt") == "ue8m0"
        sinfo = raw.info(t.stored["scale"])
        self.scale = torch.zeros(sinfo.shape, dtype=sinfo.dtype)
        self.amax = torch.zeros((), dtype=torch.float32)

    def computed(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {self.t.stored["scale"]: (self.scale.dtype, tuple(self.scale.shape))}

    def observe(self, values: torch.Tensor, first: int) -> None:
        self.amax = torch.maximum(self.amax, values.abs().max())

    def quantize(self, values: torch.Tensor, first: int) -> torch.Tensor:
        cols = self.t.shape[1]
        rows = values.view(-1, cols)
        r0 = first // cols
        amax = self.amax if self.two_pass else None
        if self.ct:
            q, s = fp8.quantize_fp8_divided(rows, self.block, self.scale.dtype, amax)
        else:
            q, s = fp8.quantize_fp8_block(rows, self.block, ue8m0=self.ue8m0, scale_dtype=self.scale.dtype, amax=amax)
        flat = self.scale.view(-1, self.scale.shape[-1]) if self.scale.dim() > 1 else self.scale.view(-1, 1)
        if self.two_pass:
            flat.copy_(s.reshape(flat.shape))
        else:
            g0 = r0 // self.block[0]
            flat[g0 : g0 + s.shape[0]] = s.reshape(s.shape[0], -1)
        self.err.add(fp8.dequantize_rows(q, scale_values(self.scale), r0, self.block), rows)
        return q

    def companion(self, key: str) -> torch.Tensor:
        return self.scale


class _Int8(_Stream):
    """bitsandbytes 8-bit: one absmax per row."""

    def __init__(self, t: QuantizedTensor, raw: Checkpoint) -> None:
        super().__init__(t, raw)
        cols = t.shape[1]
        self.band = max(1, BAND_ELEMENTS // cols) * cols
        self.scb = torch.zeros(t.shape[0], dtype=torch.float32)

    def computed(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {self.t.stored["scale"]: (torch.float32, (self.t.shape[0],))}

    def quantize(self, values: torch.Tensor, first: int) -> torch.Tensor:
        rows = values.view(-1, self.t.shape[1])
        r0 = first // self.t.shape[1]
        q, scb = bnb.quantize_int8_rows(rows)
        self.scb[r0 : r0 + rows.shape[0]] = scb
        self.err.add(bnb.dequantize_int8_rows(q, scb), rows)
        return q

    def companion(self, key: str) -> torch.Tensor:
        return self.scb


class _Bnb4(_Stream):
    """bitsandbytes 4-bit through its own quantizer; double-quantized block maxima take two passes (their
    offset is the mean of all of them), the error is measured with the maxima as written."""

    def __init__(self, t: QuantizedTensor, raw: Checkpoint) -> None:
        super().__init__(t, raw)
        self.bs, self.qtype, self.nested = t.params["blocksize"], t.params["quant_type"], t.params["nested"]
        self.band = max(1, BAND_ELEMENTS // self.bs) * self.bs
        self.numel = math.prod(t.shape)
        self.absmax = torch.zeros(bnb.blocks_of(self.numel, self.bs), dtype=torch.float32)
        self.two_pass = self.nested
        self.state = dict(t.params["state"])
        self.code = raw.read(t.stored["quant_map"]).float()
        self.final: torch.Tensor | None = None  # the maxima as written (after double quantization)
        self.packed: dict[str, torch.Tensor] = {}

    def computed(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        s = self.t.stored
        nb = self.absmax.numel()
        out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            s["absmax"]: (torch.uint8 if self.nested else torch.float32, (nb,))
        }
        if self.nested:
            nested_bs = int(self.state.get("nested_blocksize", 256))
            out[s["nested_absmax"]] = (torch.float32, (-(-nb // nested_bs),))
            out[s["nested_quant_map"]] = (torch.float32, (256,))
        blob = json.dumps({**self.state, "nested_offset": _WIDEST_FLOAT} if self.nested else self.state)
        out[s["quant_state"]] = (torch.uint8, (len(blob.encode("utf-8")),))
        return out

    def observe(self, values: torch.Tensor, first: int) -> None:
        _, absmax = bnb.quantize_4bit_chunk(values, self.bs, self.qtype)
        b0 = first // self.bs
        self.absmax[b0 : b0 + absmax.numel()] = absmax

    def start(self) -> None:
        nb = int(self.state.get("nested_blocksize", 256))
        codes, n_absmax, n_map, offset = bnb.compress_absmax(self.absmax, nb)
        self.packed.update(absmax=codes, nested_absmax=n_absmax, nested_quant_map=n_map)
        self.state["nested_offset"] = offset
        self.final = bnb.absmax_values(codes, 0, (n_absmax, n_map, nb, offset))

    def quantize(self, values: torch.Tensor, first: int) -> torch.Tensor:
        packed, absmax = bnb.quantize_4bit_chunk(values, self.bs, self.qtype)
        b0 = first // self.bs
        if not self.nested:
            self.absmax[b0 : b0 + absmax.numel()] = absmax
        used = self.final if self.final is not None else self.absmax
        got = bnb.dequantize_4bit(packed, first, values.numel(), used[b0:], b0, self.bs, self.code)
        self.err.add(got, values)
        return packed.view(-1, 1)

    def companion(self, key: str) -> torch.Tensor:
        s = self.t.stored
        if key == s["quant_state"]:
            size = self.computed()[key][1][0]
            blob = json.dumps(self.state).encode("utf-8").ljust(size)  # JSON allows the trailing spaces
            return torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        if key == s["absmax"]:
            return self.packed.get("absmax", self.absmax)
        return self.packed["nested_absmax" if key == s["nested_absmax"] else "nested_quant_map"]


class _Mxfp4(_Stream):
    """gpt-oss experts: one expert (in, out) per band, quantized along ``in`` in its stored (out, in) layout."""

    def __init__(self, t: QuantizedTensor, raw: Checkpoint) -> None:
        super().__init__(t, raw)
        experts, n_in, n_out = t.shape
        self.band = n_in * n_out
        self.scales = torch.zeros(raw.info(t.stored["scale"]).shape, dtype=torch.uint8)

    def computed(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {self.t.stored["scale"]: (torch.uint8, tuple(self.scales.shape))}

    def quantize(self, values: torch.Tensor, first: int) -> torch.Tensor:
        _, n_in, n_out = self.t.shape
        e = first // self.band
        w = values.view(n_in, n_out).t()
        blocks, scales = mxfp4.quantize(w)
        self.scales[e] = scales
        self.err.add(mxfp4.dequantize(blocks, scales), w)
        return blocks.unsqueeze(0)

    def companion(self, key: str) -> torch.Tensor:
        return self.scales


def _stream(t: QuantizedTensor, raw: Checkpoint, qc: dict[str, Any]) -> _Stream:
    if t.scheme in ("fp8-block", "ct-fp8"):
        return _Fp8(t, raw, qc)
    if t.scheme == "bnb-int8":
        return _Int8(t, raw)
    if t.scheme == "mxfp4":
        return _Mxfp4(t, raw)
    return _Bnb4(t, raw)


# -- jobs -----------------------------------------------------------------------------------------------------------
def _bands(job: Job, buf: Buffers, band: int) -> Iterator[tuple[torch.Tensor, int]]:
    """The merged weight's fp32 values in bands of ``band`` elements (the last one shorter), from the
    merge job's blocks of any shape; each block goes back to its pool as soon as it is copied."""
    pending = buf.scratch("requantize-band", (band,), torch.float32)
    fill, first = 0, 0
    for block in job.blocks(buf):
        flat = block.reshape(-1)
        pos = 0
        while pos < flat.numel():
            take = min(band - fill, flat.numel() - pos)
            pending[fill : fill + take].copy_(flat[pos : pos + take])
            fill, pos = fill + take, pos + take
            if fill == band:
                yield pending, first
                first, fill = first + band, 0
        buf.give_back(block)
    if fill:
        yield pending[:fill], first


def requantize_jobs(
    job: Job,
    t: QuantizedTensor,
    raw: Checkpoint,
    qc: dict[str, Any],
    report: Requantization,
    delta_norm: Callable[[], float | None],
) -> list[Job]:
    """The stored tensors of ``t`` re-quantized from ``job``'s fp32 merged weight: the weight, the
    companions computed from it, then the companions that travel unchanged (input scales, formats)."""
    stream = _stream(t, raw, qc)
    report.modules.append(stream.err)

    def weight_blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        if stream.two_pass:
            for values, first in _bands(job, buf, stream.band):
                stream.observe(values, first)
            stream.start()
        for values, first in _bands(job, buf, stream.band):
            yield stream.quantize(values, first)
        stream.err.finish(delta_norm())

    name, dtype, shape = stream.weight_spec()
    passes = 2 if stream.two_pass else 1
    jobs = [Job(name, dtype, shape, weight_blocks, "requantize", reads=lambda: job.reads() * passes)]
    computed = stream.computed()

    def companion(buf: Buffers, key: str) -> Iterator[torch.Tensor]:
        yield stream.companion(key)

    for key, (cdtype, cshape) in computed.items():
        jobs.append(Job(key, cdtype, cshape, functools.partial(companion, key=key), "quant-state"))
    for role, key in t.stored.items():
        if role != "weight" and key not in computed:
            jobs.append(copy_job(raw, key, key))
    return jobs


def raw_jobs(t: QuantizedTensor, raw: Checkpoint) -> list[Job]:
    """An untouched quantized weight: its stored tensors copied byte for byte."""
    return [copy_job(raw, key, key) for key in t.stored.values()]


def lora_delta_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """‖scaling · B·A‖_F from the factors alone: trace((BᵀB)(AAᵀ)), r×r products."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    return abs(scaling) * math.sqrt(max(0.0, float(((b.t() @ b) * (a @ a.t())).sum())))

"""Quantized checkpoints read as plain float tensors: fp8 with block scales (DeepSeek-V3, Qwen3-FP8),
compressed-tensors fp8, bitsandbytes 4-bit and 8-bit, and MXFP4 (gpt-oss experts).

:func:`find_layout` reads ``config.json``'s ``quantization_config`` and the tensor headers (no tensor
data, no torch: ``detect`` and ``report`` use it) and lists every quantized weight with the stored
tensors it is made of.  :func:`dequantized` wraps a checkpoint so that each quantized weight appears
as one float tensor of its logical shape and its companions (scales, block maxima, quant states)
disappear; a read of some rows dequantizes just the blocks behind them
(:class:`DequantizingSource`), so every route reads a quantized base exactly as it reads a plain one.
The math lives in :mod:`lora_convert.quant`.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsupportedError
from . import quant_bounds
from .safetensors_format import DTYPE_TABLE, TensorInfo
from .sources import SafetensorsSource, TensorSource

if TYPE_CHECKING:
    import torch

    from .reader import Checkpoint

FP32_MAX = 3.4028234663852886e38
FP8_SCALE_DTYPES = frozenset({"F32", "BF16", "F16", "F8_E8M0"})
BNB_4BIT_BLOB = ".quant_state.bitsandbytes__"
# Suffixes that only quantized checkpoints have: a base holding one without a quantization_config is refused.
QUANTIZED_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".qweight", ".scales", ".absmax", ".SCB", "_blocks")
# Tensors that only mean something beside a quantized weight of the layout (refused when they are not).
COMPANION_SUFFIXES = (*QUANTIZED_SUFFIXES, ".input_scale", ".activation_scale", ".weight_zero_point")


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized weight: the float tensor it stands for and the stored tensors it is made of."""

    name: str  # the logical tensor (gpt-oss: ``...experts.gate_up_proj``, without ``_blocks``)
    scheme: str  # fp8-block | ct-fp8 | bnb-nf4 | bnb-fp4 | bnb-int8 | mxfp4
    shape: tuple[int, ...]
    dtype_name: str  # what the format's own library dequantizes to
    stored: dict[str, str]  # role -> stored key: "weight" and "scale" first, then what only travels along
    params: dict[str, Any] = field(default_factory=dict)  # block, blocksize, quant_type, the 4-bit JSON state...

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if self.name.endswith(".weight") else self.name


@dataclass
class QuantLayout:
    """What a checkpoint's quantization is, and where every quantized weight lies."""

    method: str  # quant_method of config.json
    scheme: str  # in words, for detect/report and the model card
    tensors: dict[str, QuantizedTensor]  # logical name -> tensor
    config: dict[str, Any]

    @property
    def hidden(self) -> set[str]:
        """Stored keys that the dequantized view replaces by logical tensors."""
        return {k for t in self.tensors.values() for k in t.stored.values()}

    def stored_bytes(self, ck: Checkpoint) -> int:
        return sum(ck.info(k).nbytes for k in self.hidden)

    def logical_bytes(self, itemsize: int | None = None) -> int:
        """Bytes of the quantized weights once dequantized (in ``itemsize`` bytes, else their own dtype)."""
        return sum(math.prod(t.shape) * (itemsize or DTYPE_TABLE[t.dtype_name][0]) for t in self.tensors.values())


def find_layout(ck: Checkpoint) -> QuantLayout | None:
    """The quantization of ``ck`` (None for a plain checkpoint).  Raises UnsupportedError for a scheme we
    do not know and CheckpointError for companions that are missing or of the wrong shape, both naming
    the tensor."""
    qc = (ck.config or {}).get("quantization_config")
    if not qc:
        for k in ck.tensors:
            if k.endswith(QUANTIZED_SUFFIXES):
                raise UnsupportedError(
                    "the base holds quantized weights but config.json has no quantization_config",
                    path=ck.root,
                    tensor=k,
                    hint="use the checkpoint's own config.json, or merge into the unquantized base",
                )
        return None
    method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
    reader = _READERS.get(method)
    if reader is None:
        raise UnsupportedError(
            f"the base is quantized with {method}, which lora-convert cannot dequantize",
            path=ck.root,
            tensor=_first_quantized(ck),
            hint="supported: fp8 (block scales), compressed-tensors fp8, bitsandbytes 4/8-bit, mxfp4; "
            "or merge into the unquantized base",
        )
    tensors, scheme = reader(ck, qc)
    if not tensors:
        raise CheckpointError(
            f"config.json's quantization_config says {method} but no tensor is stored that way",
            path=ck.root,
            hint="the config does not belong to these weights",
        )
    return QuantLayout(method, scheme, tensors, qc)


def refuse_orphans(ck: Checkpoint, layout: QuantLayout) -> None:
    """A scale (or other quantization companion) that belongs to no quantized weight: the dequantized
    view would copy it into an output whose config no longer says it is quantized, where nothing reads
    it — and a weight stored in float beside its old scale is a half-converted checkpoint whose meaning
    (scaled or not?) we cannot know.  (Merges refuse it; detect and report still describe the base.)"""
    hidden = layout.hidden
    for k in ck.tensors:
        if k in hidden or not k.endswith(COMPANION_SUFFIXES):
            continue
        stem = k[: -len(next(s for s in COMPANION_SUFFIXES if k.endswith(s)))]
        info = ck.tensors.get(stem + ".weight") or ck.tensors.get(stem)
        beside = f"beside a {info.dtype_name} weight that is not quantized" if info else "with no weight of its own"
        raise CheckpointError(
            f"a quantization companion {beside} ({layout.method})",
            path=ck.info(k).file,
            tensor=k,
            hint="the checkpoint is half converted: remove the stray tensor, or use the checkpoint's own weights",
        )


def _first_quantized(ck: Checkpoint) -> str | None:
    for k, info in ck.tensors.items():
        if k.endswith(QUANTIZED_SUFFIXES) or (k.endswith("weight") and not info.is_float):
            return k
    return None


def _need(ck: Checkpoint, key: str, owner: str, what: str) -> TensorInfo:
    info = ck.tensors.get(key)
    if info is None:
        raise CheckpointError(f"quantized weight without its {what} ({key})", path=ck.root, tensor=owner)
    return info


def _check_shape(ck: Checkpoint, info: TensorInfo, want: tuple[int, ...], what: str) -> None:
    if tuple(info.shape) != tuple(want) and not (math.prod(info.shape) == 1 == math.prod(want)):
        raise CheckpointError(
            f"{what} has shape {list(info.shape)}, expected {list(want)}", path=ck.root, tensor=info.name
        )


# -- fp8 with block scales (quant_method "fp8") ---------------------------------------------------------------
def _fp8_block(ck: Checkpoint, qc: dict[str, Any]) -> tuple[dict[str, QuantizedTensor], str]:
    try:  # numbers from config.json, bounded before they size a grid
        size = quant_bounds.fp8_block_size(qc.get("weight_block_size"))
        if any(info.dtype_name == "F8_E4M3" for info in ck.tensors.values()):
            quant_bounds.check_fp8_fmt(qc.get("fmt"))
    except ValueError as exc:
        raise CheckpointError(
            f"config.json's quantization_config: {exc}", path=ck.root, hint="fix it in config.json"
        ) from None
    out: dict[str, QuantizedTensor] = {}
    for k, info in ck.tensors.items():
        if info.dtype_name != "F8_E4M3":
            continue
        if info.dtype_name == "F8_E4M3" and len(info.shape) != 2:
            raise UnsupportedError("fp8 weight that is not 2-D", path=ck.root, tensor=k)
        rows, cols = info.shape
        block = size or (rows, cols)
        scale = _need(ck, k + "_scale_inv", k, "weight_scale_inv")
        _scale_dtype(ck, scale)
        _check_shape(ck, scale, (-(-rows // block[0]), -(-cols // block[1])), "weight_scale_inv")
        stored = {"weight": k, "scale": scale.name}
        act = k.rsplit(".", 1)[0] + ".activation_scale"
        if act in ck.tensors:
            stored["activation_scale"] = act
        out[k] = QuantizedTensor(k, "fp8-block", (rows, cols), "F32", stored, {"block": block})
    what = f"{size[0]}×{size[1]} blocks" if size else "one scale per tensor"
    ue = ", ue8m0 scales" if qc.get("scale_fmt") == "ue8m0" else ""
    return out, f"fp8 e4m3, {what}{ue}"


def _scale_dtype(ck: Checkpoint, info: TensorInfo) -> None:
    if info.dtype_name not in FP8_SCALE_DTYPES:
        raise UnsupportedError(f"fp8 scales stored as {info.dtype_name}", path=ck.root, tensor=info.name)


# -- compressed-tensors fp8 ------------------------------------------------------------------------------------
def _ct_weights(qc: dict[str, Any]) -> list[dict[str, Any]]:
    groups = qc.get("config_groups") or {}
    fmt = qc.get("format")
    out = []
    for g in groups.values() if isinstance(groups, dict) else []:
        w = g.get("weights") if isinstance(g, dict) else None
        if not w:
            continue
        if not isinstance(w, dict):
            raise UnsupportedError(
                f"compressed-tensors config_groups weights must be an object, not {type(w).__name__}"
            )
        gfmt = g.get("format") or fmt
        if gfmt not in ("float-quantized", "naive-quantized") or w.get("type") != "float" or w.get("num_bits") != 8:
            raise UnsupportedError(
                f"compressed-tensors format {gfmt!r} with {w.get('num_bits')}-bit {w.get('type')} weights "
                "(only fp8 float-quantized is supported)",
            )
        if not w.get("symmetric", True):
            raise UnsupportedError("compressed-tensors asymmetric fp8 weights")
        out.append(w)
    return out


def _ct_fp8(ck: Checkpoint, qc: dict[str, Any]) -> tuple[dict[str, QuantizedTensor], str]:
    try:
        weights = _ct_weights(qc)
    except UnsupportedError as exc:
        raise UnsupportedError(exc.message, path=ck.root, tensor=_first_quantized(ck)) from None
    try:  # numbers from config.json, bounded before they size a grid
        sizes = [
            quant_bounds.fp8_block_size(w.get("block_structure"), "block_structure")
            for w in weights
            if w.get("strategy") == "block"
        ]
        blocks = {b for b in sizes if b is not None}
    except ValueError as exc:
        raise CheckpointError(
            f"config.json's quantization_config: {exc}", path=ck.root, hint="fix it in config.json"
        ) from None
    if len(blocks) > 1:
        raise UnsupportedError(f"compressed-tensors block sizes {sorted(blocks)} in one model", path=ck.root)
    block_size = blocks.pop() if blocks else None
    out: dict[str, QuantizedTensor] = {}
    for k, info in ck.tensors.items():
        if info.dtype_name != "F8_E4M3":
            continue
        rows, cols = info.shape if len(info.shape) == 2 else (0, 0)
        prefix = k.rsplit(".", 1)[0]
        scale = _need(ck, prefix + ".weight_scale", k, "weight_scale")
        if prefix + ".weight_zero_point" in ck.tensors:
            raise UnsupportedError("asymmetric fp8 (a weight_zero_point)", path=ck.root, tensor=k)
        if not scale.is_float:
            raise UnsupportedError(f"fp8 scales stored as {scale.dtype_name}", path=ck.root, tensor=scale.name)
        n = math.prod(scale.shape)
        if n == 1:
            strategy, block = "tensor", (rows, cols)
        elif tuple(scale.shape) == (rows, 1):
            strategy, block = "channel", (1, cols)
        elif block_size is not None:
            strategy, block = "block", (int(block_size[0]), int(block_size[1]))
            _check_shape(ck, scale, (-(-rows // block[0]), -(-cols // block[1])), "weight_scale")
        else:
            raise CheckpointError(
                f"weight_scale has shape {list(scale.shape)}, which fits neither one scale per tensor nor "
                f"one per row ({rows}) and the config names no block size",
                path=ck.root,
                tensor=scale.name,
            )
        stored = {"weight": k, "scale": scale.name}
        if prefix + ".input_scale" in ck.tensors:
            stored["input_scale"] = prefix + ".input_scale"
        params = {"block": block, "strategy": strategy}
        out[k] = QuantizedTensor(k, "ct-fp8", (rows, cols), scale.dtype_name, stored, params)
    kinds = sorted({t.params["strategy"] for t in out.values()})
    return out, f"compressed-tensors fp8 e4m3, per-{'/'.join(kinds)} scales"


# -- bitsandbytes ------------------------------------------------------------------------------------------------
def raw_bytes(ck: Checkpoint, key: str) -> bytes:
    """A small tensor's bytes without torch when it lives in a safetensors file (headers-only listing)."""
    info = ck.info(key)
    if isinstance(info.source, SafetensorsSource):
        with open(info.file, "rb") as fh:
            fh.seek(info.offset)
            return fh.read(info.nbytes)
    return bytes(info.source.read_into(info, 0, info.nbytes, None).numpy().tobytes())


def _bnb(ck: Checkpoint, qc: dict[str, Any]) -> tuple[dict[str, QuantizedTensor], str]:
    out: dict[str, QuantizedTensor] = {}
    for k in ck.tensors:
        if BNB_4BIT_BLOB in k:
            t = _bnb_4bit(ck, k)
            out[t.name] = t
        elif k.endswith(".SCB"):
            t = _bnb_int8(ck, k)
            out[t.name] = t
    kinds = sorted({t.scheme.removeprefix("bnb-") for t in out.values()})
    dq = any(t.params.get("nested") for t in out.values())
    return out, f"bitsandbytes {'/'.join(kinds)}{', double-quantized block maxima' if dq else ''}"


def _bnb_4bit(ck: Checkpoint, blob_key: str) -> QuantizedTensor:
    wk, _, qtype = blob_key.partition(BNB_4BIT_BLOB)
    winfo = _need(ck, wk, blob_key, "packed weight")
    try:
        state = json.loads(raw_bytes(ck, blob_key).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(
            "not a bitsandbytes quant state (JSON)", path=ck.info(blob_key).file, tensor=blob_key
        ) from None
    problem = quant_bounds.bnb_state_problem(state, qtype)  # every number bounded before it sizes or divides anything
    if problem:
        raise CheckpointError(f"bitsandbytes quant state: {problem}", path=ck.info(blob_key).file, tensor=blob_key)
    shape, blocksize = tuple(state["shape"]), state["blocksize"]
    dtype = quant_bounds.BNB_DTYPES[state.get("dtype", "float32")]
    if winfo.dtype_name != "U8":
        raise UnsupportedError(
            f"4-bit weights stored as {winfo.dtype_name} (bnb_4bit_quant_storage other than uint8)",
            path=ck.root,
            tensor=wk,
        )
    n = math.prod(shape)
    _check_shape(ck, winfo, ((n + 1) // 2, 1), "packed 4-bit weight")
    nblocks = -(-n // blocksize)
    absmax = _need(ck, f"{wk}.absmax", wk, "absmax")
    _check_shape(ck, absmax, (nblocks,), "absmax")
    stored = {"weight": wk, "absmax": absmax.name}
    stored["quant_map"] = _need(ck, f"{wk}.quant_map", wk, "quant_map").name
    _check_shape(ck, ck.info(stored["quant_map"]), (16,), "quant_map")
    nested = f"{wk}.nested_absmax" in ck.tensors
    if nested:
        nb = int(state.get("nested_blocksize", 256))
        _check_shape(ck, _need(ck, f"{wk}.nested_absmax", wk, "nested_absmax"), (-(-nblocks // nb),), "nested_absmax")
        _check_shape(ck, _need(ck, f"{wk}.nested_quant_map", wk, "nested_quant_map"), (256,), "nested_quant_map")
        stored["nested_absmax"], stored["nested_quant_map"] = f"{wk}.nested_absmax", f"{wk}.nested_quant_map"
    elif absmax.dtype_name != "F32":
        raise CheckpointError("absmax is not F32 and no nested_absmax is stored", path=ck.root, tensor=absmax.name)
    stored["quant_state"] = blob_key
    params = {"blocksize": blocksize, "quant_type": qtype, "nested": nested, "state": state}
    return QuantizedTensor(wk, f"bnb-{qtype}", shape, dtype, stored, params)


def _bnb_int8(ck: Checkpoint, scb_key: str) -> QuantizedTensor:
    prefix = scb_key.removesuffix(".SCB")
    winfo = _need(ck, prefix + ".weight", scb_key, "int8 weight")
    if winfo.dtype_name != "I8" or len(winfo.shape) != 2:
        raise CheckpointError(
            f"8-bit weight stored as {winfo.dtype_name} {list(winfo.shape)}", path=ck.root, tensor=winfo.name
        )
    _check_shape(ck, ck.info(scb_key), (winfo.shape[0],), "SCB")
    stored = {"weight": winfo.name, "scale": scb_key}
    fmt = prefix + ".weight_format"
    if fmt in ck.tensors:
        if raw_bytes(ck, fmt) != b"\x00":
            raise UnsupportedError(
                "8-bit weight in a legacy tiled format (weight_format != row)", path=ck.root, tensor=fmt
            )
        stored["weight_format"] = fmt
    return QuantizedTensor(winfo.name, "bnb-int8", tuple(winfo.shape), "F32", stored)


# -- MXFP4 (gpt-oss) -----------------------------------------------------------------------------------------------
def _mxfp4(ck: Checkpoint, qc: dict[str, Any]) -> tuple[dict[str, QuantizedTensor], str]:
    out: dict[str, QuantizedTensor] = {}
    for k, info in ck.tensors.items():
        if not k.endswith("_blocks"):
            continue
        name = k.removesuffix("_blocks")
        if info.dtype_name != "U8" or len(info.shape) != 4 or info.shape[-1] != 16:
            raise CheckpointError(
                f"MXFP4 blocks stored as {info.dtype_name} {list(info.shape)}, expected U8 (experts, out, in/32, 16)",
                path=ck.root,
                tensor=k,
            )
        experts, rows, groups, _ = info.shape
        scales = _need(ck, name + "_scales", k, "_scales")
        if scales.dtype_name != "U8":
            raise CheckpointError(f"MXFP4 scales stored as {scales.dtype_name}", path=ck.root, tensor=scales.name)
        _check_shape(ck, scales, (experts, rows, groups), "MXFP4 scales")
        shape = (experts, groups * 32, rows)  # transformers' parameter: (experts, in, out)
        out[name] = QuantizedTensor(name, "mxfp4", shape, "BF16", {"weight": k, "scale": scales.name})
    return out, "MXFP4 (e2m1 values, one power-of-two scale per 32)"


_READERS = {"fp8": _fp8_block, "compressed-tensors": _ct_fp8, "bitsandbytes": _bnb, "mxfp4": _mxfp4}


# -- scales that would make the dequantized weights wrong -------------------------------------------------------------
# Roles of stored tensors read whole and checked before a merge starts (small: one value per block, row or
# 256 blocks); ``absmax`` (one per 64 values) and MXFP4's scales are checked as each read touches them.
_SMALL_SCALES = ("scale", "nested_absmax", "quant_map", "nested_quant_map")
# A scale of 0 is what bitsandbytes writes for an all-zero block or row; no fp8 quantizer writes one
# (transformers writes 1 for an all-zero block, compressed-tensors its dtype's epsilon).
_ZERO_IS_EXPECTED = ("bnb-nf4", "bnb-fp4", "bnb-int8")


def check_scales(ck: Checkpoint, layout: QuantLayout) -> list[str]:
    """Refuse, naming file and tensor, a scale that is NaN or Inf (every weight it scales would be) or
    negative (no quantizer writes one: the weights' signs would flip); return a warning for each fp8
    scale of 0 (its block dequantizes to zeros, though no fp8 quantizer writes a 0)."""
    import torch

    warnings = []
    for t in layout.tensors.values():
        if t.scheme == "mxfp4":  # exponents, one per 32 values: checked as each expert is read
            continue
        for role in _SMALL_SCALES:
            key = t.stored.get(role)
            if key is None:
                continue
            values = scale_values(ck.read(key)) if t.scheme in ("fp8-block", "ct-fp8") else ck.read(key).float()
            signed = role in ("quant_map", "nested_quant_map")  # code books hold negative values
            check_scale_values(ck, key, values, signed=signed)
            if role == "scale" and t.scheme not in _ZERO_IS_EXPECTED:
                zeros = int(torch.count_nonzero(values == 0))
                if zeros:
                    warnings.append(
                        f"{ck.info(key).file}: {key}: {zeros} of its {values.numel()} scales are 0 (no fp8 "
                        "quantizer writes one): the blocks they scale were read as zeros"
                    )
        # (bnb's nested_offset is bounded where the quant state is read: quant_bounds.bnb_state_problem)
    return warnings


def check_scale_values(ck: Checkpoint, key: str, values: torch.Tensor, *, signed: bool = False) -> None:
    from ..lora_math import all_finite

    if not all_finite(values):
        what = "NaN or Inf (an e8m0 exponent of 255 is NaN)" if ck.info(key).dtype_name in ("U8", "F8_E8M0") else ""
        raise CheckpointError(
            f"holds {what or 'NaN or Inf'}: every weight it scales would be NaN or Inf",
            path=ck.info(key).file,
            tensor=key,
            hint="the checkpoint is damaged; use an intact copy",
        )
    if not signed and values.numel() and float(values.min()) < 0:
        raise CheckpointError(
            f"holds a negative scale ({float(values.min()):g}): no quantizer writes one, and it would flip the "
            "signs of the weights it scales",
            path=ck.info(key).file,
            tensor=key,
            hint="the checkpoint is damaged; use an intact copy",
        )


# -- the dequantized view --------------------------------------------------------------------------------------------
def dequantized(ck: Checkpoint, layout: QuantLayout) -> Checkpoint:
    """``ck`` with every quantized weight as one float tensor (its logical name, shape and dtype) and the
    stored pieces behind it hidden; reads dequantize the blocks they touch."""
    source = DequantizingSource(ck, layout)
    hidden = layout.hidden
    tensors: dict[str, TensorInfo] = {}
    by_weight = {t.stored["weight"]: t for t in layout.tensors.values()}
    for k, info in ck.tensors.items():
        t = by_weight.get(k)
        if t is not None:
            tensors[t.name] = source.infos()[t.name]
        elif k not in hidden:
            tensors[k] = info
    return replace(ck, tensors=tensors, sources=[*ck.sources, source])


class DequantizingSource(TensorSource):
    """The logical tensors of a quantized checkpoint: a byte range of one is the dequantized values of
    those elements, computed from the stored blocks that hold them (one expert at most for MXFP4)."""

    def __init__(self, ck: Checkpoint, layout: QuantLayout) -> None:
        self.ck, self.layout = ck, layout
        self.path = ck.root
        self.metadata: dict[str, str] = {}
        self._infos = {
            t.name: TensorInfo(
                t.name,
                t.dtype_name,
                t.shape,
                ck.info(t.stored["weight"]).file,
                0,
                math.prod(t.shape) * DTYPE_TABLE[t.dtype_name][0],
                self,
            )
            for t in layout.tensors.values()
        }
        self._small: dict[str, torch.Tensor] = {}  # the current tensor's scales, SCB, quant maps: read once
        self._owner: str | None = None
        self._expert: tuple[str, int, torch.Tensor, torch.Tensor] | None = None  # MXFP4: the last expert read
        self._lock = threading.Lock()

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        import torch

        from .. import lora_math

        t = self.layout.tensors[info.name]
        first, count = start // info.itemsize, nbytes // info.itemsize
        with self._lock:
            if self._owner != t.name:  # a model's scales add up (DeepSeek-V3: 160 MB): keep one tensor's
                self._small.clear()
                self._owner = t.name
            direct = self._fp8_into(t, info, first, count, buf)
            if direct is not None:
                return direct
            values = self._elements(t, first, first + count).to(info.dtype)
        if not self._finite_by_scales(t, info) and not lora_math.all_finite(values):
            self._non_finite(t)
        data = values.reshape(-1).view(torch.uint8)
        if buf is None:
            return data.clone()
        return buf.copy_(data)

    def _fp8_into(
        self, t: QuantizedTensor, info: TensorInfo, first: int, count: int, buf: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Whole fp8 rows dequantized to fp32 straight into ``buf`` (one conversion pass and one in-place
        multiply per band of rows, :func:`..quant.fp8.dequantize_rows_into`), their finiteness read from the
        fp8 bytes and the scales (:meth:`_finite_by_scales`) rather than from the fp32 values; None where the
        read is anything else (the general path)."""
        import torch

        from ..quant import fp8

        cols = t.shape[1] if len(t.shape) == 2 else 0
        if (
            t.scheme not in ("fp8-block", "ct-fp8")
            or info.dtype != torch.float32
            or buf is None
            or not cols
            or first % cols
            or count % cols
            or not buf.is_contiguous()
            or buf.numel() != count * 4
            or buf.storage_offset() % 4
        ):
            return None
        r0, r1 = first // cols, (first + count) // cols
        q = self.ck.read_rows(t.stored["weight"], r0, r1)
        if q.dtype != fp8.FP8:
            return None
        scale = self._scale(t)
        out = fp8.dequantize_rows_into(q, scale, r0, t.params["block"], buf.view(torch.float32).view(r1 - r0, cols))
        if not self._finite_by_scales(t, info) or fp8.has_nan_code(q):
            from .. import lora_math

            if not lora_math.all_finite(out):
                self._non_finite(t)
        return buf

    def _finite_by_scales(self, t: QuantizedTensor, info: TensorInfo) -> bool:
        """Whether every value × scale of ``t`` is finite in ``info``'s dtype whatever its stored values, from
        its scales alone (checked finite when read): |value| is at most 448 for fp8 e4m3 (NaN codes are
        checked apart), the largest |code| for 4-bit; so max |scale| × that ≤ the dtype's largest finite
        value means no product can overflow.  Computed once per tensor; False where not known."""
        import torch

        key = f"{t.name}//finite"
        cached = self._small.get(key)
        if cached is not None:
            return bool(cached)
        limit = torch.finfo(info.dtype).max if info.dtype.is_floating_point else 0.0
        bound = math.inf
        if t.scheme in ("fp8-block", "ct-fp8") and self.ck.info(t.stored["weight"]).dtype_name == "F8_E4M3":
            bound = 448.0 * float(self._scale(t).abs().max())
        elif t.scheme in ("bnb-nf4", "bnb-fp4") and not t.params["nested"]:
            code = float(self._cached(t.stored["quant_map"]).float().abs().max())
            bound = code * float(self._cached(t.stored["absmax"]).float().abs().max())
        ok = bound <= limit
        self._small[key] = torch.tensor(ok)
        return ok

    def _scale(self, t: QuantizedTensor) -> torch.Tensor:
        """fp32 values of an fp8 or int8 weight's scales, read and checked once per tensor."""
        key = t.stored["scale"]
        scale = self._small.get(key)
        if scale is None:
            raw = self.ck.read(key)
            scale = self._small[key] = raw.float() if t.scheme == "bnb-int8" else scale_values(raw)
            check_scale_values(self.ck, key, scale)
        return scale

    def _non_finite(self, t: QuantizedTensor) -> None:
        """Dequantized values that are NaN or Inf, from scales that passed :func:`check_scales`: a stored
        value that is NaN (fp8 has NaN codes), or a finite value × finite scale beyond the dtype's range."""
        key = t.stored["weight"]
        raise CheckpointError(
            f"dequantized to NaN or Inf ({t.scheme}: a stored value is NaN, or value × scale overflows {t.dtype_name})",
            path=self.ck.info(key).file,
            tensor=key,
            hint="the checkpoint is damaged; use an intact copy",
        )

    def prefetch(self, info: TensorInfo, start: int, nbytes: int) -> None:
        t = self.layout.tensors[info.name]
        first, stop = start // info.itemsize, (start + nbytes) // info.itemsize
        if t.scheme.startswith("bnb-") and t.scheme != "bnb-int8":
            self.ck.prefetch(t.stored["weight"], first // 2, -(-stop // 2))
        elif t.scheme == "mxfp4":
            per = math.prod(t.shape[1:])
            self.ck.prefetch(t.stored["weight"], first // per, -(-stop // per))
        else:
            cols = t.shape[1]
            self.ck.prefetch(t.stored["weight"], first // cols, -(-stop // cols))

    def _cached(self, key: str) -> torch.Tensor:
        got = self._small.get(key)
        if got is None:
            got = self._small[key] = self.ck.read(key)
        return got

    def _elements(self, t: QuantizedTensor, first: int, stop: int) -> torch.Tensor:
        if t.scheme in ("bnb-nf4", "bnb-fp4"):
            return self._bnb_4bit(t, first, stop)
        if t.scheme == "mxfp4":
            return self._mxfp4(t, first, stop)
        cols = t.shape[1]
        r0, r1 = first // cols, -(-stop // cols)
        rows = self._rows(t, r0, r1).reshape(-1)
        return rows[first - r0 * cols : stop - r0 * cols]

    def _rows(self, t: QuantizedTensor, r0: int, r1: int) -> torch.Tensor:
        """fp32 rows ``r0:r1`` of a 2-D weight quantized row by row (fp8, compressed-tensors, int8)."""
        from ..quant import bnb, fp8

        q = self.ck.read_rows(t.stored["weight"], r0, r1)
        scale = self._scale(t)
        if t.scheme == "bnb-int8":
            return bnb.dequantize_int8_rows(q, scale[r0:r1])
        return fp8.dequantize_rows(q, scale, r0, t.params["block"])

    def _bnb_4bit(self, t: QuantizedTensor, first: int, stop: int) -> torch.Tensor:
        from ..quant import bnb

        bs = t.params["blocksize"]
        packed = self.ck.read_flat(t.stored["weight"], first // 2, -(-stop // 2))
        b0, b1 = first // bs, -(-stop // bs)
        nested = None
        if t.params["nested"]:
            offset = float(t.params["state"].get("nested_offset", 0.0))
            nb = int(t.params["state"].get("nested_blocksize", 256))
            nested = (self._cached(t.stored["nested_absmax"]), self._cached(t.stored["nested_quant_map"]), nb, offset)
        stored = self.ck.read_flat(t.stored["absmax"], b0, b1)
        if nested is None:
            check_scale_values(self.ck, t.stored["absmax"], stored.float())
        absmax = bnb.absmax_values(stored, b0, nested)
        code = self._cached(t.stored["quant_map"])
        if first % bs == 0 and first % 2 == 0:  # a run of whole blocks (a merge's row blocks): the fast decode
            pairs = self._small.get(f"{t.name}//pairs")
            if pairs is None:
                pairs = self._small[f"{t.name}//pairs"] = bnb.code_pairs(code)
            return bnb.dequantize_4bit_aligned(packed, stop - first, absmax, bs, pairs)
        return bnb.dequantize_4bit(packed, first, stop - first, absmax, b0, bs, code)

    def _mxfp4(self, t: QuantizedTensor, first: int, stop: int) -> torch.Tensor:
        """Elements of the (experts, in, out) view: for each expert touched, the 32-groups of the input
        rows asked for, dequantized and transposed."""
        import torch

        from ..quant import mxfp4

        _, n_in, n_out = t.shape
        per = n_in * n_out
        parts = []
        pos = first
        while pos < stop:
            e, off = divmod(pos, per)
            end = min(stop, (e + 1) * per) - e * per
            i0, i1 = off // n_out, -(-end // n_out)
            g0, g1 = i0 // 32, -(-i1 // 32)
            blocks, scales = self._expert_data(t, e)
            vals = mxfp4.dequantize(blocks[:, g0:g1], scales[:, g0:g1]).t()  # (in rows g0*32.., out)
            flat = vals.reshape(-1)
            base = g0 * 32 * n_out
            parts.append(flat[off - base : end - base])
            pos = e * per + end
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def _expert_data(self, t: QuantizedTensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        cached = self._expert
        if cached is None or cached[0] != t.name or cached[1] != e:
            blocks = self.ck.read_rows(t.stored["weight"], e, e + 1)[0]
            scales = self.ck.read_rows(t.stored["scale"], e, e + 1)[0]
            if bool((scales == 255).any()):  # e8m0's NaN
                check_scale_values(self.ck, t.stored["scale"], torch.tensor([math.nan]))
            cached = self._expert = (t.name, e, blocks, scales)
        return cached[2], cached[3]

    def close(self) -> None:
        self._small.clear()
        self._expert = None


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of stored fp8 scales: floats as they are, e8m0 exponents as powers of two."""
    import torch

    if scale.dtype == torch.uint8:
        return torch.ldexp(torch.ones(scale.shape), scale.to(torch.int32) - 127)
    return scale.float()


def logical_order(ck: Checkpoint, layout: QuantLayout) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, dtype name, bytes) of every tensor as the dequantized view lists it, in file order;
    torch-free (``report`` counts parameters and FLOPs from it)."""
    by_weight = {t.stored["weight"]: t for t in layout.tensors.values()}
    hidden = layout.hidden
    out = []
    for k, info in ck.tensors.items():
        t = by_weight.get(k)
        if t is not None:
            out.append((t.name, t.shape, t.dtype_name, math.prod(t.shape) * DTYPE_TABLE[t.dtype_name][0]))
        elif k not in hidden:
            out.append((k, tuple(info.shape), info.dtype_name, info.nbytes))
    return out


def summary(ck: Checkpoint, layout: QuantLayout) -> dict[str, Any]:
    """What ``detect`` and ``report`` say about a quantized checkpoint: the scheme, how many weights, their
    bytes on disk (with every companion) and what they take dequantized."""
    numel = sum(math.prod(t.shape) for t in layout.tensors.values())
    return {
        "method": layout.method,
        "scheme": layout.scheme,
        "tensors": len(layout.tensors),
        "stored_bytes": layout.stored_bytes(ck),
        "dequantized_bytes": {"BF16": 2 * numel, "F32": 4 * numel},
    }

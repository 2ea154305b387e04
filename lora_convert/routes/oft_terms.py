"""An OFT, BOFT, HRA or LyCORIS Diag-OFT/BOFT module's rotation as the merge engine applies it (:class:`..oft_math.BlockRotation`,
:class:`..oft_math.ButterflyRotation`, :class:`..oft_math.HouseholderRotation`): its tensors read and checked
against the base weight, then built with the adapter config's numbers.

PEFT builds OFT only on ``nn.Linear``, ``nn.Conv2d`` (groups 1) and ``nn.Embedding``, BOFT and HRA on the first two
(their ``_get_tuner_layer_class``): a weight stored transposed (GPT-2's ``Conv1D``), a Conv1d/Conv3d kernel or a
grouped conv has neither in PEFT, so one is refused by name rather than given a reading PEFT never defined.
Both are products, not sums: alone on their tensor, at weight 1 (``merge_engine._assign``).
"""

from __future__ import annotations

import math

from .. import oft_math
from ..errors import AdapterError, UnsupportedError
from ..inventory import LoraModule
from ..io.reader import Checkpoint
from . import additive_terms
from .common import check_finite


def rotation(
    m: LoraModule, ck: Checkpoint, shape: tuple[int, ...], conv1d_hint: bool, embedding: bool
) -> oft_math.Rotation:
    """The rotation of ``m`` (OFT, BOFT, HRA) on a base weight of ``shape`` (``embedding``: the base layer is an embedding)."""
    if m.tuner == "road":
        return _road(m, ck, shape, conv1d_hint, embedding)
    if m.tuner == "miss":  # MiSS bat: W's r×r blocks times (I + B_i), plus B_i (routes/additive_terms)
        return additive_terms.bat(m, ck, shape, conv1d_hint)
    if "oft_blocks" in m.factors or m.tuner == "diag-oft":  # LyCORIS's Diag-OFT and BOFT (kohya files)
        return _lycoris_oft(m, ck, shape, conv1d_hint, embedding)
    if m.tuner == "boft":
        return _butterfly(m, ck, shape, conv1d_hint, embedding)
    if m.tuner == "hra":
        return _householder(m, ck, shape, conv1d_hint, embedding)
    ((factor, key),) = m.factors.items()
    on_embedding = factor == "oft_embedding_R"
    if len(shape) not in (2, 4) or (len(shape) == 2 and conv1d_hint and not on_embedding):
        what = "stored transposed (GPT-2's Conv1D, fan_in_fan_out)" if len(shape) == 2 else f"of shape {list(shape)}"
        raise UnsupportedError(
            f"OFT module {m.module} on a weight {what}: PEFT builds OFT only on nn.Linear, nn.Conv2d and "
            "nn.Embedding and refuses this layer",
            path=ck.root,
            tensor=key,
        )
    if (embedding and not on_embedding) or (on_embedding and len(shape) != 2):
        have = "an embedding" if embedding else ("a conv" if len(shape) == 4 else "a linear layer")
        raise AdapterError(
            f"OFT module {m.module}: {factor} on {have}; PEFT's OFT is oft_embedding_R on nn.Embedding and "
            "oft_R on nn.Linear/nn.Conv2d",
            path=ck.root,
            tensor=key,
            hint="is this adapter for this base model?",
        )
    cols = int(shape[1]) if on_embedding else math.prod(shape[1:])
    vec = check_finite(ck.read(key), ck, key)
    o = m.tuner_args
    try:
        return oft_math.BlockRotation.build(
            vec,
            cols,
            transposed=not on_embedding,
            coft=bool(o.get("coft", False)),
            eps=float(o.get("eps", 6e-5)),
            neumann=bool(o.get("use_cayley_neumann", True)),
            terms=int(o.get("num_cayley_neumann_terms", 5)),
        )
    except ValueError as exc:
        raise AdapterError(
            f"OFT module {m.module}: {factor} {list(vec.shape)} does not fit the base weight {list(shape)}: {exc}",
            path=ck.root,
            tensor=key,
            hint="is this adapter for this base model?",
        ) from None


def _butterfly(
    m: LoraModule, ck: Checkpoint, shape: tuple[int, ...], conv1d_hint: bool, embedding: bool
) -> oft_math.ButterflyRotation:
    key_r, key_s = m.factors.get("boft_R"), m.factors.get("boft_s")
    if key_r is None or key_s is None:
        raise AdapterError(
            f"BOFT module {m.module}: {'boft_R' if key_r is None else 'boft_s'} is missing",
            path=ck.root,
            tensor=key_s or key_r or m.a_key,
        )
    if len(shape) not in (2, 4) or embedding or (len(shape) == 2 and conv1d_hint):
        what = "stored transposed (GPT-2's Conv1D, fan_in_fan_out)" if len(shape) == 2 else f"of shape {list(shape)}"
        raise UnsupportedError(
            f"BOFT module {m.module} on {'an embedding' if embedding else f'a weight {what}'}: PEFT builds BOFT only "
            "on nn.Linear and nn.Conv2d and refuses this layer",
            path=ck.root,
            tensor=key_r,
        )
    r = check_finite(ck.read(key_r), ck, key_r)
    s = check_finite(ck.read(key_s), ck, key_s)
    if s.numel() != shape[0] or s.dim() != 2 or 1 not in s.shape:
        raise AdapterError(
            f"BOFT module {m.module}: boft_s {list(s.shape)} is not one scale per output row of the base weight "
            f"{list(shape)}",
            path=ck.root,
            tensor=key_s,
            hint="is this adapter for this base model?",
        )
    try:
        return oft_math.ButterflyRotation.build(r, s, math.prod(shape[1:]))
    except ValueError as exc:
        raise AdapterError(
            f"BOFT module {m.module}: boft_R {list(r.shape)} does not fit the base weight {list(shape)}: {exc}",
            path=ck.root,
            tensor=key_r,
            hint="is this adapter for this base model?",
        ) from None


def _householder(
    m: LoraModule, ck: Checkpoint, shape: tuple[int, ...], conv1d_hint: bool, embedding: bool
) -> oft_math.HouseholderRotation:
    key = m.factors["hra_u"]
    if len(shape) not in (2, 4) or embedding or (len(shape) == 2 and conv1d_hint):
        what = "stored transposed (GPT-2's Conv1D, fan_in_fan_out)" if len(shape) == 2 else f"of shape {list(shape)}"
        raise UnsupportedError(
            f"HRA module {m.module} on {'an embedding' if embedding else f'a weight {what}'}: PEFT builds HRA only "
            "on nn.Linear and nn.Conv2d and refuses this layer",
            path=ck.root,
            tensor=key,
        )
    u = check_finite(ck.read(key), ck, key)
    try:
        return oft_math.HouseholderRotation.build(
            u, math.prod(shape[1:]), apply_gs=bool(m.tuner_args.get("apply_GS", False))
        )
    except ValueError as exc:
        raise AdapterError(
            f"HRA module {m.module}: does not fit the base weight {list(shape)}: {exc}",
            path=ck.root,
            tensor=key,
            hint="is this adapter for this base model?",
        ) from None


def _lycoris_oft(
    m: LoraModule, ck: Checkpoint, shape: tuple[int, ...], conv1d_hint: bool, embedding: bool
) -> oft_math.OutputRotation | oft_math.OutputButterfly:
    """LyCORIS's Diag-OFT or BOFT (a kohya file): its output rows rotated.  LyCORIS builds both on Linear and
    Conv1d/2d/3d layers."""
    key = m.factors.get("oft_blocks")
    if key is None:
        raise AdapterError(f"{m.tuner} module {m.module}: oft_blocks is missing", path=ck.root, tensor=m.a_key)
    if len(shape) < 2 or embedding or (len(shape) == 2 and conv1d_hint):
        what = "stored transposed (GPT-2's Conv1D)" if len(shape) == 2 else f"of shape {list(shape)}"
        raise UnsupportedError(
            f"{m.tuner} module {m.module} on {'an embedding' if embedding else f'a weight {what}'}: LyCORIS builds "
            "Diag-OFT and BOFT only on Linear and Conv1d/2d/3d layers",
            path=ck.root,
            tensor=key,
        )
    blocks = check_finite(ck.read(key), ck, key)
    rkey = m.factors.get("rescale")
    rescale = check_finite(ck.read(rkey), ck, rkey) if rkey is not None else None
    build = oft_math.OutputButterfly.build if blocks.dim() == 4 else oft_math.OutputRotation.build
    try:
        return build(blocks, rescale, int(shape[0]), float(m.tuner_args.get("constraint", 0.0)))
    except ValueError as exc:
        raise AdapterError(
            f"{m.tuner} module {m.module}: oft_blocks {list(blocks.shape)} does not fit the base weight "
            f"{list(shape)}: {exc}",
            path=ck.root,
            tensor=rkey if rescale is not None and "rescale" in str(exc) else key,
            hint="is this adapter for this base model?",
        ) from None


def _road(
    m: LoraModule, ck: Checkpoint, shape: tuple[int, ...], conv1d_hint: bool, embedding: bool
) -> oft_math.Rotation:
    """PEFT's RoAd on ``nn.Linear`` only: R (out×out, pairs of rows in groups of ``group_size``) times W, or times
    the bias (``shape`` (out, 1)); out must be as θ says and divisible by the group."""
    key = m.factors["road_theta"]
    if len(shape) != 2 or conv1d_hint or embedding:
        what = (
            "stored transposed (GPT-2's Conv1D, fan_in_fan_out)"
            if conv1d_hint
            else ("of an embedding" if embedding else f"of shape {list(shape)}")
        )
        raise UnsupportedError(
            f"RoAd module {m.module} on a weight {what}: PEFT builds RoAd only on nn.Linear and refuses this layer",
            path=ck.root,
            tensor=key,
        )
    out, g, variant = int(shape[0]), int(m.tuner_args["group_size"]), str(m.tuner_args["variant"])
    if out != m.tuner_args["out"] or out % g:
        raise AdapterError(
            f"RoAd module {m.module}: road_theta is for {m.tuner_args['out']} output rows in groups of {g}, the base "
            f"weight is {list(shape)}" + (": PEFT needs the rows divisible by group_size" if out % g else ""),
            path=ck.root,
            tensor=key,
            hint="is this adapter for this base model?",
        )
    theta = check_finite(ck.read(key), ck, key)
    ak = m.factors["road_alpha"]
    alpha = check_finite(ck.read(ak), ck, ak)
    first, second = oft_math.road_columns(variant, g, theta, alpha)
    return oft_math.RoadRotation(first.contiguous(), second.contiguous(), g)

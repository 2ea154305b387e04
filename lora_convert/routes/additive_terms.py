"""A SHiRA, FourierFT, VB-LoRA, DeLoRA, C3A or RandLoRA module's ΔW as the merge engine's row producer
(:class:`lora_math.RowDelta`): its tensors read and checked against the config and the base weight, then handed
to :mod:`..additive_math`.

PEFT builds SHiRA, DeLoRA and C3A on ``nn.Linear`` only (GPT-2's ``Conv1D`` is refused by its
``_create_new_module``), so such a module on a weight stored transposed is refused by name; FourierFT, VB-LoRA
and RandLoRA also take ``Conv1D`` (ΔW transposed by ``fan_in_fan_out``).
"""

from __future__ import annotations

import re

import torch

from .. import additive_math, lora_math
from ..dialects.additive import WORDS
from ..errors import AdapterError, UnsupportedError
from ..inventory import LoraModule
from ..io.reader import Checkpoint
from .common import check_finite


def _unfit(m: LoraModule, ck: Checkpoint, what: str, tensor: str | None = None) -> AdapterError:
    return AdapterError(
        f"{WORDS[m.tuner]} module {m.module}: {what}",
        path=ck.root,
        tensor=tensor or m.a_key,
        hint="is this adapter for this base model?",
    )


def delta(
    m: LoraModule, ck: Checkpoint, scaling: float, base_shape: tuple[int, ...], conv1d_hint: bool
) -> lora_math.RowDelta:
    """The module's ΔW (``scaling`` holds the tuner's own scale times the adapter's weight) on a base weight of
    ``base_shape``; the config's numbers it needs are the module's ``tuner_args``."""
    raw = m.tuner_args
    word = WORDS[m.tuner]
    if len(base_shape) != 2:
        raise UnsupportedError(
            f"{word} module {m.module} on a weight of shape {list(base_shape)}: PEFT builds {word} on linear layers only",
            path=ck.root,
            tensor=m.a_key,
        )
    if m.tuner == "shira" and conv1d_hint:
        raise UnsupportedError(
            f"SHiRA module {m.module} on a weight stored transposed (GPT-2's Conv1D, fan_in_fan_out): PEFT builds "
            "SHiRA only on nn.Linear and refuses this layer",
            path=ck.root,
            tensor=m.a_key,
        )
    if m.tuner == "vblora":
        return _vblora(m, ck, scaling, base_shape, conv1d_hint)
    if m.tuner in ("delora", "c3a", "miss") and conv1d_hint:
        return _linear_only(m, ck, scaling, base_shape, conv1d_hint)
    if m.tuner in ("delora", "c3a"):
        return _linear_only(m, ck, scaling, base_shape, conv1d_hint)
    if m.tuner == "randlora":
        return _randlora(m, ck, scaling, base_shape, conv1d_hint)
    if m.tuner == "miss":
        return _miss(m, ck, scaling, base_shape)
    rows, cols = int(base_shape[0]), int(base_shape[1])
    out_f, in_f = (cols, rows) if conv1d_hint else (rows, cols)
    if m.tuner == "shira":
        return _shira(m, ck, scaling, out_f, in_f, raw)
    return _fourierft(m, ck, scaling, out_f, in_f, conv1d_hint, raw)


def _shira(m: LoraModule, ck: Checkpoint, scaling: float, out_f: int, in_f: int, raw: dict) -> lora_math.RowDelta:
    wk, ik = m.factors["shira_weight"], m.factors.get("shira_indices")
    if ik is None:
        raise _unfit(m, ck, "shira_indices is missing")
    values = check_finite(ck.read(wk), ck, wk)
    idx = ck.read(ik)
    n = values.numel()
    r = int(raw.get("r", 32))
    if n != r * (in_f + out_f):
        raise _unfit(
            m,
            ck,
            f"shira_weight has {n} values; PEFT's SHiRA with r={r} on a ({out_f}, {in_f}) weight has "
            f"r·(in+out) = {r * (in_f + out_f)}: PEFT refuses to load it",
            wk,
        )
    if idx.is_floating_point():  # PEFT saves them as float32 on Windows and takes them back as int
        if not bool(torch.isfinite(idx).all()) or not bool((idx == idx.round()).all()):
            raise _unfit(m, ck, "shira_indices holds values that are not whole numbers", ik)
    elif idx.dtype == torch.bool or idx.is_complex():
        raise _unfit(m, ck, f"shira_indices is {idx.dtype}: PEFT's are integers", ik)
    if tuple(idx.shape) != (2, n):
        raise _unfit(m, ck, f"shira_indices has shape {list(idx.shape)}; beside {n} values PEFT's is [2, {n}]", ik)
    idx = idx.to(torch.int64)
    if n and (int(idx.min()) < 0 or int(idx[0].max()) >= out_f or int(idx[1].max()) >= in_f):
        raise _unfit(m, ck, f"shira_indices out of range for a ({out_f}, {in_f}) weight", ik)
    return additive_math.SparseDelta.build(idx, values, scaling, (out_f, in_f), transposed=False)


def _n_for(module: str, raw: dict) -> int:
    """PEFT's FourierFT ``_create_and_replace``: the first ``n_frequency_pattern`` key ``re.match``-ing
    ``.*\\.<key>$`` on the module's path, else ``n_frequency``."""
    pattern = raw.get("n_frequency_pattern") or {}
    key = next((k for k in pattern if re.match(rf".*\.{k}$", module)), None)
    return int(pattern[key]) if key is not None else int(raw.get("n_frequency", 1000))


def _fourierft(
    m: LoraModule, ck: Checkpoint, scaling: float, out_f: int, in_f: int, transposed: bool, raw: dict
) -> lora_math.RowDelta:
    sk = m.factors["fourierft_spectrum"]
    spectrum = check_finite(ck.read(sk), ck, sk)
    n, want = spectrum.numel(), _n_for(m.module, raw)
    if n != want:
        raise _unfit(m, ck, f"fourierft_spectrum has {n} values, the config's n_frequency for it is {want}", sk)
    if n > out_f * in_f:
        raise _unfit(m, ck, f"fourierft_spectrum has {n} values, more than the ({out_f}, {in_f}) weight's entries", sk)
    idx = additive_math.fourier_indices(out_f, in_f, n, int(raw.get("random_loc_seed", 777)))
    return additive_math.fourier_delta(spectrum, idx, scaling, out_f, in_f, transposed=transposed)


def _vblora(
    m: LoraModule, ck: Checkpoint, scaling: float, base_shape: tuple[int, ...], conv1d_hint: bool
) -> lora_math.RowDelta:
    """PEFT's ``get_delta_weight``: A and B from the bank and each side's top-k (chosen from the logits, or as a
    ``save_only_topk_weights`` file stores them), ΔW = transpose(B @ A, fan_in_fan_out): LoRA factors."""
    try:
        transposed = lora_math.is_transposed(base_shape, m.in_features, m.out_features, hint=conv1d_hint)
    except ValueError:
        raise _unfit(
            m, ck, f"the logits build a ({m.out_features}, {m.in_features}) ΔW, the base weight is {list(base_shape)}"
        ) from None
    bank_key = m.tuner_args["bank"]
    bank = check_finite(ck.read(bank_key), ck, bank_key)
    k = int(m.tuner_args["topk"])
    sides = []
    for side in "AB":
        full = m.factors.get(f"vblora_logits_{side}")
        if full is not None:
            logits = ck.read(full)
            if bool(torch.isnan(logits).any()):
                raise _unfit(m, ck, "NaN among the logits", full)
            if k > logits.shape[-1]:
                raise _unfit(m, ck, f"topk={k} of {logits.shape[-1]} vectors", full)
            sides.append(additive_math.vblora_topk(logits, k))
            continue
        ik, wk = m.factors[f"vblora_logits_{side}_topk_indices"], m.factors[f"vblora_logits_{side}_topk_weights"]
        idx, weights = ck.read(ik).to(torch.int64), check_finite(ck.read(wk), ck, wk)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bank.shape[0]):
            raise _unfit(m, ck, f"vblora_logits_{side}_topk_indices out of range for a bank of {bank.shape[0]}", ik)
        sides.append(additive_math.vblora_saved_topk(idx, weights))
    a, b = additive_math.vblora_factors(bank, sides[0], sides[1])
    if transposed:  # GPT-2's Conv1D: the stored weight is (in, out), its rows Aᵀ's
        return additive_math.BuiltFactors(a.t().contiguous(), b.t().contiguous(), scaling, k)
    return additive_math.BuiltFactors(b.contiguous(), a.contiguous(), scaling, k)


def _linear_only(
    m: LoraModule, ck: Checkpoint, scaling: float, base_shape: tuple[int, ...], conv1d_hint: bool
) -> lora_math.RowDelta:
    """DeLoRA and C3A: PEFT builds them on ``nn.Linear`` only (a (out, in) weight), refusing GPT-2's Conv1D."""
    word = WORDS[m.tuner]
    if conv1d_hint:
        raise UnsupportedError(
            f"{word} module {m.module} on a weight stored transposed (GPT-2's Conv1D, fan_in_fan_out): PEFT builds "
            f"{word} only on nn.Linear and refuses this layer",
            path=ck.root,
            tensor=m.a_key,
        )
    if tuple(base_shape) != (m.out_features, m.in_features):
        raise _unfit(
            m, ck, f"its tensors build a ({m.out_features}, {m.in_features}) ΔW, the base weight is {list(base_shape)}"
        )
    t = {p: check_finite(ck.read(k), ck, k) for p, k in m.factors.items()}
    if m.tuner == "c3a":  # PEFT divides by the base weight's input size
        return additive_math.CirculantDelta(t["c3a_kernel"].to(torch.float32), scaling / m.in_features)
    return additive_math.delora_factors(t["delora_A"], t["delora_B"], t["delora_lambda"], t["delora_w_norm"], scaling)


def _randlora(
    m: LoraModule, ck: Checkpoint, scaling: float, base_shape: tuple[int, ...], conv1d_hint: bool
) -> lora_math.RowDelta:
    """PEFT's RandLoRA on nn.Linear or GPT-2's Conv1D (ΔW transposed by ``fan_in_fan_out``): the layer's min/max
    sides from the base weight, checked against γ's width and the shared bases' sizes."""
    rows, cols = int(base_shape[0]), int(base_shape[1])
    out_f, in_f = (cols, rows) if conv1d_hint else (rows, cols)
    lo, hi = min(out_f, in_f), max(out_f, in_f)
    args = m.tuner_args
    if lo != args["min_dim"]:
        raise _unfit(
            m, ck, f"randlora_gamma is {args['min_dim']} wide, the ({out_f}, {in_f}) weight's smaller side is {lo}"
        )
    a = check_finite(ck.read(args["A"]), ck, args["A"])
    b = check_finite(ck.read(args["B"]), ck, args["B"])
    if a.shape[-1] < lo or b.shape[0] < hi or b.shape[1] < args["bases"]:
        raise _unfit(
            m,
            ck,
            f"the shared bases randlora_A {list(a.shape)} and randlora_B {list(b.shape)} are smaller than this layer "
            f"needs ({lo} wide, {hi} long, {args['bases']} bases)",
            args["A"] if a.shape[-1] < lo else args["B"],
        )
    lam = check_finite(ck.read(m.factors["randlora_lambda"]), ck, m.factors["randlora_lambda"])
    gamma = check_finite(ck.read(m.factors["randlora_gamma"]), ck, m.factors["randlora_gamma"])
    d = additive_math.randlora_factors(a, b, lam, gamma, out_f, in_f, scaling)
    if conv1d_hint:  # the stored weight is (in, out): its rows are ΔWᵀ's
        return lora_math.DeltaFactors(d.right.t().contiguous(), d.left.t().contiguous(), d.scaling)
    return d


def _miss(m: LoraModule, ck: Checkpoint, scaling: float, base_shape: tuple[int, ...]) -> lora_math.RowDelta:
    """PEFT's MiSS on ``nn.Linear`` (its default and ``mini``: the block tiled over W, added; PEFT gives MiSS no
    scale of its own: ``scaling`` is the adapter's weight), checked as PEFT's ``update_layer`` checks the layer:
    r ≤ in, the block as wide as the output (``mini``: out divisible by mini_r)."""
    out_f, in_f = int(base_shape[0]), int(base_shape[1])
    key = m.factors["miss_block"]
    block = check_finite(ck.read(key), ck, key).to(torch.float32)
    args = m.tuner_args
    r = int(args["r"])
    if r > in_f:
        raise _unfit(m, ck, f"r={r} is more than the ({out_f}, {in_f}) weight's {in_f} inputs: PEFT refuses it", key)
    if args["variant"] == "mini":
        if out_f % block.shape[1]:
            raise _unfit(m, ck, f"mini_r={block.shape[1]} does not divide the weight's {out_f} outputs", key)
    elif block.shape[1] != out_f:
        raise _unfit(
            m,
            ck,
            f"miss_block {list(block.shape)} is for {block.shape[1]} outputs, the base weight is {list(base_shape)}",
            key,
        )
    return additive_math.TiledDelta(block * scaling, out_f, in_f)


def bat(m: LoraModule, ck: Checkpoint, base_shape: tuple[int, ...], conv1d_hint: bool) -> additive_math.BatBlocks:
    """PEFT's MiSS ``bat`` on ``nn.Linear``: the (out/r, r, r) blocks on an (out, in) weight both sides of which
    r divides (PEFT's ``update_layer`` refuses any other)."""
    if len(base_shape) != 2 or conv1d_hint:
        what = "stored transposed (GPT-2's Conv1D, fan_in_fan_out)" if conv1d_hint else f"of shape {list(base_shape)}"
        raise UnsupportedError(
            f"MiSS module {m.module} on a weight {what}: PEFT builds MiSS only on nn.Linear and refuses this layer",
            path=ck.root,
            tensor=m.a_key,
        )
    key = m.factors["miss_block"]
    out_f, in_f = int(base_shape[0]), int(base_shape[1])
    blocks = check_finite(ck.read(key), ck, key).to(torch.float32)
    r = int(blocks.shape[-1])
    if in_f % r or out_f % r:
        raise _unfit(
            m, ck, f"the ({out_f}, {in_f}) weight is not made of whole {r}×{r} blocks: PEFT refuses bat on it", key
        )
    if blocks.shape[0] * r != out_f:
        raise _unfit(
            m,
            ck,
            f"miss_block {list(blocks.shape)} is for {blocks.shape[0] * r} outputs, the base weight is {list(base_shape)}",
            key,
        )
    return additive_math.BatBlocks(blocks)

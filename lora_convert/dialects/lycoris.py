"""LyCORIS modules in a kohya (sd-scripts) file: LoHa, LoKr and full weight differences, read beside LoRA.

LyCORIS names its modules as kohya does (``lora_unet_<path>``, ``lora_te1_<path>``, ...: the kohya dialect
reads the names); what differs is the tensors under each name, and the algorithm a module uses is told by
them alone (LyCORIS's own ``get_module``: ``hada_*`` LoHa, ``lokr_*`` LoKr, ``diff`` full).

* **LoHa** ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·k…), ``hada_w2_a``, ``hada_w2_b``; with Tucker cores
  (``use_tucker`` on a k×k conv) ``hada_t1``/``hada_t2`` (r, r, k…), ``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in).
  ΔW = alpha/r · (w1a·w1b) ⊙ (w2a·w2b), r = rows of ``hada_w1_b``.
* **LoKr** ΔW = alpha/r · kron(w1, w2), each side stored whole (``lokr_w1``, ``lokr_w2``) or as a product
  (``lokr_w1_a @ lokr_w1_b``; ``lokr_w2_a @ lokr_w2_b``, or the Tucker rebuild with ``lokr_t2``); r = the rank
  of the decomposed side.  Both sides whole (``full_matrix``): scale 1 whatever ``alpha`` says (LyCORIS sets
  alpha = dim then; diffusers' ``_bake_lokr_alpha_`` and ComfyUI drop it too).
* **full** ``diff`` (= ΔW, the weight's shape) and ``diff_b`` (added to the bias), no scale.
* **Diag-OFT** ``oft_blocks`` (k, b, b), optional ``rescale`` (out, 1, …) and ``alpha`` (its ``constraint``, not a
  scale): the weight's OUTPUT rows rotated, ``W ← rescale ⊙ (Rᵀ·W)`` per b-row block, R the Cayley transform of
  the blocks' skew part (:class:`..oft_math.OutputRotation`).  ``rank`` is b (a b-long dot per merged entry).
* **BOFT** the same tensors with 4-D ``oft_blocks`` (m, k, b, b): m butterfly stages on the output rows
  (:class:`..oft_math.OutputButterfly`), then ``rescale``; algorithm ``boft`` (its tensors tell it from PEFT's).

A missing or 0 ``alpha`` means alpha = r (scale 1), as LyCORIS and ComfyUI load it.  ``use_scalar`` and
``rs_lora`` leave no trace in the file (LyCORIS folds the scalar into ``hada_w1_a``/``lokr_w1`` and rs_lora into
the saved alpha): such files read as any other.  ``weight_decompose`` (``dora_scale``) is refused by name.
"""

from __future__ import annotations

import math

from ..errors import AdapterError, UnsupportedError
from ..inventory import DEFAULT_ADAPTER, LoraModule
from ..io.reader import Checkpoint

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")
DIAG_OFT = ("oft_blocks", "rescale")
ROLES = LOHA + LOKR + FULL + DIAG_OFT
ALGORITHMS = {"loha": LOHA, "lokr": LOKR, "full": FULL, "diag-oft": DIAG_OFT}
# what a LyCORIS tensor can be stored as (the same floats a LoRA factor can)
FACTOR_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def algorithm(ck: Checkpoint, roles: dict[str, str]) -> str:
    """``lora``, ``loha``, ``lokr`` or ``full``: which algorithm one module's tensors are; a module mixing
    two is refused (no LyCORIS module holds both)."""
    found: dict[str, str] = {}  # algorithm -> one of its keys
    for role, key in sorted(roles.items()):
        algo = next((a for a, names in ALGORITHMS.items() if role in names), "lora" if role != "alpha" else None)
        if algo is not None:
            found.setdefault(algo, key)
    if len(found) > 1:
        (a1, k1), (a2, k2) = sorted(found.items(), key=lambda kv: kv[0] != "lora")[:2]
        raise AdapterError(
            f"{k2} ({a2}) beside {k1} ({a1}): a LyCORIS module uses one algorithm",
            path=ck.root,
            tensor=k2,
        )
    return next(iter(found), "lora")


def read_module(
    ck: Checkpoint, module: str, roles: dict[str, str], algo: str, alpha: float | None
) -> tuple[LoraModule, float]:
    """One LyCORIS module (``roles``: role -> key, ``alpha`` as the file stores it, None when absent) after
    checking that its tensors fit each other; and the alpha that gives its scale with alpha / rank."""
    for role, key in roles.items():
        info = ck.info(key)
        if role == "alpha" and algo == "diag-oft":
            continue  # its constraint, read by :func:`constraint`
        if info.dtype_name not in FACTOR_DTYPES:
            raise AdapterError(
                f"a LyCORIS tensor stored as {info.dtype_name}: its factors are floating-point numbers",
                path=info.file,
                tensor=key,
            )
    shapes = {r: tuple(ck.info(k).shape) for r, k in roles.items() if r != "alpha"}
    if algo == "diag-oft":
        return _diag_oft(ck, module, roles, shapes, alpha)
    if algo == "loha":
        rank, out, cols, conv = _loha(ck, roles, shapes)
    elif algo == "lokr":
        rank, out, cols, conv = _lokr(ck, roles, shapes)
    else:
        rank, out, cols, conv = _full(ck, roles, shapes, alpha)
    factors = {r: k for r, k in roles.items() if r in ROLES or r == "alpha"}
    whole = algo == "full" or (algo == "lokr" and "lokr_w1" in roles and "lokr_w2" in roles)
    a = alpha if alpha else float(rank)  # missing or 0: alpha = rank
    scaling = 1.0 if whole else a / rank
    first, second = _two(roles, ALGORITHMS[algo])
    lm = LoraModule(
        module,
        DEFAULT_ADAPTER,
        "conv" if conv else "linear",
        first,
        second,
        rank,
        cols,
        out,
        bias_key=roles.get("diff_b"),
        scaling=scaling,
        tuner=algo,
        factors=factors,
        factor_params=sum(math.prod(shapes[r]) for r in factors if r != "alpha"),
    )
    return lm, scaling * rank


CONSTRAINT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32"})


def constraint(ck: Checkpoint, key: str) -> float:
    """A Diag-OFT module's ``alpha``: its constraint, one finite value >= 0.  LyCORIS saves
    ``torch.tensor(constraint)``: an int64 0 when no constraint was asked for, a float32 otherwise."""
    info = ck.info(key)
    if info.dtype_name not in CONSTRAINT_DTYPES or info.numel != 1:
        raise AdapterError(
            f"Diag-OFT alpha (its constraint) stored as {info.dtype_name} {list(info.shape)}: it is one number",
            path=info.file,
            tensor=key,
        )
    value = float(ck.read(key).reshape(-1)[0].double())
    if not math.isfinite(value) or value < 0:
        raise AdapterError(
            f"Diag-OFT alpha (its constraint) {value:g} is not a finite number >= 0", path=info.file, tensor=key
        )
    return value


def _two(roles: dict[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    """The first two of a module's tensors in LyCORIS's order (a_key and b_key: what messages name)."""
    keys = [roles[n] for n in names if n in roles]
    return keys[0], keys[1] if len(keys) > 1 else keys[0]


def _unfit(ck: Checkpoint, roles: dict[str, str], role: str, what: str) -> AdapterError:
    return AdapterError(what, path=ck.root, tensor=roles.get(role) or sorted(roles.values())[0])


def _need(ck: Checkpoint, roles: dict[str, str], algo: str, *names: str) -> None:
    for n in names:
        if n not in roles:
            raise _unfit(ck, roles, next((m for m in names if m in roles), ""), f"{algo} module without {n}")


def _loha(ck: Checkpoint, roles: dict[str, str], s: dict[str, tuple[int, ...]]) -> tuple[int, int, int, bool]:
    """(rank, out, in·k…, conv) of a LoHa module whose factors fit each other."""
    _need(ck, roles, "LoHa", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in roles) != ("hada_t2" in roles):
        have = "hada_t1" if "hada_t1" in roles else "hada_t2"
        raise _unfit(ck, roles, have, f"LoHa module with {have} alone: Tucker cores hada_t1 and hada_t2 come together")
    tucker = "hada_t1" in roles
    sides = []
    for i in ("1", "2"):
        a, b = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"]
        if tucker:
            t = s[f"hada_t{i}"]
            ok = len(a) == 2 and len(b) == 2 and len(t) >= 3 and t[:2] == (a[0], b[0]) and a[0] > 0 and b[0] > 0
            shape = (a[1] if len(a) == 2 else 0, b[1] if len(b) == 2 else 0, *t[2:])
            what = f"hada_t{i} {list(t)}, hada_w{i}_a {list(a)} and hada_w{i}_b {list(b)} are not Tucker factors"
        else:
            ok = len(a) == 2 and len(b) == 2 and a[1] == b[0] and a[1] > 0
            shape = (a[0], b[1] if len(b) == 2 else 0)
            what = f"hada_w{i}_a {list(a)} and hada_w{i}_b {list(b)} do not multiply"
        if not ok:
            raise _unfit(ck, roles, f"hada_w{i}_a", f"LoHa: {what}")
        sides.append(shape)
    if sides[0] != sides[1]:
        raise _unfit(
            ck, roles, "hada_w2_a", f"LoHa: its two halves build {list(sides[0])} and {list(sides[1])}, not one shape"
        )
    return s["hada_w1_b"][0], sides[0][0], math.prod(sides[0][1:]), tucker


def _lokr(ck: Checkpoint, roles: dict[str, str], s: dict[str, tuple[int, ...]]) -> tuple[int, int, int, bool]:
    """(rank, out, in·k…, conv) of a LoKr module whose factors fit each other.  w1 is (a, c), w2 (b, d[, k…])."""
    sides: list[tuple[int, ...]] = []
    ranks: list[int] = []
    for i in ("1", "2"):
        whole, a, b = (s.get(f"lokr_w{i}{x}") for x in ("", "_a", "_b"))
        t = s.get("lokr_t2") if i == "2" else None
        if whole is not None:
            if a is not None or b is not None or t is not None:
                extra = next(n for n in (f"lokr_w{i}_a", f"lokr_w{i}_b", "lokr_t2") if n in roles and n in s)
                raise _unfit(ck, roles, extra, f"LoKr: lokr_w{i} and {extra} both stored; LyCORIS keeps one form")
            if len(whole) < 2 or (i == "1" and len(whole) != 2):
                raise _unfit(ck, roles, f"lokr_w{i}", f"LoKr: lokr_w{i} {list(whole)} is not a Kronecker factor")
            sides.append(whole)
            continue
        if a is None or b is None:
            missing = f"lokr_w{i}_a" if a is None else f"lokr_w{i}_b"
            raise _unfit(ck, roles, f"lokr_w{i}_b", f"LoKr module without lokr_w{i} or {missing}")
        if t is not None:  # rebuild einsum("i j k l, i p, j r -> p r k l", t, a, b): a (r, b), b (r, d)
            ok = len(a) == 2 and len(b) == 2 and len(t) >= 3 and t[:2] == (a[0], b[0]) and a[0] > 0
            side = (a[1], b[1], *t[2:]) if ok else ()
            what = f"lokr_t2 {list(t)}, lokr_w2_a {list(a)} and lokr_w2_b {list(b)} are not Tucker factors"
        else:
            ok = len(a) == 2 and len(b) == 2 and a[1] == b[0] and a[1] > 0
            side = (a[0], b[1]) if ok else ()
            what = f"lokr_w{i}_a {list(a)} and lokr_w{i}_b {list(b)} do not multiply"
        if not ok:
            raise _unfit(ck, roles, f"lokr_w{i}_a", f"LoKr: {what}")
        sides.append(side)
        ranks.append(b[0])
    if len(set(ranks)) > 1:
        raise _unfit(
            ck,
            roles,
            "lokr_w2_b",
            f"LoKr: lokr_w1 has rank {ranks[0]} and lokr_w2 rank {ranks[1]}; loaders disagree on which alpha / rank "
            "scales such a module (LyCORIS reads w1's, diffusers and ComfyUI w2's)",
        )
    (a1, c1), w2 = sides[0], sides[1]
    return (ranks[0] if ranks else 1), a1 * w2[0], c1 * math.prod(w2[1:]), len(w2) > 2


def _full(
    ck: Checkpoint, roles: dict[str, str], s: dict[str, tuple[int, ...]], alpha: float | None
) -> tuple[int, int, int, bool]:
    """(rank, out, in·k…, conv) of a full difference: rank min(out, in·k…), scale 1."""
    _need(ck, roles, "full (diff)", "diff")
    d = s["diff"]
    if len(d) < 2 or 0 in d:
        raise _unfit(ck, roles, "diff", f"diff {list(d)} is not a weight's difference (a matrix or a kernel)")
    if "diff_b" in roles and s["diff_b"] != d[:1]:
        raise _unfit(ck, roles, "diff_b", f"diff_b {list(s['diff_b'])} is not the bias of a weight {list(d)}")
    if "alpha" in roles:
        raise UnsupportedError(
            "alpha beside a full diff: LyCORIS's full algorithm has no scale, so what it means is unknown",
            path=ck.root,
            tensor=roles["alpha"],
        )
    cols = math.prod(d[1:])
    return min(d[0], cols), d[0], cols, len(d) > 2


def _diag_oft(
    ck: Checkpoint, module: str, roles: dict[str, str], s: dict[str, tuple[int, ...]], alpha: float | None
) -> tuple[LoraModule, float]:
    """A Diag-OFT or BOFT module: its blocks checked square (a butterfly LyCORIS builds), its rescale one value per
    row of k·b; scale 1 (alpha is the constraint, kept in ``tuner_args``).  The input side is not in the file
    (0: no base is read here)."""
    _need(ck, roles, "Diag-OFT/BOFT", "oft_blocks", "alpha")
    blocks = s["oft_blocks"]
    butterfly = len(blocks) == 4  # LyCORIS's BOFT: (m, k, b, b), m butterfly stages
    what = "BOFT" if butterfly else "Diag-OFT"
    if len(blocks) not in (3, 4) or blocks[-1] != blocks[-2] or 0 in blocks:
        raise _unfit(
            ck, roles, "oft_blocks", f"{what}: oft_blocks {list(blocks)} are not (k, b, b) or (m, k, b, b) blocks"
        )
    b, k = blocks[-1], blocks[-3] if len(blocks) >= 3 else 0
    out = k * b
    stages = blocks[0] if butterfly else 1
    if butterfly and (b % 2 or k % 2 ** (stages - 1)):
        raise _unfit(
            ck, roles, "oft_blocks", f"BOFT: oft_blocks {list(blocks)}: LyCORIS builds no butterfly of these stages"
        )
    rescale = s.get("rescale")
    if rescale is not None and (not rescale or rescale[0] != out or math.prod(rescale) != out):
        raise _unfit(
            ck, roles, "rescale", f"{what}: rescale {list(rescale)} is not one scale per row of oft_blocks' {out}"
        )
    conv = rescale is not None and len(rescale) > 2
    factors = {r: k for r, k in roles.items() if r in DIAG_OFT or r == "alpha"}
    lm = LoraModule(
        module,
        DEFAULT_ADAPTER,
        "conv" if conv else "linear",
        roles["oft_blocks"],
        roles.get("rescale", roles["oft_blocks"]),
        b,
        0,
        out,
        scaling=1.0,
        tuner="boft" if butterfly else "diag-oft",
        factors=factors,
        factor_params=math.prod(blocks) + (out if rescale is not None else 0),
        # rows_mixed: the rows the rotation mixes (a block, the last butterfly stage): the engine reads whole ones
        tuner_args={"constraint": float(alpha or 0.0), "rows_mixed": 2 ** (stages - 1) * b, "stages": stages},
    )
    return lm, float(b)

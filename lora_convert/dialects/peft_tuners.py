"""PEFT's LoHa and LoKr modules (``hada_*``, ``lokr_*`` keys) read into :class:`LoraModule` s with
``tuner`` set and their factors by PEFT's parameter name; and the config's part: the rank a LoKr module
with whole factors does not show, and a config whose ``peft_type`` is not the tensors' tuner.

The factor layouts are PEFT's ``create_adapter_parameters``: LoHa ``hada_w{1,2}_a`` (out, r) and
``hada_w{1,2}_b`` (r, in·k…), with Tucker cores ``hada_t{1,2}`` (r, r, k…) the ``_a`` halves are (r, out)
and the ``_b`` halves (r, in); LoKr w1 (a, c) whole or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c), w2 (b, d…)
whole, ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d·k…), or with ``lokr_t2`` (r, r, k…) (r, b) and (r, d).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..config import AdapterConfig
from ..errors import AdapterError
from ..inventory import LoraModule
from ..io.reader import Checkpoint
from .peft_keys import TUNER_FACTORS, ParsedKey


def _bad(ck: Checkpoint, module: str, what: str, key: str) -> AdapterError:
    return AdapterError(f"module {module}: {what}", path=ck.root, tensor=key)


def tuner_module(ck: Checkpoint, adapter: str, module: str, parts: dict[str, ParsedKey]) -> LoraModule:
    """One LoHa or LoKr module from its factor keys, after checking that the factors are all there and have
    the ranks PEFT gives them (their fit to the base weight is checked by the merge)."""
    any_key = next(iter(parts.values())).key
    kinds = {t for t, names in TUNER_FACTORS.items() if any(n in names for n in parts)}
    if len(kinds) != 1:
        raise _bad(ck, module, "holds both LoHa (hada_*) and LoKr (lokr_*) factors", any_key)
    tuner = kinds.pop()
    shapes = {n: tuple(ck.info(p.key).shape) for n, p in parts.items()}
    keys = {n: p.key for n, p in parts.items()}
    order = [n for n in TUNER_FACTORS[tuner] if n in keys]
    for n in order:
        want = 4 if n in ("hada_t1", "hada_t2", "lokr_t2") else None
        dims = len(shapes[n])
        if (want is not None and dims != want) or (want is None and n != "lokr_w2" and dims != 2):
            raise _bad(ck, module, f"{n} has shape {list(shapes[n])}, PEFT's is {want or 2}-D", keys[n])
        if 0 in shapes[n]:
            raise _bad(ck, module, f"{n} has shape {list(shapes[n])}", keys[n])
    rank, out, cols = (_loha if tuner == "loha" else _lokr)(ck, module, shapes, keys)
    conv = any(n in keys for n in ("hada_t1", "lokr_t2")) or len(shapes.get("lokr_w2", ())) > 2
    return LoraModule(
        module,
        adapter,
        "conv" if conv else "linear",
        keys[order[0]],
        keys[order[1]] if len(order) > 1 else keys[order[0]],
        rank,
        cols,
        out,
        tuner=tuner,
        factors={n: keys[n] for n in order},
        factor_params=sum(math.prod(shapes[n]) for n in order),
    )


def _need(ck: Checkpoint, module: str, keys: dict[str, str], *names: str) -> None:
    for n in names:
        if n not in keys:
            raise _bad(ck, module, f"{n} is missing", next(iter(keys.values())))


def _loha(ck: Checkpoint, module: str, s: dict[str, tuple[int, ...]], keys: dict[str, str]) -> tuple[int, int, int]:
    _need(ck, module, keys, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in keys) != ("hada_t2" in keys):
        _need(ck, module, keys, "hada_t1", "hada_t2")
    tucker = "hada_t1" in keys
    r = s["hada_w1_a"][0 if tucker else 1]
    for side in ("1", "2"):
        a, b = s[f"hada_w{side}_a"], s[f"hada_w{side}_b"]
        ra = a[0] if tucker else a[1]
        if ra != r or b[0] != r or (tucker and s[f"hada_t{side}"][:2] != (r, r)):
            raise _bad(
                ck, module, f"LoHa factors of ranks that differ (hada_w1_a has rank {r})", keys[f"hada_w{side}_a"]
            )
    if tucker:
        return r, s["hada_w1_a"][1], s["hada_w1_b"][1] * math.prod(s["hada_t1"][2:])
    return r, s["hada_w1_a"][0], s["hada_w1_b"][1]


def _lokr(ck: Checkpoint, module: str, s: dict[str, tuple[int, ...]], keys: dict[str, str]) -> tuple[int, int, int]:
    rank = 0  # both factors whole: the config's r (resolve)
    rows, cols = 1, 1
    for side in ("1", "2"):
        w, a, b = f"lokr_w{side}", f"lokr_w{side}_a", f"lokr_w{side}_b"
        if w in keys:
            if a in keys or b in keys:
                raise _bad(ck, module, f"holds {w} and its low-rank halves: PEFT keeps one or the other", keys[w])
            rows, cols = rows * s[w][0], cols * math.prod(s[w][1:])
            continue
        if a not in keys and b not in keys:
            raise _bad(ck, module, f"{w} is missing (and so are {a}, {b})", next(iter(keys.values())))
        _need(ck, module, keys, a, b)
        tucker = side == "2" and "lokr_t2" in keys
        r = s[a][0] if tucker else s[a][1]
        if s[b][0] != r or (tucker and s["lokr_t2"][:2] != (r, r)):
            raise _bad(ck, module, f"{a} {list(s[a])} and {b} {list(s[b])} do not multiply", keys[a])
        if rank and r != rank:
            raise _bad(ck, module, f"LoKr factors of ranks {rank} and {r}: PEFT gives both one r", keys[a])
        rank = r
        rows *= s[a][1] if tucker else s[a][0]
        cols *= s[b][1] * (math.prod(s["lokr_t2"][2:]) if tucker else 1)
    if "lokr_t2" in keys and "lokr_w2_a" not in keys:
        raise _bad(
            ck, module, "lokr_t2 beside a whole lokr_w2: PEFT has a Tucker core only for w2_a/w2_b", keys["lokr_t2"]
        )
    return rank, rows, cols


def resolve(cfg: AdapterConfig, modules: dict[str, LoraModule], adapter: str, ck: Checkpoint) -> list[AdapterError]:
    """Give whole-factor LoKr modules the config's rank; a config that names another tuner than the tensors
    (a LoRA config beside hada_* keys, LOKR beside hada_*) is a problem: its alpha is not theirs."""
    problems: list[AdapterError] = []
    want = cfg.peft_type.lower()
    other = [m for m in modules.values() if m.tuner != want and (m.tuner != "lora" or want in ("loha", "lokr"))]
    if other:
        m = other[0]
        problems.append(
            AdapterError(
                f"adapter {adapter}: its config says peft_type {cfg.peft_type} but module {m.module} holds "
                f"{_word(m.tuner)} tensors ({len(other)} module(s))",
                path=cfg.source or ck.root,
                tensor=m.a_key,
                hint="use the adapter_config.json saved with these tensors",
            )
        )
    for m in _tuned(modules.values()):
        if m.rank == 0:
            m.rank = cfg.rank_for(m.config_key)
    return problems


def _tuned(modules: Iterable[LoraModule]) -> list[LoraModule]:
    return [m for m in modules if m.tuner != "lora"]


def _word(tuner: str) -> str:
    return {"loha": "LoHa", "lokr": "LoKr"}.get(tuner, "LoRA")

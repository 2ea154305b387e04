"""PEFT's BOFT (``peft_type: BOFT``): OFT with butterfly factors and a scale per output row, ``W ← (R·Wᵀ)ᵀ ⊙ s``.

Each module is a :class:`LoraModule` with ``tuner`` ``boft`` and its two tensors in ``factors``: ``boft_R``
(m, D, b, b) — m butterfly factors of D free b×b blocks, whose skew parts PEFT's exact Cayley turns into
rotations — and ``boft_s`` (out, 1) (Conv2d: (1, out)).  ``rank`` is the block size b, ``in_features`` D·b.  The
rotation is built in :mod:`..oft_math` and applied by the merge engine (``routes/oft_terms.py``); no route that
writes LoRA factors takes it.  Split and attach write BOFT's own tensors.

m is what the tensors hold, not the config's ``boft_n_butterfly_factor``: PEFT without its CUDA extension
(``fbd_cuda``) builds one factor whatever the config says, and its CPU merge handles one factor only; the
butterfly of several is PEFT's CUDA path (``FastBlockDiag``), which we follow.

Layouts (ParameterDicts, as LoHa's): the saved adapter holds ``<module>.boft_R`` and ``<module>.boft_s``, PEFT's
in-model state dict ``<module>.boft_R.<name>`` beside ``<module>.base_layer.weight``.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from .vera import config_of_type, one_adapter, sort_rest

PEFT_TYPE = "BOFT"
_SAVED = re.compile(r"^(?P<mod>.+)\.(?P<role>boft_R|boft_s)$", re.DOTALL)
_IN_MODEL = re.compile(r"^(?P<mod>.+)\.(?P<role>boft_R|boft_s)\.(?P<name>(?!weight$|bias$)[^.]+)$", re.DOTALL)
_PREFIX = "base_model.model."
KEYS = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")  # shown by detect


def read_parameter_dicts(
    ck: Checkpoint, peft_type: str, dialect: str, roles: tuple[str, ...], keys: tuple[str, ...]
) -> tuple[Inventory, dict[str, Any], AdapterConfig, dict[tuple[str, str], dict[str, str]]]:
    """A tuner whose tensors are ParameterDicts (``<module>.<role>`` saved, ``<module>.<role>.<name>`` in-model)
    and whose config says ``peft_type``: the inventory with the other tensors sorted, the config's object, the
    config (without ``keys``, the tuner's own fields) and the tensors per (adapter, module).  BOFT, HRA."""
    words = "|".join(roles)
    saved = re.compile(rf"^(?P<mod>.+)\.(?P<role>{words})$", re.DOTALL)
    in_model_re = re.compile(rf"^(?P<mod>.+)\.(?P<role>{words})\.(?P<name>(?!weight$|bias$)[^.]+)$", re.DOTALL)
    data = config_of_type(ck, peft_type)
    where = ck.adapter_config_path or ck.root
    if data is None:
        raise AdapterError(
            f"{peft_type} tensors ({', '.join(roles)}) without an adapter_config.json saying peft_type {peft_type}",
            path=where,
            hint=f"put the adapter_config.json PEFT saved with this {peft_type} adapter beside its weights",
        )
    cfg = AdapterConfig.from_dict({k: v for k, v in data.items() if k not in keys}, source=str(where))
    cfg.raw, cfg.peft_type = dict(data), peft_type
    fallback = ck.adapter_name or DEFAULT_ADAPTER
    parts: dict[tuple[str, str], dict[str, str]] = {}
    rest: list[str] = []
    in_model = any(in_model_re.fullmatch(k) for k in ck.tensors)
    for k in ck.tensors:
        m = in_model_re.fullmatch(k) if in_model else saved.fullmatch(k)
        if m:
            ad = m.groupdict().get("name") or fallback
            parts.setdefault((ad, m["mod"].removeprefix(_PREFIX)), {})[m["role"]] = k
        else:
            rest.append(k)
    if not parts:
        raise AdapterError(f"adapter_config.json says {peft_type}, but no {roles[0]} tensors are here", path=where)
    one_adapter(ck, parts, peft_type)
    inv = Inventory(
        form="unmerged" if in_model else "adapter",
        dialect=dialect,
        prefixed=any(k.startswith(_PREFIX) for k in ck.tensors),
    )
    sort_rest(ck, inv, rest, fallback, f"a {peft_type} checkpoint: {peft_type}'s are {' and '.join(roles)}")
    return inv, data, cfg, parts


class BoftDialect:
    """BOFT checkpoints: claimed by ``boft_R``/``boft_s`` tensors or an adapter_config.json saying BOFT."""

    name = "boft"

    def claims(self, ck: Checkpoint) -> bool:
        if any(_SAVED.fullmatch(k) or _IN_MODEL.fullmatch(k) for k in ck.tensors):
            return True
        return config_of_type(ck, PEFT_TYPE) is not None

    def read(self, ck: Checkpoint) -> Inventory:
        inv, data, cfg, parts = read_parameter_dicts(ck, PEFT_TYPE, "boft", ("boft_R", "boft_s"), KEYS)
        factors: set[int] = set()
        for (ad, mod), keys in sorted(parts.items()):
            bm = _module(ck, inv, ad, mod, keys)
            factors.add(int(ck.info(bm.factors["boft_R"]).shape[0]))
            inv.lora.setdefault(ad, {})[mod] = bm
            inv.configs[ad] = cfg
            inv.tuner[ad] = {
                "peft_type": PEFT_TYPE,
                **{k: data.get(k) for k in KEYS},
                "butterfly_factors": sorted(factors),  # what the tensors hold (see the module's docstring)
            }
        return inv


def _module(ck: Checkpoint, inv: Inventory, adapter: str, mod: str, keys: dict[str, str]) -> LoraModule:
    """One BOFT module, after checking both tensors are there and of PEFT's shapes (their fit to the base weight
    is checked by the merge)."""
    for role in ("boft_R", "boft_s"):
        if role not in keys:
            raise AdapterError(f"BOFT module {mod}: {role} is missing", path=ck.root, tensor=next(iter(keys.values())))
    r, s = ck.info(keys["boft_R"]), ck.info(keys["boft_s"])
    if not r.is_float or len(r.shape) != 4 or r.shape[2] != r.shape[3] or 0 in r.shape:
        raise AdapterError(
            f"boft_R of shape {list(r.shape)} ({r.dtype_name}): PEFT's BOFT stores float (factors, blocks, b, b) "
            "blocks",
            path=r.file,
            tensor=keys["boft_R"],
        )
    if not s.is_float or len(s.shape) != 2 or 1 not in s.shape:
        raise AdapterError(
            f"boft_s of shape {list(s.shape)} ({s.dtype_name}): PEFT's BOFT stores a float (out, 1) scale",
            path=s.file,
            tensor=keys["boft_s"],
        )
    _, d, b, _ = r.shape
    base = inv.base.get(f"{mod}.weight")
    shape: Any = ck.info(base).shape if base is not None else ()
    return LoraModule(
        mod,
        adapter,
        "conv" if len(shape) > 2 else "linear",
        keys["boft_R"],
        keys["boft_s"],
        b,
        d * b,
        s.shape[0] * s.shape[1],
        scaling=1.0,
        tuner="boft",
        factors={"boft_R": keys["boft_R"], "boft_s": keys["boft_s"]},
        factor_params=r.shape[0] * d * b * b + s.shape[0] * s.shape[1],
        tuner_args={"stages": r.shape[0]},  # m butterfly factors (its merge FLOPs)
    )

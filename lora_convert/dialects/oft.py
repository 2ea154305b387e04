"""PEFT's OFT (``peft_type: OFT``): a block-diagonal rotation of a weight's input side, not a term added to it.

Each module is a :class:`LoraModule` with ``tuner`` ``oft`` and its one tensor in ``factors``: ``oft_R``
(nn.Linear, nn.Conv2d: ``W ← W·Rᵀ``, kind ``linear``/``conv`` by the base) or ``oft_embedding_R``
(nn.Embedding: ``W ← W·R``, kind ``embedding``), of shape (r, b(b−1)/2) — one row per b×b block, one
row in all with ``block_share``.  ``rank`` is the block size b; ``in_features`` r·b (0 with block_share:
the base settles it).  The rotation is built in :mod:`..oft_math` and applied by the merge engine
(``routes/oft_terms.py``); no route that writes LoRA factors takes it.  Split and attach write OFT's own
tensors.

Layouts: the saved adapter holds ``<module>.oft_R.weight``; PEFT's in-model state dict
``<module>.oft_R.<name>.weight`` beside ``<module>.base_layer.weight``.  PEFT before 0.14 stored
``oft_r`` (whole b×b blocks) and its config no ``oft_block_size``: PEFT 0.22 refuses both, so do we.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterError, UnsupportedError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from .vera import config_of_type, one_adapter, sort_rest

PEFT_TYPE = "OFT"
FACTORS = ("oft_R", "oft_embedding_R")
_SAVED = re.compile(r"^(?P<mod>.+)\.(?P<role>oft_R|oft_embedding_R)\.weight$", re.DOTALL)
_IN_MODEL = re.compile(r"^(?P<mod>.+)\.(?P<role>oft_R|oft_embedding_R)\.(?P<name>(?!weight$)[^.]+)\.weight$", re.DOTALL)
_OLD = re.compile(r"^(?P<mod>.+)\.oft_r(?:\.[^.]+)?$", re.DOTALL)
_PREFIX = "base_model.model."
# the config's key parameters, as detect shows them (PEFT's OFTConfig defaults where the file has none)
KEYS: dict[str, Any] = {
    "r": 0,
    "oft_block_size": 32,
    "coft": False,
    "eps": 6e-5,
    "block_share": False,
    "use_cayley_neumann": True,
    "num_cayley_neumann_terms": 5,
}


def key(module: str, factor: str, adapter: str | None = None) -> str:
    """An OFT tensor's key in PEFT's saved adapter (``adapter`` None) or in-model state dict."""
    return f"{_PREFIX}{module}.{factor}" + (f".{adapter}" if adapter else "") + ".weight"


class OftDialect:
    """OFT checkpoints: claimed by ``oft_R``/``oft_embedding_R``/``oft_r`` tensors or a config saying OFT."""

    name = "oft"

    def claims(self, ck: Checkpoint) -> bool:
        if any(_SAVED.fullmatch(k) or _IN_MODEL.fullmatch(k) or _OLD.fullmatch(k) for k in ck.tensors):
            return True
        return config_of_type(ck, PEFT_TYPE) is not None

    def read(self, ck: Checkpoint) -> Inventory:
        old = next((k for k in ck.tensors if _OLD.fullmatch(k)), None)
        if old is not None:
            raise UnsupportedError(
                "an OFT adapter of PEFT before 0.14 (oft_r: whole rotation blocks), which PEFT 0.14 and later "
                "refuse to load",
                path=ck.root,
                tensor=old,
                hint="load it with PEFT <= 0.13 and merge it there, or train it again with a newer PEFT",
            )
        data = config_of_type(ck, PEFT_TYPE)
        where = ck.adapter_config_path or ck.root
        if data is None:
            raise AdapterError(
                "OFT tensors (oft_R) without an adapter_config.json saying peft_type OFT: its block parameters "
                "(coft, Cayley-Neumann terms) are unknown",
                path=where,
                hint="put the adapter_config.json PEFT saved with this OFT adapter beside its weights",
            )
        if "oft_block_size" not in data:
            raise UnsupportedError(
                "an OFT config without oft_block_size: PEFT before 0.14's layout, which PEFT 0.14 and later refuse",
                path=where,
                hint="load it with PEFT <= 0.13 and merge it there, or train it again with a newer PEFT",
            )
        cfg = AdapterConfig.from_dict({k: v for k, v in data.items() if k not in KEYS}, source=str(where))
        cfg.raw, cfg.peft_type = dict(data), PEFT_TYPE
        fallback = ck.adapter_name or DEFAULT_ADAPTER
        parts: dict[tuple[str, str], dict[str, str]] = {}
        rest: list[str] = []
        in_model = any(_IN_MODEL.fullmatch(k) for k in ck.tensors)
        for k in ck.tensors:
            m = _IN_MODEL.fullmatch(k) if in_model else _SAVED.fullmatch(k)
            if m:
                ad = m.groupdict().get("name") or fallback
                parts.setdefault((ad, m["mod"].removeprefix(_PREFIX)), {})[m["role"]] = k
            else:
                rest.append(k)
        if not parts:
            raise AdapterError("adapter_config.json says OFT, but no oft_R tensors are here", path=where)
        one_adapter(ck, parts, "OFT")
        inv = Inventory(
            form="unmerged" if in_model else "adapter",
            dialect="oft",
            prefixed=any(k.startswith(_PREFIX) for k in ck.tensors),
        )
        sort_rest(ck, inv, rest, fallback, "an OFT checkpoint: OFT's are oft_R")
        share = bool(data.get("block_share", False))
        for (ad, mod), keys in sorted(parts.items()):
            inv.lora.setdefault(ad, {})[mod] = _module(ck, inv, ad, mod, keys, share)
            inv.lora[ad][mod].tuner_args = {k: data.get(k, v) for k, v in KEYS.items()}
            inv.configs[ad] = cfg
            inv.tuner[ad] = {"peft_type": PEFT_TYPE, **{k: data.get(k, v) for k, v in KEYS.items()}}
        return inv


def _module(ck: Checkpoint, inv: Inventory, adapter: str, mod: str, keys: dict[str, str], share: bool) -> LoraModule:
    """One OFT module, after checking its tensor is PEFT's (r, b(b−1)/2) of floats (its fit to the base
    weight is checked by the merge)."""
    if len(keys) > 1:
        raise AdapterError(
            f"OFT module {mod} holds both oft_R and oft_embedding_R: PEFT gives a layer one of them",
            path=ck.root,
            tensor=keys["oft_embedding_R"],
        )
    ((factor, k),) = keys.items()
    info = ck.info(k)
    b = block_size(info.shape[1]) if len(info.shape) == 2 else None
    if not info.is_float or b is None or info.shape[0] == 0 or (share and info.shape[0] != 1):
        raise AdapterError(
            f"{factor} of shape {list(info.shape)} ({info.dtype_name}): PEFT's OFT stores a float (r, b(b-1)/2) "
            "tensor, one row per b×b block" + (" and a single row with block_share" if share else ""),
            path=info.file,
            tensor=k,
        )
    in_f, out_f = (0 if share else info.shape[0] * b), 0
    base = inv.base.get(f"{mod}.weight")
    kind = "embedding" if factor == "oft_embedding_R" else "linear"
    if base is not None:
        shape = ck.info(base).shape
        kind = "conv" if len(shape) > 2 and kind == "linear" else kind
        out_f = shape[0] if shape else 0
        if share and len(shape) >= 2:
            in_f = shape[1] if kind == "embedding" else math.prod(shape[1:])
    return LoraModule(
        mod,
        adapter,
        kind,
        k,
        k,
        b,
        in_f,
        out_f,
        scaling=1.0,
        tuner="oft",
        factors={factor: k},
        factor_params=info.shape[0] * info.shape[1],
    )


def block_size(n_elements: int) -> int | None:
    """b with b(b−1)/2 = ``n_elements`` (a stored row's length), or None when there is none (torch-free: detect
    reads it; ``oft_math.BlockRotation.build`` checks the same when it builds the blocks)."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements else None

"""Dialects: the key layouts of the world, translated into our :class:`~lora_convert.inventory.Inventory`.

A dialect looks at a checkpoint's tensor names (and its config files) and says which base tensors,
LoRA modules (A, B, rank, kind, scaling) and replacement tensors it holds.  Everything downstream —
detect, the routes, report — reads only the inventory, so supporting a new adapter format is one
dialect module: a class with ``name``, ``claims(ck)`` and ``read(ck)``, registered with
:func:`register`.  PEFT's layout is the first dialect and the fallback.

The other built-in dialects are registered *lazily* (:class:`LazyDialect`): each with a cheap test on names,
metadata and the adapter config's ``peft_type`` that every checkpoint it claims passes, so that its module is
imported only for a checkpoint that may be its own.  A PEFT LoRA — most inputs, and every base — imports none of
them (start-up: issue 26).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from .. import arch
from ..errors import AdapterError
from ..inventory import Inventory
from ..io.reader import Checkpoint
from .peft import PeftDialect
from .peft_common import adapter_config_object


class Dialect(Protocol):
    name: str

    def claims(self, ck: Checkpoint) -> bool:
        """Whether ``ck`` is written in this dialect (from names and config files; no tensor data)."""

    def read(self, ck: Checkpoint) -> Inventory:
        """The inventory of ``ck``.  Raises AdapterError for LoRA tensors that do not add up."""


class LazyDialect:
    """A dialect whose module is imported the first time a checkpoint passes ``may_claim``: a necessary condition
    of the dialect's own ``claims`` (tests/test_lazy_dialects.py holds every built-in one to it), so that a
    checkpoint failing it is not the dialect's and its module need not be read to be told so."""

    def __init__(self, name: str, module: str, cls: str, may_claim: Callable[[Checkpoint], bool], *args: Any) -> None:
        self.name, self.module, self.cls, self.may_claim, self.args = name, module, cls, may_claim, args
        self._dialect: Dialect | None = None

    def load(self) -> Dialect:
        if self._dialect is None:
            self._dialect = getattr(importlib.import_module(self.module, __name__), self.cls)(*self.args)
        return self._dialect

    def claims(self, ck: Checkpoint) -> bool:
        return self.may_claim(ck) and self.load().claims(ck)

    def read(self, ck: Checkpoint) -> Inventory:
        return self.load().read(ck)


DIALECTS: list[Dialect] = [PeftDialect()]


def register(dialect: Dialect) -> None:
    """Add a dialect, consulted before those already registered (PEFT, the fallback, stays last)."""
    DIALECTS.insert(0, dialect)


def unregister(dialect: Dialect) -> None:
    DIALECTS.remove(dialect)


FACTOR_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})  # what a LoRA factor can be


def read_inventory(ck: Checkpoint) -> Inventory:
    """The inventory of ``ck`` in the first dialect that claims it, its LoRA factors floating-point."""
    for d in DIALECTS:
        if d.claims(ck):
            inv = d.read(ck)
            _check_factor_dtypes(ck, inv)
            return inv
    raise AssertionError("the PEFT dialect claims every checkpoint")  # pragma: no cover


def _check_factor_dtypes(ck: Checkpoint, inv: Inventory) -> None:
    """Integer or bool LoRA factors (and DoRA magnitudes, lora_bias) are no LoRA a trainer writes: refused by
    name rather than multiplied as numbers."""
    for modules in inv.lora.values():
        for m in modules.values():
            for key in (m.a_key, m.b_key, m.bias_key, m.magnitude_key):
                if key is None or key not in ck.tensors:
                    continue  # (a view some dialects build, of tensors checked under their own names)
                info = ck.info(key)
                if info.dtype_name not in FACTOR_DTYPES:
                    raise AdapterError(
                        f"a LoRA tensor stored as {info.dtype_name}: LoRA factors are floating-point numbers",
                        path=info.file,
                        tensor=key,
                        hint="this file is corrupted or not a LoRA adapter",
                    )


def declared_peft_type(ck: Checkpoint) -> str:
    """The adapter config's ``peft_type``, upper case ("" without one)."""
    data = adapter_config_object(ck)
    return str(data.get("peft_type") or "").upper() if data is not None else ""


def _names_or_type(markers: tuple[str, ...], peft_type: str) -> Callable[[Checkpoint], bool]:
    """PEFT's other tuners: a tensor name holding one of ``markers``, or an adapter config saying ``peft_type``."""
    return lambda ck: any(m in k for k in ck.tensors for m in markers) or declared_peft_type(ck) == peft_type


def _diffusers(ck: Checkpoint) -> bool:
    """No adapter config, and the diffusers metadata or a pipeline component's name first in some tensor name."""
    if ck.adapter_config_path is not None:
        return False
    return "lora_adapter_metadata" in ck.metadata or any(
        k.split(".", 1)[0] in arch.DIFFUSION_COMPONENTS for k in ck.tensors
    )


# Consulted in this order, each before those registered earlier (PEFT, the fallback, stays last).
register(
    LazyDialect("mlx", ".mlx", "MlxDialect", lambda ck: any(k.endswith((".lora_a", ".lora_b")) for k in ck.tensors))
)
register(  # every kohya prefix (diffusion_names.KOHYA_PREFIXES) begins "lora_"
    LazyDialect(
        "kohya",
        ".kohya",
        "KohyaDialect",
        lambda ck: ck.adapter_config_path is None and any(k.startswith("lora_") for k in ck.tensors),
    )
)
register(LazyDialect("diffusers", ".diffusers", "DiffusersDialect", _diffusers))
register(LazyDialect("vera", ".vera", "VeraDialect", _names_or_type((".vera_lambda_",), "VERA")))
register(LazyDialect("ia3", ".ia3", "Ia3Dialect", _names_or_type(("ia3_l",), "IA3")))
register(LazyDialect("oft", ".oft", "OftDialect", _names_or_type((".oft_R.", ".oft_embedding_R.", ".oft_r"), "OFT")))
register(LazyDialect("boft", ".boft", "BoftDialect", _names_or_type((".boft_R", ".boft_s"), "BOFT")))
register(LazyDialect("hra", ".hra", "HraDialect", _names_or_type((".hra_u",), "HRA")))
# claimed by lora_E tensors (ranknum in an unmerged model) or peft_type ADALORA, which no other dialect reads
register(LazyDialect("adalora", ".adalora", "AdaloraDialect", _names_or_type(("lora_E", "ranknum"), "ADALORA")))
# PEFT's additive tuners (dialects/additive.py: one class, a tuner each), claimed by their tensors or peft_type
for _tuner, _peft_type, _params in (
    ("shira", "SHIRA", ("shira_weight", "shira_indices")),
    ("fourierft", "FOURIERFT", ("fourierft_spectrum",)),
    ("vblora", "VBLORA", ("vblora_logits_",)),
    ("delora", "DELORA", ("delora_",)),
    ("c3a", "C3A", ("c3a_kernel",)),
    ("randlora", "RANDLORA", ("randlora_lambda", "randlora_gamma")),
    ("miss", "MISS", ("miss_block",)),
    ("road", "ROAD", ("road_theta", "road_alpha")),
):
    register(
        LazyDialect(
            _tuner, ".additive", "AdditiveDialect", _names_or_type(tuple(f".{p}" for p in _params), _peft_type), _tuner
        )
    )

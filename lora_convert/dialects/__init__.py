"""Dialects: the key layouts of the world, translated into our :class:`~lora_convert.inventory.Inventory`.

A dialect looks at a checkpoint's tensor names (and its config files) and says which base tensors,
LoRA modules (A, B, rank, kind, scaling) and replacement tensors it holds.  Everything downstream —
detect, the routes, report — reads only the inventory, so supporting a new adapter format is one
dialect module: a class with ``name``, ``claims(ck)`` and ``read(ck)``, registered with
:func:`register`.  PEFT's layout is the first dialect and the fallback.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import AdapterError
from ..inventory import Inventory
from ..io.reader import Checkpoint
from .adalora import AdaloraDialect
from .additive import AdditiveDialect
from .boft import BoftDialect
from .diffusers import DiffusersDialect
from .hra import HraDialect
from .ia3 import Ia3Dialect
from .kohya import KohyaDialect
from .mlx import MlxDialect
from .oft import OftDialect
from .peft import PeftDialect
from .vera import VeraDialect


class Dialect(Protocol):
    name: str

    def claims(self, ck: Checkpoint) -> bool:
        """Whether ``ck`` is written in this dialect (from names and config files; no tensor data)."""

    def read(self, ck: Checkpoint) -> Inventory:
        """The inventory of ``ck``.  Raises AdapterError for LoRA tensors that do not add up."""


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


register(MlxDialect())
register(KohyaDialect())
register(DiffusersDialect())
register(VeraDialect())  # claimed by vera_lambda_* tensors or peft_type VERA
register(Ia3Dialect())  # claimed by ia3_l tensors or peft_type IA3
register(OftDialect())  # claimed by oft_R / oft_embedding_R tensors or peft_type OFT
register(BoftDialect())  # claimed by boft_R / boft_s tensors or peft_type BOFT
register(HraDialect())  # claimed by hra_u tensors or peft_type HRA
register(AdaloraDialect())  # claimed by lora_E tensors or peft_type ADALORA, which no other dialect reads
register(AdditiveDialect("shira"))  # claimed by shira_weight/shira_indices tensors or peft_type SHIRA
register(AdditiveDialect("fourierft"))  # claimed by fourierft_spectrum tensors or peft_type FOURIERFT
register(AdditiveDialect("vblora"))  # claimed by vblora_logits_* tensors or peft_type VBLORA
register(AdditiveDialect("delora"))  # claimed by delora_* tensors or peft_type DELORA
register(AdditiveDialect("c3a"))  # claimed by c3a_kernel tensors or peft_type C3A
register(AdditiveDialect("road"))  # claimed by road_theta/road_alpha tensors or peft_type ROAD
register(AdditiveDialect("miss"))  # claimed by miss_block tensors or peft_type MISS
register(AdditiveDialect("randlora"))  # claimed by randlora_lambda/gamma tensors or peft_type RANDLORA

"""Dialects: the key layouts of the world, translated into our :class:`~lora_convert.inventory.Inventory`.

A dialect looks at a checkpoint's tensor names (and its config files) and says which base tensors,
LoRA modules (A, B, rank, kind, scaling) and replacement tensors it holds.  Everything downstream —
detect, the routes, report — reads only the inventory, so supporting a new adapter format is one
dialect module: a class with ``name``, ``claims(ck)`` and ``read(ck)``, registered with
:func:`register`.  PEFT's layout is the first dialect and the fallback.
"""

from __future__ import annotations

from typing import Protocol

from ..inventory import Inventory
from ..io.reader import Checkpoint
from .diffusers import DiffusersDialect
from .kohya import KohyaDialect
from .mlx import MlxDialect
from .peft import PeftDialect


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


def read_inventory(ck: Checkpoint) -> Inventory:
    """The inventory of ``ck`` in the first dialect that claims it."""
    for d in DIALECTS:
        if d.claims(ck):
            return d.read(ck)
    raise AssertionError("the PEFT dialect claims every checkpoint")  # pragma: no cover


register(MlxDialect())
register(KohyaDialect())
register(DiffusersDialect())

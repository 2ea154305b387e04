"""Where a checkpoint comes from: a local path or a Hub repo id, opened and read by its dialect.

Shared by every command, below the API and above the I/O.  Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .arch import check_model_config
from .dialects import read_inventory
from .errors import CheckpointError, RouteError, option
from .inventory import Inventory
from .io.files import load_json
from .io.reader import Checkpoint, open_checkpoint


def resolve(ref: str | Path) -> Path:
    """A local path as it is, or a Hub repo id (``org/name[@revision]``) fetched into the cache."""
    p = Path(ref)
    if os.path.exists(p):  # False, not an exception, for a name too long or holding a NUL
        return p
    from .io.hub import is_repo_id, resolve_checkpoint

    if is_repo_id(str(ref).split("@", 1)[0]):
        return resolve_checkpoint(str(ref))
    return p


def open_local(path: Path, *, adapter: str | None = None) -> Checkpoint:
    """A checkpoint on disk, its config.json's keys type-checked: it comes from a stranger, so a wrong type
    is refused by key here rather than raising deep inside a route."""
    ck = open_checkpoint(path, adapter_name=adapter)
    if ck.config is not None and ck.config_path is not None:
        try:
            check_model_config(ck.config, ck.config_path)
        except BaseException:
            ck.close()
            raise
    return ck


def load_source(ref: str | Path, *, adapter: str | None = None) -> tuple[Checkpoint, Inventory]:
    """Open a checkpoint and read it in its dialect (an adapter's config is part of the inventory)."""
    ck = open_local(resolve(ref), adapter=adapter)
    try:
        return ck, read_inventory(ck)
    except BaseException:
        ck.close()
        raise


def open_plain(ref: str | Path, what: str) -> Checkpoint:
    """A base (or tuned) model: a checkpoint without LoRA tensors."""
    ck, inv = load_source(ref)
    if inv.form != "plain":
        ck.close()
        raise RouteError(
            f"{what} holds LoRA tensors itself",
            path=ck.root,
            hint=f"give the base model itself, without LoRA tensors, as {option('base', 'BASE')}"
            if what == "the base"
            else "extract works on two full models, without LoRA tensors (merge an adapter first)",
        )
    return ck


def pick_adapter(inv: Inventory, want: str | None, ck: Checkpoint) -> str:
    """The adapter a command works on: the one asked for, or the only one there is."""
    names = inv.adapters
    if want is not None:
        if want in names or (ck.adapter_name == want):
            return want
        if inv.form == "adapter" and len(names) == 1:
            return names[0]
        raise RouteError(f"no adapter named {want!r} (found: {', '.join(names) or 'none'})", path=ck.root)
    if len(names) > 1:
        raise RouteError(
            f"holds several adapters: {', '.join(names)}",
            path=ck.root,
            hint=f"choose one with {option('adapter', 'NAME')}",
        )
    return names[0] if names else "default"


def load_model_config(ref: str | Path, what: str = "the base") -> dict[str, Any]:
    """A model's config.json alone: from its folder (weights not needed), the file itself, or a Hub
    repo (only config.json is fetched).  For routes that need the base's shape, not its weights."""
    p = Path(ref)
    if not os.path.exists(p):
        from .io.hub import resolve_checkpoint

        p = resolve_checkpoint(str(ref), allow_patterns=["config.json"])
    path = p / "config.json" if p.is_dir() else p
    if not os.path.lexists(path):
        raise CheckpointError(f"{what} has no config.json", path=p)
    data = check_model_config(load_json(path, what="a config file"), path)  # bounded, keys type-checked
    if data is None:
        raise CheckpointError("config.json is not a JSON object", path=path)
    return data

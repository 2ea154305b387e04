"""Where a checkpoint comes from: a local path or a Hub repo id, opened and sorted into an inventory.

Shared by every route (convert, extract, detect, report), below the API and above the I/O.
"""

from __future__ import annotations

from pathlib import Path

from .config import AdapterConfig
from .errors import AdapterError, RouteError
from .inventory import Inventory, build_inventory
from .io.reader import Checkpoint, open_checkpoint


def resolve(ref: str | Path | None, *, what: str) -> Path | None:
    """A local path, or a Hub repo id fetched into the cache."""
    if ref is None:
        return None
    p = Path(ref)
    if p.exists():
        return p
    try:
        from .io.hub import is_repo_id, resolve_checkpoint
    except ImportError:  # pragma: no cover - hub module always ships
        return p
    if is_repo_id(str(ref).split("@", 1)[0]):  # org/name or org/name@revision
        return resolve_checkpoint(str(ref))
    return p


def load_source(path: str | Path, *, adapter: str | None = None) -> tuple[Checkpoint, Inventory, AdapterConfig | None]:
    """Open a checkpoint and sort its tensors; the adapter config is loaded when there is one."""
    p = resolve(path, what="source")
    ck = open_checkpoint(p, adapter_name=adapter)
    inv = build_inventory(ck)
    cfg = AdapterConfig.load(ck.adapter_config_path) if ck.adapter_config_path else None
    if cfg is None and inv.form == "adapter":
        raise AdapterError("adapter_config.json is missing", path=ck.root,
                           hint="an adapter needs the adapter_config.json PEFT writes beside its weights")
    return ck, inv, cfg


def pick_adapter(inv: Inventory, want: str | None, ck: Checkpoint) -> str:
    names = inv.adapters
    if want is not None:
        if want in names or (ck.adapter_name == want):
            return want
        if inv.form == "adapter" and len(names) == 1:
            return names[0]
        raise RouteError(f"no adapter named {want!r} (found: {', '.join(names) or 'none'})", path=ck.root)
    if len(names) > 1:
        raise RouteError(f"holds several adapters: {', '.join(names)}", path=ck.root, hint="choose one with --adapter")
    return names[0] if names else "default"

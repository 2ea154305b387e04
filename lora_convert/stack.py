"""Several adapters at once: ``REF[:WEIGHT]`` specs, parsed and opened for merge, unmerge, verify and combine.

A spec names an adapter and the weight its ΔW is multiplied by (PEFT's ``set_scale``; 1 when left
out).  ``REF`` is an adapter checkpoint (a folder, a file or a Hub repo id) or, when the command's
SOURCE holds adapters itself, one of their names.  Weights are parsed here, before anything is opened,
so that a typo costs one ``error:`` line and nothing else.  Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import AdapterConfig
from .errors import AdapterError, LoraConvertError, OptionError, RouteError, option
from .inputs import load_source, pick_adapter
from .inventory import Inventory
from .io.reader import Checkpoint

Spec = str | tuple[str, float]


@dataclass
class AdapterInput:
    """One adapter of a merge, unmerge, verify or combine: the checkpoint that holds it, which of its
    adapters, and the weight its ΔW is multiplied by."""

    ck: Checkpoint
    inventory: Inventory
    name: str
    weight: float = 1.0
    ref: str = ""  # as the user named it (model card, messages)

    @property
    def config(self) -> AdapterConfig | None:
        return self.inventory.config(self.name)

    @property
    def label(self) -> str:
        return self.ref or self.name


def parse_spec(spec: Spec) -> tuple[str, float]:
    """``"REF:0.5"`` -> ("REF", 0.5); ``"REF"`` -> ("REF", 1.0).  A path that exists is taken whole,
    colons included; otherwise the text after the last colon must be a finite number."""
    if isinstance(spec, tuple):
        ref, weight = spec
        return str(ref), _weight(str(weight), str(ref))
    text = str(spec)
    if ":" not in text or Path(text).exists():
        return text, 1.0
    ref, _, raw = text.rpartition(":")
    if not ref:
        raise OptionError(f"adapter {text!r}: nothing before the weight", hint="write REF[:WEIGHT], e.g. my-lora:0.5")
    return ref, _weight(raw, text)


def has_weight(spec: Spec) -> bool:
    """Whether the spec itself carries a weight (``REF:W`` or a tuple)."""
    return isinstance(spec, tuple) or (":" in str(spec) and not Path(str(spec)).exists())


def _weight(raw: str, spec: str) -> float:
    try:
        weight = float(raw)
    except ValueError:
        raise OptionError(
            f"adapter {spec!r}: the weight {raw!r} is not a number", hint="write REF[:WEIGHT], e.g. my-lora:0.5"
        ) from None
    if not math.isfinite(weight):
        raise OptionError(f"adapter {spec!r}: the weight must be a finite number, not {raw!r}")
    return weight


def parse_weights(values: Iterable[str | float]) -> list[float]:
    """``--weights 0.7,-0.4`` or ``--weights 0.7 --weights -0.4`` -> [0.7, -0.4]."""
    out: list[float] = []
    for v in values:
        parts = [p for p in str(v).replace(",", " ").split()] if isinstance(v, str) else [str(v)]
        out += [_weight(p, str(v)) for p in parts]
    return out


def names_a_stack(adapter: Spec | None, adapters: Sequence[Spec] | None) -> bool:
    """Whether the adapters given are a stack (other checkpoints, weights) rather than the legacy
    ``--adapter NAME`` that picks one adapter of a checkpoint holding several."""
    if adapters or isinstance(adapter, tuple):
        return True
    if adapter is None:
        return False
    return ":" in adapter or "/" in adapter or "\\" in adapter or Path(adapter).exists()


def open_stack(specs: Sequence[Spec], source: tuple[Checkpoint, Inventory] | None) -> list[AdapterInput]:
    """The adapters of ``specs``, opened.  With a ``source`` that holds adapters, a spec may name one of
    them, and when none does and it holds exactly one, that one comes first with weight 1 (``merge
    ADAPTER --base BASE --adapter OTHER`` merges both).  Closes what it opened if anything fails."""
    parsed = [parse_spec(s) for s in specs]
    own = _own_adapters(source)
    out: list[AdapterInput] = []
    try:
        named = False
        for ref, weight in parsed:
            if source is not None and ref in own:
                out.append(AdapterInput(source[0], source[1], ref, weight, ref))
                named = True
            else:
                out.append(_open_one(ref, weight))
        if source is not None and not named and len(own) == 1:
            out.insert(0, AdapterInput(source[0], source[1], own[0], 1.0, str(source[0].root)))
    except BaseException:
        close_stack(out, keep=source[0] if source else None)
        raise
    if not out:
        raise OptionError("no adapter given", hint=f"pass {option('adapter', 'ADAPTER[:WEIGHT]')}")
    return out


def _own_adapters(source: tuple[Checkpoint, Inventory] | None) -> list[str]:
    if source is None or source[1].form == "plain":
        return []
    ck, inv = source
    return list(dict.fromkeys([*inv.adapters, *([ck.adapter_name] if ck.adapter_name else [])]))


def _open_one(ref: str, weight: float) -> AdapterInput:
    """An adapter checkpoint of its own (a saved adapter, or an unmerged checkpoint with one adapter)."""
    try:
        ck, inv = load_source(ref)
    except LoraConvertError as exc:
        if not Path(ref).exists() and "/" not in ref:
            raise RouteError(
                f"adapter {ref!r} is neither a path nor an adapter of the source", hint=exc.message
            ) from None
        raise
    try:
        if inv.form == "plain":
            raise RouteError("holds no LoRA tensors: not an adapter", path=ck.root)
        name = pick_adapter(inv, None, ck)
        if inv.config(name) is None:
            raise AdapterError(
                "no adapter_config.json beside the LoRA tensors, so the scaling (lora_alpha / r) is unknown",
                path=ck.root,
                hint="put the adapter_config.json of this fine-tune there",
            )
        return AdapterInput(ck, inv, name, weight, ref)
    except BaseException:
        ck.close()
        raise


def close_stack(stack: Sequence[AdapterInput], keep: Checkpoint | None = None) -> None:
    """Close every checkpoint the stack opened (not ``keep``, the caller's own)."""
    seen: set[int] = set()
    for inp in stack:
        if inp.ck is keep or id(inp.ck) in seen:
            continue
        seen.add(id(inp.ck))
        inp.ck.close()


def check_same_base(stack: Sequence[AdapterInput]) -> None:
    """Adapters trained on different base models do not add up: their configs'
    ``base_model_name_or_path`` must name one model.  Names are compared by their last path component
    (case-insensitive), so a Hub id and a local copy of it (``org/Model`` and ``/models/Model``) agree."""
    first: tuple[str, AdapterInput, str] | None = None
    for inp in stack:
        name = inp.config.base_model_name_or_path if inp.config is not None else None
        if not name or name == "None":
            continue
        key = Path(str(name).rstrip("/\\")).name.lower()
        if first is None:
            first = (key, inp, str(name))
        elif key != first[0]:
            raise AdapterError(
                f"adapters for different base models: {first[1].label} was trained on {first[2]!r}, "
                f"{inp.label} on {name!r}",
                path=inp.ck.root,
                hint="use adapters of one base model (if both names are the same model, correct "
                "base_model_name_or_path in adapter_config.json)",
            )

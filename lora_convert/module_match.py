"""Which base module each adapter module is, across the layouts that spell one model differently.

An adapter names its modules as the model it was trained on held them; a base checkpoint names its
tensors as it was saved.  The two can differ by

* a prefix (:data:`arch.EQUIVALENT_PREFIXES`): a VLM's text decoder is ``model.layers`` in a text-only
  model and in Qwen2-VL as saved, ``model.language_model.layers`` in memory (so in PEFT adapters trained
  on the VLM), ``language_model.model.layers`` in a saved Llava or Gemma 3; diffusers' LoRA files put the
  pipeline component (``unet.``) in front of every module; GPT-2 is saved with or without ``transformer.``;
* the spelling: kohya writes the path with ``_`` for ``.`` (:attr:`Inventory.spelled`), so a module is
  looked up by its spelling among the base's own names;
* the block numbering: SDXL kohya files number UNet blocks the SGM way (:func:`diffusion_names.sgm_to_diffusers`,
  which needs the base's config).

Every reading of a module is looked up in the base: one hit is a match; two are refused, since the names
alone cannot say which one is meant; none leaves the module unmatched — an error, unless its whole part
(a text encoder beside a UNet base, a vision tower beside a text-only base) is absent from the base, in
which case that part is left out and reported.  Torch-free: ``detect --base`` uses it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import arch, diffusion_names


def spelling(path: str) -> str:
    """A module path as kohya writes it (``down_blocks.0.to_q`` -> ``down_blocks_0_to_q``)."""
    return path.replace(".", "_")


@dataclass
class ModuleMatch:
    """The outcome of matching adapter modules to a base."""

    mapping: dict[str, str] = field(default_factory=dict)  # adapter module -> base module
    renamed: dict[tuple[str, str], int] = field(default_factory=dict)  # (adapter prefix, base prefix) -> modules
    left_out: dict[str, list[str]] = field(default_factory=dict)  # part -> its modules (absent from the base)
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # module -> the base modules it could be

    def notes(self, *, kept: bool = False) -> list[str]:
        """One line per prefix read differently and per part left out (warnings of a conversion);
        ``kept``: the route keeps those parts under their own names rather than leaving them out."""
        out = []
        for (ours, theirs), n in sorted(self.renamed.items(), key=lambda kv: (-kv[1], kv[0])):
            sgm = theirs.endswith(SGM)
            theirs = theirs.removesuffix(SGM)
            where = f"the base's {theirs!r}" if theirs else "the base's top level"
            what = " (SGM-numbered UNet blocks, as SDXL kohya files name them, renumbered by the base's config)"
            out.append(
                f"adapter modules under {ours!r} matched {where} ({n} module{'s' if n != 1 else ''}){what if sgm else ''}"
            )
        for part, mods in sorted(self.left_out.items()):
            fate = "kept under their own names" if kept else "left out"
            out.append(
                f"{len(mods)} module{'s' if len(mods) != 1 else ''} of {part.rstrip('.')!r} {fate}: the base holds "
                f"no such part (e.g. {mods[0]})"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "matched": len(self.mapping),
            "renamed": {f"{a} -> {b}": n for (a, b), n in self.renamed.items()},
            "left_out": {k: len(v) for k, v in self.left_out.items()},
            "unmatched": list(self.unmatched),
            "ambiguous": {k: list(v) for k, v in self.ambiguous.items()},
        }


class _BaseNames:
    """The base's tensor names, looked up by module path (or by kohya spelling)."""

    def __init__(self, keys: Iterable[str], spelled: bool) -> None:
        self.keys = set(keys)
        self.heads = {k.split(".", 1)[0] for k in self.keys}
        self.prefixes = {""}  # the base's first one to three path components: where a reading can land
        for parts in {tuple(k.split(".", 3)[:-1]) for k in self.keys}:
            self.prefixes.update(".".join(parts[:i]) + "." for i in range(1, len(parts) + 1))
        self._swaps: dict[str, list[Change]] = {}
        self.spelled = spelled
        self.by_spelling: dict[str, set[str]] = {}
        if spelled:
            for k in self.keys:
                mod = arch.module_of(k)
                self.by_spelling.setdefault(spelling(mod), set()).add(mod)

    def find(self, name: str) -> set[str]:
        if self.spelled:
            return self.by_spelling.get(spelling(name), set())
        if f"{name}.weight" in self.keys or f"{name}.bias" in self.keys or name in self.keys:
            return {name}
        return set()

    def swaps(self, s: str) -> list[Change]:
        """(prefix of ``s``, another spelling of it the base has something under), for a module path
        ``s`` ending in '.'.  Every equivalent prefix spans at most two components, so the answer
        depends on the first two only: cached by those (an adapter has thousands of modules)."""
        key = ".".join(s.split(".", 2)[:2])
        found = self._swaps.get(key)
        if found is None:
            found = []
            for group in arch.EQUIVALENT_PREFIXES:
                have = max((p for p in group if s.startswith(p)), key=len, default=None)
                if have is not None:
                    found += [(have, q) for q in group if q != have and q in self.prefixes]
            self._swaps[key] = found
        return found

    def holds_any(self, prefixes: Iterable[str]) -> bool:
        prefixes = tuple(prefixes)
        return any(k.startswith(prefixes) for k in self.keys)


Change = tuple[str, str]  # (the adapter's prefix, the base's prefix) a reading swapped
SGM = "<SGM blocks>"  # marks a reading whose UNet blocks were renumbered from SGM's


def _readings(module: str, base: _BaseNames, config: dict[str, Any] | None) -> list[tuple[str, Change]]:
    """``module`` and its other spellings one step away, each with the prefix it swapped: every
    equivalent prefix the base has something under, the first component dropped where the base has
    nothing under it, the SGM block numbering translated."""
    out: list[tuple[str, Change]] = [(module, ("", ""))]
    s = module + "."
    out += [((q + s[len(have) :])[:-1], (have, q)) for have, q in base.swaps(s)]
    head, _, rest = module.partition(".")
    if rest and head not in base.heads:
        out.append((rest, (head + ".", "")))  # a base saved without its base_model_prefix (GPT-2's ``h.0``)
    if config is not None:
        for r, change in list(out):
            t = diffusion_names.sgm_to_diffusers(r[len(change[1]) :], config) if r.startswith(change[1]) else None
            if t is not None:
                out.append((change[1] + t, (change[0], change[1] + SGM)))
    return out


def _hits(module: str, base: _BaseNames, config: dict[str, Any] | None) -> dict[str, Change]:
    """Base modules that some reading of ``module`` names, with the prefix swapped to reach each: one
    step first, two only if that finds none (a kohya text-encoder module read against a CLIP saved
    without ``text_model.``)."""
    first = _readings(module, base, config)
    hits: dict[str, Change] = {}
    for r, change in first:
        for t in base.find(r):
            hits.setdefault(t, change)  # the first reading to reach a module names the swap
    if hits:
        return hits
    for r, (a1, b1) in first[1:]:
        for r2, (a2, b2) in _readings(r, base, config)[1:]:
            for t in base.find(r2):  # two swaps in a row: the adapter's prefix, then the base's
                hits.setdefault(t, (a1 + a2[len(b1) :] if a2.startswith(b1) else a1, b2 + b1[len(a2) :]))
    return hits


def match_modules(
    modules: Iterable[str], base_keys: Iterable[str], *, spelled: bool = False, config: dict[str, Any] | None = None
) -> ModuleMatch:
    """Match every adapter module to the base (see the module docstring for the rules).

    ``spelled``: the adapter's paths are readings of '_'-joined names (kohya).  ``config``: the base's
    config.json, which numbers SGM blocks (used only for a diffusers UNet)."""
    base = _BaseNames(base_keys, spelled)
    sgm_config = config if arch.is_diffusers_config(config) else None
    res = ModuleMatch()
    for m in modules:
        hits = _hits(m, base, sgm_config)
        if len(hits) > 1:
            res.ambiguous[m] = sorted(hits)
        elif hits:
            (target, change), *_ = hits.items()
            res.mapping[m] = target
            if change != ("", ""):
                res.renamed[change] = res.renamed.get(change, 0) + 1
        else:
            res.unmatched.append(m)
    _leave_out_absent_parts(res, base)
    return res


def _leave_out_absent_parts(res: ModuleMatch, base: _BaseNames) -> None:
    """Unmatched modules of a part none of whose modules matched, and of which the base holds nothing,
    are left out — provided something else matched (zero matched modules stays an error)."""
    if not res.mapping or not res.unmatched:
        return
    matched_parts = {arch.part_of(m) for m in res.mapping}
    by_part: dict[str, list[str]] = {}
    for m in res.unmatched:
        part = arch.part_of(m)
        if part is not None and part not in matched_parts:
            by_part.setdefault(part, []).append(m)
    for part, mods in by_part.items():
        if part not in arch.DIFFUSION_COMPONENTS:
            group = next(g for g in arch.EQUIVALENT_PREFIXES if part in g)
            if base.holds_any(group):
                continue  # the base has this vision part: its modules not matching is an error
        res.left_out[part] = mods
    gone = {m for mods in res.left_out.values() for m in mods}
    res.unmatched = [m for m in res.unmatched if m not in gone]

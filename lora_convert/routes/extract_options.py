"""The options of an extraction (``extract``, ``convert --to adapter`` from a plain checkpoint): what they
are, their defaults, and every check of their values, ``--layers`` read into ranges.  The SVD pass and the
planner that use them are :mod:`.extract`'s.

Torch-free: options are checked before anything heavy is imported (``--device cuda`` asks torch only then).
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field

from .. import arch
from ..bounds import seed_ok
from ..errors import OptionError, RouteError, option_name, spelled
from ..fmt import ranges
from ..io.reader import Checkpoint

EMBEDDING_MODES = ("lora", "full", "skip")
FACTOR_DTYPES = ("fp32", "bf16", "fp16")  # of the written factors
SVD_METHODS = ("auto", "exact", "randomized")


@dataclass
class ExtractOptions:
    """How to factor: one criterion (``rank``, ``energy`` or ``max_error``; rank 16 when none is given)
    capped at ``max_rank``; which tensors (``include``/``exclude`` regexes, ``layers`` "0-15,20",
    ``embeddings`` lora|full|skip, ``save_other``); the solver (``svd``, ``device``, ``seed``); and the
    dtype of the written factors (``dtype``: fp32, bf16, fp16)."""

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    max_rank: int = 128
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    layers: str | None = None
    embeddings: str = "lora"
    svd: str = "auto"
    device: str = "cpu"
    seed: int = 0
    save_other: bool = False
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        self.include, self.exclude = list(self.include), list(self.exclude)

    def validate(self) -> ExtractOptions:
        """Check every option (OptionError naming it); the default criterion is rank 16."""
        chosen = [x is not None for x in (self.rank, self.energy, self.max_error)]
        if sum(chosen) > 1:
            raise OptionError(f"give at most one of {option_names('rank', 'energy', 'max_error')}")
        if not any(chosen):
            self.rank = 16
        checks = [
            (self.rank is None or self.rank >= 1, f"{option_name('rank')} must be at least 1"),
            (self.energy is None or 0 < self.energy <= 1, f"{option_name('energy')} must be in (0, 1]"),
            (self.max_error is None or 0 <= self.max_error < 1, f"{option_name('max_error')} must be in [0, 1)"),
            (self.max_rank >= 1, f"{option_name('max_rank')} must be at least 1"),
            (
                self.embeddings in EMBEDDING_MODES,
                f"{option_name('embeddings')} must be one of {', '.join(EMBEDDING_MODES)}",
            ),
            (
                self.dtype in FACTOR_DTYPES,
                f"{option_name('dtype')} must be one of {', '.join(FACTOR_DTYPES)} for the adapter's factors",
            ),
            (self.svd in SVD_METHODS, f"{option_name('svd')} must be auto, exact or randomized"),
            (
                seed_ok(self.seed),
                f"{option_name('seed')} must be an integer from 0 to 2**64 - 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message)
        if self.device.startswith("cuda") and not _cuda_available():
            raise RouteError(
                f"{option_name('device')} cuda: no CUDA device is available",
                hint="use " + spelled("--device cpu", 'device="cpu"'),
            )
        self.patterns()
        parse_layers(self.layers)
        return self

    def patterns(self) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]]]:
        try:
            return [re.compile(p) for p in self.include], [re.compile(p) for p in self.exclude]
        except re.error as e:
            raise OptionError(f"bad {option_names('include', 'exclude')} regex: {e}") from None

    def criterion(self) -> str:
        if self.energy is not None:
            return f"energy {self.energy}"
        if self.max_error is not None:
            return f"max error {self.max_error}"
        return f"rank {self.rank}"


def option_names(*names: str) -> str:
    """Several options named as the caller spells them (``--include, --layers`` or ``include, layers``)."""
    return ", ".join(option_name(n) for n in names)


@dataclass(frozen=True)
class LayerSelection:
    """``--layers 0-15,20``: sorted, disjoint, inclusive ranges, never expanded into their members (``0-10000000``
    is two numbers, not a set of ten million)."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, layer: object) -> bool:
        if not isinstance(layer, int):
            return False
        i = bisect.bisect_right(self.ranges, (layer, math.inf)) - 1
        return i >= 0 and self.ranges[i][0] <= layer <= self.ranges[i][1]

    def missing(self, have: list[int]) -> int | None:
        """The first selected layer not in ``have`` (sorted, distinct), if any: each range is checked by counting
        the layers it holds (two bisections), not by walking it."""
        for a, b in self.ranges:
            lo, hi = bisect.bisect_left(have, a), bisect.bisect_right(have, b)
            if hi - lo != b - a + 1:
                return next((x for x, y in zip(range(a, b + 1), have[lo:hi], strict=False) if x != y), a + (hi - lo))
        return None


MAX_LAYER_DIGITS = 9  # a layer index of ten digits is no model's


def parse_layers(spec: str | None) -> LayerSelection | None:
    """``"0-15,20"`` -> the ranges (0, 15), (20, 20); overlapping and adjacent ranges are joined."""
    if spec is None or str(spec).strip() == "":
        return None
    found: list[tuple[int, int]] = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if not m:
            raise OptionError(f"{option_name('layers')}: cannot read {part[:40]!r} (use e.g. 0-15,20)")
        if any(g is not None and len(g) > MAX_LAYER_DIGITS for g in m.groups()):
            raise OptionError(f"{option_name('layers')}: {part[:40]!r} has a layer number of more than 9 digits")
        a, b = (int(m.group(3)),) * 2 if m.group(3) is not None else (int(m.group(1)), int(m.group(2)))
        if b < a:
            raise OptionError(f"{option_name('layers')}: empty range {part!r}")
        found.append((a, b))
    joined: list[tuple[int, int]] = []
    for a, b in sorted(found):
        if joined and a <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], b))
        else:
            joined.append((a, b))
    return LayerSelection(tuple(joined))


def check_layers(spec: str | None, ck: Checkpoint) -> None:
    """A ``--layers`` selection must name layers the tuned model has: one it lacks is an error listing the
    layers it has (``--layers 7`` on a 2-layer model extracted nothing from the layers, silently)."""
    sel = parse_layers(spec)
    if sel is None:
        return
    have = sorted({i for name in ck.tensors if (i := arch.layer_index(name)) is not None})
    lacking = sel.missing(have)
    if lacking is not None:
        has = f"it has layers {ranges(have)}" if have else "it has no numbered layers"
        raise RouteError(
            f"{option_name('layers')} {str(spec).strip()[:80]} names layer {lacking}, which the model lacks: {has}",
            path=ck.root,
        )


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())

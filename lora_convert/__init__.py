"""lora-convert: detect, convert, merge, split and extract LoRA checkpoints, exact to PEFT.

Everything the CLI does is a function here::

    import lora_convert as lc
    lc.detect("my-adapter").form               # "adapter"
    lc.merge("my-adapter", base="base-model", output="merged")
    lc.convert("unmerged-ckpt", "adapter", output="adapter-out")
    lc.extract("merged", base="base-model", output="adapter-out", rank=16)
    lc.spectrum("merged", base="base-model", energy=0.9).groups  # error vs rank, before extracting
    lc.report("my-adapter", base="base-model").rows
    lc.verify("merged", base="base-model", adapter="my-adapter").ok
    lc.push("merged", "me/my-model")
    lc.merge("my-adapter", base="base-model", output="merged", push_to="me/my-model")  # token checked first

Importing the package does not import torch: ``detect``, ``report`` and ``push`` never need it, and the
conversions import it when they run.
"""

from typing import TYPE_CHECKING, Any

from .api import (
    batch,
    combine,
    convert,
    detect,
    extract,
    load_source,
    merge,
    push,
    read_jobs,
    report,
    spectrum,
    verify,
)
from .errors import (
    AdapterError,
    CheckpointError,
    HubError,
    LoraConvertError,
    OptionError,
    OutputError,
    RouteError,
    UnsafeInputError,
    UnsupportedError,
)
from .io.reader import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    from .fleet import Job

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``Job`` is imported when first asked for (see :func:`.api.__getattr__`): a merge has no batch to run."""
    if name == "Job":
        from .fleet import Job

        return Job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterError",
    "Checkpoint",
    "CheckpointError",
    "HubError",
    "LoraConvertError",
    "OptionError",
    "OutputError",
    "RouteError",
    "UnsafeInputError",
    "UnsupportedError",
    "Job",
    "batch",
    "read_jobs",
    "combine",
    "convert",
    "detect",
    "extract",
    "load_source",
    "merge",
    "open_checkpoint",
    "push",
    "report",
    "spectrum",
    "verify",
    "__version__",
]

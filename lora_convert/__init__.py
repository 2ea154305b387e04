"""lora-convert: detect, convert, merge, split and extract LoRA checkpoints, exact to PEFT.

Everything the CLI does is a function here::

    import lora_convert as lc
    lc.detect("my-adapter").form               # "adapter"
    lc.merge("my-adapter", base="base-model", output="merged")
    lc.convert("unmerged-ckpt", "adapter", output="adapter-out")
"""

from .api import convert, load_source, merge
from .detect import DetectResult, detect
from .errors import (AdapterError, CheckpointError, HubError, LoraConvertError, OutputError, RouteError,
                     UnsafeInputError, UnsupportedError)
from .io.reader import Checkpoint, open_checkpoint

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "Checkpoint", "CheckpointError", "DetectResult", "HubError", "LoraConvertError", "OutputError",
    "RouteError", "UnsafeInputError", "UnsupportedError", "convert", "detect", "load_source", "merge",
    "open_checkpoint", "__version__",
]

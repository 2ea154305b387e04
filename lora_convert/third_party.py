"""Other libraries imported without their import-time chatter reaching our output.

Why: importing bitsandbytes (directly, or through peft or transformers) logs "Failed to load CPU
gemm_4bit_forward from kernels-community ..." on CPUs with AVX512-BF16, and other libraries warn about their
own optional pieces the same way.  None of it is about the user's files, and a user reading lora-convert's
stderr cannot act on it, so it would only hide our own ``warning:`` lines.

How: while one of these imports runs, the libraries' loggers are raised to ERROR and Python warnings are
ignored; both are restored right after, so our own warnings (issued later, outside the import) still show,
and a library's errors at ERROR level still do.  A module imported before (by the caller's own program)
is simply returned.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

# the top-level loggers of what we import lazily and of what those import in turn
LOGGERS = (
    "bitsandbytes",
    "transformers",
    "peft",
    "diffusers",
    "gguf",
    "compressed_tensors",
    "kernels",
    "huggingface_hub",
    "accelerate",
    "torch",
)


@contextmanager
def quiet_import() -> Iterator[None]:
    """Third-party loggers at ERROR and warnings ignored, for the duration of an import only."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)`` inside :func:`quiet_import` (ImportError passes through)."""
    with quiet_import():
        return importlib.import_module(name)

"""The project's exceptions.

Every failure a user can cause is a :class:`LoraConvertError`; the CLI turns it into
one ``error: ...`` line and exit status 1.  Each error carries the file and, where it is
about one tensor, the tensor name, so the message can say *where* as well as *what*.
"""

from __future__ import annotations

from pathlib import Path

from .text import escape_controls


class LoraConvertError(Exception):
    """Base class: a problem with the user's input, output or environment, not a bug."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        # Names come from downloaded files: control characters are escaped so that the one-line
        # message stays one line and cannot drive a terminal (the attributes keep the raw text).
        where = ": ".join(_cut(p, 400) for p in (self.path, self.tensor) if p)
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return escape_controls(_cut(text, 4000))


def _cut(text: str, n: int) -> str:
    """At most ``n`` characters: a name from a file can be megabytes long."""
    return text if len(text) <= n else f"{text[: n // 2 - 2]}...{text[-(n // 2 - 2) :]}"


class CheckpointError(LoraConvertError):
    """A checkpoint file or folder is missing, malformed, truncated or lies about itself."""


class UnsafeInputError(CheckpointError):
    """Input that would make us run code or read outside the checkpoint folder."""


class AdapterError(LoraConvertError):
    """An adapter does not fit its base, contradicts its config, or holds bad values."""


class UnsupportedError(LoraConvertError):
    """A valid checkpoint that this tool cannot convert exactly (other PEFT methods, quantized bases...)."""


class RouteError(LoraConvertError):
    """The asked-for conversion is impossible with the inputs given (e.g. no base)."""


class OutputError(LoraConvertError):
    """The output path exists, lies inside an input, is not writable, or the disk filled up."""


class HubError(LoraConvertError):
    """A Hugging Face Hub operation failed (auth, missing repo, server error, offline)."""

"""The project's exceptions.

Every failure a user can cause is a :class:`LoraConvertError`; the CLI turns it into
one ``error: ...`` line and exit status 1 (2 for an :class:`OptionError`, a usage error).  Each error carries the file and, where it is
about one tensor, the tensor name, so the message can say *where* as well as *what*.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypedDict

from .text import escape_controls

_SPELLED = re.compile("\x00([^\x00-\x02]*)\x01([^\x00-\x02]*)\x02")


def spelled(cli: str, api: str) -> str:
    """Words that differ between the two front doors, for a message both show: ``cli`` on the command line,
    ``api`` in Python.  The error spells them for whoever shows it (``str(exc)`` in Python,
    :meth:`LoraConvertError.for_cli` in the CLI), so the API never tells a caller to "pass --force"."""
    return f"\x00{cli}\x01{api}\x02"


def option(name: str, value: str | None = None) -> str:
    """How to give an option: ``option("force")`` is ``--force`` / ``force=True``, ``option("base", "BASE")``
    is ``--base BASE`` / ``base=BASE`` (``name`` is the API's keyword argument)."""
    flag = "--" + name.replace("_", "-")
    return spelled(f"{flag} {value}" if value else flag, f"{name}={value or 'True'}")


def option_name(name: str) -> str:
    """An option named as the subject of a message: ``--seq-len`` / ``seq_len``."""
    return spelled("--" + name.replace("_", "-"), name)


def render(text: str, *, cli: bool) -> str:
    """``text`` with every :func:`spelled` part spelled for the CLI or for Python."""
    return _SPELLED.sub(lambda m: m.group(1 if cli else 2), text)


class Where(TypedDict, total=False):
    """Where a problem is, as keywords for any error: ``raise AdapterError(msg, **where)``."""

    path: str | Path | None
    tensor: str | None


class LoraConvertError(Exception):
    """Base class: a problem with the user's input, output or environment, not a bug.

    ``str(exc)`` speaks to a Python caller (``force=True``); the CLI prints :meth:`for_cli` (``--force``)."""

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
        return _shown(render(self._text(), cli=False))

    def for_cli(self) -> str:
        """The message as the command line shows it: options as ``--flag``."""
        return _shown(render(self._text(), cli=True))

    def _text(self) -> str:
        where = ": ".join(_cut(p, 400) for p in (self.path, self.tensor) if p)
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


def _shown(text: str) -> str:
    """Names come from downloaded files: the message is cut to a bounded length and its control
    characters escaped, so that it stays one line and cannot drive a terminal (the attributes keep
    the raw text)."""
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


class OptionError(RouteError):
    """An option's value is out of range, malformed, or clashes with another option: wrong whatever the inputs
    hold, so the CLI calls it a usage error (exit 2), as click does the checks it makes itself.  A
    :class:`RouteError` still, for callers that caught that before."""


class OutputError(LoraConvertError):
    """The output path exists, lies inside an input, is not writable, or the disk filled up."""


class HubError(LoraConvertError):
    """A Hugging Face Hub operation failed (auth, missing repo, server error, offline)."""


BUG_HINT = "this is a bug in lora-convert: please report it with the command line; --debug shows the traceback"


def error_line(exc: BaseException) -> str:
    """The one line (after ``error:``) the CLI prints for ``exc``: ours as :meth:`LoraConvertError.for_cli`, the
    environment's (an OSError, memory) as what happened, anything else as a bug to report.  ``batch`` reports each
    failed job with it."""
    if isinstance(exc, LoraConvertError):
        return exc.for_cli()
    if isinstance(exc, KeyboardInterrupt):
        where = getattr(exc, "output_target", None)  # set by AtomicOutput on its way out
        return f"{where + ': ' if where else ''}interrupted; nothing was written"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError):  # the environment (permissions, a name too long, I/O errors), not a bug
        what = exc.strerror or type(exc).__name__
        return escape_controls(f"{exc.filename}: {what}" if exc.filename else what)
    text = " ".join(str(exc).split())[:300]  # the last line of defence: one line, not a traceback
    return escape_controls(f"internal error ({type(exc).__name__}{': ' + text if text else ''}); {BUG_HINT}")

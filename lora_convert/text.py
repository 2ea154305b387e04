"""Text from checkpoints made safe to print.

Tensor names, file names and config values come from files downloaded from strangers.  Printed
raw, an ESC or a newline in a name could fake an ``error:`` line or drive the terminal, and a
``[/bold]`` would be taken as markup by rich (or crash it).  Everything we print goes through
:func:`safe`.
"""

from __future__ import annotations

import unicodedata

# Control characters (C0, DEL, C1), format characters (bidi overrides, zero-width), line and
# paragraph separators and lone surrogates are shown as escapes; everything else as it is.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape_controls(text: str) -> str:
    """``text`` with every control/format/separator character (and lone surrogate) as an escape."""
    if text.isprintable() and text.isascii():  # the common case, fast
        return text
    return "".join(_escape_char(ch) if unicodedata.category(ch) in _ESCAPED_CATEGORIES else ch for ch in text)


def safe(value: object, *, markup: bool = True) -> str:
    """``str(value)`` fit for the terminal: control characters escaped and, with ``markup``
    (text printed through rich), rich markup neutralised so that it prints as written."""
    text = escape_controls(str(value))
    if markup:
        from rich.markup import escape

        # (the space stops rich from doubling a trailing backslash, which would then print twice)
        text = escape(text + " ")[:-1]
    return text

"""How the command line prints: consoles sized for a terminal or for a pipe, tables that never cut the
part of a name that tells rows apart, the ``--json`` documents (versioned; errors are documents too), and
every failure as one ``error:`` line (:func:`run_guarded`).

``docs/json.md`` documents every document's shape.  Torch-free: ``--help`` and usage errors print
through here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from .errors import LoraConvertError, OptionError, error_line, render
from .text import escape_controls, safe

#: The version of every ``--json`` document's shape: it changes when a key is removed or changes meaning
#: (new keys may appear within a version).  Each document says ``"schema": "<kind>/<version>"``.
SCHEMA_VERSION = 1
#: Line width off a terminal: whole lines for pipes and CI logs, which rich would wrap at 80 columns.
PIPE_WIDTH = 4096


def fit_console(console: Console, *, soft_wrap: bool = False) -> None:
    """Size ``console`` for where it writes now: a terminal wraps at its width; anything else (a pipe, a file,
    a CI log) gets each line whole and each table as wide as its cells."""
    terminal = console.is_terminal
    # None asks the terminal (rich's setter takes it, though its property is typed int)
    console.width = None if terminal else PIPE_WIDTH  # type: ignore[assignment]
    console.soft_wrap = soft_wrap or not terminal


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix all ``names`` share and none of them ends at (``model.layers.``)."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    while prefix and any(n == prefix or len(n) <= len(prefix) for n in names):
        prefix = prefix[: prefix[:-1].rfind(".") + 1]
    return prefix


def table(
    console: Console,
    title: str,
    head: list[str],
    rows: list[list[str]],
    *,
    name_col: int | None = 0,
    right: tuple[int, ...] = (),
) -> Table:
    """A table whose cells are never cut short: off a terminal it is as wide as it needs; on a terminal too
    narrow for it the common prefix of the name column is shown as ``…`` (the title says what it stands
    for) and whatever is still too wide folds onto more lines, so ``q_proj`` and ``k_proj`` stay apart."""
    t = _table(title, head, rows, right)
    if not console.is_terminal or name_col is None or not rows:
        return t
    if Measurement.get(console, console.options.update_width(PIPE_WIDTH), t).maximum <= console.width:
        return t
    prefix = common_prefix([r[name_col] for r in rows])
    if not prefix:
        return t
    short = [[*r[:name_col], "…" + r[name_col][len(prefix) :], *r[name_col + 1 :]] for r in rows]
    return _table(f"{title} (… = {prefix})", head, short, right)


def _table(title: str, head: list[str], rows: list[list[str]], right: tuple[int, ...]) -> Table:
    """Title, headers and cells come from files (tensor and module names): rich renders markup in all of
    them, so every one goes through :func:`~lora_convert.text.safe`."""
    t = Table(title=safe(title))
    for i, h in enumerate(head):
        t.add_column(safe(h), overflow="fold", justify="right" if i in right else "left")
    for r in rows:
        t.add_row(*(safe(c) for c in r))
    return t


# -- --json documents ---------------------------------------------------------------------------------
def document(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as the ``--json`` document of ``kind`` (``detect``, ``report``, ``conversion``, ``push``)."""
    return {"schema": f"{kind}/{SCHEMA_VERSION}", **data}


def error_document(
    exc: BaseException, exit_code: int, *, message: str | None = None, type_name: str | None = None
) -> dict[str, Any]:
    """The ``--json`` document of a failure: the same exit code as without ``--json``, the one-line error
    as ``text`` and its parts (``type``, ``message``, ``path``, ``tensor``, ``hint``) for scripts."""
    if isinstance(exc, LoraConvertError):
        err = {
            "type": type(exc).__name__,
            "message": render(exc.message, cli=True),
            "path": exc.path,
            "tensor": exc.tensor,
            "hint": render(exc.hint, cli=True) if exc.hint else None,
            "text": exc.for_cli(),
        }
    else:
        text = message if message is not None else str(exc)
        err = {"type": type_name or type(exc).__name__, "message": text, "path": None, "tensor": None, "hint": None}
        err["text"] = text
    return document("error", {"error": {**err, "exit_code": exit_code}})


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, default=str)


# -- failures: one error line ------------------------------------------------------------------------------
def run_guarded(fn: Callable[[], Any], debug: bool | Callable[[], bool], as_json: bool = False) -> Any:
    """Turn every exception into one ``error:`` line (under --json, an error document on stdout too): ours and
    the environment's (exit 1; an option's bad value, :class:`OptionError`, exit 2 as a usage error), Ctrl-C (exit 130), anything else as a bug to report (exit 1).  ``--debug``
    (``debug``: a flag, or a function asked when something failed) re-raises."""
    try:
        return fn()
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except (LoraConvertError, KeyboardInterrupt, MemoryError, Exception) as exc:
        if debug() if callable(debug) else debug:
            raise
        _fail_on(exc, as_json)


def _fail_on(exc: BaseException, as_json: bool) -> NoReturn:
    text = error_line(exc)  # the same line batch reports for a failed job
    if isinstance(exc, LoraConvertError):
        _fail(exc, 2 if isinstance(exc, OptionError) else 1, text, as_json)
    if isinstance(exc, KeyboardInterrupt):
        _fail(exc, 130, text, as_json, "Interrupted")
    _fail(exc, 1, text, as_json)


def _fail(exc: BaseException, code: int, text: str, as_json: bool, type_name: str | None = None) -> NoReturn:
    text = escape_controls(text)
    if as_json:
        click.echo(dumps(error_document(exc, code, message=text, type_name=type_name)))
    click.echo(f"error: {text}", err=True)
    sys.exit(code)


def usage_error(exc: click.UsageError, as_json: bool) -> NoReturn:
    """Under ``--json``, a usage error is an error document on stdout too (exit 2); otherwise click prints it."""
    if not as_json:
        raise exc
    click.echo(dumps(error_document(exc, exc.exit_code, message=exc.format_message(), type_name="UsageError")))
    exc.show()
    raise click.exceptions.Exit(exc.exit_code)

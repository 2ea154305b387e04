"""The option records of a conversion, built once at the top of each API function and passed down as they are.

Three records replace the ~20 keywords that used to travel api -> writer -> assembly one by one:
:class:`Output` (where and how the output is written: the assembly reads it), :class:`HubPush` (where it
is pushed afterwards) and :class:`RouteOptions` (what only some routes take; the request builder checks
each against the route and the :class:`~.routes.plan.Request` carries it: it lives beside the routes, in
:mod:`.routes.route_options`, since they read it).  Each record checks its own
values before any input is opened, so that a typo costs one ``error:`` line and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HubError, OptionError, OutputError, RouteError, option, option_name, spelled
from .fmt import human_bytes
from .io.writer import parse_size
from .routes.route_options import RouteOptions

if TYPE_CHECKING:
    from .io.hub import PushResult

__all__ = ["UNSHARDED", "HubPush", "Output", "RouteOptions"]

UNSHARDED = 10**15  # an adapter is one file whatever its size, as PEFT writes it


@dataclass(frozen=True)
class Output:
    """How an output is written, the same for every route (:func:`~.assemble.write_output` reads it)."""

    path: str | Path
    force: bool = False
    max_shard_size: str | int = "5GB"
    progress: bool = False
    command: str | None = None  # the command line, quoted in the model card
    started: float = field(default_factory=time.perf_counter)  # the result's ``seconds`` count from here

    def check(self) -> None:
        try:
            parse_size(self.max_shard_size)
        except ValueError as exc:
            raise OptionError(f"{option_name('max_shard_size')}: {exc}") from None


@dataclass(frozen=True)
class HubPush:
    """Push the output to a Hub repo once written (``push_to=``, ``private=``, ``token=``)."""

    repo: str
    private: bool = False
    token: str | None = None

    def preflight(self, to: str, output: Output) -> HubPush:
        """Everything a push needs, before any work: the token, its right to write the repo, and (a rerun after
        a failed push) no finished output in the way.  Returns the record with the token the push will use."""
        if to == "gguf":
            raise RouteError(
                f"{option_name('push_to')} uploads a folder and a gguf output is one file",
                hint="upload the .gguf file with `hf upload REPO FILE`",
            )
        if Path(output.path).exists() and not output.force:
            again = spelled(
                f"lora-convert push {output.path} {self.repo}",
                f"lora_convert.push({str(output.path)!r}, {self.repo!r})",
            )
            raise OutputError(
                "already exists",
                path=output.path,
                hint=f"to push the folder that is there: {again}; to convert again, pass {option('force')}",
            )
        from .io.hub import check_push_access

        return HubPush(self.repo, self.private, check_push_access(self.repo, self.token))

    def upload(self, output: str, files: int, total_bytes: int, progress: bool) -> PushResult:
        """Push a finished output (``files`` weight files, ``total_bytes`` in all); a failure says that the
        output is complete and how to push it alone."""
        from .io.hub import push_folder

        try:
            return push_folder(output, self.repo, private=self.private, token=self.token, progress=progress)
        except HubError as exc:
            again = spelled(f"lora-convert push {output} {self.repo}", f"lora_convert.push({output!r}, {self.repo!r})")
            raise HubError(
                f"the output was written in full ({files} weight file(s), "
                f"{human_bytes(total_bytes)}), then the push failed: {exc.message}",
                path=output,
                hint=(f"{exc.hint}; then " if exc.hint else "") + f"push it without converting again: {again}",
            ) from exc

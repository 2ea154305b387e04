"""The option records of a conversion, built once at the top of each API function and passed down as they are.

Three records replace the ~20 keywords that used to travel api -> writer -> assembly one by one:
:class:`Output` (where and how the output is written: the assembly reads it), :class:`HubPush` (where it
is pushed afterwards) and :class:`RouteOptions` (what only some routes take; the request builder checks
each against the route and hands it to the :class:`~.routes.plan.Request`).  Each record checks its own
values before any input is opened, so that a typo costs one ``error:`` line and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HubError, OptionError, OutputError, RouteError, option, option_name, spelled
from .fmt import human_bytes
from .io.writer import parse_size

if TYPE_CHECKING:
    from .io.hub import PushResult
    from .routes.extract import ExtractOptions

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


@dataclass(frozen=True)
class RouteOptions:
    """The options that only some routes take (each refused by name elsewhere)."""

    dtype: str = "auto"
    extract: ExtractOptions | dict[str, Any] | None = None
    outtype: str | None = None
    requantize: bool = False
    device: str = "cpu"
    moe_layout: str | None = None
    drop_norms: bool = False

    def check(self, to: str, output: Output) -> None:
        """What can be refused from the target alone, before any input is opened."""
        from .routes import FORMATS, FORMS
        from .routes.plan import output_dtype

        if to not in FORMS + FORMATS:
            raise OptionError(f"unknown target form {to!r} (choose from {', '.join(FORMS + FORMATS)})")
        output_dtype(self.dtype)
        output.check()
        self._check_format(to, output.path)
        self._check_device()

    def _check_format(self, to: str, output: str | Path) -> None:
        """--outtype and --drop-norms are GGUF's (its types are not --dtype's), and a GGUF output is a ``.gguf``
        file."""

        def target(form: str) -> str:
            return spelled(f"--to {form}", f'to="{form}"')

        if self.outtype is not None and to != "gguf":
            raise OptionError(f"{option_name('outtype')} applies to {target('gguf')} only, not {target(to)}")
        if self.drop_norms and to != "gguf":
            raise OptionError(f"{option_name('drop_norms')} applies to {target('gguf')} only, not {target(to)}")
        if to != "gguf":
            return
        from .io.gguf_sink import OUTTYPES  # (imported only for a GGUF output: it is no merge's concern)

        if self.dtype != "auto":
            raise OptionError(
                f"{option_name('dtype')} does not apply to {target('gguf')}: use {option_name('outtype')} "
                + "|".join(OUTTYPES)
            )
        if self.outtype is not None and self.outtype not in OUTTYPES:
            raise OptionError(f"unknown {option_name('outtype')} {self.outtype!r} (choose from {', '.join(OUTTYPES)})")
        if not str(output).endswith(".gguf"):
            raise RouteError(
                f"{target('gguf')} writes one file: give {spelled('-o', 'output=')} a path ending in .gguf", path=output
            )

    def _check_device(self) -> None:
        """``cpu``, or a CUDA device torch can see (checked before any work)."""
        if self.device == "cpu":
            return
        if not self.device.startswith("cuda"):
            raise OptionError(f"{option_name('device')} must be cpu or cuda[:N], not {self.device!r}")
        import torch

        if not torch.cuda.is_available():
            raise RouteError(
                f"{option_name('device')} {self.device}: no CUDA device is available",
                hint="use " + spelled("--device cpu", 'device="cpu"'),
            )

"""The options only some routes take (``--dtype``, extraction's, ``--outtype``, ``--requantize``, ``--device``,
``--moe-layout``, ``--drop-norms``), as one record: built once by the API (:mod:`lora_convert.options` re-exports
it beside ``Output`` and ``HubPush``), checked against the target before any input is opened, and carried as it
is by the :class:`~.plan.Request` (``Request.options``) to the route that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import OptionError, RouteError, option_name, spelled

if TYPE_CHECKING:
    import torch

    from .extract_options import ExtractOptions

FORMS = ("merged", "adapter", "unmerged", "base")
FORMATS = ("gguf", "mlx", "kohya", "diffusers")  # other ecosystems' adapters: llama.cpp's GGUF file, an mlx-lm
# adapter folder, a kohya (sd-scripts) file, diffusers' LoRA file
OUTPUT_DTYPES = {
    "auto": None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def output_dtype(name: str) -> torch.dtype | None:
    """``--dtype`` as a torch dtype (None: keep each tensor's own)."""
    if name not in OUTPUT_DTYPES:
        raise RouteError(f"unknown dtype {name!r} (choose from auto, bf16, fp16, fp32)")
    attr = OUTPUT_DTYPES[name]
    if attr is None:
        return None
    import torch

    return getattr(torch, attr)


class Output(Protocol):
    """What the check needs of :class:`lora_convert.options.Output` (which sits a layer above the routes)."""

    @property
    def path(self) -> str | Path: ...

    def check(self) -> None: ...


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
        from ..io.gguf_sink import OUTTYPES  # (imported only for a GGUF output: it is no merge's concern)

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

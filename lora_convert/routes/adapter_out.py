"""What the routes that write another ecosystem's adapter (GGUF for llama.cpp, mlx-lm) share: which of
an adapter's parts such a file can carry, and the job that writes one factor computed from A or B.

Those files hold LoRA pairs and nothing else, so anything PEFT adds around them — ``modules_to_save``,
trainable tokens, ``lora_bias``, GPT-2's transposed ``Conv1D`` — is refused with the reason rather
than dropped.  Factors are small (rank × dimension), so a job reads them whole, in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .. import arch
from ..errors import AdapterError, UnsupportedError
from ..inventory import LoraModule
from ..io.reader import Checkpoint
from ..pipeline import Buffers, Job
from .common import check_finite
from .plan import Request


def carried_modules(
    req: Request, fmt: str, *, dora: bool, dropped: frozenset[str] = frozenset()
) -> tuple[list[LoraModule], list[str]]:
    """The adapter's LoRA modules, after refusing what ``fmt`` cannot hold (but the base tensors in
    ``dropped``, which the caller leaves out and lists); and warnings."""
    cfg, inv, name = req.config, req.inventory, req.adapter
    assert cfg is not None, "the API checks that an adapter config exists"
    cfg.check_supported()
    where = req.source.root
    if inv.tokens.get(name):
        raise UnsupportedError(f"trainable tokens cannot be written as {fmt} LoRA", path=where)
    warnings = _saved_layers(req, fmt, dropped)
    modules = list(inv.modules(name).values())
    if not modules:
        raise AdapterError("holds no LoRA modules to convert", path=where)
    if cfg.fan_in_fan_out or arch.stores_conv1d(req.model_config):
        raise UnsupportedError(f"GPT-2 style Conv1D layers (fan_in_fan_out) have no {fmt} form", path=where)
    for m in modules:
        if m.kind not in ("linear", "embedding"):
            raise UnsupportedError(f"{m.kind} LoRA has no {fmt} form", path=where, tensor=m.module)
        if m.bias_key:
            raise UnsupportedError(f"lora_bias has no {fmt} form", path=where, tensor=m.bias_key)
        if m.magnitude_key and not dora:
            raise UnsupportedError(f"DoRA has no {fmt} form (only plain LoRA)", path=where, tensor=m.magnitude_key)
        if m.scaling is None:  # pragma: no cover - the dialects resolve it whenever a config exists
            raise AdapterError("scaling unknown", path=where, tensor=m.module)
    return modules, warnings


def _saved_layers(req: Request, fmt: str, dropped: frozenset[str] = frozenset()) -> list[str]:
    """PEFT saves the embedding layers whole beside an embedding LoRA (``save_embedding_layers``).  They
    are the base's own and are left out, as llama.cpp's converter does; anything else that replaces a
    base tensor, or a saved layer of another vocabulary size (a resized vocab), cannot be carried."""
    inv, name, where = req.inventory, req.adapter, req.source.root
    saved = inv.saved_layers.get(name, set())
    vocab = arch.config_value(req.model_config, "vocab_size")
    for base_key, key in sorted(inv.replace.get(name, {}).items()):
        if base_key in dropped:
            continue
        if base_key not in saved:
            raise UnsupportedError(
                f"modules_to_save / a base tensor saved whole ({base_key}) cannot be written as {fmt} LoRA",
                path=where,
                tensor=key,
            )
        rows = req.source.info(key).shape[0]
        if vocab is not None and rows != vocab:
            raise UnsupportedError(
                f"the adapter resizes the vocabulary ({rows} rows, the base has {vocab}); {fmt} LoRA cannot",
                path=where,
                tensor=key,
            )
    if saved and vocab is None:
        return [f"{len(saved)} embedding layer(s) saved whole in the adapter were left out as the base's own"]
    return []


def read_factor(ck: Checkpoint, key: str) -> torch.Tensor:
    """A LoRA factor, whole, in fp32, refused when it holds NaN or Inf."""
    return check_finite(ck.read(key), ck, key).to(torch.float32)


def factor_job(name: str, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> Job:
    """One output tensor computed whole by ``make`` (read and transform one factor)."""

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        t = make()
        if tuple(t.shape) != shape:  # pragma: no cover - the planners compute shapes from the same headers
            raise AssertionError(f"{name}: made {tuple(t.shape)}, planned {shape}")
        yield t.to(dtype).contiguous()

    return Job(name, dtype, shape, blocks, "lora")

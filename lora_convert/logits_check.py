"""``verify --logits``: MERGED's logits against PEFT's unmerged model (BASE + the adapters, active
together, ``set_scale`` for the weights) on a few tokens.

This is the one place the tool builds models, on purpose: it is the end-to-end check a user would
otherwise write.  It runs only when transformers and peft are installed and two fp32 copies of the
model fit in the memory available; otherwise it says why it was skipped.  Both models run in fp32,
so the only difference left is MERGED's rounding of ``W + ΔW`` to its dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch

from .closeness import unit_roundoff
from .io.reader import Checkpoint
from .routes.plan import Request
from .third_party import quiet_import

TOKENS = 16
SEED = 0
HEADROOM = 1.5  # of the two models' fp32 bytes, for activations and allocator slack


def compare_logits(merged: Checkpoint, req: Request) -> dict[str, Any]:
    """{"ok": bool | None, "max_abs_diff", "max_abs_logit", "relative", "tolerance", "summary"};
    ``ok`` is None (and ``skipped`` says why) when the comparison could not run."""
    why = _cannot_run(merged, req)
    if why:
        return {"ok": None, "skipped": why, "summary": f"skipped ({why})"}
    try:
        with _quiet():
            ref, got = _peft_logits(req), _merged_logits(merged.root)
    except Exception as exc:  # noqa: BLE001 - a model transformers cannot build is a skip, not a crash
        why = f"transformers could not run the model: {type(exc).__name__}: {str(exc)[:160]}"
        return {"ok": None, "skipped": why, "summary": f"skipped ({why})"}
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    dtype = max((i for i in merged.tensors.values() if i.is_float), key=lambda i: i.nbytes).dtype
    tol = max(1e-4, 16 * unit_roundoff(dtype))
    rel = diff / scale if scale else diff
    ok = rel <= tol
    return {
        "ok": ok,
        "tokens": TOKENS,
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "relative": rel,
        "tolerance": tol,
        "summary": f"max |Δ| {diff:.3g} = {rel:.3g} of max |logit| ({'within' if ok else 'above'} {tol:.3g})",
    }


def _cannot_run(merged: Checkpoint, req: Request) -> str | None:
    try:
        with quiet_import():  # peft imports bitsandbytes where installed, which logs on import
            import peft  # noqa: F401
            import transformers  # noqa: F401
    except ImportError:
        return "needs transformers and peft (pip install transformers peft)"
    for inp in req.adapters_in():
        if inp.inventory.form != "adapter":
            return f"{inp.label} is not a saved adapter PEFT can load (convert it to an adapter first)"
    base_root = (req.base or req.source).root
    params = sum(i.nbytes // max(1, i.itemsize) for i in merged.tensors.values())
    need = int(params * 4 * 2 * HEADROOM)
    avail = _available_memory()
    if avail is not None and need > avail:
        return f"two fp32 copies of the model need about {need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available"
    if not (Path(base_root) / "config.json").is_file():
        return "BASE has no config.json to build the model from"
    return None


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' and PEFT's loading bars and notices are not ours to print (nor what the libraries PEFT
    imports while it builds the model, bitsandbytes among them, log on import)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with quiet_import():
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _tokens(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (1, TOKENS), generator=g)


@torch.no_grad()
def _run(model: Any) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return model(_tokens(vocab)).logits.float()


def _merged_logits(root: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32).eval()
    return _run(model)


def _peft_logits(req: Request) -> torch.Tensor:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = AutoModelForCausalLM.from_pretrained(str((req.base or req.source).root), dtype=torch.float32).eval()
    inputs = req.adapters_in()
    names = [f"adapter{i}" for i in range(len(inputs))]
    model = PeftModel.from_pretrained(base, str(inputs[0].ck.root), adapter_name=names[0])
    for name, inp in zip(names[1:], inputs[1:], strict=True):
        model.load_adapter(str(inp.ck.root), adapter_name=name)
    cast(Any, model.base_model).set_adapter(names if len(names) > 1 else names[0])
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            for name, inp in zip(names, inputs, strict=True):
                if inp.weight != 1:
                    mod.set_scale(name, inp.weight)
    return _run(model.eval())

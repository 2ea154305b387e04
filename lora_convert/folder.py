"""The non-weight files of a Hugging Face folder: which ones we carry over, and config edits."""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .errors import LoraConvertError
from .io.files import load_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
NEVER_CARRY = {
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
    "adapter_config.json",
    "README.md",
    ".gitattributes",
}
CARRY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py", ".vocab", ".spm")
DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers >= 4.56 writes "dtype"; older configs say "torch_dtype"
TOKENIZER_HINTS = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template", "spiece")


def carry_files(
    src: Path | None, dst: Path, *, skip: Collection[str] = frozenset(), only_tokenizer: bool = False
) -> list[str]:
    """Copy config, generation config, tokenizer and chat-template files (never weights)."""
    if src is None or not src.is_dir():
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in NEVER_CARRY or p.name in skip or p.suffix in WEIGHT_SUFFIXES:
            continue
        if not p.name.endswith(CARRY_SUFFIXES):
            continue
        if only_tokenizer and not any(h in p.name for h in TOKENIZER_HINTS):
            continue
        shutil.copyfile(p, dst / p.name)
        copied.append(p.name)
    return copied


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file (bounded like every file we parse), or None."""
    try:
        data = load_json(path)
    except LoraConvertError:
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def update_config(dst: Path, changes: dict[str, Any]) -> None:
    """Apply ``changes`` to ``dst/config.json``: also to a nested ``text_config`` where the key lives there,
    and a dtype to every sub-config that states one (a multimodal model's vision tower is cast too); a value of
    None removes the key (``quantization_config`` of a dequantized base)."""
    path = dst / "config.json"
    config = read_json(path)
    if config is None or not changes:
        return
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
            continue
        config[key] = value
        subs = [v for v in config.values() if isinstance(v, dict)] if key in DTYPE_KEYS else [config.get("text_config")]
        for sub in subs:
            if isinstance(sub, dict) and key in sub:
                sub[key] = value
    write_json(path, config)

"""mlx-lm's LoRA adapters — ``adapters.safetensors`` + ``adapter_config.json`` — read into an
:class:`~lora_convert.inventory.Inventory`.

The format, as mlx-lm's ``tuner/lora.py``, ``tuner/dora.py`` and ``tuner/utils.py`` define it:

* ``{module}.lora_a`` is ``(in, r)`` = PEFT's Aᵀ and ``{module}.lora_b`` is ``(r, out)`` = Bᵀ, for
  linears and embeddings alike (an embedding's ``lora_a`` is ``(vocab, r)``); DoRA adds ``{module}.m``
  ``(out,)``, PEFT's ``lora_magnitude_vector``.  Module paths carry no prefix (for the models mlx-lm
  loads from Hugging Face checkpoints they are the transformers paths).
* ``adapter_config.json``: ``fine_tune_type`` (``lora``, ``dora``, ``full``; older files:
  ``use_dora``), ``num_layers`` (older: ``lora_layers``) and ``lora_parameters`` with one ``rank``,
  ``scale`` and ``keys`` for every module.  ``scale`` is the multiplier itself:
  ``y = W·x + scale·B·A·x``.

Which modules an adapter holds comes from its tensor names, never from ``num_layers``/``keys``: their
meaning changed between mlx-lm versions (a positive ``num_layers`` once meant every layer; a config
without ``keys`` meant q/v only before 0.28 and every linear after), while current mlx-lm refuses a
file holding a tensor its config does not convert.

The factors are presented transposed (:class:`~lora_convert.io.views.TransposedSource`), so every
route reads PEFT's orientation.  The synthesized PEFT config gives each module ``lora_alpha / r =
scale`` (rank and alpha patterns where ranks differ), so the scaling is exactly mlx-lm's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from ..arch import is_embedding, short_name
from ..config import FP32_MAX, AdapterConfig, check_schema
from ..errors import AdapterError, UnsupportedError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.files import load_json
from ..io.reader import Checkpoint
from ..io.safetensors_format import TensorInfo
from ..io.views import TransposedSource

LEAVES = ("lora_a", "lora_b", "m")
DORA_TYPES = {"lora": False, "dora": True}


def _number(v: Any) -> bool:
    """A number float32 holds; an int is compared exactly (``math.isfinite(10**400)`` raises OverflowError)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return ok and (isinstance(v, int) or math.isfinite(v)) and abs(v) <= FP32_MAX


# the keys of mlx-lm's adapter_config.json we read, type-checked at load as PEFT's are (config.SCHEMA)
SCHEMA: dict[str, tuple[Any, str]] = {
    "fine_tune_type": (lambda v: isinstance(v, str), "a string"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_parameters": (lambda v: isinstance(v, dict), "an object"),
}
PARAMETERS_SCHEMA: dict[str, tuple[Any, str]] = {
    "scale": (_number, "a finite number that float32 can hold"),
    "rank": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2**31, "a positive integer"),
    "dropout": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1 (a dropout probability)"),
}


class MlxDialect:
    """mlx-lm's adapters: claimed by their lower-case ``.lora_a``/``.lora_b`` tensor names."""

    name = "mlx"

    def claims(self, ck: Checkpoint) -> bool:
        return any(k.endswith((".lora_a", ".lora_b")) for k in ck.tensors)

    def read(self, ck: Checkpoint) -> Inventory:
        cfg = _load_config(ck)
        dora = _fine_tune_type(cfg, ck)
        params = cfg.get("lora_parameters")
        if not isinstance(params, dict) or "scale" not in params:
            raise AdapterError(
                "adapter_config.json has no lora_parameters.scale, which mlx-lm needs as the LoRA multiplier",
                path=ck.adapter_config_path,
            )
        try:
            scale = float(params["scale"])
            cfg_rank = int(params["rank"]) if params.get("rank") is not None else None
        except (TypeError, ValueError) as exc:
            raise AdapterError(f"bad lora_parameters: {exc}", path=ck.adapter_config_path) from None
        modules = _modules(ck, dora, scale)
        inv = Inventory(form="adapter", dialect=self.name)
        inv.lora[DEFAULT_ADAPTER] = modules
        inv.configs[DEFAULT_ADAPTER] = _peft_config(modules, scale, dora, params, cfg, str(ck.adapter_config_path))
        inv.warnings[DEFAULT_ADAPTER] = _warnings(modules, params, cfg_rank)
        return inv


def _load_config(ck: Checkpoint) -> dict[str, Any]:
    path = ck.adapter_config_path
    if path is None:
        raise AdapterError(
            "mlx-lm adapter without its adapter_config.json: the LoRA scale is unknown",
            path=ck.root,
            hint="put the adapter_config.json mlx-lm wrote beside adapters.safetensors",
        )
    data = load_json(path, what="an adapter config", error=AdapterError)  # bounded: size, depth, a regular file
    if not isinstance(data, dict):
        raise AdapterError("adapter config is not a JSON object", path=path)
    if "peft_type" in data and "lora_parameters" not in data:
        raise AdapterError(
            "PEFT's adapter_config.json beside tensors named like mlx-lm's (.lora_a/.lora_b)",
            path=path,
            hint="the config does not belong to these tensors",
        )
    check_schema(data, str(path), SCHEMA)
    if isinstance(data.get("lora_parameters"), dict):
        check_schema(data["lora_parameters"], str(path), PARAMETERS_SCHEMA, "lora_parameters.")
    return data


def _fine_tune_type(cfg: dict[str, Any], ck: Checkpoint) -> bool:
    """Whether the adapter is DoRA; refuses full fine-tunes and unknown types."""
    kind = cfg.get("fine_tune_type") or ("dora" if cfg.get("use_dora") else "lora")
    if kind == "full":
        raise UnsupportedError(
            "fine_tune_type is full: the file holds whole weights, not LoRA factors", path=ck.adapter_config_path
        )
    if kind not in DORA_TYPES:
        raise UnsupportedError(f"fine_tune_type {kind!r} is not LoRA or DoRA", path=ck.adapter_config_path)
    return DORA_TYPES[kind]


def _stored_shape(info: TensorInfo) -> tuple[int, ...]:
    """The shape as the file stores it (a second reading of one checkpoint finds the views in place)."""
    return info.shape[::-1] if isinstance(info.source, TransposedSource) else info.shape


def _modules(ck: Checkpoint, dora: bool, scale: float) -> dict[str, LoraModule]:
    parts: dict[str, dict[str, str]] = {}
    for key in ck.tensors:
        mod, _, leaf = key.rpartition(".")
        if leaf not in LEAVES or not mod:
            raise AdapterError(
                "not a tensor of an mlx-lm LoRA adapter (expected <module>.lora_a, .lora_b or .m)",
                path=ck.root,
                tensor=key,
            )
        parts.setdefault(mod, {})[leaf] = key
    views = TransposedSource()
    return {mod: _module(ck, mod, keys, dora, scale, views) for mod, keys in sorted(parts.items())}


def _module(
    ck: Checkpoint, mod: str, keys: dict[str, str], dora: bool, scale: float, views: TransposedSource
) -> LoraModule:
    have = next(iter(keys.values()))
    for leaf in ("lora_a", "lora_b"):
        if leaf not in keys:
            raise AdapterError(f"{leaf} is missing for module {mod}", path=ck.root, tensor=have)
    a_key, b_key = keys["lora_a"], keys["lora_b"]
    sa, sb = _stored_shape(ck.info(a_key)), _stored_shape(ck.info(b_key))
    if len(sa) == 3 or len(sb) == 3:
        raise UnsupportedError(
            "LoRA on mixture-of-experts layers (mlx-lm's SwitchLinear, 3-D lora_a/lora_b) is not supported",
            path=ck.root,
            tensor=a_key,
        )
    if len(sa) != 2 or len(sb) != 2:
        raise AdapterError(f"LoRA factors must be 2-D, got {list(sa)} and {list(sb)}", path=ck.root, tensor=a_key)
    (in_f, r_a), (r_b, out_f) = sa, sb
    if r_a != r_b or r_a == 0:
        raise AdapterError(f"rank mismatch or 0: lora_a {list(sa)}, lora_b {list(sb)}", path=ck.root, tensor=a_key)
    kind = "embedding" if is_embedding(mod) else "linear"
    m_key = keys.get("m")
    if dora != (m_key is not None):
        why = "DoRA magnitude .m, but fine_tune_type is lora" if m_key else "no DoRA magnitude .m (fine_tune_type dora)"
        raise AdapterError(f"module {mod} has {why}", path=ck.root, tensor=m_key or a_key)
    if m_key is not None and (kind == "embedding" or _stored_shape(ck.info(m_key)) != (out_f,)):
        raise UnsupportedError(
            f"DoRA magnitude of shape {list(_stored_shape(ck.info(m_key)))} on a {kind} (only linears, ({out_f},))",
            path=ck.root,
            tensor=m_key,
        )
    for key in (a_key, b_key):
        if not isinstance(ck.tensors[key].source, TransposedSource):
            ck.tensors[key] = views.view(ck.tensors[key])
    return LoraModule(mod, DEFAULT_ADAPTER, kind, a_key, b_key, r_a, in_f, out_f, None, m_key, scaling=scale)


def _peft_config(
    modules: dict[str, LoraModule], scale: float, dora: bool, params: dict[str, Any], cfg: dict[str, Any], src: str
) -> AdapterConfig:
    """The PEFT config under which every module's scaling (alpha / r) is mlx-lm's ``scale``."""
    ranks = Counter(m.rank for m in modules.values())
    r0 = sorted(ranks.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] if ranks else int(params.get("rank") or 8)
    odd = {re.escape(m.module): m.rank for m in modules.values() if m.rank != r0}
    base = cfg.get("model") if isinstance(cfg.get("model"), str) else None
    return AdapterConfig(
        r=r0,
        lora_alpha=scale * r0,
        rank_pattern=odd,
        alpha_pattern={k: scale * r for k, r in odd.items()},
        use_dora=dora,
        target_modules=sorted({short_name(m) for m in modules}),
        base_model_name_or_path=base,
        task_type="CAUSAL_LM",  # mlx-lm trains language models only
        raw={"lora_dropout": float(params.get("dropout") or 0.0)},
        source=src,
    )


def _warnings(modules: dict[str, LoraModule], params: dict[str, Any], cfg_rank: int | None) -> list[str]:
    out = []
    if "alpha" in params:
        out.append(
            "lora_parameters.alpha is ignored, as mlx-lm >= 0.14.2 ignores it: the multiplier is scale alone "
            "(mlx-lm <= 0.14.1 used scale * alpha / rank)"
        )
    bad = [m for m in modules.values() if cfg_rank is not None and m.rank != cfg_rank]
    if bad:
        out.append(
            f"{bad[0].module}: lora_parameters.rank is {cfg_rank}, the tensors have rank {bad[0].rank}; "
            f"the tensors' rank is used ({len(bad)} module(s) disagree)"
        )
    return out

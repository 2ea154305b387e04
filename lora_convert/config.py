"""``adapter_config.json`` -> per-module rank, alpha and scaling, resolved as PEFT does.

PEFT resolves ``rank_pattern``/``alpha_pattern`` with ``re.match(rf"(.*\\.)?({key})$", name)``
over the pattern keys in dict order, the first match winning; ``scaling`` is
``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA.  We keep the same rule in one place.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterError, UnsupportedError
from .io.files import MAX_CONFIG_BYTES, load_json

# init_lora_weights values that change the *base* weights at init time: the saved adapter
# is relative to a residual base we do not have, so a plain merge would be wrong.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")
SUPPORTED_PEFT_TYPES = ("LORA",)


def pattern_key(pattern_keys: Any, module: str) -> str | None:
    """First pattern key that matches the end of ``module`` on a dot boundary (PEFT's rule)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class AdapterConfig:
    """The parts of a PEFT LoraConfig that change what the tensors mean."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    lora_bias: bool = False
    init_lora_weights: Any = True
    layer_replication: Any = None
    trainable_token_indices: Any = None
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    # -- loading -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> AdapterConfig:
        if not isinstance(data, dict):
            raise AdapterError("adapter config is not a JSON object", path=source)
        known = {f for f in cls.__dataclass_fields__ if f not in ("raw", "source")}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        cfg = cls(**kwargs, raw=dict(data), source=source)
        cfg.peft_type = str(data.get("peft_type") or "LORA").upper()
        cfg.rank_pattern = dict(data.get("rank_pattern") or {})
        cfg.alpha_pattern = dict(data.get("alpha_pattern") or {})
        try:
            cfg.r = int(cfg.r)
            cfg.lora_alpha = float(cfg.lora_alpha)
        except (TypeError, ValueError) as exc:
            raise AdapterError(f"bad r/lora_alpha: {exc}", path=source) from None
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> AdapterConfig:
        path = Path(path)
        if not os.path.lexists(path):
            raise AdapterError(
                "adapter_config.json is missing",
                path=path,
                hint="an adapter folder needs the adapter_config.json PEFT writes",
            ) from None
        data = load_json(path, what="an adapter config", max_bytes=MAX_CONFIG_BYTES, error=AdapterError)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update(
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern,
            use_dora=self.use_dora,
            fan_in_fan_out=self.fan_in_fan_out,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            bias=self.bias,
            lora_bias=self.lora_bias,
            init_lora_weights=self.init_lora_weights,
            layer_replication=self.layer_replication,
            trainable_token_indices=self.trainable_token_indices,
            peft_type=self.peft_type,
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
        )
        # Normalise so that the numbers round-trip as PEFT writes them.
        if float(out["lora_alpha"]).is_integer():
            out["lora_alpha"] = int(out["lora_alpha"])
        return out

    # -- per-module numbers ---------------------------------------------------------
    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern.keys(), module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern.keys(), module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, module: str, rank: int | None = None) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); ``rank`` from the tensors wins over the config."""
        r = rank if rank is not None else self.rank_for(module)
        if r <= 0:
            raise AdapterError(f"rank {r} for module {module}", tensor=module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def trainable_token_map(self) -> dict[str, list[int]]:
        """``trainable_token_indices`` as {module short name: indices}; a bare list means embed_tokens."""
        tti = self.trainable_token_indices
        if not tti:
            return {}
        if isinstance(tti, list):
            return {"embed_tokens": [int(i) for i in tti]}
        return {str(k): [int(i) for i in v] for k, v in tti.items()}

    # -- what we cannot merge exactly ---------------------------------------------------
    def unsupported_reasons(self) -> list[str]:
        reasons: list[str] = []
        if self.peft_type not in SUPPORTED_PEFT_TYPES:
            reasons.append(f"peft_type {self.peft_type} is not LoRA (only LoRA and DoRA adapters are supported)")
        if self.layer_replication:
            reasons.append("layer_replication duplicates decoder layers; the base's layer layout cannot hold it")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            reasons.append(
                f"init_lora_weights={init!r} changes the base weights at init; the adapter is relative to a "
                "residual base (convert it to plain LoRA with PEFT's path_initial_model_for_weight_conversion first)"
            )
        for key in ("use_qalora", "use_bdlora"):
            if self.raw.get(key):
                reasons.append(f"{key} is not supported")
        for key in ("velora_config", "monteclora_config", "kasa_config", "arrow_config"):
            if self.raw.get(key):
                reasons.append(f"{key.removesuffix('_config')} is a LoRA variant this tool cannot merge")
        if self.raw.get("target_parameters"):
            reasons.append("target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported")
        return reasons

    def check_supported(self) -> None:
        reasons = self.unsupported_reasons()
        if reasons:
            raise UnsupportedError("; ".join(reasons), path=self.source)

"""diffusers' own LoRA files (``pytorch_lora_weights.safetensors``, what ``save_lora_weights`` writes and
``load_lora_weights`` reads): PEFT's saved-adapter keys with the pipeline component in front
(``unet.down_blocks.0...lora_A.weight``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``) and
no ``adapter_config.json``.  Each component's LoraConfig is in the safetensors header under
``lora_adapter_metadata``, as JSON whose keys carry the component (``unet.r``, ``unet.alpha_pattern``).

Scaling follows diffusers' loading: the component's config resolved per module (PEFT's rules, patterns
relative to the component); a file without metadata loads with ``lora_alpha = r`` — scale 1 for every
module — which is said in a warning, since an adapter trained with another alpha changes meaning.
"""

from __future__ import annotations

import json
from typing import Any

from .. import arch
from ..config import AdapterConfig
from ..errors import AdapterError
from ..inventory import DEFAULT_ADAPTER, Inventory
from ..io.files import MAX_CONFIG_BYTES
from ..io.reader import Checkpoint
from .peft import build_inventory, dora_without_magnitudes
from .peft_keys import parse_key

METADATA_KEY = "lora_adapter_metadata"


class DiffusersDialect:
    """Component-prefixed PEFT keys, with diffusers' metadata or without any config at all."""

    name = "diffusers"

    def claims(self, ck: Checkpoint) -> bool:
        if ck.adapter_config_path is not None or not ck.tensors:
            return False
        if METADATA_KEY in ck.metadata:
            return True
        return all(_is_component_lora(k) for k in ck.tensors)

    def read(self, ck: Checkpoint) -> Inventory:
        inv = build_inventory(ck)
        inv.dialect, inv.form = self.name, "adapter"
        configs = component_configs(ck)
        modules = inv.modules(DEFAULT_ADAPTER)
        if not modules or inv.replace or inv.tokens:
            what = "LoRA modules" if not modules else "tensors other than LoRA factors"
            raise AdapterError(f"a diffusers LoRA file with {what}", path=ck.root, hint="only LoRA pairs are read")
        for m in modules.values():
            comp, _, path = m.module.partition(".")
            cfg = configs.get(comp)
            m.scaling = cfg.scaling_for(path, m.rank) if cfg is not None else 1.0
        for comp, cfg in configs.items():
            if cfg.use_dora:
                mods = [m for m in modules.values() if m.module.partition(".")[0] == comp]
                said = f"{METADATA_KEY} has {comp}.use_dora: true"
                missing = dora_without_magnitudes(mods, path=_file(ck, mods), said=said, loader="diffusers")
                if missing is not None:
                    inv.problems.setdefault(DEFAULT_ADAPTER, []).append(missing)
        if not configs:
            inv.warnings[DEFAULT_ADAPTER] = [
                f"no {METADATA_KEY} in the file: every module's scaling is 1 (lora_alpha = r), as diffusers loads it"
            ]
        inv.configs[DEFAULT_ADAPTER] = merged_config(modules.values(), configs)
        return inv


def _file(ck: Checkpoint, mods: list[Any]) -> Any:
    """The file the modules' tensors are in (a diffusers LoRA is one file), else the checkpoint."""
    return ck.info(mods[0].a_key).file if mods else ck.root


def _is_component_lora(key: str) -> bool:
    p = parse_key(key)
    return key.split(".", 1)[0] in arch.DIFFUSION_COMPONENTS and p.role.is_lora and p.adapter is None


def component_configs(ck: Checkpoint) -> dict[str, AdapterConfig]:
    """``lora_adapter_metadata`` split into one PEFT config per pipeline component."""
    raw = ck.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    files = getattr(ck, "files", None) or []
    where = str(files[0]) if len(files) == 1 else str(ck.root)  # the file whose metadata this is
    if len(raw) > MAX_CONFIG_BYTES:  # what an adapter_config.json may hold; real ones are a few KB
        raise AdapterError(f"{METADATA_KEY} metadata of {len(raw)} characters (at most {MAX_CONFIG_BYTES})", path=where)
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{METADATA_KEY} is not valid JSON ({exc.msg})", path=where) from None
    except RecursionError:  # a header is 100 MB at most, but "[[[[..." that deep still blows the parser's stack
        raise AdapterError(f"{METADATA_KEY} is not valid JSON (nested too deep)", path=where) from None
    except ValueError as exc:  # an integer over Python's digit limit (a 5,000-digit value)
        raise AdapterError(
            f"{METADATA_KEY} is not valid JSON ({' '.join(str(exc).split())[:120]})", path=where
        ) from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{METADATA_KEY} is not a JSON object", path=where)
    per: dict[str, dict[str, Any]] = {}
    for key, value in meta.items():
        comp, _, field = str(key).partition(".")
        per.setdefault(comp, {})[field] = value
    fix_in = f"the file's {METADATA_KEY} metadata"  # (a diffusers LoRA file has no adapter_config.json)
    return {
        comp: AdapterConfig.from_dict(d, source=where, prefix=f"{METADATA_KEY} {comp}.", fix_in=fix_in)
        for comp, d in per.items()
        if d
    }


def merged_config(modules: Any, configs: dict[str, AdapterConfig]) -> AdapterConfig:
    """One PEFT-style config for the whole file (what detect and the routes read): every module's own
    rank and effective alpha (``scaling · r``), DoRA and lora_bias as the components say; the first
    component's other fields (peft_type, init...) so that what cannot be merged is still refused."""
    mods = list(modules)
    ranks = {m.module: m.rank for m in mods}
    alphas = {m.module: m.scaling * m.rank for m in mods}
    first = next(iter(configs.values()), None)
    cfg = AdapterConfig.for_modules(
        ranks,
        alphas,
        use_dora=any(m.magnitude_key for m in mods),
        lora_bias=any(m.bias_key for m in mods),
        source=first.source if first is not None else None,
    )
    if first is not None:
        cfg.raw = {k: v for k, v in first.raw.items() if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
        cfg.peft_type, cfg.init_lora_weights, cfg.layer_replication = (
            first.peft_type,
            first.init_lora_weights,
            first.layer_replication,
        )
    return cfg

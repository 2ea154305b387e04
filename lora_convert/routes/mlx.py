"""adapter (or unmerged) -> an mlx-lm adapter folder: ``adapters.safetensors`` + mlx-lm's
``adapter_config.json`` (the format :mod:`lora_convert.dialects.mlx` reads).

mlx-lm has one rank and one scale for every module, PEFT one per module.  The conversion stays exact:
every factor is padded with zeros to the largest rank (zero rows of A and columns of B add nothing,
and leave DoRA's norms unchanged), and a module whose scaling is not the common ``scale`` has the
ratio folded into B.  ``lora_a = Aᵀ``, ``lora_b = Bᵀ`` (embeddings too), DoRA's magnitude is ``.m``.

Which modules mlx-lm makes LoRA layers of is ``keys`` (relative to a decoder layer for modules inside
one, ``self_attn.q_proj``; full paths for the others, ``lm_head``) in the last ``num_layers`` layers.
We write the base's layer count, which means every layer in every mlx-lm version (``-1`` did not,
between 0.19 and 0.21); modules in layers the adapter leaves out get LoRA layers with zero B.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from .. import arch
from ..errors import RouteError, UnsupportedError, option
from ..inventory import LoraModule
from ..pipeline import Job
from .adapter_out import carried_modules, factor_job, read_factor
from .common import copy_job
from .plan import Plan, Request, output_dtype


def mlx_key(module: str) -> str:
    """mlx-lm's ``keys`` entry for a module: its path inside a decoder layer, else its full path."""
    m = arch.LAYER_INDEX.search(f".{module}.")
    return module if m is None else module[m.end() - 1 :]


def common_scale(modules: list[LoraModule]) -> float:
    """The scaling most modules have (fewest folds); never 0, which no fold could correct."""
    counts = Counter(m.scaling for m in modules if m.scaling)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] if counts else 1.0


def plan_mlx(req: Request) -> Plan:
    """Jobs writing ``adapters.safetensors`` and the adapter_config.json mlx-lm loads it with."""
    if req.inventory.dialect == "mlx":
        raise RouteError("is already an mlx-lm adapter", path=req.source.root)
    modules, warnings = carried_modules(req, "mlx-lm", dora=True)
    dora = any(m.magnitude_key for m in modules)
    for m in modules:
        if dora and (m.kind == "embedding" or not m.magnitude_key):
            raise UnsupportedError(
                "mlx-lm's fine_tune_type is one for every module: DoRA needs every module to be a DoRA linear",
                path=req.source.root,
                tensor=m.module,
            )
    _check_ties(req, modules)
    rank, scale = max(m.rank for m in modules), common_scale(modules)
    dtype = output_dtype(req.dtype)
    jobs: list[Job] = []
    for m in modules:
        jobs += _module_jobs(req, m, rank, scale, dtype)
    changed = sum(1 for m in modules if m.rank != rank or m.scaling != scale)
    if changed:
        warnings.append(
            f"{changed} module(s) padded to rank {rank} or with their scaling folded into lora_b "
            f"(mlx-lm has one rank and one scale, {scale:g})"
        )
    config = _config(req, modules, dora, rank, scale)
    return Plan("mlx", jobs, stem="adapters", sharded=False, adapter_config=config, warnings=warnings)


def _check_ties(req: Request, modules: list[LoraModule]) -> None:
    """mlx-lm computes a tied head with the embedding (``as_linear``), adding the embedding's LoRA to the
    head as well, and has no ``lm_head`` module to put a head LoRA on; PEFT does neither."""
    special = [m for m in modules if m.kind == "embedding" or arch.is_head(m.module)]
    if not special:
        return
    config = req.model_config
    if not config:
        raise RouteError(
            "an embedding or head LoRA needs the base's config.json, to tell whether the two are tied",
            path=req.source.root,
            hint=f"pass {option('base', 'BASE')}",
        )
    if arch.ties_embeddings(config, head_stored=True):
        raise UnsupportedError(
            "the base ties lm_head to embed_tokens: mlx-lm computes the head with the embedding and would apply "
            "its LoRA there too (PEFT does not), and has no lm_head for a head LoRA",
            path=req.source.root,
            tensor=special[0].module,
            hint="leave embed_tokens/lm_head out of the adapter",
        )


def _module_jobs(req: Request, m: LoraModule, rank: int, scale: float, dtype: torch.dtype | None) -> list[Job]:
    ck = req.source
    out_dtype = dtype or ck.info(m.a_key).dtype
    assert m.scaling is not None
    fold = m.scaling / scale

    def lora_a() -> torch.Tensor:  # A (r, in) -> (in, R)
        a = read_factor(ck, m.a_key)
        return torch.nn.functional.pad(a, (0, 0, 0, rank - m.rank)).t()

    def lora_b() -> torch.Tensor:  # B (out, r) -> (R, out)
        b = read_factor(ck, m.b_key)
        if fold != 1.0:
            b = b * fold
        return torch.nn.functional.pad(b, (0, rank - m.rank)).t()

    jobs = [
        factor_job(f"{m.module}.lora_a", (m.in_features, rank), out_dtype, lora_a),
        factor_job(f"{m.module}.lora_b", (rank, m.out_features), out_dtype, lora_b),
    ]
    if m.magnitude_key:
        jobs.append(copy_job(ck, m.magnitude_key, f"{m.module}.m", dtype, op="lora"))
    return jobs


def _config(req: Request, modules: list[LoraModule], dora: bool, rank: int, scale: float) -> dict[str, Any]:
    cfg = req.config
    assert cfg is not None
    layers = arch.config_value(req.model_config, "num_hidden_layers")
    out: dict[str, Any] = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": int(layers) if layers else -1,  # -1: every layer in mlx-lm >= 0.21
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": float(cfg.raw.get("lora_dropout") or 0.0),
            "keys": sorted({mlx_key(m.module) for m in modules}),
        },
    }
    base = req.base_ref or cfg.base_model_name_or_path
    if base:
        out["model"] = str(base)
    return out

"""An adapter for a diffusion pipeline written as a kohya (sd-scripts) file or as diffusers' own LoRA file.

* ``--to kohya``: a LyCORIS source's LoHa/LoKr/full modules keep every tensor as stored (``hada_*``,
  ``lokr_*``, ``diff``/``diff_b`` and its own ``.alpha``), under the names below; LoRA pairs go as
  ``lora.safetensors`` with ``lora_unet_<path>.lora_down.weight`` (= A, bytes untouched),
  ``.lora_up.weight`` (= B) and a 0-d float32 ``.alpha`` = scaling · rank, so that kohya's alpha / rank
  gives back every module's exact scaling (rsLoRA and patterns included); sd-scripts' ``ss_*`` metadata.
  Paths are diffusers' (``down_blocks_0_...``), which diffusers, ComfyUI and sd-scripts all read;
  text-encoder paths start at CLIP's ``text_model`` as kohya's do.
* ``--to diffusers``: ``pytorch_lora_weights.safetensors`` as ``save_lora_weights`` writes it:
  ``<component>.<path>.lora_A.weight`` ... and per component the LoraConfig (rank and alpha of every
  module) in the header's ``lora_adapter_metadata``, which ``load_lora_weights`` reads.

Module paths come from the source's dialect; a kohya source's '_'-joined names are settled by ``--base``
(a UNet, transformer or text-encoder folder: its own tensor names, its config for SDXL's SGM block
numbers) where given, else by the names diffusers and CLIP use, refusing a name that cannot be read so.
Both files hold LoRA pairs only: ``modules_to_save``, trainable tokens and embedding LoRA are refused
(kohya also refuses DoRA and ``lora_bias``, which it cannot express).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch

from .. import arch, diffusion_names
from ..config import AdapterConfig
from ..dialects.diffusers import METADATA_KEY
from ..dialects.peft_keys import Role, format_key
from ..errors import RouteError, UnsupportedError
from ..inventory import LoraModule
from ..module_match import spelling
from ..pipeline import Buffers, Job
from .common import BaseView, copy_job, remap_modules
from .plan import Plan, Request, output_dtype

KOHYA_STEM = "lora"
DIFFUSERS_STEM = "pytorch_lora_weights"  # diffusers' LORA_WEIGHT_NAME_SAFE
KOHYA_PREFIX = {
    "unet": "lora_unet",
    "transformer": "lora_transformer",
    "text_encoder_2": "lora_te2",
    "text_encoder_3": "lora_te3",
}


def plan_kohya(req: Request) -> Plan:
    modules, notes = _placed(req, "kohya")
    dtype = output_dtype(req.dtype)
    two_encoders = any(comp == "text_encoder_2" for comp, _ in modules.values())
    jobs: list[Job] = []
    for mod, (comp, path) in sorted(modules.items(), key=lambda kv: kv[1]):
        m = req.inventory.modules(req.adapter)[mod]
        if comp.startswith("text_encoder") and not path.startswith("text_model."):
            path = "text_model." + path  # kohya's text-encoder names start at CLIP's text_model
        prefix = KOHYA_PREFIX.get(comp) or ("lora_te1" if two_encoders else "lora_te")
        name = f"{prefix}_{spelling(path)}"
        if m.tuner != "lora":  # LyCORIS: every tensor under its own name, alpha as the file stores it
            jobs.extend(
                copy_job(req.source, k, f"{name}.{role}", None if role == "alpha" else dtype, op="lora")
                for role, k in sorted(m.factors.items())
            )
            continue
        jobs.append(copy_job(req.source, m.a_key, f"{name}.lora_down.weight", dtype, op="lora"))
        jobs.append(copy_job(req.source, m.b_key, f"{name}.lora_up.weight", dtype, op="lora"))
        jobs.append(_scalar_job(f"{name}.alpha", m.alpha))
    _no_duplicates(jobs, req)
    return Plan(
        "kohya",
        jobs,
        stem=KOHYA_STEM,
        sharded=False,
        one_file_suffix=".safetensors",  # `-o lora.safetensors`: the one file loaders take, as sd-scripts writes it
        metadata=_kohya_metadata(req, modules),
        warnings=notes,
        card_config=req.model_config,
    )


def plan_diffusers(req: Request) -> Plan:
    modules, notes = _placed(req, "diffusers")
    dtype = output_dtype(req.dtype)
    jobs: list[Job] = []
    per: dict[str, dict[str, LoraModule]] = {}
    for mod, (comp, path) in sorted(modules.items(), key=lambda kv: kv[1]):
        m = req.inventory.modules(req.adapter)[mod]
        per.setdefault(comp, {})[path] = m
        where = f"{comp}.{path}"
        jobs.append(copy_job(req.source, m.a_key, format_key(where, Role.LORA_A, prefixed=False), dtype, op="lora"))
        jobs.append(copy_job(req.source, m.b_key, format_key(where, Role.LORA_B, prefixed=False), dtype, op="lora"))
        if m.bias_key:
            key = format_key(where, Role.LORA_B, param="bias", prefixed=False)
            jobs.append(copy_job(req.source, m.bias_key, key, dtype, op="lora"))
        if m.magnitude_key:
            key = format_key(where, Role.MAGNITUDE, prefixed=False)
            jobs.append(copy_job(req.source, m.magnitude_key, key, dtype, op="lora"))
    _no_duplicates(jobs, req)
    meta = {f"{comp}.{k}": v for comp, mods in per.items() for k, v in _component_config(comp, mods).items()}
    return Plan(
        "diffusers",
        jobs,
        stem=DIFFUSERS_STEM,
        sharded=False,
        metadata={METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)},
        warnings=notes,
        card_config=req.model_config,
    )


def _placed(req: Request, fmt: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Every module of the adapter -> (pipeline component, module path within it); and notes."""
    modules = _carried(req, fmt)
    inv, notes = req.inventory, list[str]()
    config = req.base.config if req.base is not None else req.model_config
    found: dict[str, str] = {}
    if req.base is not None:  # the base's own names (and config, for SGM blocks) settle the paths
        found = remap_modules(
            sorted(modules),
            BaseView(req.base),
            "adapter modules",
            req.source.root,
            spelled=inv.spelled,
            config=req.base.config,
            notes=notes,
            kept=True,
        )
    out: dict[str, tuple[str, str]] = {}
    for mod in modules:
        comp = diffusion_names.diffusion_component(mod, config)
        if comp is None:
            raise RouteError(
                f"cannot tell which part of a diffusion pipeline {mod} belongs to",
                path=req.source.root,
                hint=f"{fmt} LoRA files are for UNets, transformers and text encoders",
            )
        path = found.get(mod) or mod.removeprefix(comp + ".")
        if mod in inv.unsure and mod not in found:
            sgm = "SDXL's SGM-numbered blocks" if diffusion_names.is_sgm_path(path) else "names"
            raise RouteError(
                f"{spelling(path)}: {sgm} cannot be read as diffusers module paths without the model "
                f"({len(inv.unsure - set(found))} such)",
                path=req.source.root,
                hint=f"pass --base with the {comp} folder: its tensor names and config settle the reading",
            )
        out[mod] = (comp, path)
    return out, notes


def _carried(req: Request, fmt: str) -> dict[str, LoraModule]:
    """The adapter's modules, after refusing what a ``fmt`` file cannot hold."""
    cfg, inv, name, where = req.config, req.inventory, req.adapter, req.source.root
    assert cfg is not None, "the API checks that an adapter config exists"
    cfg.check_supported()
    if inv.replace.get(name) or inv.tokens.get(name):
        raise UnsupportedError(f"modules_to_save, saved layers and trainable tokens have no {fmt} form", path=where)
    if cfg.fan_in_fan_out or arch.stores_conv1d(req.model_config):
        raise UnsupportedError(f"GPT-2 style Conv1D layers have no {fmt} form", path=where)
    modules = inv.modules(name)
    if not modules:
        raise RouteError("holds no LoRA modules to convert", path=where)
    for m in modules.values():
        if m.kind == "embedding":
            raise UnsupportedError(f"embedding LoRA has no {fmt} form", path=where, tensor=m.module)
        if fmt == "kohya" and m.tuner == "lora" and (m.magnitude_key or m.bias_key):
            what = "DoRA" if m.magnitude_key else "lora_bias"
            raise UnsupportedError(f"{what} has no kohya LoRA form", path=where, tensor=m.magnitude_key or m.bias_key)
        assert m.scaling is not None, "the dialects resolve every module's scaling"
    return modules


def _component_config(comp: str, mods: dict[str, LoraModule]) -> dict[str, object]:
    """One component's LoraConfig, every module's own rank and alpha (scaling · rank, so rsLoRA and
    patterns read back exactly without use_rslora).  Text-encoder patterns leave out ``text_model.``:
    they match at the end of a path, so they fit a CLIP saved with or without it."""

    def key(path: str) -> str:
        return path.removeprefix("text_model.") if comp.startswith("text_encoder") else path

    ranks = {key(p): m.rank for p, m in mods.items()}
    alphas = {key(p): m.alpha for p, m in mods.items()}
    dora = any(m.magnitude_key for m in mods.values())
    bias = any(m.bias_key for m in mods.values())
    d = AdapterConfig.for_modules(ranks, alphas, use_dora=dora, lora_bias=bias).to_dict()
    d["init_lora_weights"] = True
    return d


def _kohya_metadata(req: Request, modules: dict[str, tuple[str, str]]) -> dict[str, str]:
    """sd-scripts' header fields (informational: the per-module ``.alpha`` tensors are what loaders use)."""
    mods = [req.inventory.modules(req.adapter)[m] for m in modules]
    algos = sorted({m.tuner for m in mods} - {"lora"})
    if algos:  # a LyCORIS file, as LyCORIS's kohya network writes its header
        args = {"algo": algos[0]} if len(algos) == 1 else {"algo": "mixed: " + ", ".join(algos)}
        return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
    cfg = AdapterConfig.for_modules({m.module: m.rank for m in mods}, {m.module: m.alpha for m in mods})
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.r),
        "ss_network_alpha": f"{cfg.lora_alpha:g}",
    }
    convs = [m for m in mods if any(d != 1 for d in req.source.info(m.a_key).shape[2:])]  # 3×3: conv_dim
    if convs:
        ranks = {m.module: m.rank for m in convs}
        conv = AdapterConfig.for_modules(ranks, {m.module: m.alpha for m in convs})
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv.r), "conv_alpha": f"{conv.lora_alpha:g}"})
    return meta


def _scalar_job(name: str, value: float) -> Job:
    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        yield torch.tensor(value, dtype=torch.float32)

    return Job(name, torch.float32, (), blocks, "alpha")


def _no_duplicates(jobs: list[Job], req: Request) -> None:
    seen: set[str] = set()
    for j in jobs:
        if j.name in seen:
            raise RouteError(f"two modules would both be written as {j.name}", path=req.source.root)
        seen.add(j.name)

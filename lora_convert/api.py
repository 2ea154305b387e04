"""The Python API: every CLI command is one call here."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from . import convert as cv
from .card import render_card
from .config import AdapterConfig
from .errors import AdapterError, LoraConvertError, RouteError
from .folder import carry_files, read_json, update_config, write_json
from .inventory import Inventory, build_inventory
from .io.output import AtomicOutput
from .io.reader import Checkpoint, open_checkpoint
from .io.writer import parse_size, write_tensors


def _resolve(ref: str | Path | None, *, what: str) -> Path | None:
    """A local path, or a Hub repo id fetched into the cache."""
    if ref is None:
        return None
    p = Path(ref)
    if p.exists():
        return p
    try:
        from .io.hub import is_repo_id, resolve_checkpoint
    except ImportError:  # pragma: no cover - hub module always ships
        return p
    if is_repo_id(str(ref).split("@", 1)[0]):  # org/name or org/name@revision
        return resolve_checkpoint(str(ref))
    return p


def load_source(path: str | Path, *, adapter: str | None = None) -> tuple[Checkpoint, Inventory, AdapterConfig | None]:
    """Open a checkpoint and sort its tensors; the adapter config is loaded when there is one."""
    p = _resolve(path, what="source")
    ck = open_checkpoint(p, adapter_name=adapter)
    inv = build_inventory(ck)
    cfg = AdapterConfig.load(ck.adapter_config_path) if ck.adapter_config_path else None
    if cfg is None and inv.form == "adapter":
        raise AdapterError("adapter_config.json is missing", path=ck.root,
                           hint="an adapter needs the adapter_config.json PEFT writes beside its weights")
    return ck, inv, cfg


def _pick_adapter(inv: Inventory, want: str | None, ck: Checkpoint) -> str:
    names = inv.adapters
    if want is not None:
        if want in names or (ck.adapter_name == want):
            return want
        if inv.form == "adapter" and len(names) == 1:
            return names[0]
        raise RouteError(f"no adapter named {want!r} (found: {', '.join(names) or 'none'})", path=ck.root)
    if len(names) > 1:
        raise RouteError(f"holds several adapters: {', '.join(names)}", path=ck.root, hint="choose one with --adapter")
    return names[0] if names else "default"


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as p:
        yield p


def _base_for(inv_cfg: AdapterConfig | None, base: str | Path | None, route: str) -> Path:
    if base is not None:
        return _resolve(base, what="base")  # type: ignore[return-value]
    hint_path = inv_cfg.base_model_name_or_path if inv_cfg else None
    if hint_path:
        p = _resolve(hint_path, what="base")
        if p is not None and p.exists():
            return p
    raise RouteError(f"{route} needs the base model", hint="pass --base BASE (a folder or a Hub repo id)")


def convert(source: str | Path, to: str, *, output: str | Path, base: str | Path | None = None,
            adapter: str | None = None, dtype: str = "auto", max_shard_size: str | int = "5GB",
            force: bool = False, progress: bool = False, command: str | None = None,
            extract_options: dict[str, Any] | None = None) -> cv.ConvertResult:
    """Convert ``source`` to the form ``to`` (merged, adapter, unmerged, base) in ``output``."""
    t0 = time.perf_counter()
    if to not in cv.FORMS:
        raise RouteError(f"unknown target form {to!r} (choose from {', '.join(cv.FORMS)})")
    if dtype not in cv.DTYPES:
        raise RouteError(f"unknown dtype {dtype!r} (choose from auto, bf16, fp16, fp32)")
    try:
        parse_size(max_shard_size)
    except ValueError as exc:
        raise RouteError(f"--max-shard-size: {exc}") from None
    out_dtype = cv.DTYPES[dtype]
    src_ck, inv, cfg = load_source(source, adapter=adapter)
    form = inv.form
    if form == "plain" and to == "adapter":
        if base is None:
            raise RouteError("a plain checkpoint holds no LoRA tensors; extracting an adapter needs the base",
                             path=src_ck.root, hint="pass --base BASE")
        from .extract import extract  # the SVD route

        opts = dict(extract_options or {})
        if dtype != "auto":  # --dtype names the factors' dtype on this route
            opts.setdefault("dtype", {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype))
        return extract(source, base=base, output=output, force=force, progress=progress, command=command, **opts)
    if extract_options:
        raise RouteError(f"{', '.join('--' + k.replace('_', '-') for k in extract_options)}: extraction options "
                         f"apply only to a plain checkpoint converted --to adapter with --base, not {form} -> {to}",
                         path=src_ck.root)
    if form == "plain":
        raise RouteError(f"holds no LoRA tensors (a base or merged model); nothing to convert to {to}",
                         path=src_ck.root)
    if form == to:
        raise RouteError(f"is already in {form} form", path=src_ck.root)
    name = _pick_adapter(inv, adapter, src_ck)
    if cfg is None:
        raise AdapterError("no adapter_config.json beside the LoRA tensors, so the scaling (lora_alpha / r) "
                           "is unknown", path=src_ck.root, hint="put the adapter_config.json of this fine-tune there")
    warnings: list[str] = []
    config_changes: dict[str, Any] = {}
    base_ck: Checkpoint | None = None
    inputs = [src_ck.root]
    model_dir: Path | None = src_ck.root if form == "unmerged" else None
    if form == "adapter":
        if to == "base":
            raise RouteError("an adapter holds no base weights: the base is the model it was trained on",
                             path=src_ck.root)
        base_path = _base_for(cfg, base, f"adapter -> {to}")
        base_ck = open_checkpoint(base_path)
        if build_inventory(base_ck).form != "plain":
            raise RouteError("the base holds LoRA tensors itself", path=base_ck.root,
                             hint="give the plain base model as --base")
        inputs.append(base_ck.root)
        model_dir = base_ck.root
        view = cv.BaseView(base_ck)
        model_config = base_ck.config
    else:
        view = cv.BaseView(src_ck, inv.base)
        model_config = src_ck.config
    for w in _config_warnings(cfg, inv, name):
        warnings.append(w)
    out = AtomicOutput(output, force=force, inputs=inputs)
    with out as tmp, _progress(progress) as prog:
        files: list[str]
        ops: dict[str, int] = {}
        if to == "merged":
            jobs, config_changes, w = cv.plan_merge(view, src_ck if form == "adapter" else src_ck, inv, name, cfg,
                                                    out_dtype, model_config)
            warnings += w
            files = cv.execute(jobs, tmp, max_shard_size=max_shard_size, progress=prog)
            ops = _count_ops(jobs)
        elif to == "base":
            jobs = cv.plan_strip(inv, src_ck)
            files = cv.execute(jobs, tmp, max_shard_size=max_shard_size, progress=prog)
            ops = _count_ops(jobs)
        elif to == "unmerged":
            jobs = cv.plan_attach(view, src_ck, inv, name, cfg, model_config)
            files = cv.execute(jobs, tmp, max_shard_size=max_shard_size, progress=prog)
            ops = _count_ops(jobs)
        else:  # unmerged -> adapter
            mapping = cv.plan_split(inv, src_ck, name)
            tensors = {k: src_ck.read(v) for k, v in mapping.items()}
            files = write_tensors(tmp, tensors, stem="adapter_model", max_shard_size=10**15)
            jobs = []
            ops = {"lora": len(tensors)}
        if to == "adapter":
            carry_files(src_ck.root, tmp, only_tokenizer=True)
            write_json(tmp / "adapter_config.json", _adapter_config_out(cfg, base))
            files.append("adapter_config.json")
        else:
            carry_files(model_dir, tmp)
            if form == "adapter":
                carry_files(src_ck.root, tmp, only_tokenizer=True)  # a resized vocab ships its tokenizer
            update_config(tmp, config_changes)
            if to == "unmerged":
                write_json(tmp / "adapter_config.json", _adapter_config_out(cfg, base))
        total = sum((tmp / f).stat().st_size for f in files if (tmp / f).exists())
        base_name = str(base) if base is not None else (cfg.base_model_name_or_path if cfg else None)
        summary = [f"source: `{source}` ({form} form)", f"{len(jobs) or ops.get('lora', 0)} tensors written"]
        summary += [f"{k}: {v}" for k, v in sorted(ops.items())]
        (tmp / "README.md").write_text(render_card(form=to, base_model=base_name, model_config=read_json(
            tmp / "config.json") or model_config, command=command, summary=summary + warnings), encoding="utf-8")
        n_tensors = len(jobs) if jobs else ops.get("lora", 0)
        result = cv.ConvertResult(str(output), f"{form}->{to}", form, to, sorted(set(files)), n_tensors,
                                  total, ops, config_changes, warnings)
    if out.stale_removed:
        result.warnings.append(_stale_note(out.stale_removed))
    src_ck.close()
    if base_ck is not None:
        base_ck.close()
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _stale_note(paths: list[Path]) -> str:
    return (f"removed {len(paths)} unfinished temp folder(s) left by killed runs: "
            + ", ".join(p.name for p in paths))


def merge(source: str | Path, *, output: str | Path, base: str | Path | None = None, **kwargs: Any) -> cv.ConvertResult:
    """Fold the LoRA of an adapter (with ``base``) or of an unmerged checkpoint into the base weights."""
    return convert(source, "merged", output=output, base=base, **kwargs)


def _count_ops(jobs: list[cv.Job]) -> dict[str, int]:
    out: dict[str, int] = {}
    for j in jobs:
        out[j.op] = out.get(j.op, 0) + 1
    return out


def _adapter_config_out(cfg: AdapterConfig, base: str | Path | None) -> dict[str, Any]:
    d = cfg.to_dict()
    d["inference_mode"] = True
    if base is not None:
        d["base_model_name_or_path"] = str(base)
    return d


def _config_warnings(cfg: AdapterConfig, inv: Inventory, name: str) -> list[str]:
    out = []
    for m in inv.modules(name).values():
        r_cfg = cfg.rank_for(m.module)
        if r_cfg != m.rank:
            out.append(f"{m.module}: config says r={r_cfg}, the tensors have rank {m.rank}; the tensors' rank is used "
                       f"(scaling {cfg.scaling_for(m.module, m.rank):g})")
            break
    return out

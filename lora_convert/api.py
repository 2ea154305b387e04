"""The Python API: every CLI command is one call here."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

from . import convert as cv
from .card import render_card
from .config import AdapterConfig
from .errors import AdapterError, RouteError
from .folder import carry_files, read_json, update_config, write_json
from .inventory import Inventory, build_inventory
from .io.output import AtomicOutput, stale_note
from .io.reader import Checkpoint, open_checkpoint
from .io.writer import parse_size, write_tensors
from .sources import load_source, pick_adapter, resolve


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
        return resolve(base, what="base")  # type: ignore[return-value]
    hint_path = inv_cfg.base_model_name_or_path if inv_cfg else None
    if hint_path:
        p = resolve(hint_path, what="base")
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
    name = pick_adapter(inv, adapter, src_ck)
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
        result.warnings.append(stale_note(out.stale_removed))
    src_ck.close()
    if base_ck is not None:
        base_ck.close()
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


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

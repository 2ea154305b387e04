"""Extract a PEFT LoRA adapter from a fine-tuned (or merged) checkpoint and its base: ``ΔW ≈ B·A`` by SVD.

Tensor by tensor: ``ΔW = W_tuned − W_base`` is formed in fp32 from the stored values, row block by
row block straight from the two files (never a whole stored or fp32 copy of either side), factored
(:mod:`.svd`) and dropped; the kernel is asked to read the next pair while the current one is
factored.  Memory stays at ΔW of the largest matrix plus the SVD's thin factors.

GPT-2-style ``Conv1D`` weights are stored (in, out): their ΔW is factored in the (out, in) view that
PEFT's ``B·A`` describes, and ``fan_in_fan_out`` is set.

Adapter layout (what ``PeftModel.from_pretrained(base, OUT)`` loads with no missing or unexpected keys):

* ``target_modules`` is one regex that fullmatches exactly the modules we factored;
* ``lora_alpha == r`` for every module (``alpha_pattern`` mirrors ``rank_pattern``), so scaling is 1;
* ``rank_pattern`` keys are escaped full module paths, matching one module each under PEFT's
  ``re.match(rf"(.*\\.)?({key})$", name)``;
* input embeddings get ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (dim, r) with
  ``ΔW = (B·A)ᵀ``; ``lm_head`` an ordinary ``lora_A``/``lora_B``; ``--embeddings full`` and a
  resized vocabulary save the tuned matrix whole through ``modules_to_save``;
* with tied embeddings (no ``lm_head.weight`` stored), ``ensure_weight_tying`` makes PEFT apply the
  embedding's delta to the output head too, as in the tuned model;
* when the bias of a factored module changed, ``bias="lora_only"`` and ``<module>.base_layer.bias`` for
  every factored module that has a bias (what PEFT itself saves in that mode).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import svd as S
from .card import render_card
from .config import AdapterConfig
from .convert import CONV1D_MODEL_TYPES
from .errors import CheckpointError, RouteError, UnsupportedError
from .folder import carry_files, write_json
from .inventory import build_inventory
from .io.output import AtomicOutput, stale_note
from .io.reader import Checkpoint, open_checkpoint
from .io.writer import write_tensors
from .keys import PEFT_PREFIX, Role, format_key, layer_index, short_name
from .lora_math import all_finite

FP32 = torch.float32
EMBED_NAMES = {"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings"}
# Learned position tables are nn.Embedding too (GPT-2 wpe, OPT embed_positions, BERT-style): PEFT gives
# them lora_embedding_A/B, so an ordinary lora_A/B for them would load as unexpected keys.
POSITION_NAMES = {"wpe", "embed_positions", "position_embeddings"}
DELTA_BLOCK = 4 << 20  # bytes of fp32 ΔW built per step from the two files
HEAD_NAMES = {"lm_head", "embed_out", "output"}
EMBEDDING_MODES = ("lora", "full", "skip")
FACTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- options and results ----------------------------------------------------------------------

def parse_layers(spec: str | None) -> set[int] | None:
    """``"0-15,20"`` -> {0..15, 20}."""
    if spec is None or str(spec).strip() == "":
        return None
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if not m:
            raise RouteError(f"--layers: cannot read {part!r} (use e.g. 0-15,20)")
        if m.group(3) is not None:
            out.add(int(m.group(3)))
        else:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise RouteError(f"--layers: empty range {part!r}")
            out.update(range(a, b + 1))
    return out


@dataclass
class ModuleReport:
    module: str
    kind: str  # linear | embedding | lm_head
    shape: list[int]
    rank: int
    energy: float  # fraction of ‖ΔW‖²_F kept
    error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F, measured on the factors written
    method: str  # exact | randomized
    capped: bool = False  # --max-rank (or the matrix size) stopped short of the target
    seconds: float = 0.0


@dataclass
class ExtractResult:
    output: str
    files: list[str]
    tensors: int
    total_bytes: int
    ops: dict[str, int]
    modules: list[ModuleReport]
    skipped: list[dict[str, str]]  # {"tensor":..., "reason":...}: changed but not in the adapter
    saved_whole: list[dict[str, str]]  # {"module":..., "reason":...}: in modules_to_save
    adapter_parameters: int
    worst_error: float
    mean_error: float
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    carried_biases: list[str] = field(default_factory=list)  # <module>.bias saved as base_layer.bias (lora_only)
    config_changes: dict[str, Any] = field(default_factory=dict)
    route: str = "plain->adapter"
    source_form: str = "plain"
    target_form: str = "adapter"
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown_table(self) -> str:
        rows = ["| module | shape | rank | energy kept | rel. error | method |", "|---|---|---|---|---|---|"]
        for m in self.modules:
            rows.append(f"| `{m.module}` | {m.shape[0]}×{m.shape[1]} | {m.rank}{' (capped)' if m.capped else ''} | "
                        f"{m.energy:.6f} | {m.error:.3e} | {m.method} |")
        for s in self.saved_whole:
            rows.append(f"| `{s['module']}` | whole | – | 1 | 0 | modules_to_save: {s['reason']} |")
        for b in self.carried_biases:
            rows.append(f"| `{b}` | whole | – | 1 | 0 | bias of a LoRA module (bias=lora_only) |")
        for s in self.skipped:
            rows.append(f"| `{s['tensor']}` | – | – | 0 | 1 | skipped: {s['reason']} |")
        return "\n".join(rows)

    def summary_lines(self) -> list[str]:
        lines = [f"{len(self.modules)} modules factored; adapter parameters: {self.adapter_parameters:,}; "
                 f"size on disk: {self.total_bytes:,} bytes",
                 f"relative Frobenius error: worst {self.worst_error:.3e}, mean {self.mean_error:.3e}"]
        if self.saved_whole:
            lines.append("saved whole (modules_to_save): " + ", ".join(s["module"] for s in self.saved_whole))
        if self.carried_biases:
            lines.append(f"{len(self.carried_biases)} bias(es) of LoRA modules saved whole (bias='lora_only'), "
                         "since some changed")
        if self.skipped:
            lines.append(f"{len(self.skipped)} changed tensor(s) not in the adapter: " + "; ".join(
                f"{s['tensor']} ({s['reason']})" for s in self.skipped[:12]) + (" …" if len(self.skipped) > 12 else ""))
        return lines


# -- classifying tensors ----------------------------------------------------------------------

def _cfg_get(cfg: dict[str, Any] | None, key: str, default: Any = None) -> Any:
    if not cfg:
        return default
    if key in cfg:
        return cfg[key]
    text = cfg.get("text_config")
    if isinstance(text, dict) and key in text:
        return text[key]
    return default


def _kind(name: str, shape: tuple[int, ...], vocab: int | None) -> str:
    """linear | embedding | lm_head | other (what a LoRA cannot carry)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return "other"
    short = short_name(name[: -len(".weight")])
    if short in HEAD_NAMES:
        return "lm_head"
    if short in EMBED_NAMES or short in POSITION_NAMES or (vocab and shape[0] == vocab and "embed" in name):
        return "embedding"
    return "linear"


def _target_regex(modules: list[str]) -> str:
    """One regex fullmatching exactly ``modules``: paths grouped by their layer-index template."""
    groups: dict[tuple[str, str], list[int]] = {}
    plain: list[str] = []
    for m in modules:
        mm = re.search(r"\.(layers|h|blocks|block|layer)\.(\d+)\.", f".{m}.")
        if mm is None:
            plain.append(re.escape(m))
            continue
        start, end = mm.start(2) - 1, mm.end(2) - 1  # positions in m (we prefixed a dot)
        groups.setdefault((m[:start], m[end:]), []).append(int(m[start:end]))
    parts = []
    for (pre, post), idx in groups.items():
        alts = "|".join(str(i) for i in sorted(set(idx)))
        parts.append(f"{re.escape(pre)}(?:{alts}){re.escape(post)}")
    parts += plain
    return "^(?:" + "|".join(parts) + ")$" if len(parts) > 1 else "^" + parts[0] + "$"


# -- the work ---------------------------------------------------------------------------------

@dataclass
class _Task:
    name: str  # tensor name in the tuned checkpoint
    module: str
    kind: str
    base_name: str | None  # tensor to subtract (None: tied head computed from the embedding)


def _prefetch(ck: Checkpoint, name: str) -> None:
    info = ck.tensors.get(name)
    if info is not None and info.shape:
        ck.prefetch(name, 0, info.shape[0])


def _delta(tuned: Checkpoint, base: Checkpoint, t: _Task, *, keep: bool = True) -> torch.Tensor | None:
    """fp32 ``ΔW = W_tuned − W_base``, built row block by row block straight from the two files, or
    None when the tensors are equal.

    Why blocks: reading both tensors whole and converting them costs 2 stored + 2 fp32 copies next
    to ΔW (for a 32000x2048 bf16 embedding ~1 GB at once, which was most of the extract's peak
    RSS); here the peak is ΔW itself plus two small read buffers.  With ``keep=False`` no ΔW is
    kept at all: only whether the tensors differ (for tensors that are only reported).
    A NaN or Inf in either file is an error naming the tensor: no factorisation can carry it.
    """
    ti = tuned.info(t.name)
    bname = t.base_name or t.name
    shape = ti.shape
    rows = shape[0] if shape else 1
    cols = max(1, ti.nbytes // max(1, ti.dtype.itemsize) // max(1, rows))
    step = max(1, DELTA_BLOCK // (4 * cols))
    delta = torch.empty((rows, cols) if keep else (min(step, rows), cols), dtype=FP32)
    changed = False
    for s in range(0, rows, step):
        n = min(step, rows - s)
        if shape:
            a = tuned.read_rows(t.name, s, s + n).reshape(n, cols)
            b = base.read_rows(bname, s, s + n).reshape(n, cols)
        else:
            a, b = tuned.read(t.name).reshape(1, 1), base.read(bname).reshape(1, 1)
        if not (a.is_floating_point() and b.is_floating_point()):
            if keep:
                raise UnsupportedError(f"{a.dtype}/{b.dtype} weight: a quantized checkpoint cannot be "
                                       "differenced exactly", path=tuned.root, tensor=t.name,
                                       hint="extract from the unquantized tuned model and base")
            changed = changed or not torch.equal(a, b)  # integer buffers: compare exactly
            continue
        for ck, key, x in ((tuned, t.name, a), (base, bname, b)):
            if not all_finite(x):
                raise CheckpointError("holds NaN or Inf values", path=ck.root, tensor=key,
                                      hint="no adapter can carry a non-finite difference")
        d = delta[s:s + n] if keep else delta[:n]
        d.copy_(a).sub_(b)  # b is promoted inside the kernel: no fp32 copy of either side
        if d.numel():
            lo, hi = torch.aminmax(d)
            changed = changed or bool(lo != 0) or bool(hi != 0)
    if not changed:
        return None
    return delta.reshape(shape) if keep else delta


def _residual_error(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, total: float) -> float:
    """‖ΔW − B·A‖_F / ‖ΔW‖_F, in row blocks (measured, not estimated)."""
    if total == 0:
        return 0.0
    acc = 0.0
    step = max(1, (1 << 20) // max(1, delta.shape[1]))
    for i in range(0, delta.shape[0], step):
        r = torch.addmm(delta[i:i + step], B[i:i + step], A, alpha=-1)
        acc += float(torch.sum(r * r))  # fp32 cascade sum per block, fp64 across blocks (see svd.frobenius_sq)
    return (acc / total) ** 0.5


def extract(tuned: str | Path, *, base: str | Path, output: str | Path, rank: int | None = None,
            energy: float | None = None, max_error: float | None = None, max_rank: int = 128,
            include: list[str] | tuple[str, ...] = (), exclude: list[str] | tuple[str, ...] = (),
            layers: str | None = None, embeddings: str = "lora", svd: str = "auto", device: str = "cpu",
            seed: int = 0, save_other: bool = False, dtype: str = "fp32", force: bool = False,
            progress: bool = False, command: str | None = None) -> ExtractResult:
    """Factor every changed tensor of ``tuned`` against ``base`` into a PEFT LoRA adapter in ``output``.

    ``dtype`` is that of the written factors (fp32, bf16, fp16); the reported error is measured on the
    factors as written, rounding included."""
    from .sources import resolve

    t0 = time.perf_counter()
    chosen = [x is not None for x in (rank, energy, max_error)]
    if sum(chosen) > 1:
        raise RouteError("give at most one of --rank, --energy, --max-error")
    if not any(chosen):
        rank = 16
    if rank is not None and rank < 1:
        raise RouteError("--rank must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise RouteError("--energy must be in (0, 1]")
    if max_error is not None and not 0 <= max_error < 1:
        raise RouteError("--max-error must be in [0, 1)")
    if max_rank < 1:
        raise RouteError("--max-rank must be at least 1")
    if embeddings not in EMBEDDING_MODES:
        raise RouteError(f"--embeddings must be one of {', '.join(EMBEDDING_MODES)}")
    if dtype not in FACTOR_DTYPES:
        raise RouteError(f"--dtype must be one of {', '.join(FACTOR_DTYPES)} for the adapter's factors")
    if svd not in ("auto", "exact", "randomized"):
        raise RouteError("--svd must be auto, exact or randomized")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RouteError("--device cuda: no CUDA device is available", hint="use --device cpu")
    try:
        inc = [re.compile(p) for p in include]
        exc = [re.compile(p) for p in exclude]
    except re.error as e:
        raise RouteError(f"bad --include/--exclude regex: {e}") from None
    layer_set = parse_layers(layers)
    options = dict(rank=rank, energy=energy, max_error=max_error, max_rank=max_rank, include=list(include),
                   exclude=list(exclude), layers=layers, embeddings=embeddings, svd=svd, device=device, seed=seed,
                   save_other=save_other, dtype=dtype)

    tuned_path = resolve(tuned, what="source")
    base_path = resolve(base, what="base")
    tk = open_checkpoint(tuned_path)
    bk = open_checkpoint(base_path)
    try:
        for ck, what in ((tk, "the tuned checkpoint"), (bk, "the base")):
            if build_inventory(ck).form != "plain":
                raise RouteError(f"{what} holds LoRA tensors", path=ck.root,
                                 hint="extract works on two plain checkpoints (merge an adapter first)")
        return _extract(tk, bk, tuned_path, base, output, options, inc, exc, layer_set, force, progress, command, t0)
    finally:
        tk.close()
        bk.close()


def _plan(tk: Checkpoint, bk: Checkpoint, opts: dict[str, Any], inc: list[re.Pattern[str]],
          exc: list[re.Pattern[str]], layer_set: set[int] | None
          ) -> tuple[list[_Task], list[tuple[str, str]], list[dict[str, str]], list[str], bool]:
    """(tasks to factor, (module, reason) saved whole, skipped, 'other' tensors to compare, tied)."""
    cfg = tk.config or bk.config
    vocab = _cfg_get(cfg, "vocab_size")
    tasks: list[_Task] = []
    whole: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    others: list[str] = []
    embeddings = opts["embeddings"]
    heads_stored = [n for n in tk.tensors if _kind(n, tk.info(n).shape, vocab) == "lm_head"]
    tied = bool(_cfg_get(cfg, "tie_word_embeddings", False)) and not heads_stored
    for name, info in tk.tensors.items():
        kind = _kind(name, info.shape, vocab)
        if name not in bk.tensors:
            skipped.append({"tensor": name, "reason": "not in the base"})
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else name.rsplit(".", 1)[0]
        if kind == "other":
            others.append(name)
            continue
        if bk.info(name).shape != info.shape:
            if kind in ("embedding", "lm_head") and embeddings != "skip":
                whole.append((module, f"shape changed {list(bk.info(name).shape)} -> {list(info.shape)} "
                                      "(vocabulary resized: resize the base's embeddings before loading)"))
            else:
                skipped.append({"tensor": name, "reason": f"shape changed {list(bk.info(name).shape)} -> "
                                                          f"{list(info.shape)}"})
            continue
        # --embeddings full/skip decide the embeddings and heads outright; everything that is to be
        # decomposed (embeddings too, under --embeddings lora) goes through --include/--exclude, and
        # decoder-layer modules through --layers.
        if kind in ("embedding", "lm_head") and embeddings != "lora":
            tasks.append(_Task(name, module, "skip-embedding" if embeddings == "skip" else "full", None))
            continue
        li = layer_index(module)
        if kind == "linear" and layer_set is not None and li is not None and li not in layer_set:
            tasks.append(_Task(name, module, "skip-layers", None))
            continue
        if inc and not any(p.search(module) for p in inc):
            tasks.append(_Task(name, module, "skip-include", None))
            continue
        if any(p.search(module) for p in exc):
            tasks.append(_Task(name, module, "skip-exclude", None))
            continue
        tasks.append(_Task(name, module, kind, None))
    for name in bk.tensors:
        if name not in tk.tensors and not (tied and _kind(name, bk.info(name).shape, vocab) == "lm_head"):
            skipped.append({"tensor": name, "reason": "in the base but not in the tuned checkpoint"})
    return tasks, whole, skipped, others, tied


_SKIP_REASONS = {"skip-embedding": "--embeddings skip", "skip-layers": "outside --layers",
                 "skip-include": "not matched by --include", "skip-exclude": "matched by --exclude"}


def _extract(tk: Checkpoint, bk: Checkpoint, tuned_ref: Path, base_ref: str | Path, output: str | Path,
             opts: dict[str, Any], inc: list[re.Pattern[str]], exc: list[re.Pattern[str]],
             layer_set: set[int] | None, force: bool, progress: bool, command: str | None,
             t0: float) -> ExtractResult:
    tasks, whole_plan, skipped, others, tied = _plan(tk, bk, opts, inc, exc, layer_set)
    dev = torch.device(opts["device"])
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    saved_whole: list[dict[str, str]] = []
    modules_to_save: list[str] = []
    warnings: list[str] = []
    lora_modules: list[str] = []
    embed_lora = False
    conv1d_model = _cfg_get(tk.config or bk.config, "model_type") in CONV1D_MODEL_TYPES
    any_conv1d = False
    for module, reason in whole_plan:
        modules_to_save.append(module)
        saved_whole.append({"module": module, "reason": reason})
        tensors[f"{PEFT_PREFIX}{module}.weight"] = tk.read(f"{module}.weight")
        if tied:
            warnings.append("tied embeddings with a resized vocabulary: the output head follows the embedding")
    with _progress_bar(progress, len(tasks) + len(others)) as advance:
        for i, task in enumerate(tasks):
            advance()
            if i + 1 < len(tasks):  # the disk reads the next pair while we factor this one
                _prefetch(tk, tasks[i + 1].name)
                _prefetch(bk, tasks[i + 1].base_name or tasks[i + 1].name)
            factor = task.kind not in _SKIP_REASONS and task.kind != "full"
            delta = _delta(tk, bk, task, keep=factor)
            if delta is None:
                continue
            if task.kind in _SKIP_REASONS:
                skipped.append({"tensor": task.name, "reason": _SKIP_REASONS[task.kind]})
                continue
            if task.kind == "full":
                modules_to_save.append(task.module)
                saved_whole.append({"module": task.module, "reason": "--embeddings full"})
                tensors[f"{PEFT_PREFIX}{task.module}.weight"] = tk.read(task.name)
                continue
            t1 = time.perf_counter()
            conv1d = task.kind == "linear" and conv1d_model
            if conv1d:  # GPT-2 Conv1D stores (in, out): factor the (out, in) view PEFT's B·A describes
                delta = delta.T
                any_conv1d = True
            delta = delta.to(dev)
            k = opts["rank"] if opts["rank"] is not None else opts["max_rank"]
            k = min(k, opts["max_rank"])
            f = S.factorise(delta, k, svd=opts["svd"], seed=opts["seed"])
            r, capped = S.pick_rank(f, rank=opts["rank"], energy=opts["energy"], max_error=opts["max_error"],
                                    max_rank=opts["max_rank"])
            B, A = f.factors(r)
            if FACTOR_DTYPES[opts["dtype"]] != FP32:  # measure what is written: rounded factors
                B, A = B.to(FACTOR_DTYPES[opts["dtype"]]), A.to(FACTOR_DTYPES[opts["dtype"]])
            err_meas = _residual_error(delta, B.to(FP32), A.to(FP32), f.total_energy)
            rep = ModuleReport(task.module, task.kind, list(delta.shape), r, f.energy_fraction(r), err_meas,
                               f.method, capped)
            del delta, f
            B, A = B.cpu(), A.cpu()
            if task.kind == "embedding":  # ΔW (vocab, dim) = (B_e·A_e)ᵀ: B_e = Aᵀ (dim, r), A_e = Bᵀ (r, vocab)
                tensors[format_key(task.module, Role.EMBED_A)] = B.T.contiguous()
                tensors[format_key(task.module, Role.EMBED_B)] = A.T.contiguous()
                token_table = short_name(task.module) not in POSITION_NAMES
                embed_lora = embed_lora or token_table
                if tied and token_table:  # the head shares the weight, so it shares the delta: lora_A = A, lora_B = B
                    tensors[format_key("lm_head", Role.LORA_A)] = A
                    tensors[format_key("lm_head", Role.LORA_B)] = B
            else:
                tensors[format_key(task.module, Role.LORA_A)] = A
                tensors[format_key(task.module, Role.LORA_B)] = B
            lora_modules.append(task.module)
            rep.seconds = round(time.perf_counter() - t1, 4)
            reports.append(rep)
        other_changed = []
        for name in others:
            advance()
            if tk.info(name).shape != bk.info(name).shape or _delta(tk, bk, _Task(name, name, "other", None),
                                                                     keep=False) is not None:
                other_changed.append(name)
    # A changed bias of a module that gets LoRA travels the way PEFT saves it with bias="lora_only":
    # ``<module>.base_layer.bias`` for every LoRA module that has a bias (PEFT saves them all).
    lora_set = set(lora_modules)
    carry_bias = any(n.endswith(".bias") and n.rsplit(".", 1)[0] in lora_set for n in other_changed)
    carried: list[str] = []
    if carry_bias:
        for module in lora_modules:
            if f"{module}.bias" in tk.tensors:
                tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = tk.read(f"{module}.bias")
                carried.append(f"{module}.bias")
    for name in other_changed:
        module = name.rsplit(".", 1)[0]
        if carry_bias and name.endswith(".bias") and module in lora_set:
            continue
        if opts["save_other"] and module not in lora_modules and module not in modules_to_save:
            modules_to_save.append(module)
            saved_whole.append({"module": module, "reason": "changed tensor a LoRA cannot carry (--save-other)"})
            for pn in tk.tensors:
                if pn.rsplit(".", 1)[0] == module:
                    tensors[f"{PEFT_PREFIX}{pn}"] = tk.read(pn)
        elif opts["save_other"] and module in modules_to_save:
            continue
        else:
            why = "a LoRA cannot carry it (1-D/norm/bias); pass --save-other to save its module whole"
            skipped.append({"tensor": name, "reason": why})
    if not lora_modules and not modules_to_save:
        raise RouteError("no changed tensor went into the adapter" if skipped else
                         "the tuned checkpoint equals the base: nothing to extract", path=tk.root,
                         hint="see the skipped tensors with --json" if skipped else None)
    if not lora_modules:
        raise RouteError("no tensor was factored (only whole modules to save): PEFT needs at least one LoRA module",
                         path=tk.root, hint="widen --include/--layers or use --embeddings lora")
    ensure_tying = tied and (embed_lora or any(s["module"] in modules_to_save for s in saved_whole
                                               if s["reason"] == "--embeddings full"))
    if ensure_tying:
        warnings.append("tied embeddings: ensure_weight_tying is set so the output head gets the same change")
    ranks = Counter(r.rank for r in reports)
    r0 = sorted(ranks.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    rank_pattern = {re.escape(r.module): r.rank for r in reports if r.rank != r0}
    targets = list(lora_modules)
    if tied and embed_lora:  # PEFT ties the head's adapter to the embedding's when both are targeted
        targets += [h for h in HEAD_NAMES if h == "lm_head"]
    cfg = AdapterConfig(
        r=r0, lora_alpha=r0, rank_pattern=rank_pattern, alpha_pattern={k: v for k, v in rank_pattern.items()},
        target_modules=_target_regex(targets), modules_to_save=modules_to_save or None,
        fan_in_fan_out=any_conv1d, bias="lora_only" if carry_bias else "none",
        base_model_name_or_path=str(base_ref), task_type=_task_type(tk.config or bk.config),
        raw={"lora_dropout": 0.0, "inference_mode": True, "ensure_weight_tying": bool(ensure_tying)},
    ).to_dict()
    n_params = sum(t.numel() for t in tensors.values())
    errors = [r.error for r in reports]
    skip_counts = Counter(s["reason"] for s in skipped)
    for reason, n in skip_counts.items():
        warnings.append(f"{n} changed tensor(s) left out: {reason}")
    result = ExtractResult(
        output=str(output), files=[], tensors=len(tensors), total_bytes=0,
        ops={"lora": len(reports), "modules_to_save": len(modules_to_save), "skipped": len(skipped),
             **({"lora_biases": len(carried)} if carried else {})}, carried_biases=carried,
        modules=reports, skipped=skipped, saved_whole=saved_whole, adapter_parameters=n_params,
        worst_error=max(errors) if errors else 0.0, mean_error=sum(errors) / len(errors) if errors else 0.0,
        options=opts, warnings=warnings,
    )
    out = AtomicOutput(output, force=force, inputs=[tk.root, bk.root])
    with out as tmp:
        files = write_tensors(tmp, tensors, stem="adapter_model", max_shard_size=10**15)
        write_json(tmp / "adapter_config.json", cfg)
        files.append("adapter_config.json")
        carry_files(tk.root, tmp, only_tokenizer=True)
        result.files = files
        result.total_bytes = sum((tmp / f).stat().st_size for f in files)
        summary = [f"extracted from `{tuned_ref}` minus base `{base_ref}` by SVD "
                   f"({_criterion(opts)}, max rank {opts['max_rank']}, svd {opts['svd']})"] + result.summary_lines()
        (tmp / "README.md").write_text(render_card(form="adapter", base_model=str(base_ref), model_config=tk.config,
                                                   command=command, summary=summary,
                                                   tables=[result.markdown_table()]), encoding="utf-8")
    if out.stale_removed:
        result.warnings.append(stale_note(out.stale_removed))
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _criterion(opts: dict[str, Any]) -> str:
    if opts["energy"] is not None:
        return f"energy {opts['energy']}"
    if opts["max_error"] is not None:
        return f"max error {opts['max_error']}"
    return f"rank {opts['rank']}"


def _task_type(cfg: dict[str, Any] | None) -> str | None:
    for arch in (cfg or {}).get("architectures") or []:
        if str(arch).endswith(("ForCausalLM", "LMHeadModel")):
            return "CAUSAL_LM"
    return None


class _progress_bar:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self._p = enabled, total, None

    def __enter__(self):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress
        self._p = Progress(transient=True)
        self._p.__enter__()
        task = self._p.add_task("extracting", total=self.total)
        return lambda: self._p.advance(task)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)


# -- detect --base ----------------------------------------------------------------------------

def analyse_difference(tuned_ck: Checkpoint, base_ck: Checkpoint, *, energy: float = 0.999,
                       k: int = 64) -> dict[str, Any]:
    """Which tensors differ from the base, which module kinds in which layers, and the effective rank."""
    cfg = tuned_ck.config or base_ck.config
    vocab = _cfg_get(cfg, "vocab_size")
    changed: list[str] = []
    modules: dict[str, dict[str, Any]] = {}
    names = [n for n in tuned_ck.tensors if n in base_ck.tensors]
    for name in tuned_ck.tensors:
        if name not in base_ck.tensors:
            changed.append(name)
    for name in names:
        ta, tb = tuned_ck.info(name), base_ck.info(name)
        if ta.shape != tb.shape:
            changed.append(name)
            modules[name] = {"kind": "resized", "shape": [list(tb.shape), list(ta.shape)]}
            continue
        kind = _kind(name, tuple(ta.shape), vocab)
        factor = kind != "other" and ta.dtype.is_floating_point and tb.dtype.is_floating_point
        d = _delta(tuned_ck, base_ck, _Task(name, name, kind, None), keep=factor)
        if d is None:
            continue
        changed.append(name)
        entry: dict[str, Any] = {"kind": kind, "shape": list(ta.shape)}
        if factor:
            er, gap = S.effective_rank(d, energy, k=k)
            entry.update(rank_at_energy=er, rank_at_gap=gap,
                         relative_change=(S.frobenius_sq(d) / max(_frobenius_sq_stored(tuned_ck, name), 1e-300)) ** 0.5)
        del d
        modules[name] = entry
    changed += [n for n in base_ck.tensors if n not in tuned_ck.tensors]
    return {"changed": changed, "modules": modules, "k": k, "summary": _summary(changed, modules, cfg, energy, k)}


def _frobenius_sq_stored(ck: Checkpoint, name: str) -> float:
    """‖W‖²_F of a stored tensor, read in row blocks (fp64 accumulation)."""
    info = ck.info(name)
    rows = info.shape[0] if info.shape else 1
    step = max(1, DELTA_BLOCK // max(1, info.nbytes // max(1, rows)))
    return sum(S.frobenius_sq(ck.read_rows(name, s, s + step).to(FP32)) for s in range(0, rows, step)) \
        if info.shape else S.frobenius_sq(ck.read(name).to(FP32))


def _summary(changed: list[str], modules: dict[str, dict[str, Any]], cfg: dict[str, Any] | None,
             energy: float, k: int) -> str:
    if not changed:
        return "identical to the base"
    n_layers = _cfg_get(cfg, "num_hidden_layers")
    kinds: dict[str, set[int]] = {}
    outside: list[str] = []
    ranks: list[int | None] = []
    gaps: list[int | None] = []
    other = 0
    for name, e in modules.items():
        if e["kind"] == "other":
            other += 1
            continue
        mod = name[: -len(".weight")] if name.endswith(".weight") else name
        li = layer_index(mod)
        if li is None:
            outside.append(short_name(mod))
        else:
            kinds.setdefault(short_name(mod), set()).add(li)
        if e["kind"] != "resized":
            ranks.append(e.get("rank_at_energy"))
            gaps.append(e.get("rank_at_gap"))
    parts = []
    by_layers: dict[tuple[int, ...], list[str]] = {}
    for kname, ls in sorted(kinds.items()):
        by_layers.setdefault(tuple(sorted(ls)), []).append(kname)
    for ls, knames in by_layers.items():
        if n_layers and len(ls) == n_layers:
            where = f"in all {n_layers} layers"
        else:
            where = f"in layers {_ranges(list(ls))}"
        parts.append(f"{', '.join(knames)} {where}")
    if outside:
        parts.append(", ".join(sorted(set(outside))))
    text = "; ".join(parts) + " changed" if parts else "only tensors a LoRA cannot carry changed"
    if other:
        text += f" (+{other} norm/bias/1-D tensor(s))"
    if ranks:
        if all(r is not None for r in ranks):
            rmax = max(r for r in ranks if r is not None)
            text += f"; rank ≤ {rmax} at {energy * 100:g}% energy"
            if rmax <= k // 2:
                text += f": looks like a merged LoRA of r={rmax}"
        else:
            text += f"; rank > {k} at {energy * 100:g}% energy in some modules (a full fine-tune, or rounding noise)"
            known_gaps = [g for g in gaps if g is not None]
            if known_gaps and len(known_gaps) == len(gaps):
                text += f"; but the spectrum drops by ≥10× after rank {max(known_gaps)}: likely a merged LoRA of " \
                        f"r={max(known_gaps)} plus rounding"
    return text


def _ranges(xs: list[int]) -> str:
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}-{prev}" if prev != start else str(start))
        if x is not None:
            start = prev = x
    return ",".join(parts)

"""Extraction's first question, from headers alone: what is each tensor of the tuned checkpoint to become?

A LoRA module to factor (linear, embedding, output head), a module saved whole (``--embeddings full``, or a
vocabulary resized), a tensor left out and why (``--embeddings skip``, ``--layers``, ``--include``,
``--exclude``, missing from the base, a shape changed), or one a LoRA cannot carry (biases, norms: compared by
the pass, reported or saved with ``--save-other``).  Shared by ``extract`` (:mod:`.extract`) and ``spectrum``
(:mod:`lora_convert.spectrum`), so that both look at the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import arch
from ..io.reader import Checkpoint
from .extract_options import ExtractOptions, parse_layers


@dataclass
class Task:
    name: str  # tensor name in the tuned checkpoint
    module: str
    kind: str  # linear | embedding | lm_head | full | skip-* (see SKIP_REASONS)


SKIP_REASONS = {
    "skip-embedding": "--embeddings skip",
    "skip-layers": "outside --layers",
    "skip-include": "not matched by --include",
    "skip-exclude": "matched by --exclude",
}


@dataclass
class Inputs:
    """The tuned checkpoint's tensors, sorted."""

    tasks: list[Task]  # to factor, save whole or report, if changed
    whole: list[tuple[str, str]]  # (module, reason) saved whole because their shape changed
    skipped: list[dict[str, str]]
    others: list[str]  # tensors a LoRA cannot carry: compared, reported (or saved with --save-other)
    tied: bool


def classify(tk: Checkpoint, bk: Checkpoint, opts: ExtractOptions, skip: set[str]) -> Inputs:
    """Sort the tuned checkpoint's tensors (``skip``: expert tensors extracted as such)."""
    model_config = tk.config or bk.config
    vocab = arch.config_value(model_config, "vocab_size")
    inc, exc = opts.patterns()
    layer_set = parse_layers(opts.layers)
    heads_stored = any(arch.tensor_kind(n, tk.info(n).shape, vocab) == "lm_head" for n in tk.tensors)
    out = Inputs([], [], [], [], arch.ties_embeddings(model_config, heads_stored) and not heads_stored)
    for name, info in tk.tensors.items():
        if name in skip:
            continue
        kind = arch.tensor_kind(name, info.shape, vocab)
        if name not in bk.tensors:
            out.skipped.append({"tensor": name, "reason": "not in the base"})
            continue
        module = arch.module_of(name)
        if kind == "other":
            out.others.append(name)
            continue
        if bk.info(name).shape != info.shape:
            change = f"shape changed {list(bk.info(name).shape)} -> {list(info.shape)}"
            if kind in ("embedding", "lm_head") and opts.embeddings != "skip":
                out.whole.append(
                    (module, f"{change} (vocabulary resized: resize the base's embeddings before loading)")
                )
            else:
                out.skipped.append({"tensor": name, "reason": change})
            continue
        # --embeddings full/skip decide the embeddings and heads outright; everything that is to be
        # decomposed (embeddings too, under --embeddings lora) goes through --include/--exclude, and
        # decoder-layer modules through --layers.
        if kind in ("embedding", "lm_head") and opts.embeddings != "lora":
            kind = "skip-embedding" if opts.embeddings == "skip" else "full"
        elif (
            kind == "linear"
            and layer_set is not None
            and (li := arch.layer_index(module)) is not None
            and li not in layer_set
        ):
            kind = "skip-layers"
        elif inc and not any(p.search(module) for p in inc):
            kind = "skip-include"
        elif any(p.search(module) for p in exc):
            kind = "skip-exclude"
        out.tasks.append(Task(name, module, kind))
    for name in bk.tensors:
        if (
            name not in tk.tensors
            and name not in skip
            and not (out.tied and arch.tensor_kind(name, bk.info(name).shape, vocab) == "lm_head")
        ):
            out.skipped.append({"tensor": name, "reason": "in the base but not in the tuned checkpoint"})
    return out

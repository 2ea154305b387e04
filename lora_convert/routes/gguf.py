"""adapter (or unmerged) -> a llama.cpp LoRA adapter: one GGUF file, from the base's config.json alone.

What llama.cpp expects (``src/llama-adapter.cpp``, its ``convert_lora_to_gguf.py``; gguf-py 0.19):

* names from llama.cpp's own tables — ``gguf.get_tensor_name_map(arch, n_layers)`` maps
  ``model.layers.3.self_attn.q_proj.weight`` to ``blk.3.attn_q.weight`` — plus ``.lora_a``/``.lora_b``;
  ``general.architecture`` is llama.cpp's name of the base (``llama`` for Mistral too);
* ``lora_a = A (r, in)`` and ``lora_b = B (out, r)``; the token embedding's ``lora_a`` is ``Aᵀ (vocab, r)``
  (llama.cpp gathers its rows by token id);
* for the Llama family llama.cpp permutes the rows of q and k at conversion (its rope pairs
  neighbouring dimensions), so ``lora_b`` of q/k gets the same row permutation; ``lora_a`` none;
* llama.cpp scales every pair by ``adapter.lora.alpha / rank``.  We write the config's ``lora_alpha``
  and fold into ``lora_b`` whatever differs from that per module (rsLoRA, alpha patterns), so each
  module's delta is PEFT's exactly; in the plain case nothing is folded and the file equals
  llama.cpp's converter's.

Refused, with the reason: architectures outside :data:`ARCHITECTURES`, modules llama.cpp has no tensor
for (or never applies LoRA to: norms), LoRA on embeddings or the head of a base whose head is tied to
the embedding (llama.cpp then multiplies the token_embd pair as the head and aborts, or finds no
``output.weight``), MoE experts, DoRA, and what :func:`~.adapter_out.carried_modules` refuses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .. import arch
from ..errors import AdapterError, RouteError, UnsupportedError, Where, option, option_name
from ..inventory import LoraModule
from ..io.gguf_sink import OUTTYPES, GgufSink, require_gguf
from ..pipeline import Job
from .adapter_out import carried_modules, factor_job, read_factor
from .plan import Plan, Request

# transformers architecture -> llama.cpp's (as convert_hf_to_gguf.py registers them)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
MODEL_TYPES = {  # config.json without ``architectures`` (a config saved on its own)
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "phi3": "phi3",
}
PERMUTED = frozenset({"llama"})  # LlamaModel.permute of q/k rows (NEOX-rope archs keep HF's order)
ALWAYS_TIED = frozenset({"gemma2"})  # llama.cpp's gemma2 has no output tensor at all
TIED_BY_DEFAULT = frozenset({"gemma2", "gemma3"})  # when config.json does not say
VLM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))


def gguf_arch(config: dict[str, Any] | None) -> str:
    """llama.cpp's architecture name for the base, or a RouteError naming the unsupported one."""
    names = [str(a) for a in (config or {}).get("architectures") or []]
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    model_type = arch.config_value(config, "model_type")
    if not names and model_type in MODEL_TYPES:
        return MODEL_TYPES[str(model_type)]
    what = names[0] if names else f"model_type {model_type!r}"
    raise UnsupportedError(
        f"GGUF adapters are written for {', '.join(sorted(ARCHITECTURES))}; the base is {what}",
        hint="llama.cpp's name tables and weight transforms differ per architecture",
    )


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to Llama q/k weights (``LlamaModel.permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def text_module(module: str) -> str:
    """A module path as a text-only checkpoint spells it (llama.cpp's converter strips ``language_model``)."""
    for prefix, repl in VLM_PREFIXES:
        if module.startswith(prefix):
            return repl + module[len(prefix) :]
    return module


def _natural(name: str) -> tuple[int, int, str]:
    """token_embd first, blocks in numeric order, the head last."""
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def plan_gguf(req: Request) -> Plan:
    """The jobs that write ``.lora_a``/``.lora_b`` per module, and the sink that makes them one GGUF file."""
    gguf = require_gguf()
    outtype = req.outtype or "f32"
    if outtype not in OUTTYPES:
        raise RouteError(f"unknown {option_name('outtype')} {outtype!r} (choose from {', '.join(OUTTYPES)})")
    config = req.model_config
    if not config:
        raise RouteError("a GGUF adapter needs the base's config.json", hint=f"pass {option('base', 'BASE')}")
    name = gguf_arch(config)
    norms = _whole_norms(req, name, config)
    if norms and not req.drop_norms:
        base_key, key = next(iter(norms.items()))
        raise UnsupportedError(
            f"{len(norms)} norm weight(s) saved whole ({base_key} first): GGUF LoRA cannot carry them and "
            f"llama.cpp's LoRA loader would ignore them",
            path=req.source.root,
            tensor=key,
            hint=f"pass {option('drop_norms')} to write the LoRA pairs without them (the result differs from the "
            "adapter by those norms)",
        )
    modules, warnings = carried_modules(req, "GGUF", dora=False, dropped=frozenset(norms))
    cfg = req.config
    assert cfg is not None
    alpha = float(cfg.lora_alpha) if cfg.lora_alpha > 0 else 0.0
    pairs = sorted(_pairs(req, modules, name, config), key=lambda p: _natural(p[0]))
    jobs = []
    for gname, m in pairs:
        jobs += _pair_jobs(req, gname, m, name, config, alpha)
    folded = sum(1 for _, m in pairs if _fold(m, alpha) != 1.0)
    if folded:
        warnings.append(f"{folded} module(s) have a scaling other than lora_alpha / r; it is folded into lora_b")
    metadata = {
        gguf.Keys.General.TYPE: gguf.GGUFType.ADAPTER,
        gguf.Keys.Adapter.TYPE: "lora",
        gguf.Keys.General.NAME: Path(req.ref).name or "adapter",
        gguf.Keys.Adapter.LORA_ALPHA: alpha,  # FLOAT32: llama.cpp aborts on any other type
        gguf.Keys.General.QUANTIZATION_VERSION: gguf.GGML_QUANT_VERSION,
    }
    dropped = [{"tensor": key, "reason": NORM_DROPPED} for key in norms.values()]
    if dropped:
        warnings.append(
            f"{option_name('drop_norms')}: {len(dropped)} norm weight(s) saved whole were left out (the GGUF "
            f"adapter differs from the adapter by them): {', '.join(d['tensor'] for d in dropped)}"
        )
    return Plan(
        "gguf",
        jobs,
        warnings=warnings,
        file_sink=lambda path: GgufSink(path, arch=name, metadata=metadata, outtype=outtype),
        dropped=dropped,
    )


NORM_DROPPED = "a norm weight saved whole: GGUF LoRA cannot carry it (llama.cpp's LoRA loader ignores it)"


def _tensor_map(name: str, config: dict[str, Any], used: Iterable[int | None]) -> Any:
    """llama.cpp's name map of the architecture ``name``, for the layers ``used`` (layer indices, None for
    modules outside the layers).  The map holds every name of every layer: built only up to the highest layer
    used (the same names as a map of all the layers), so a huge num_hidden_layers costs nothing; a block past
    num_hidden_layers is in neither."""
    gguf = require_gguf()
    layers = int(arch.text_config(config).get("num_hidden_layers") or 0)  # at most arch.MAX_LAYERS
    top = max((i for i in used if i is not None and i < layers), default=-1)
    return gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name), top + 1)


def _whole_norms(req: Request, name: str, config: dict[str, Any]) -> dict[str, str]:
    """Base key -> adapter key of every norm vector the adapter saves whole (mergekit's ``to_save``
    modules): 1-D tensors whose llama.cpp name is a ``*_norm`` (attn_norm, ffn_norm, output_norm...)."""
    inv, adapter = req.inventory, req.adapter
    saved = inv.saved_layers.get(adapter, set())
    replace = {k: v for k, v in inv.replace.get(adapter, {}).items() if k not in saved}
    if not replace:
        return {}
    tmap = _tensor_map(name, config, (arch.layer_index(text_module(k)) for k in replace))
    out = {}
    for base_key, key in sorted(replace.items()):
        gname = tmap.get_name(text_module(base_key), try_suffixes=(".weight", ".bias"))
        if gname is not None and gname.rsplit(".", 1)[0].endswith("_norm") and len(req.source.info(key).shape) == 1:
            out[base_key] = key
    return out


def _pairs(req: Request, modules: list[LoraModule], name: str, config: dict[str, Any]) -> list[tuple[str, LoraModule]]:
    """(llama.cpp base tensor name, module) for every module; refuses what llama.cpp cannot apply."""
    text = arch.text_config(config)
    layers = int(text.get("num_hidden_layers") or 0)  # at most arch.MAX_LAYERS (checked when config.json is read)
    index = {m.module: arch.layer_index(text_module(m.module)) for m in modules}
    for m in modules:
        i = index[m.module]
        if i is not None and i >= layers and text_module(m.module).startswith("model.layers."):
            raise AdapterError(
                f"LoRA on layer {i}, but the base's config.json has num_hidden_layers {layers}",
                path=req.source.root,
                tensor=m.module,
                hint="is this adapter for this base model?",
            )
    tmap = _tensor_map(name, config, index.values())
    tie = arch.config_value(config, "tie_word_embeddings")
    tied = name in ALWAYS_TIED or (bool(tie) if tie is not None else name in TIED_BY_DEFAULT)
    hidden, vocab = text.get("hidden_size"), text.get("vocab_size")
    out: list[tuple[str, LoraModule]] = []
    for m in modules:
        where: Where = {"path": req.source.root, "tensor": m.module}
        gname = tmap.get_name(text_module(m.module) + ".weight", try_suffixes=(".weight",))
        if gname is None or gname.endswith("_norm.weight"):
            raise UnsupportedError(f"llama.cpp's {name} has no tensor it applies LoRA to for this module", **where)
        if "_exps." in gname or "_shexp." in gname:
            raise UnsupportedError("LoRA on MoE experts is not supported for GGUF yet", **where)
        if gname in ("token_embd.weight", "output.weight") and tied:
            raise UnsupportedError(
                f"the base ties its output head to the token embedding, so llama.cpp's {name} computes the head "
                "with token_embd and cannot apply an embedding or head LoRA the way PEFT does",
                hint="leave embed_tokens/lm_head out of the adapter, or use an untied base",
                **where,
            )
        if (gname == "token_embd.weight") != (m.kind == "embedding"):
            raise UnsupportedError(f"a {m.kind} LoRA on {gname} has no llama.cpp form", **where)
        if m.kind == "embedding" and (m.in_features, m.out_features) != (vocab, hidden):
            raise AdapterError(
                f"embedding LoRA for ({m.in_features}, {m.out_features}) but the base has ({vocab}, {hidden})",
                hint="is this adapter for this base model?",
                **where,
            )
        if m.kind == "linear" and hidden not in (m.in_features, m.out_features):
            raise AdapterError(
                f"LoRA ({m.out_features}, {m.in_features}) touches no dimension of the base's hidden size {hidden}",
                hint="is this adapter for this base model?",
                **where,
            )
        out.append((gname, m))
    return out


def _fold(m: LoraModule, alpha: float) -> float:
    """What lora_b is multiplied by so that llama.cpp's ``alpha / rank`` gives PEFT's scaling."""
    assert m.scaling is not None
    implied = alpha / m.rank if alpha else 1.0  # llama.cpp: alpha 0 means scale 1
    return m.scaling / implied


def _pair_jobs(req: Request, gname: str, m: LoraModule, name: str, config: dict[str, Any], alpha: float) -> list[Job]:
    ck, r = req.source, m.rank
    embedding = m.kind == "embedding"
    factor = _fold(m, alpha)
    permute = None
    if name in PERMUTED and gname.endswith(("attn_q.weight", "attn_k.weight")):
        where = req.base_ref or ck.root
        n_head = arch.head_count(config, "num_attention_heads", where)
        n_kv = arch.head_count(config, "num_key_value_heads", where, default=n_head)
        permute = (n_head, n_head if gname.endswith("attn_q.weight") else n_kv)
        if m.out_features % (2 * permute[1]):
            raise AdapterError(
                f"{m.out_features} rows do not split into {permute[1]} heads of pairs",
                path=ck.root,
                tensor=m.module,
            )

    def lora_a() -> torch.Tensor:
        a = read_factor(ck, m.a_key)
        return a.t() if embedding else a

    def lora_b() -> torch.Tensor:
        b = read_factor(ck, m.b_key)
        if factor != 1.0:
            b = b * factor
        return llama_permute(b, *permute) if permute else b

    a_shape = (m.in_features, r) if embedding else (r, m.in_features)
    return [
        factor_job(f"{gname}.lora_a", a_shape, torch.float32, lora_a),
        factor_job(f"{gname}.lora_b", (m.out_features, r), torch.float32, lora_b),
    ]

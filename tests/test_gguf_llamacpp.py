"""Our GGUF adapters in real llama.cpp: base + adapter logits against PEFT's.

Optional: runs only where a libllama with Python bindings imports — llama-cpp-py-sync's CFFI bindings
(``pip install llama-cpp-py-sync``, a CPU wheel of llama.cpp), found on ``sys.path`` or in the folder
named by ``LORA_CONVERT_LLAMA_CPP``.  Its libraries need glibc >= 2.38 (for four ``__isoc23_*`` symbols);
on an older glibc, a copy whose libraries are given those four from a small shim library
(``patchelf --add-needed``) works.  The base GGUF is written here with gguf-py (F32, llama.cpp's names
and q/k permutation, no tokenizer: ``tokenizer.ggml.model = no_vocab``), so no converter of llama.cpp's
is needed::

    LORA_CONVERT_LLAMA_CPP=/path/to/shimmed python -m pytest tests/test_gguf_llamacpp.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import peft_wrap
from tiny_archs import build

import lora_convert as lc

gguf = pytest.importorskip("gguf")
if os.environ.get("LORA_CONVERT_LLAMA_CPP"):
    sys.path.insert(0, os.environ["LORA_CONVERT_LLAMA_CPP"])
try:
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib
except Exception:  # noqa: BLE001 - ImportError, or an OSError loading the shared library
    pytest.skip("no libllama bindings (llama-cpp-py-sync) here", allow_module_level=True)

from lora_convert.routes.gguf import gguf_arch, llama_permute  # noqa: E402

TOKENS = [1, 5, 17, 42, 90, 3, 64, 7]


def write_base(base: Path, path: Path) -> None:
    """A base GGUF from the safetensors checkpoint: what convert_hf_to_gguf.py writes, minus the tokenizer."""
    import json

    cfg = json.loads((base / "config.json").read_text())
    name = gguf_arch(cfg)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)
    w = gguf.GGUFWriter(str(path), name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("no_vocab")
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    for key, t in load_file(base / "model.safetensors").items():
        g = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        t = t.float()
        if name == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"]
            t = llama_permute(t, heads, heads if "attn_q" in g else cfg["num_key_value_heads"])
        w.add_tensor(g, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(base: Path, adapter: Path | None, vocab: int) -> np.ndarray:
    lib, ffi = get_lib(), get_ffi()
    lib.llama_backend_init()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(str(base).encode(), mp)
    assert model != ffi.NULL
    cp = lib.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.type_k = cp.type_v = lib.GGML_TYPE_F32
    cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.n_threads = cp.n_threads_batch = 2
    ctx = lib.llama_init_from_model(model, cp)
    ad = None
    if adapter is not None:
        ad = lib.llama_adapter_lora_init(model, str(adapter).encode())
        assert ad != ffi.NULL, "llama.cpp refused the adapter (its log says why)"
        assert lib.llama_set_adapters_lora(ctx, ffi.new("struct llama_adapter_lora *[]", [ad]), 1, [1.0]) == 0
    b = lib.llama_batch_init(len(TOKENS), 0, 1)
    b.n_tokens = len(TOKENS)
    for i, tok in enumerate(TOKENS):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, 1
        b.seq_id[i][0] = 0
    assert lib.llama_decode(ctx, b) == 0
    out = np.stack(
        [np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * vocab), np.float32) for i in range(len(TOKENS))]
    ).copy()
    lib.llama_batch_free(b)
    if ad is not None:
        lib.llama_adapter_lora_free(ad)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return out


@pytest.mark.parametrize(
    ("arch", "targets", "lora"),
    [
        (
            "llama",
            ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"],
            {"use_rslora": True},
        ),
        (
            "qwen2",
            ["q_proj", "k_proj", "v_proj", "up_proj"],
            {"rank_pattern": {"k_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        ),
        ("qwen3", ["q_proj", "k_proj", "o_proj", "gate_proj"], {}),
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {}),
    ],
    ids=["llama", "qwen2", "qwen3", "phi3"],
)
def test_llama_cpp_logits_equal_peft(tmp_path, arch, targets, lora):
    model = build(arch)
    model.save_pretrained(tmp_path / "base")
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=targets, **lora)
    pm.save_pretrained(tmp_path / "adapter")
    lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    write_base(tmp_path / "base", tmp_path / "base.gguf")
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        want = pm(ids).logits[0].numpy()
        with pm.disable_adapter():
            plain = pm(ids).logits[0].numpy()
    vocab = model.config.vocab_size
    assert np.abs(llama_cpp_logits(tmp_path / "base.gguf", None, vocab) - plain).max() < 1e-4  # the base agrees
    got = llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "a.gguf", vocab)
    effect = np.abs(want - plain).max()
    assert effect > 0.1 and np.abs(got - want).max() < 1e-4 * max(1.0, effect), (np.abs(got - want).max(), effect)

"""Our GGUF adapters against llama.cpp itself: its converter, its merge tool and its runtime.

Opt-in: llama.cpp is no test dependency (llama-cpp-python builds it from source, ~20 min on 2 cores).
Each part runs where its piece of llama.cpp is at hand and skips otherwise, saying what is missing (README,
"llama.cpp as the GGUF referee", gives the commands):

* ``convert_lora_to_gguf.py``, llama.cpp's converter: needs a llama.cpp source tree in
  ``LORA_CONVERT_LLAMA_CPP`` (llama-cpp-python's source distribution carries one, ``vendor/llama.cpp``).
  Plain adapters (no rsLoRA, no patterns: nothing folded) give the converter's tensors byte for byte:
  names, types, shapes and bytes, in f32, f16, bf16 and q8_0, embedding and head included.
* ``llama-export-lora``, llama.cpp's merge: ``LORA_CONVERT_LLAMA_EXPORT_LORA``, or ``build/bin/`` of that
  tree.  Its merge of our adapter into the base GGUF equals our merge within 1e-6 (7e-7 measured).
* the runtime, through llama-cpp-python (``import llama_cpp``): base + our adapter give PEFT's logits
  within 1e-5 (2.4e-6 measured) with flash attention off and an F32 KV cache; llama.cpp's defaults
  (flash attention on CPU, f16 cache) move them by up to 4.6e-3, which would hide a wrong adapter of
  that size.

Measured with llama.cpp 0c1e57098, the one llama-cpp-python 0.3.36 builds.  The base GGUF is written here
with gguf-py (F32, llama.cpp's names and q/k permutation, no tokenizer: ``tokenizer.ggml.model =
no_vocab``), so no tokenizer and no converter of llama.cpp's is needed for the base.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import peft_wrap
from tiny_archs import build

import lora_convert as lc
from lora_convert.routes.gguf import gguf_arch, llama_permute

TOKENS = [1, 5, 17, 42, 90, 3, 64, 7]
SRC = Path(os.environ["LORA_CONVERT_LLAMA_CPP"]) if os.environ.get("LORA_CONVERT_LLAMA_CPP") else None
CONVERTER = SRC / "convert_lora_to_gguf.py" if SRC else None
EXPORT_LORA = (
    Path(os.environ["LORA_CONVERT_LLAMA_EXPORT_LORA"])
    if os.environ.get("LORA_CONVERT_LLAMA_EXPORT_LORA")
    else (SRC / "build" / "bin" / "llama-export-lora" if SRC else None)
)
try:
    import llama_cpp
except ImportError:  # opt-in: not a test dependency
    llama_cpp = None

needs_converter = pytest.mark.skipif(
    CONVERTER is None or not CONVERTER.is_file(),
    reason="llama.cpp's convert_lora_to_gguf.py not found: set LORA_CONVERT_LLAMA_CPP to a llama.cpp source tree "
    "(README: llama.cpp as the GGUF referee)",
)
needs_export_lora = pytest.mark.skipif(
    EXPORT_LORA is None or not EXPORT_LORA.is_file(),
    reason="llama-export-lora not found: build it in LORA_CONVERT_LLAMA_CPP/build or set "
    "LORA_CONVERT_LLAMA_EXPORT_LORA (README: llama.cpp as the GGUF referee)",
)
needs_bindings = pytest.mark.skipif(
    llama_cpp is None,
    reason="llama-cpp-python is not installed (opt-in, builds llama.cpp from source; README: llama.cpp as the "
    "GGUF referee)",
)

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"]


def gguf_tensors(folder: Path) -> tuple[dict, str, dict[str, np.ndarray]]:
    """(config, llama.cpp arch name, {llama.cpp tensor name: F32 array}) of a safetensors checkpoint folder,
    as convert_hf_to_gguf.py lays it out (names, q/k row permutation of the Llama family)."""
    cfg = json.loads((folder / "config.json").read_text())
    name = gguf_arch(cfg)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for key, t in load_file(f).items():
            g = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            t = t.float()
            if name == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg["num_attention_heads"]
                t = llama_permute(t, heads, heads if "attn_q" in g else cfg["num_key_value_heads"])
            out[g] = t.contiguous().numpy()
    return cfg, name, out


def write_base(base: Path, path: Path) -> None:
    """A base GGUF from the safetensors checkpoint: what convert_hf_to_gguf.py writes, minus the tokenizer."""
    cfg, name, tensors = gguf_tensors(base)
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
    for g, t in tensors.items():
        w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf_bytes(path: Path) -> tuple[dict[str, object], dict[str, tuple[int, list[int], bytes]]]:
    """({key: value}, {tensor name: (type, shape, bytes)}) of a GGUF file, through gguf-py's reader."""
    r = gguf.GGUFReader(str(path))
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    tensors = {t.name: (int(t.tensor_type), [int(n) for n in t.shape], t.data.tobytes()) for t in r.tensors}
    return kv, tensors


def adapter_case(tmp_path: Path, arch: str, targets: list[str], **lora):
    model = build(arch)
    model.save_pretrained(tmp_path / "base")
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=targets, **lora)
    pm.save_pretrained(tmp_path / "adapter")
    return model, pm


# -- the converter ------------------------------------------------------------------------------------------

# derived by the converter from the adapter's model card and folder name, not from the weights
CARD_KEYS = {"general.name", "general.tags", "general.base_model.count"}


@needs_converter
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plain_adapter_is_llama_cpp_converters_tensors(tmp_path, arch, outtype):
    adapter_case(tmp_path, arch, LLAMA_ALL)
    ref = tmp_path / "ref.gguf"
    r = subprocess.run(
        [sys.executable, CONVERTER, "--base", tmp_path / "base", "--outfile", ref, "--outtype", outtype]
        + [tmp_path / "adapter"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf", outtype=outtype)
    want_kv, want = read_gguf_bytes(ref)
    got_kv, got = read_gguf_bytes(tmp_path / "a.gguf")
    assert set(got) == set(want) and got == want  # names, types, shapes, bytes (the order may differ)
    assert {k: v for k, v in got_kv.items() if k not in CARD_KEYS} == {
        k: v for k, v in want_kv.items() if k not in CARD_KEYS
    }


# -- llama-export-lora --------------------------------------------------------------------------------------


@needs_export_lora
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_export_lora_merge_equals_ours(tmp_path, arch):
    adapter_case(tmp_path, arch, LLAMA_ALL)
    lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    write_base(tmp_path / "base", tmp_path / "base.gguf")
    r = subprocess.run(
        [EXPORT_LORA, "-m", tmp_path / "base.gguf", "--lora", tmp_path / "a.gguf", "-o", tmp_path / "m.gguf"]
        + ["-t", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    cfg, _, ours = gguf_tensors(tmp_path / "merged")
    _, _, base = gguf_tensors(tmp_path / "base")
    theirs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert set(theirs) == set(ours)
    changed = 0
    for g, want in ours.items():
        got = theirs[g].reshape(want.shape)
        assert got.dtype == np.float32, (g, got.dtype)  # an F32 base stays F32
        assert np.abs(got - want).max() <= 1e-6, (g, float(np.abs(got - want).max()))
        changed += bool(np.abs(want - base[g]).max() > 1e-3)
    # every targeted weight of every layer (q, k, v, o, down), the embedding and the head moved
    assert changed == 5 * cfg["num_hidden_layers"] + 2


# -- the runtime --------------------------------------------------------------------------------------------


def llama_cpp_logits(base: Path, adapter: Path | None) -> np.ndarray:
    """Logits of every position of TOKENS, llama.cpp on the CPU with the options that make them comparable:
    flash attention off and an F32 KV cache (llama.cpp's defaults, flash attention and an f16 cache, move
    them by up to 4.6e-3)."""
    llm = llama_cpp.Llama(
        model_path=str(base),
        lora_path=str(adapter) if adapter else None,
        lora_scale=1.0,
        n_gpu_layers=0,
        n_ctx=64,
        n_batch=64,
        n_ubatch=64,
        n_threads=2,
        n_threads_batch=2,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        logits_all=True,
        verbose=False,
    )
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    finally:
        llm.close()


@needs_bindings
@pytest.mark.parametrize(
    ("arch", "targets", "lora"),
    [
        ("llama", LLAMA_ALL, {"use_rslora": True}),
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
    model, pm = adapter_case(tmp_path, arch, targets, **lora)
    lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    write_base(tmp_path / "base", tmp_path / "base.gguf")
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        want = pm(ids).logits[0].numpy()
        with pm.disable_adapter():
            plain = pm(ids).logits[0].numpy()
    base = llama_cpp_logits(tmp_path / "base.gguf", None)
    assert base.shape == plain.shape == (len(TOKENS), model.config.vocab_size)
    assert np.abs(base - plain).max() <= 1e-5  # the base agrees first
    got = llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "a.gguf")
    effect = np.abs(want - plain).max()
    assert effect > 0.1, effect  # the adapter moves the logits far beyond the tolerance
    assert np.abs(got - want).max() <= 1e-5, (float(np.abs(got - want).max()), float(effect))

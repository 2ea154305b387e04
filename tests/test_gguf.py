"""convert --to gguf: llama.cpp LoRA adapters, read back with gguf's own GGUFReader.

The oracle is PEFT: for every module, lora_b·lora_a·(alpha / rank) as llama.cpp computes it — after
undoing the q/k row permutation llama.cpp applies to the Llama family — must be PEFT's
``get_delta_weight``.  Names, shapes (llama.cpp's loader rules), types and metadata are checked against
what llama.cpp's loader and its own converter use (docs in lora_convert/routes/gguf.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_gguf
from tiny import peft_wrap
from tiny_archs import ARCHS, build, lora_layers

import lora_convert as lc

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
}
# llama.cpp's names (llama-arch.cpp), written out here rather than taken from the code under test
BLOCK_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "qkv_proj": "attn_qkv",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "gate_up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def expected_name(module: str) -> str:
    if module.endswith("embed_tokens"):
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    layer = re.search(r"\.layers\.(\d+)\.", module)
    assert layer is not None, module
    return f"blk.{layer.group(1)}.{BLOCK_NAMES[module.rsplit('.', 1)[1]]}.weight"


def unpermute(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k row permutation (new row h·d + 2i + j holds old row h·d + j·d/2 + i)."""
    d = b.shape[0] // n_head
    return b.reshape(n_head, d // 2, 2, -1).swapaxes(1, 2).reshape(b.shape)


def make_case(tmp_path: Path, arch: str, targets=None, *, tie: bool = False, **lora):
    model = build(arch, tie=tie)
    model.save_pretrained(tmp_path / "base")
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    pm = peft_wrap(model, target_modules=targets or ARCHS[arch][3], **lora)
    pm.save_pretrained(tmp_path / "adapter")
    return pm


def check_deltas(pm, path: Path, arch: str, *, tol: float = 1e-6) -> dict:
    """Every module's ΔW from the GGUF file equals PEFT's (max error over max |ΔW| at most ``tol``); returns
    the file's tensors."""
    kv, tensors = read_gguf(path)
    cfg = pm.get_base_model().config
    alpha = kv["adapter.lora.alpha"][0]
    layers = lora_layers(pm)
    assert len(tensors) == 2 * len(layers)
    for module, layer in layers.items():
        name = expected_name(module)
        a, a_ne, _ = tensors[f"{name}.lora_a"]
        b, b_ne, _ = tensors[f"{name}.lora_b"]
        rank = b_ne[0]
        scale = alpha / rank if alpha else 1.0  # llama.cpp's get_scale()
        if name == "token_embd.weight":  # loader: model ne [dim, vocab] vs b.ne[1], a.ne[1]
            assert (a_ne[1], b_ne[1]) == (cfg.vocab_size, cfg.hidden_size) and a_ne[0] == rank
            got = a @ b.T * scale  # rows gathered by token id
        else:  # loader: model ne [in, out]; a.ne = [in, r], b.ne = [r, out]
            assert a_ne[1] == rank and a_ne[0] == layer.in_features and b_ne[1] == layer.out_features
            if LLAMA_CPP_ARCH[arch] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
                b = unpermute(b, heads)
            got = b @ a * scale
        want = layer.get_delta_weight("default").float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= tol, (module, err)
    return tensors


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_gives_peft_deltas(tmp_path, arch):
    pm = make_case(tmp_path, arch)
    res = lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    assert (res.target_form, res.files, res.ops) == ("gguf", ["a.gguf"], {"lora": 2 * len(lora_layers(pm))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "adapter", "base"]  # no temp, no card
    kv, _ = read_gguf(tmp_path / "a.gguf")
    assert kv["general.architecture"] == (LLAMA_CPP_ARCH[arch], "STRING")
    assert kv["general.type"] == ("adapter", "STRING") and kv["adapter.type"] == ("lora", "STRING")
    assert kv["adapter.lora.alpha"] == (8.0, "FLOAT32")  # any other type aborts llama.cpp
    tensors = check_deltas(pm, tmp_path / "a.gguf", arch)
    assert {t for _, _, t in tensors.values()} == {"F32"}


def test_llama_permutation_rslora_patterns_embeddings_and_head(tmp_path):
    """The hard case: GQA q/k permuted, rsLoRA and rank/alpha patterns folded, embedding + untied head."""
    pm = make_case(
        tmp_path,
        "llama",
        ARCHS["llama"][3] + ["embed_tokens", "lm_head"],
        use_rslora=True,
        rank_pattern={"v_proj": 2, "lm_head": 8},
        alpha_pattern={"down_proj": 3},
    )
    res = lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    assert any("folded into lora_b" in w for w in res.warnings)
    tensors = check_deltas(pm, tmp_path / "a.gguf", "llama")
    assert tensors["token_embd.weight.lora_a"][1] == [4, 96]  # (vocab, r): llama.cpp gathers rows by token
    assert tensors["blk.1.attn_v.weight.lora_b"][1] == [2, 16]
    # the permutation is real: without undoing it, q's delta is wrong
    a, b = tensors["blk.0.attn_q.weight.lora_a"][0], tensors["blk.0.attn_q.weight.lora_b"][0]
    want = lora_layers(pm)["model.layers.0.self_attn.q_proj"].get_delta_weight("default")
    assert not torch.allclose(b @ a * 8 / 4, want, atol=1e-3)


def test_plain_adapter_is_written_unscaled(tmp_path):
    """Without rsLoRA or patterns nothing is folded: the factors are PEFT's bytes (as llama.cpp's converter)."""
    from safetensors.torch import load_file

    make_case(tmp_path, "qwen2", ["v_proj", "down_proj"])
    res = lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    assert res.warnings == []
    _, tensors = read_gguf(tmp_path / "a.gguf")
    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert torch.equal(tensors["blk.1.ffn_down.weight.lora_b"][0], b)


@pytest.mark.parametrize(
    ("outtype", "types", "tol"),
    [("f16", {"F16"}, 2e-3), ("bf16", {"BF16"}, 1e-2), ("q8_0", {"Q8_0", "F16"}, 1e-2)],
)
def test_outtypes(tmp_path, outtype, types, tol):
    pm = make_case(tmp_path, "llama", ["q_proj", "down_proj", "embed_tokens"])
    lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf", outtype=outtype)
    tensors = check_deltas(pm, tmp_path / "a.gguf", "llama", tol=tol)
    assert {t for _, _, t in tensors.values()} == types
    if outtype == "q8_0":  # blocks of 32 along a row: lora_a rows are `in` long, lora_b rows r long
        assert tensors["blk.0.ffn_down.weight.lora_a"][2] == "Q8_0"
        assert tensors["blk.0.ffn_down.weight.lora_b"][2] == "F16"
        assert tensors["token_embd.weight.lora_a"][2] == "F16"


def test_base_config_alone_and_unmerged_and_mlx_sources(tmp_path):
    """Only the base's config.json is read; an unmerged checkpoint brings its own; mlx-lm adapters convert too."""
    from tiny import save_unmerged

    pm = make_case(tmp_path, "mistral", ["q_proj", "k_proj", "lm_head"])
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "cfg", output=tmp_path / "a.gguf")
    check_deltas(pm, tmp_path / "a.gguf", "mistral")
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "gguf", output=tmp_path / "u.gguf")
    lc.convert(tmp_path / "adapter", "mlx", base=tmp_path / "base", output=tmp_path / "mlx")
    lc.convert(tmp_path / "mlx", "gguf", base=tmp_path / "cfg" / "config.json", output=tmp_path / "m.gguf")
    _, a = read_gguf(tmp_path / "a.gguf")
    for other in ("u.gguf", "m.gguf"):
        _, b = read_gguf(tmp_path / other)
        assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) for k in a), other


def test_text_part_of_a_vision_language_model(tmp_path):
    """Gemma 3's multimodal checkpoint: the text model's modules (model.language_model.*) become llama.cpp's
    gemma3 tensors, as llama.cpp's converter strips ``language_model``; the vision tower has none."""
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8)
    text.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=16, patch_size=8)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index = 95, 93, 94
    transformers.Gemma3ForConditionalGeneration(cfg).save_pretrained(tmp_path / "base")
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|down_proj)")
    pm.save_pretrained(tmp_path / "adapter")
    lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    kv, _ = read_gguf(tmp_path / "a.gguf")
    assert kv["general.architecture"][0] == "gemma3"
    check_deltas(pm, tmp_path / "a.gguf", "gemma3")
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=r".*(vision_tower|language_model).*\.q_proj")
    pm.save_pretrained(tmp_path / "vision")
    with pytest.raises(lc.UnsupportedError, match="vision_tower.*gemma3 has no tensor"):
        lc.convert(tmp_path / "vision", "gguf", base=tmp_path / "base", output=tmp_path / "v.gguf")


def _refused(tmp_path, exc, match, arch="llama", targets=None, tie=False, base=None, **lora):
    make_case(tmp_path, arch, targets, tie=tie, **lora)
    with pytest.raises(exc, match=match):
        lc.convert(tmp_path / "adapter", "gguf", base=base or tmp_path / "base", output=tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


@pytest.mark.parametrize(
    ("arch", "targets", "tie", "lora", "match"),
    [
        ("qwen2", ["q_proj", "embed_tokens"], True, {}, "ties its output head"),
        ("qwen2", ["lm_head"], True, {}, "ties its output head"),
        ("gemma2", ["lm_head"], False, {}, "gemma2 has no tensor"),
        ("llama", ["q_proj"], False, {"use_dora": True}, "DoRA"),
        ("llama", ["q_proj"], False, {"lora_bias": True}, "lora_bias"),
        ("llama", ["q_proj"], False, {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
    ids=["tied-embed", "tied-head", "gemma2-head", "dora", "lora-bias", "modules-to-save"],
)
def test_unrepresentable_adapters_are_refused(tmp_path, arch, targets, tie, lora, match):
    _refused(tmp_path, lc.UnsupportedError, match, arch, targets, tie, **lora)


def test_unsupported_architecture_is_named(tmp_path):
    from tiny import gpt2

    model = gpt2()
    model.save_pretrained(tmp_path / "base")
    peft_wrap(model, r=4, target_modules=["c_attn"], fan_in_fan_out=True).save_pretrained(tmp_path / "adapter")
    with pytest.raises(lc.UnsupportedError, match="the base is GPT2LMHeadModel"):
        lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")


def test_usage_errors(tmp_path):
    make_case(tmp_path, "llama", ["q_proj"])
    ad, base = tmp_path / "adapter", tmp_path / "base"
    with pytest.raises(lc.RouteError, match="ending in .gguf"):
        lc.convert(ad, "gguf", base=base, output=tmp_path / "out")
    with pytest.raises(lc.RouteError, match='outtype applies to to="gguf" only'):  # the API's words
        lc.convert(ad, "mlx", base=base, output=tmp_path / "m", outtype="f16")
    with pytest.raises(lc.RouteError, match="use outtype"):
        lc.convert(ad, "gguf", base=base, output=tmp_path / "a.gguf", dtype="bf16")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "nowhere/at-all"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lc.RouteError, match="needs the base's config.json"):
        lc.convert(ad, "gguf", output=tmp_path / "a.gguf")
    from click.testing import CliRunner

    from lora_convert.cli import main

    args = ["convert", str(ad), "--to", "gguf", "--base", str(base), "-o", str(tmp_path / "a.gguf")]
    r = CliRunner().invoke(main, [*args, "--push-to", "me/x"])
    assert r.exit_code == 2 and "hf upload" in r.output
    r = CliRunner().invoke(main, [*args, "--outtype", "q4_k"])
    assert r.exit_code == 2 and not (tmp_path / "a.gguf").exists()
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(lc.OutputError, match="already exists"):
        lc.convert(ad, "gguf", base=base, output=tmp_path / "dir.gguf")
    with pytest.raises(lc.OutputError, match="is a folder"):
        lc.convert(ad, "gguf", base=base, output=tmp_path / "dir.gguf", force=True)


def test_output_file_is_atomic(tmp_path):
    """Written beside its target and renamed; an existing file is replaced only with force, and a failure
    (NaN in a factor) leaves the old file and no temp folder."""
    from safetensors.torch import load_file, save_file

    make_case(tmp_path, "llama", ["q_proj", "v_proj"])
    ad, base, out = tmp_path / "adapter", tmp_path / "base", tmp_path / "adapter" / "a.gguf"
    lc.convert(ad, "gguf", base=base, output=out)  # a file beside the inputs is fine
    first = out.read_bytes()
    with pytest.raises(lc.OutputError, match="already exists"):
        lc.convert(ad, "gguf", base=base, output=out)
    sd = load_file(ad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, ad / "adapter_model.safetensors")
    with pytest.raises(lc.AdapterError, match="NaN"):
        lc.convert(ad, "gguf", base=base, output=out, force=True)
    assert out.read_bytes() == first
    assert sorted(p.name for p in ad.iterdir()) == [
        "README.md",
        "a.gguf",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_cli(tmp_path):
    pm = make_case(tmp_path, "qwen3", ["q_proj", "o_proj"])
    r = subprocess.run(
        [sys.executable, "-m", "lora_convert.cli", "convert", str(tmp_path / "adapter"), "--to", "gguf"]
        + ["--base", str(tmp_path / "base"), "-o", str(tmp_path / "a.gguf"), "--outtype", "f16", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == ["a.gguf"]
    check_deltas(pm, tmp_path / "a.gguf", "qwen3", tol=2e-3)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_output_file_made_during_the_run_is_left_alone(tmp_path, monkeypatch, force):
    """A file that appears at -o while a conversion writes (a user, a second run) is never replaced,
    with --force alike (it replaces only what was there at the start); no temp folder stays behind."""
    from lora_convert.io import gguf_sink
    from lora_convert.io.output import TMP_MARK

    make_case(tmp_path, "llama", ["q_proj"])
    out = tmp_path / "a.gguf"
    close = gguf_sink.GgufSink.close

    def close_then_appear(self):
        names = close(self)
        out.write_text("the user's")
        return names

    monkeypatch.setattr(gguf_sink.GgufSink, "close", close_then_appear)
    with pytest.raises(lc.OutputError, match="appeared while this run was writing"):
        lc.convert(tmp_path / "adapter", "gguf", base=tmp_path / "base", output=out, force=force)
    assert out.read_text() == "the user's"
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]

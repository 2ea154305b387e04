"""mlx-lm adapters, both ways: convert --to mlx, mlx -> PEFT, merge of an mlx adapter.

Two references.  Without mlx: the format as mlx-lm's source defines it (``lora_a`` = Aᵀ, ``lora_b`` = Bᵀ,
``W' = W + scale·lora_bᵀ·lora_aᵀ``, embeddings ``E' = E + scale·lora_a·lora_b``), checked against PEFT's
``get_delta_weight``.  Where mlx-lm imports (``pip install "mlx[cpu]" mlx-lm`` on Linux), mlx-lm itself:
its loader runs our adapters against PEFT's logits, and adapters it makes are converted to PEFT and merged.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import peft_as_mlx, peft_load
from safetensors.torch import load_file, save_file
from tiny import SEQ, llama, load_merged, logits, peft_wrap, qwen2
from tiny_archs import lora_layers

import lora_convert as lc
from lora_convert.io.hub import check_complete_output

ROOT = Path(__file__).resolve().parents[1]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_case(tmp_path: Path, targets, *, make=llama, **lora):
    model = make()
    model.save_pretrained(tmp_path / "base")
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    pm = peft_wrap(model, target_modules=targets, **lora)
    pm.save_pretrained(tmp_path / "adapter")
    return pm


def mlx_delta(w: dict, module: str, scale: float, embedding: bool) -> torch.Tensor:
    """ΔW of one module as mlx-lm's ``fuse()`` computes it (tuner/lora.py), in PEFT's (out, in) / (vocab, dim)."""
    a, b = w[f"{module}.lora_a"].float(), w[f"{module}.lora_b"].float()
    return scale * (a @ b) if embedding else scale * (b.T @ a.T)


def test_peft_to_mlx_is_mlx_lm_format_with_peft_deltas(tmp_path):
    """rsLoRA, rank and alpha patterns and an embedding: one rank and one scale, padded and folded, exact."""
    pm = make_case(
        tmp_path,
        ALL + ["embed_tokens", "lm_head"],
        use_rslora=True,
        rank_pattern={"v_proj": 2, "lm_head": 6},
        alpha_pattern={"down_proj": 3},
        lora_dropout=0.05,
    )
    res = lc.convert(tmp_path / "adapter", "mlx", base=tmp_path / "base", output=tmp_path / "mlx")
    assert res.files == ["adapter_config.json", "adapters.safetensors"] and res.target_form == "mlx"
    assert check_complete_output(tmp_path / "mlx") == []  # push takes it as a complete output
    assert any("padded to rank 6" in w for w in res.warnings)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    params = cfg["lora_parameters"]
    assert (cfg["fine_tune_type"], cfg["num_layers"], params["rank"], params["dropout"]) == ("lora", 2, 6, 0.05)
    assert params["scale"] == 8 / 2  # alpha / sqrt(r) of the most common rank, 4
    assert params["keys"] == sorted(
        ["lm_head", "model.embed_tokens"]
        + [f"{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}" for p in ALL]
    )
    w = load_file(tmp_path / "mlx" / "adapters.safetensors")
    layers = lora_layers(pm)
    assert len(w) == 2 * len(layers)
    for module, layer in layers.items():
        embedding = module.endswith("embed_tokens")
        assert w[f"{module}.lora_a"].shape[1] == 6 and w[f"{module}.lora_b"].shape[0] == 6
        want = layer.get_delta_weight("default").float()
        got = mlx_delta(w, module, params["scale"], embedding)
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (module, (got - want).abs().max())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mlx_adapter_to_peft_and_merged(tmp_path, dora):
    pm = make_case(tmp_path, ["q_proj", "v_proj", "down_proj"], use_dora=dora, layers_to_transform=[1])
    want = logits(pm)
    peft_as_mlx(pm, tmp_path / "mlx", 2.0, fine_tune_type="dora" if dora else "lora")
    d = lc.detect(tmp_path / "mlx")
    assert (d.form, d.dialect, d.files, d.adapters[0].dora) == ("adapter", "mlx", ["adapters.safetensors"], dora)
    assert {g.name: (g.layers, g.scalings) for g in d.adapters[0].modules} == {
        n: ([1], [2.0]) for n in ("q_proj", "v_proj", "down_proj")
    }
    lc.merge(tmp_path / "mlx", base=tmp_path / "base", output=tmp_path / "merged")
    assert torch.allclose(logits(load_merged(tmp_path / "merged")), want, atol=1e-5)
    lc.convert(tmp_path / "mlx", "adapter", base=tmp_path / "base", output=tmp_path / "peft")
    got = logits(peft_load(llama, tmp_path / "peft"))  # only layer 1: no missing-key warning
    assert torch.allclose(got, want, atol=1e-5)
    back = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items():
        assert torch.equal(back[k], v), k  # the factors round-trip bit for bit


def test_mlx_folder_with_training_checkpoints_and_a_file(tmp_path):
    """The trainer leaves {iteration:07d}_adapters.safetensors beside the final file: only that one is read;
    a checkpoint named as a file is read with the folder's config."""
    pm = make_case(tmp_path, ["q_proj"])
    peft_as_mlx(pm, tmp_path / "mlx", 2.0)
    w = load_file(tmp_path / "mlx" / "adapters.safetensors")
    save_file({k: v * 0 for k, v in w.items()}, tmp_path / "mlx" / "0000100_adapters.safetensors")
    lc.merge(tmp_path / "mlx", base=tmp_path / "base", output=tmp_path / "m1")
    assert torch.allclose(logits(load_merged(tmp_path / "m1")), logits(pm), atol=1e-5)
    lc.merge(tmp_path / "mlx" / "0000100_adapters.safetensors", base=tmp_path / "base", output=tmp_path / "m0")
    with torch.no_grad(), pm.disable_adapter():
        assert torch.allclose(logits(load_merged(tmp_path / "m0")), logits(pm), atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "exc", "match"),
    [
        ({"fine_tune_type": "full"}, lc.UnsupportedError, "fine_tune_type is full"),
        ({"lora_parameters": {"scale": None}}, lc.AdapterError, "bad lora_parameters"),
        ({"fine_tune_type": "dora"}, lc.AdapterError, "no DoRA magnitude"),
        ({"peft_type": "LORA", "lora_parameters": None}, lc.AdapterError, "PEFT's adapter_config.json"),
    ],
    ids=["full", "no-scale", "dora-without-m", "peft-config"],
)
def test_bad_mlx_adapters_are_refused(tmp_path, edit, exc, match):
    pm = make_case(tmp_path, ["q_proj"])
    peft_as_mlx(pm, tmp_path / "mlx", 2.0)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    for k, v in edit.items():
        if isinstance(v, dict):
            cfg[k].update(v)
        elif v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(exc, match=match):
        lc.detect(tmp_path / "mlx")


MLX_BAD_VALUES = [
    ("fine_tune_type", ["lora"], "fine_tune_type must be a string"),
    ("use_dora", "false", "use_dora must be true or false"),
    ("lora_parameters", [1], "lora_parameters must be an object"),
    ("scale", "2", "lora_parameters.scale must be a finite number"),
    ("scale", True, "lora_parameters.scale must be a finite number"),
    ("scale", float("nan"), "lora_parameters.scale must be a finite number"),
    ("scale", 1e300, "lora_parameters.scale must be a finite number that float32 can hold"),
    ("rank", "4", "lora_parameters.rank must be a positive integer"),
    ("rank", 0, "lora_parameters.rank must be a positive integer"),
    ("dropout", "x", "lora_parameters.dropout must be a number"),
]


@pytest.mark.parametrize(("key", "value", "match"), MLX_BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in MLX_BAD_VALUES])
def test_mlx_config_values_of_the_wrong_type(tmp_path, key, value, match):
    """mlx-lm's adapter_config.json is checked against a schema of types at load, as PEFT's is (issue 12)."""
    pm = make_case(tmp_path, ["q_proj"])
    peft_as_mlx(pm, tmp_path / "mlx", 2.0)
    path = tmp_path / "mlx" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    (cfg["lora_parameters"] if key in ("scale", "rank", "dropout") else cfg)[key] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(lc.AdapterError, match=re.escape(match)) as ei:
        lc.detect(tmp_path / "mlx")
    assert str(path) in str(ei.value)


def test_mlx_edge_cases(tmp_path):
    pm = make_case(tmp_path, ["q_proj"])
    peft_as_mlx(pm, tmp_path / "mlx", 2.0, lora_parameters={"alpha": 16})
    assert any("lora_parameters.alpha is ignored" in w for w in lc.detect(tmp_path / "mlx").warnings)
    with pytest.raises(lc.RouteError, match="already an mlx-lm adapter"):
        lc.convert(tmp_path / "mlx", "mlx", output=tmp_path / "again")
    with pytest.raises(lc.RouteError, match="already a PEFT adapter"):
        lc.convert(tmp_path / "adapter", "adapter", output=tmp_path / "again")
    w = load_file(tmp_path / "mlx" / "adapters.safetensors")
    w["model.layers.0.mlp.switch_mlp.up_proj.lora_a"] = torch.zeros(4, 2, 32)
    w["model.layers.0.mlp.switch_mlp.up_proj.lora_b"] = torch.zeros(4, 48, 2)
    save_file(w, tmp_path / "mlx" / "adapters.safetensors")
    with pytest.raises(lc.UnsupportedError, match="mixture-of-experts"):
        lc.detect(tmp_path / "mlx")
    (tmp_path / "mlx" / "adapter_config.json").unlink()
    with pytest.raises(lc.AdapterError, match="without its adapter_config.json"):
        lc.detect(tmp_path / "mlx")


@pytest.mark.parametrize(
    ("targets", "match", "base"),
    [
        (["q_proj", "embed_tokens"], "ties lm_head to embed_tokens", True),
        (["q_proj", "lm_head"], "needs the base's config.json", False),
    ],
    ids=["tied-embedding", "head-without-config"],
)
def test_unrepresentable_in_mlx(tmp_path, targets, match, base):
    make_case(tmp_path, targets, make=qwen2)
    with pytest.raises(lc.LoraConvertError, match=match):
        lc.convert(tmp_path / "adapter", "mlx", base=tmp_path / "base" if base else None, output=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_mlx_detect_needs_no_torch(tmp_path):
    pm = make_case(tmp_path, ["q_proj"])
    peft_as_mlx(pm, tmp_path / "mlx", 2.0)
    code = "import sys, lora_convert as lc; d = lc.detect(sys.argv[1]); print(d.dialect, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mlx")], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == ["mlx", "False"], r.stderr


# -- against mlx-lm itself ------------------------------------------------------------------------------


# The test extra installs mlx[cpu] and mlx-lm on Linux x86-64 only (pyproject's markers): there they are imported
# plainly, and a broken install fails; elsewhere these two tests skip, and `-ra` names why.
MLX_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"


def _mlx():
    if not MLX_PLATFORM:
        pytest.skip(
            f"mlx[cpu] and mlx-lm are test dependencies on Linux x86-64 only, not {sys.platform}/{platform.machine()}"
        )
    import mlx.core as mx
    import mlx_lm  # noqa: F401 - the reference loader; its absence is a broken install

    mx.zeros(1).item()  # the CPU backend itself works (plain `pip install mlx` on Linux has none)
    return mx


def mlx_logits(mx, base: Path, adapter: Path | None):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(base)
    if adapter is not None:
        load_adapters(model, str(adapter))
    model.eval()
    return torch.from_numpy(__import__("numpy").array(model(mx.array(SEQ.numpy())).astype(mx.float32)))


@pytest.mark.parametrize(
    "lora",
    [
        {"targets": ALL + ["embed_tokens", "lm_head"], "use_rslora": True, "rank_pattern": {"o_proj": 2}},
        {"targets": ["q_proj", "v_proj"], "use_dora": True, "layers_to_transform": [1]},
    ],
    ids=["lora-patterns-embeddings", "dora-one-layer"],
)
def test_mlx_lm_loads_our_adapter_with_peft_logits(tmp_path, lora):
    mx = _mlx()
    pm = make_case(tmp_path, **lora)
    lc.convert(tmp_path / "adapter", "mlx", base=tmp_path / "base", output=tmp_path / "mlx")
    got = mlx_logits(mx, tmp_path / "base", tmp_path / "mlx")
    want = logits(pm)
    assert (want - mlx_logits(mx, tmp_path / "base", None)).abs().max() > 0.1  # the adapter does something
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_made_by_mlx_lm_converts_and_merges(tmp_path, dora):
    """mlx-lm's own adapter (its LoRA layers on the last layer only, saved as its trainer saves them) gives
    mlx-lm's logits as a PEFT adapter and merged into the Hugging Face base."""
    mx = _mlx()
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    llama().save_pretrained(tmp_path / "base")
    model, _ = load_model(tmp_path / "base")
    model.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj", "lm_head"]}
    linear_to_lora_layers(model, 1, params, use_dora=dora)
    mx.random.seed(0)
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.trainable_parameters())}
    (tmp_path / "mlx").mkdir()
    mx.save_safetensors(str(tmp_path / "mlx" / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "dora" if dora else "lora", "num_layers": 1, "lora_parameters": params}
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps({"model": str(tmp_path / "base"), **config}))
    want = mlx_logits(mx, tmp_path / "base", tmp_path / "mlx")
    assert {k.rsplit(".", 1)[0] for k in weights} == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    }
    lc.convert(tmp_path / "mlx", "adapter", output=tmp_path / "peft")  # the base from the config's "model"
    assert torch.allclose(logits(peft_load(llama, tmp_path / "peft")), want, atol=1e-4)
    lc.merge(tmp_path / "mlx", output=tmp_path / "merged")
    assert torch.allclose(logits(load_merged(tmp_path / "merged")), want, atol=1e-4)

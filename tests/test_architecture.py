"""The seams of the architecture: a new dialect is one module, the front door needs no torch,
tied models keep their shared tensor once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import front_door
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, peft_wrap, qwen2, save_unmerged
from toy_dialect import ToyDialect

import lora_convert as lc
from lora_convert import dialects

ROOT = Path(__file__).resolve().parents[1]


def _toy_from_peft(pm, path: Path) -> None:
    """The PEFT model's adapter written in the toy format (down = A, up = B, alpha per module)."""
    cfg = pm.peft_config["default"]
    out = {}
    for name, p in pm.state_dict().items():
        if ".lora_A.default.weight" in name:
            mod = name.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
            out[f"{mod}.down"] = p.detach().clone().contiguous()
            out[f"{mod}.up"] = pm.state_dict()[name.replace("lora_A", "lora_B")].detach().clone().contiguous()
            out[f"{mod}.alpha"] = torch.tensor(float(cfg.alpha_pattern.get(mod.rsplit(".", 1)[-1], cfg.lora_alpha)))
    path.mkdir(parents=True)
    save_file(out, str(path / "toy.safetensors"), metadata={"format": "toy-lora"})


def test_a_toy_dialect_is_one_module_and_merges_exactly(tmp_path):
    model = llama()
    model.save_pretrained(tmp_path / "base")
    pm = peft_wrap(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], alpha_pattern={"down_proj": 3}
    )
    want = logits(pm)
    _toy_from_peft(pm, tmp_path / "toy")
    toy = ToyDialect()
    with pytest.raises(lc.RouteError, match="holds no LoRA tensors"):  # unregistered: no LoRA keys PEFT knows
        lc.merge(tmp_path / "toy", base=tmp_path / "base", output=tmp_path / "m0")
    dialects.register(toy)
    try:
        d = lc.detect(tmp_path / "toy")
        assert (d.form, d.dialect) == ("adapter", "toy")
        assert {g.name: g.scalings for g in d.adapters[0].modules} == {
            "down_proj": [0.75],
            "q_proj": [2.0],
            "v_proj": [2.0],
        }
        res = lc.merge(tmp_path / "toy", base=tmp_path / "base", output=tmp_path / "merged")
    finally:
        dialects.unregister(toy)
    assert res.ops == {"copy": 15, "merge": 6}
    got = logits(load_merged(tmp_path / "merged"))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_front_door_does_not_import_torch(tmp_path):
    pm = peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    save_unmerged(pm, tmp_path / "u")
    kohya = {  # kohya's 0-d alpha is read from the header's offsets, without torch
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 4, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(8, 2, 1, 1),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0, dtype=torch.bfloat16),
    }
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    runs = {
        "detect-kohya": front_door("detect", str(tmp_path / "kohya.safetensors"), "--json"),
        "help": front_door("--help"),
        "detect-adapter": front_door("detect", "fixtures/tiny-llama-lora", "--json"),
        "detect-unmerged": front_door("detect", str(tmp_path / "u")),
        "report": front_door("report", "fixtures/tiny-llama-lora", "--base", "fixtures/tiny-llama-base", "--json"),
        "push-error": front_door("push", str(tmp_path / "nope"), "me/x"),
    }
    for cmd in ("merge", "convert", "extract", "detect", "report", "push", "verify", "combine"):
        runs[f"{cmd}-usage"] = front_door(cmd, "--no-such-option")
        runs[f"{cmd}-help"] = front_door(cmd, "--help")
    for name, r in runs.items():
        assert r.stderr.strip().endswith("NO_TORCH"), (name, r.stderr[-500:])
    assert runs["help"].returncode == 0 and runs["detect-adapter"].returncode == 0
    assert json.loads(runs["detect-kohya"].stdout)["adapters"][0]["modules"][0]["scalings"] == [0.5]
    assert json.loads(runs["report"].stdout)["source_form"] == "adapter"
    assert runs["push-error"].returncode == 1 and runs["merge-usage"].returncode == 2


def test_checks_of_hostile_input_import_no_torch():
    """What detect/report run on every file (escaping, bounded JSON, the config schemas and the bounded
    pattern matcher, header checks, the output's locks) stays torch-free (issue 12)."""
    code = (
        "import sys\n"
        "from lora_convert import arch, config, errors, text\n"
        "from lora_convert.io import files, output, safetensors_format\n"
        "cfg = config.AdapterConfig.from_dict({'r': 4, 'rank_pattern': {'q_proj': 2}})\n"
        "assert cfg.rank_for('model.layers.0.self_attn.q_proj') == 2\n"
        "text.safe('[/bold]\\x1b'), files.MAX_JSON_DEPTH, output.MARKER, arch.MODEL_CONFIG_SCHEMA\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "NO_TORCH", (r.stdout, r.stderr[-500:])


@pytest.mark.parametrize("make", [qwen2, gpt2], ids=["qwen2", "gpt2"])
def test_tied_models_store_the_shared_tensor_once(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path / "base")
    base_keys = set(load_file(tmp_path / "base" / "model.safetensors"))
    targets = ["q_proj", "v_proj"] if make is qwen2 else ["c_attn"]
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=make is gpt2)
    want = logits(pm)
    save_unmerged(pm, tmp_path / "unmerged")
    pm.save_pretrained(tmp_path / "adapter")
    lc.convert(tmp_path / "unmerged", "base", output=tmp_path / "stripped")
    lc.merge(tmp_path / "unmerged", output=tmp_path / "m1")
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m2")
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "attached")
    stripped = load_file(tmp_path / "stripped" / "model.safetensors")
    assert set(stripped) == base_keys
    assert all(torch.equal(stripped[k], v) for k, v in load_file(tmp_path / "base" / "model.safetensors").items())
    for out in ("m1", "m2"):
        assert set(load_file(tmp_path / out / "model.safetensors")) == base_keys, out
        assert torch.allclose(logits(load_merged(tmp_path / out)), want, atol=1e-5), out
    attached = {
        k.removeprefix("base_model.model.").replace(".base_layer", "")
        for k in load_file(tmp_path / "attached" / "model.safetensors")
        if "lora_" not in k
    }
    assert attached == base_keys

"""One rule for which routes take a tuner's modules (routes.TUNER_TAKES): every route and command that does
not take them refuses by name, in one message shape, before anything is written; the table names only routes
and commands that exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import cli, one_error
from peft import IA3Config, LoHaConfig, get_peft_model
from safetensors.torch import save_file
from tiny import llama

from lora_convert import routes

KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_the_table_names_only_routes_and_commands_that_exist():
    known = set(routes.ROUTES) | set(routes.COMMANDS)
    for key, takes in routes.TUNER_TAKES.items():
        assert takes <= known, (key, takes - known)
        assert "verify" in takes and ("adapter", "merged") in takes  # every tuner here merges and is verified
        assert "combine" not in takes  # PEFT's add_weighted_adapter combines LoRA only
    assert routes.tuner_key("kohya", "full", "linear") == "lycoris"
    assert routes.tuner_key("peft", "lokr", "linear") == "lokr"
    assert routes.tuner_key("ia3", "lora", "ia3") == "ia3"
    assert routes.tuner_key("vera", "lora", "linear") == "lora"  # AdaLoRA and VeRA read as LoRA factors


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A tiny Llama's base, a PEFT LoHa and a PEFT IA³ adapter on it, and a LyCORIS LoHa file (kohya names)."""
    root = tmp_path_factory.mktemp("tuners")
    base = llama()
    base.save_pretrained(str(root / "base"))
    configs = {
        "loha": LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    for name, cfg in configs.items():
        get_peft_model(llama(), cfg).save_pretrained(str(root / name))
    torch.manual_seed(0)
    shapes = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}
    (root / "lyco").mkdir()
    sd = {f"{KOHYA}.{k}": torch.randn(s) for k, s in shapes.items()} | {f"{KOHYA}.alpha": torch.tensor(1.0)}
    save_file(sd, str(root / "lyco" / "lyco.safetensors"))
    return root


# (adapter, command line after the adapter's path, the refusal's words): one message shape for each
CASES = [
    ("loha", ["convert", "{a}", "--to", "mlx", "--base", "{b}"], "loha module", "4 LoHa module(s)", "--to mlx"),
    ("loha", ["convert", "{a}", "--to", "adapter"], "loha module", "LoHa modules are merged", "--to adapter"),
    ("loha", ["combine", "{a}", "{a}", "--method", "cat"], "loha module", "4 LoHa module(s)", "combining"),
    ("ia3", ["convert", "{b}", "--to", "base", "--adapter", "{a}"], "ia3 module", "4 IA³ module(s)", "--to base"),
    ("ia3", ["convert", "{a}", "--to", "kohya", "--base", "{b}"], "ia3 module", "IA³ modules are", "--to kohya"),
    ("lyco", ["convert", "{a}", "--to", "unmerged", "--base", "{b}"], "loha module", "from a LyCORIS file", "unmerged"),
    ("lyco", ["combine", "{a}", "{a}", "--method", "cat"], "loha module", "from a LyCORIS file", "combining"),
]


@pytest.mark.parametrize(("adapter", "args", "who", "count", "doing"), CASES)
def test_every_route_that_does_not_take_a_tuner_refuses_it_by_name(made, adapter, args, who, count, doing):
    out = made / f"out-{adapter}"
    argv = [x.format(a=made / adapter, b=made / "base") for x in args]
    line = one_error(cli(*argv, "-o", out), who, count, doing, "does not take them", out=out)
    # the routes that do take them are listed from the table
    assert "merged, verified" in line, line
    if adapter == "lyco":
        assert "written back as a kohya file" in line
    if adapter == "ia3":
        assert "rewritten as a PEFT adapter" in line and "unmerged" not in line.split("are", 1)[1]

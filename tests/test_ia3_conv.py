"""IA³ on convolutions (PEFT's ``ia3.Conv2d``/``Conv3d``: ``ia3_l`` of shape (1, channels, 1, 1[, 1])): a
feed-forward module scales its input channels, another its output channels and its bias.  The merge equals
PEFT's merge_and_unload tensor for tensor, and a tiny UNet's output; what PEFT does not build or merge as a
row or column scale is refused by name.  AdaLoRA builds SVDConv2d (merged as LoRA's (out, in·k·k) matrix);
VeRA wraps linear layers only."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import cli, one_error
from peft import AdaLoraConfig, IA3Config, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import LayerKinds, unet, unet_out

import lora_convert as lc

TOL = 1e-6


class Conv3dKinds(torch.nn.Module):
    """A Conv3d (3×3×3, with a bias) and a pointwise one."""

    def __init__(self) -> None:
        super().__init__()
        self.vol = torch.nn.Conv3d(4, 6, 3, padding=1)
        self.pw3 = torch.nn.Conv3d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw3(self.vol(x))


def _away_from_one(pm, scale: float = 0.5) -> None:
    """PEFT starts ia3_l at ones (W ⊙ 1 would make every test pass)."""
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + torch.randn_like(p) * scale)


def _saved(tmp_path, model, config):
    (tmp_path / "base").mkdir()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    pm = get_peft_model(model, config)
    _away_from_one(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm, base


CONFIGS = {
    # conv (3×3, bias) on its output side, pw (1×1) on its input side, lin on its output side
    "conv-out": (LayerKinds, IA3Config(target_modules=["lin", "conv", "pw"], feedforward_modules=["pw"])),
    # the other way round: conv's input channels (each scales 3×3 kernel elements), pw's outputs and bias
    "conv-in": (LayerKinds, IA3Config(target_modules=["conv", "pw"], feedforward_modules=["conv"])),
    "conv3d": (Conv3dKinds, IA3Config(target_modules=["vol", "pw3"], feedforward_modules=["pw3"])),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_conv_ia3_merges_to_peft_merge_and_unload(tmp_path, case):
    factory, config = CONFIGS[case]
    torch.manual_seed(0)
    pm, base = _saved(tmp_path, factory(), config)
    want = {k: v.detach() for k, v in copy.deepcopy(pm).merge_and_unload().state_dict().items()}
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= TOL, k
    changed = sorted(k for k in want if not torch.equal(want[k], base[k]))
    targets = sorted(config.target_modules)
    biases = [f"{t}.bias" for t in targets if t not in config.feedforward_modules]
    assert changed == sorted([f"{t}.weight" for t in targets] + biases)  # output side: the bias scaled too
    det = lc.detect(tmp_path / "adapter")
    assert det.adapters[0].lora_parameters == pm.get_nb_trainable_parameters()[0]
    v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
    assert v.ok, v
    # verify knows b ⊙ l: a merge that left an output-side bias as it was is caught
    save_file({**got, biases[0]: base[biases[0]]}, str(tmp_path / "merged" / "model.safetensors"))
    v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
    assert {c.tensor: c.status for c in v.checks if c.status != "ok"} == {biases[0]: "not applied"}
    save_file(got, str(tmp_path / "merged" / "model.safetensors"))
    # attached (PEFT's in-model tensors), then stripped and split back: the same tensors
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "u")
    lc.merge(tmp_path / "u", output=tmp_path / "merged2")
    again = load_file(tmp_path / "merged2" / "model.safetensors")
    assert all(torch.equal(again[k], got[k]) for k in got)
    lc.convert(tmp_path / "u", "adapter", output=tmp_path / "split")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in load_file(tmp_path / "split" / "adapter_model.safetensors").items()} == {
        k: v.shape for k, v in saved.items()
    }


def test_conv_ia3_on_a_unet_gives_peft_output(tmp_path):
    """A tiny UNet: ResNet convs (3×3 on the output side, the 1×1 shortcut on its input side) and attention."""
    model = unet()
    model.save_pretrained(str(tmp_path / "unet"))
    config = IA3Config(target_modules=["conv1", "conv_shortcut", "to_q"], feedforward_modules=["conv_shortcut"])
    pm = get_peft_model(unet(), config)
    _away_from_one(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        want = unet_out(pm.base_model.model)  # PEFT's unmerged forward
        assert (want - unet_out(model)).abs().max().item() > 1e-3
    lc.merge(tmp_path / "adapter", base=tmp_path / "unet", output=tmp_path / "merged")
    from diffusers import UNet2DConditionModel

    with torch.no_grad():
        got = unet_out(UNet2DConditionModel.from_pretrained(str(tmp_path / "merged")).eval())
    assert (got - want).abs().max().item() <= 1e-5


class Grouped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g = torch.nn.Conv2d(8, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x)


def test_a_grouped_convolution_on_its_input_side_is_refused_by_name(tmp_path):
    """PEFT scales each group's weights by another slice of ia3_l: no row or column scale of the weight."""
    _saved(tmp_path, Grouped(), IA3Config(target_modules=["g"], feedforward_modules=["g"]))
    out = tmp_path / "out"
    one_error(
        cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out),
        "grouped convolution",
        "8 input channels, 4 per group",
        out=out,
    )


def test_ia3_on_a_conv1d_is_refused_as_peft_refuses_it(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(LayerKinds(), IA3Config(target_modules=["c1"], feedforward_modules=[]))
    # a Linear's (out, 1) vector written under the Conv1d's name
    _saved(tmp_path, LayerKinds(), IA3Config(target_modules=["lin"], feedforward_modules=[]))
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k.replace(".lin.", ".c1."): torch.ones(6, 1) for k in load_file(str(f))}, str(f))
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "target_modules": ["c1"]}))
    out = tmp_path / "out"
    one_error(
        cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out),
        "IA³ on a weight of shape [6, 8, 3]",
        "nn.Conv2d and nn.Conv3d",
        out=out,
    )


def test_adalora_builds_svdconv2d_and_it_merges_as_peft_does(tmp_path):
    """PEFT 0.22's AdaLoRA wraps nn.Conv2d (SVDConv2d: A (r, in·k·k), ΔW reshaped to the kernel)."""
    torch.manual_seed(0)
    model = LayerKinds()
    config = AdaLoraConfig(init_r=4, target_modules=["conv", "lin"], total_step=10, init_lora_weights=False)
    pm, base = _saved(tmp_path, model, config)
    want = {k: v.detach() for k, v in copy.deepcopy(pm).merge_and_unload().state_dict().items()}
    assert not torch.equal(want["conv.weight"], base["conv.weight"])
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= TOL, k
    v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
    assert v.ok, v


def test_vera_on_a_convolution_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="No layers types compatible with VeRA"):
        get_peft_model(LayerKinds(), VeraConfig(r=2, target_modules=["conv"]))
    torch.manual_seed(0)
    _saved(tmp_path, LayerKinds(), VeraConfig(r=2, target_modules=["lin"]))
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    save_file({k.replace(".lin.", ".conv."): v[:12] if "lambda_b" in k else v for k, v in sd.items()}, str(f))
    out = tmp_path / "out"
    one_error(
        cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out),
        "VeRA on a weight of shape [12, 8, 3, 3]",
        "linear layers only",
        out=out,
    )

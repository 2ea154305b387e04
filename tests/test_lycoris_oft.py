"""LyCORIS Diag-OFT and BOFT in a kohya file (``oft_blocks``, ``rescale``, ``alpha`` = the constraint): detect, merge
into a diffusers UNet equal to lycoris-lora's own reading, ``--to kohya`` tensor for tensor, other routes refused.

The reference is ``lycoris-lora`` itself on the tiny UNet of tests/tiny.py: ``DiagOFTModule`` (``ButterflyOFTModule``)
makes the tensors and its ``state_dict`` the file, ``create_lycoris_from_weights`` loads it onto a fresh UNet, then both its forward
(``apply_to``) and its own merge (``merge_to``) are compared.  Diag-OFT rotates a weight's OUTPUT rows
(``W ← rescale ⊙ Rᵀ·W``, R block-diagonal; BOFT: m butterfly stages), unlike PEFT's OFT/BOFT on the input side.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import cli, one_error
from lycoris import create_lycoris_from_weights
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.wrapper import LycorisNetwork
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import unet, unet_out

import lora_convert as lc
from lora_convert import oft_math

TOL = 2e-6
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
SPECS = {  # module -> DiagOFTModule arguments (out rows = blocks · b)
    f"{ATTN}.attn1.to_q": dict(lora_dim=2),  # Linear 8: 4 blocks of 2×2, no constraint, no rescale
    f"{ATTN}.ff.net.0.proj": dict(lora_dim=4, constraint=0.05, rescaled=True),  # Linear 64: 16 of 4×4, clamped
    "down_blocks.0.resnets.0.conv1": dict(lora_dim=2, rescaled=True),  # conv 3×3, out 8
    "up_blocks.0.resnets.0.conv2": dict(lora_dim=4, constraint=1e-3),  # conv 3×3, out 16, clamped hard
}
BLOCKS = {"to_q": 2, "proj": 4, "conv1": 2, "conv2": 4}
BOFT = {  # module -> ButterflyOFTModule arguments: (stages, blocks, b, b) oft_blocks, a full butterfly of the rows
    f"{ATTN}.attn1.to_q": dict(lora_dim=2, constraint=0.05, rescaled=True),  # (3, 4, 2, 2), clamped
    f"{ATTN}.ff.net.0.proj": dict(lora_dim=4),  # Linear 64: (5, 16, 4, 4)
    "down_blocks.0.resnets.0.conv1": dict(lora_dim=2, rescaled=True),  # conv 3×3, out 8: (3, 4, 2, 2)
    "up_blocks.0.resnets.0.conv2": dict(lora_dim=4, constraint=1e-3),  # conv 3×3, out 16: (3, 4, 4, 4), clamped
}
MODULES = {"diag-oft": (DiagOFTModule, SPECS), "boft": (ButterflyOFTModule, BOFT)}


@pytest.fixture(autouse=True)
def kohya_prefix():
    """LyCORIS's loader matches ``<LORA_PREFIX>_<path>``: kohya's ``lora_unet`` for a UNet (restored after)."""
    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    yield
    LycorisNetwork.LORA_PREFIX = old


def _name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def oft_file(model, specs, path=None, *, seed=7, cls=DiagOFTModule):
    """The file LyCORIS saves for Diag-OFT (or BOFT: ``cls``) ``specs`` on ``model``: random blocks (LyCORIS
    starts them at 0) and rescales moved off 1."""
    torch.manual_seed(seed)
    named = dict(model.named_modules())
    sd = {}
    for mod, kw in specs.items():
        m = cls(_name(mod), named[mod], 1.0, **kw)
        with torch.no_grad():
            m.oft_blocks.normal_(0, 0.3)
            if m.rescaled:
                m.rescale.add_(torch.randn_like(m.rescale) * 0.1)
        sd.update({f"{_name(mod)}.{k}": v.detach().clone().contiguous() for k, v in m.state_dict().items()})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return sd


@pytest.mark.parametrize("algo", list(MODULES))
def test_lycoris_oft_merges_as_lycoris_applies_and_merges_it(tmp_path, algo):
    """Diag-OFT and BOFT (its butterfly stages over all the rows: the engine reads the whole tensor's rows)."""
    cls, specs = MODULES[algo]
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    oft_file(base, specs, tmp_path / "k" / "oft.safetensors", cls=cls)
    ref = unet()
    net, _ = create_lycoris_from_weights(1.0, str(tmp_path / "k" / "oft.safetensors"), ref)
    assert len(net.loras) == len(SPECS)
    net.apply_to()
    want = unet_out(ref)
    d = lc.detect(tmp_path / "k")
    groups = {g.name: g for g in d.adapters[0].modules}
    assert {n: g.algorithms for n, g in groups.items()} == {n: [algo] for n in BLOCKS}
    assert {n: g.ranks for n, g in groups.items()} == {n: [b] for n, b in BLOCKS.items()}
    stored = sum(v.numel() for k, v in load_file(str(tmp_path / "k" / "oft.safetensors")).items() if "alpha" not in k)
    assert d.adapters[0].lora_parameters == stored  # oft_blocks and rescale: what LyCORIS trains
    res = lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    assert res.ops == {"copy": 208 - len(SPECS), "merge": len(SPECS)}
    merged = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged")).eval()
    assert (unet_out(merged) - want).abs().max().item() <= TOL
    assert (unet_out(unet()) - want).abs().max().item() > 0.01  # the file does something
    # lycoris-lora's own merge writes the same weights
    theirs = unet()
    create_lycoris_from_weights(1.0, str(tmp_path / "k" / "oft.safetensors"), theirs)[0].merge_to(1.0)
    ours, ts = merged.state_dict(), theirs.state_dict()
    assert max((ours[k] - ts[k]).abs().max().item() for k in ours) <= 1e-6
    changed = [k for k in ours if not torch.equal(ours[k], base.state_dict()[k])]
    assert len(changed) == len(SPECS)
    assert lc.verify(tmp_path / "merged", base=tmp_path / "unet", adapter=tmp_path / "k").ok
    assert not lc.verify(tmp_path / "unet", base=tmp_path / "unet", adapter=tmp_path / "k").ok


def test_the_constraint_clamps_the_skew_part_as_lycoris_does():
    """alpha · out is the bound on ‖Q‖ over all blocks together: below it R is the plain Cayley, above it Q is
    scaled down; the rotation rows equal LyCORIS's ``get_r`` applied to the weight's output side."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 12)
    for constraint in (0.0, 0.02, 10.0):
        m = DiagOFTModule("x", lin, 1.0, lora_dim=3, constraint=constraint)
        with torch.no_grad():
            m.oft_blocks.normal_(0, 0.5)
        r = m.get_r().detach()
        assert torch.allclose(oft_math.lycoris_cayley(m.oft_blocks.detach(), constraint * 12), r, atol=1e-6)
        rot = oft_math.OutputRotation.build(m.oft_blocks.detach(), None, 12, constraint)
        w = lin.weight.detach().clone()
        got = torch.cat([rot.rotate_(w[s : s + 6].clone(), s) for s in (0, 6)])  # two row blocks of whole blocks
        want, _ = m.get_merged_weight(1.0, lin.weight.shape)
        assert torch.allclose(got, want.detach(), atol=1e-6)
    with pytest.raises(ValueError, match="whole 3-row blocks"):
        rot.rotate_(w[1:4].clone(), 1)


@pytest.mark.parametrize("algo", list(MODULES))
def test_a_row_block_plan_reads_whole_rotation_blocks(tmp_path, monkeypatch, algo):
    """With tiles smaller than a rotation block (a tiny budget), the engine still reads whole blocks of b rows
    (BOFT: whole butterflies)."""
    cls, specs = MODULES[algo]
    from lora_convert import lora_math

    real = lora_math.block_rows
    monkeypatch.setattr(lora_math, "block_rows", lambda r, c, budget_bytes=0, elem_bytes=4: real(r, c, 1))
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    spec = {f"{ATTN}.ff.net.0.proj": specs[f"{ATTN}.ff.net.0.proj"]}
    oft_file(base, spec, tmp_path / "k" / "oft.safetensors", cls=cls)
    ref = unet()
    create_lycoris_from_weights(1.0, str(tmp_path / "k" / "oft.safetensors"), ref)[0].merge_to(1.0)
    lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    key = f"{ATTN}.ff.net.0.proj.weight"
    got = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged")).state_dict()[key]
    assert (got - ref.state_dict()[key]).abs().max().item() <= 1e-6


def test_to_kohya_writes_every_tensor_back_and_other_routes_refuse_it(tmp_path):
    sd = oft_file(unet(), SPECS)
    sd |= oft_file(unet(), {"up_blocks.1.resnets.0.conv1": dict(lora_dim=2, rescaled=True)}, cls=ButterflyOFTModule)
    (tmp_path / "k").mkdir()
    save_file(sd, str(tmp_path / "k" / "oft.safetensors"))
    res = cli("convert", tmp_path / "k", "--to", "kohya", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    back = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"algo": "mixed: boft, diag-oft"}
    out = tmp_path / "o2"
    for to in ("diffusers", "mlx"):
        one_error(
            cli("convert", tmp_path / "k", "--to", to, "-o", out), "diag-oft module", "does not take them", out=out
        )


def test_a_weighted_diag_oft_merge_is_refused_by_name(tmp_path):
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    oft_file(base, SPECS, tmp_path / "k" / "oft.safetensors")
    out = tmp_path / "merged"
    res = cli("merge", tmp_path / "unet", "--adapter", f"{tmp_path / 'k'}:0.5", "-o", out)
    one_error(res, "Diag-OFT rotates this weight (R·W, LyCORIS)", "only weight 1", out=out)


TO_Q = _name(f"{ATTN}.attn1.to_q")
PROJ = _name(f"{ATTN}.ff.net.0.proj")
BAD_FILES = {  # what is done to a good file -> the tensor the error names and what it says
    "blocks that do not cover the rows": (
        lambda sd: sd.__setitem__(f"{TO_Q}.oft_blocks", torch.zeros(3, 2, 2)),
        f"{TO_Q}.oft_blocks",
        "3 block(s) of 2×2 do not cover the weight's 8 output rows",
    ),
    "blocks not square": (
        lambda sd: sd.__setitem__(f"{TO_Q}.oft_blocks", torch.zeros(4, 2, 3)),
        f"{TO_Q}.oft_blocks",
        "are not (k, b, b) or (m, k, b, b) blocks",
    ),
    "rescale of another size": (
        lambda sd: sd.__setitem__(f"{PROJ}.rescale", torch.ones(32, 1)),
        f"{PROJ}.rescale",
        "not one scale per row",
    ),
    "missing oft_blocks": (lambda sd: sd.pop(f"{PROJ}.oft_blocks"), f"{PROJ}.", "without oft_blocks"),
    "missing alpha": (lambda sd: sd.pop(f"{TO_Q}.alpha"), f"{TO_Q}.oft_blocks", "without alpha"),
    "BOFT stages LyCORIS does not build": (
        lambda sd: sd.__setitem__(f"{TO_Q}.oft_blocks", torch.zeros(4, 4, 2, 2)),
        f"{TO_Q}.oft_blocks",
        "no butterfly of these stages",
    ),
    "BOFT for another weight": (
        lambda sd: sd.__setitem__(f"{TO_Q}.oft_blocks", torch.zeros(2, 2, 2, 2)),
        f"{TO_Q}.oft_blocks",
        "2 block(s) of 2×2 do not cover the weight's 8 output rows",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_diag_oft_file_is_one_error_naming_file_and_tensor(tmp_path, case):
    change, tensor, message = BAD_FILES[case]
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    sd = oft_file(base, SPECS)
    change(sd)
    (tmp_path / "k").mkdir()
    save_file(sd, str(tmp_path / "k" / "oft.safetensors"))
    before = (tmp_path / "k" / "oft.safetensors").read_bytes()
    out = tmp_path / "merged"
    line = one_error(cli("merge", tmp_path / "k", "--base", tmp_path / "unet", "-o", out), tensor, message, out=out)
    assert "oft.safetensors" in line or str(tmp_path / "k") in line
    assert (tmp_path / "k" / "oft.safetensors").read_bytes() == before

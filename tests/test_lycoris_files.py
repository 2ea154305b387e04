"""LyCORIS files (LoHa, LoKr, full diffs as sd-scripts + LyCORIS write them, kohya-named): detect, merge into a
diffusers UNet, written back with ``--to kohya``, and refused where they do not fit.

The reference is the ``lycoris-lora`` package itself, on a tiny real UNet2DConditionModel: its modules
(``LohaModule``, ``LokrModule``) make the factors and their ``custom_state_dict`` the file, and
``create_lycoris_from_weights`` loads the file back onto a fresh UNet and applies it (``apply_to``): that
forward is what a merge must equal.  Two facts of lycoris-lora 4.1.3 shape the tests:

* its ``merge_to`` applies alpha / dim twice for LoHa and LoKr (``get_diff_weight`` multiplies
  ``get_weight``, already scaled, by the scale again), unlike its own forward, ComfyUI, diffusers'
  ``_bake_lokr_alpha_`` and PEFT: merge_to is the reference only where alpha = dim (scale 1);
* it cannot load its own Tucker LoKr files (``make_module_from_state_dict`` reads the rank off
  ``lokr_w2_a``'s columns, which are ``b`` there): for that layout the module that made the file is the reference.

diffusers 0.42.1 loads LoKr only for Z-Image and Flux2 transformers: it refuses these SD/SDXL UNet files
(asserted below), so it gives no second reference here.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import cli, diffusers_load, one_error
from lycoris import create_lycoris_from_weights
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris.wrapper import LycorisNetwork
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import UNET_XL, clip_text, unet, unet_out

import lora_convert as lc

TOL = 2e-6
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
SPECS = {  # module -> (algorithm, LyCORIS arguments): every stored layout of each algorithm
    f"{ATTN}.attn1.to_q": ("loha", dict(lora_dim=2, alpha=1)),  # Linear, scale 0.5
    "down_blocks.0.resnets.0.conv1": ("loha", dict(lora_dim=2, alpha=3, use_tucker=True)),  # 3×3, Tucker cores
    "up_blocks.1.resnets.0.conv_shortcut": ("loha", dict(lora_dim=2, alpha=4)),  # conv 1×1, flattened factors
    f"{ATTN}.ff.net.0.proj": ("lokr", dict(lora_dim=2, alpha=5, factor=4)),  # w1 whole, w2 = w2_a @ w2_b
    f"{ATTN}.attn2.to_k": ("lokr", dict(lora_dim=1, alpha=3, factor=2, decompose_both=True)),  # w1_a/b and w2_a/b
    "down_blocks.0.downsamplers.0.conv": ("lokr", dict(lora_dim=2, alpha=3, factor=2)),  # both whole, 3×3: scale 1
    "up_blocks.0.resnets.0.conv2": ("lokr", dict(lora_dim=1, alpha=3, factor=4)),  # 3×3, w2_b (r, d·k·k)
    "down_blocks.0.resnets.0.time_emb_proj": ("full", {}),  # diff and diff_b
}
SCALINGS = {"to_q": 0.5, "conv1": 1.5, "conv_shortcut": 2.0, "proj": 2.5, "to_k": 3.0, "conv": 1.0, "conv2": 3.0}


@pytest.fixture(autouse=True)
def kohya_prefix():
    """LyCORIS's loader matches ``<LORA_PREFIX>_<path>``: kohya's ``lora_unet`` for a UNet (restored after)."""
    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    yield
    LycorisNetwork.LORA_PREFIX = old


def _name(path: str, names: dict[str, str] | None = None) -> str:
    return "lora_unet_" + (names or {}).get(path, path).replace(".", "_")


def lycoris_file(model, specs, path=None, *, seed=3, names=None, dtype=None):
    """The file LyCORIS saves for ``specs`` on ``model`` (random factors: LyCORIS starts ΔW at 0), and its
    modules.  A full diff is written as LyCORIS's ``FullModule.custom_state_dict`` does (weight - original)."""
    torch.manual_seed(seed)
    named = dict(model.named_modules())
    sd, mods = {}, []
    for mod, (algo, kw) in specs.items():
        name = _name(mod, names)
        if algo == "full":
            w = named[mod].weight
            sd[f"{name}.diff"] = torch.randn_like(w) * 0.1
            sd[f"{name}.diff_b"] = torch.randn(w.shape[0]) * 0.1
            continue
        m = (LohaModule if algo == "loha" else LokrModule)(name, named[mod], 1.0, **kw)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n != "scalar":
                    p.normal_(0, 0.3)
        sd.update({f"{name}.{k}": v.detach().clone().contiguous() for k, v in m.custom_state_dict().items()})
        mods.append(m)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return sd, mods


def lycoris_forward(path, model=None, **kind):
    """lycoris-lora's own reading of the file, applied (not merged) to a fresh UNet: the reference output."""
    model = model or unet(**kind)
    net, _ = create_lycoris_from_weights(1.0, str(path), model)
    net.apply_to()
    return unet_out(model), len(net.loras)


def _merged(path):
    return unet_out(UNet2DConditionModel.from_pretrained(str(path)).eval())


def test_a_lycoris_file_merges_as_lycoris_applies_it(tmp_path):
    """LoHa (Linear, Tucker 3×3, conv 1×1), LoKr (each side whole or a product, 3×3 kernels) and a full diff with
    its bias in one file: detect names each module's algorithm, and the merge equals lycoris-lora's forward."""
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    lycoris_file(base, SPECS, tmp_path / "k" / "lyco.safetensors")
    want, loaded = lycoris_forward(tmp_path / "k" / "lyco.safetensors")
    assert loaded == len(SPECS)
    d = lc.detect(tmp_path / "k")
    assert (d.dialect, d.form) == ("kohya", "adapter")
    groups = {g.name: g for g in d.adapters[0].modules}
    assert {n: g.algorithms for n, g in groups.items()} == {
        "to_q": ["loha"],
        "conv1": ["loha"],
        "conv_shortcut": ["loha"],
        "proj": ["lokr"],
        "to_k": ["lokr"],
        "conv": ["lokr"],
        "conv2": ["lokr"],
        "time_emb_proj": ["full"],
    }
    assert {n: g.scalings for n, g in groups.items() if n in SCALINGS} == {n: [s] for n, s in SCALINGS.items()}
    stored = sum(v.numel() for k, v in load_file(str(tmp_path / "k" / "lyco.safetensors")).items() if "alpha" not in k)
    assert d.adapters[0].lora_parameters == stored
    res = lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    assert res.ops == {"copy": 208 - len(SPECS) - 1, "merge": len(SPECS), "bias": 1}
    got = _merged(tmp_path / "merged")
    assert (got - want).abs().max().item() <= TOL
    assert (unet_out(unet()) - want).abs().max().item() > 0.1  # the file does something
    assert lc.verify(tmp_path / "merged", base=tmp_path / "unet", adapter=tmp_path / "k").ok  # verify knows each ΔW
    assert not lc.verify(tmp_path / "unet", base=tmp_path / "unet", adapter=tmp_path / "k").ok


def test_text_encoder_lycoris_modules_merge_into_the_text_encoder(tmp_path):
    """LoHa and LoKr on CLIP's attention and MLP, kohya-named from ``text_model`` (``lora_te_text_model_...``), in
    one file with UNet modules: the text encoder's merge equals the LyCORIS modules applied, the UNet part is
    left out and said so."""
    from transformers import CLIPTextModel

    te = clip_text()
    te.save_pretrained(str(tmp_path / "text_encoder"))
    named = dict(te.named_modules())
    torch.manual_seed(4)
    specs = {
        "text_model.encoder.layers.0.self_attn.q_proj": (LohaModule, dict(lora_dim=2, alpha=3)),
        "text_model.encoder.layers.1.mlp.fc1": (LokrModule, dict(lora_dim=1, alpha=2, factor=4)),
    }
    sd, mods = {}, []
    for mod, (cls, kw) in specs.items():
        path = mod if mod in named else mod.removeprefix("text_model.")  # transformers 5 may save CLIP without it
        m = cls("lora_te_" + mod.replace(".", "_"), named[path], 1.0, **kw)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n != "scalar":
                    p.normal_(0, 0.3)
        sd.update({f"{m.lora_name}.{k}": v.detach().clone() for k, v in m.custom_state_dict().items()})
        mods.append(m)
    for m in mods:
        m.apply_to()
    with torch.no_grad():
        want = te(CLIP_SEQ).last_hidden_state
    for m in mods:
        m.restore()
    unet_part, _ = lycoris_file(unet(), {f"{ATTN}.attn1.to_q": SPECS[f"{ATTN}.attn1.to_q"]})
    (tmp_path / "k").mkdir()
    save_file(sd | unet_part, str(tmp_path / "k" / "lyco.safetensors"))
    res = lc.merge(tmp_path / "k", base=tmp_path / "text_encoder", output=tmp_path / "merged")
    assert any(w.startswith("1 module of 'unet' left out") for w in res.warnings), res.warnings
    with torch.no_grad():
        got = CLIPTextModel.from_pretrained(str(tmp_path / "merged")).eval()(CLIP_SEQ).last_hidden_state
    assert (got - want).abs().max().item() <= TOL
    with torch.no_grad():
        assert (te(CLIP_SEQ).last_hidden_state - want).abs().max().item() > 0.01


CLIP_SEQ = torch.tensor([[0, 5, 9, 17, 33, 2]])


def test_tucker_lokr_merges_as_the_lycoris_module_computes_it(tmp_path):
    """LoKr with a Tucker core (``lokr_t2``) on a 3×3 conv: lycoris-lora 4.1.3 cannot load the file it saves
    (see the module docstring), so the reference is the module that made it, applied."""
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    spec = {"up_blocks.1.resnets.0.conv1": ("lokr", dict(lora_dim=1, alpha=2, factor=4, use_tucker=True))}
    sd, (m,) = lycoris_file(base, spec, tmp_path / "k" / "lyco.safetensors")
    assert "lora_unet_up_blocks_1_resnets_0_conv1.lokr_t2" in sd
    with pytest.raises(AttributeError, match="lokr_w2_a"):
        create_lycoris_from_weights(1.0, str(tmp_path / "k" / "lyco.safetensors"), unet())
    m.apply_to()
    want = unet_out(base)
    m.restore()
    lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    assert (_merged(tmp_path / "merged") - want).abs().max().item() <= TOL
    assert (unet_out(base) - want).abs().max().item() > 0.01


def test_at_scale_one_the_merge_equals_lycoris_merge_to(tmp_path):
    """alpha = dim: lycoris-lora's own merge (``merge_to``) and ours write the same weights; with alpha ≠ dim its
    merge_to scales LoHa/LoKr twice (ΔW·s²), which its own forward does not (the reference above)."""
    specs = {m: (a, {**kw, "alpha": kw.get("lora_dim", 0)}) for m, (a, kw) in SPECS.items()}
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    lycoris_file(base, specs, tmp_path / "k" / "lyco.safetensors")
    ref = unet()
    net, _ = create_lycoris_from_weights(1.0, str(tmp_path / "k" / "lyco.safetensors"), ref)
    net.merge_to(1.0)
    lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    ours = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged")).state_dict()
    theirs = ref.state_dict()
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-6
    changed = [k for k in ours if not torch.equal(ours[k], base.state_dict()[k])]
    assert len(changed) == len(SPECS) + 1  # every module's weight, and the full module's bias
    # scale 1.5 (alpha 3, dim 2): lycoris-lora's merge_to adds 1.5² · the product, its forward 1.5 ·
    m = LohaModule("x", torch.nn.Linear(8, 8), 1.0, lora_dim=2, alpha=3)
    with torch.no_grad():
        for p in (m.hada_w1_a, m.hada_w1_b, m.hada_w2_a, m.hada_w2_b):
            p.normal_()
    w0 = m.org_module[0].weight.detach().clone()
    m.merge_to(1.0)
    once = ((m.hada_w1_a @ m.hada_w1_b) * (m.hada_w2_a @ m.hada_w2_b)).detach() * 1.5
    assert torch.allclose(m.org_module[0].weight.detach() - w0, once * 1.5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_to_kohya_writes_every_tensor_back_byte_for_byte(tmp_path, dtype):
    sd, _ = lycoris_file(unet(), SPECS, tmp_path / "k" / "lyco.safetensors", dtype=dtype)
    res = cli("convert", tmp_path / "k", "--to", "kohya", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    back = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k].view(-1), v.view(-1)), k
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "mixed: full, loha, lokr"}


SGM = {  # SDXL kohya names (sd-scripts' SGM UNet) of modules of the SDXL-like tiny UNet (layers_per_block 1)
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2": "output_blocks.1.1.transformer_blocks.0.ff.net.2",
}


def test_sdxl_sgm_named_lycoris_file_merges_and_is_renamed_by_the_base(tmp_path):
    """An SDXL LyCORIS file names UNet blocks as sd-scripts' SGM UNet does: the base's config renumbers them;
    the reference is lycoris-lora applying the same tensors under diffusers' names."""
    base = unet(**UNET_XL)
    base.save_pretrained(str(tmp_path / "unet"))
    kinds = [("loha", dict(lora_dim=2, alpha=1)), ("lokr", dict(lora_dim=2, alpha=4, factor=4))]
    specs = dict(zip(SGM, [*kinds, ("lokr", dict(lora_dim=1, alpha=1, factor=4))], strict=True))
    sd, _ = lycoris_file(base, specs, tmp_path / "sgm" / "lyco.safetensors", names=SGM)
    plain, _ = lycoris_file(base, specs, tmp_path / "d" / "lyco.safetensors")
    assert [v.shape for v in sd.values()] == [v.shape for v in plain.values()]
    save_file(dict(zip(plain, sd.values(), strict=True)), str(tmp_path / "d" / "lyco.safetensors"))  # same tensors
    want, _ = lycoris_forward(tmp_path / "d" / "lyco.safetensors", **UNET_XL)
    res = lc.merge(tmp_path / "sgm", base=tmp_path / "unet", output=tmp_path / "merged")
    assert any("SGM-numbered UNet blocks" in w for w in res.warnings), res.warnings
    assert (_merged(tmp_path / "merged") - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "sgm", "kohya", base=tmp_path / "unet", output=tmp_path / "k2")
    renamed = load_file(str(tmp_path / "k2" / "lora.safetensors"))
    assert renamed.keys() == plain.keys()
    assert all(torch.equal(renamed[k], v) for k, v in zip(plain, sd.values(), strict=True))


def test_routes_that_take_lora_pairs_only_refuse_lycoris_modules_by_name(tmp_path):
    lycoris_file(unet(), {f"{ATTN}.attn1.to_q": SPECS[f"{ATTN}.attn1.to_q"]}, tmp_path / "k" / "lyco.safetensors")
    out = tmp_path / "out"
    one_error(
        cli("convert", tmp_path / "k", "--to", "diffusers", "-o", out), "loha module", "does not take them", out=out
    )
    one_error(cli("convert", tmp_path / "k", "--to", "mlx", "-o", out), "loha module", "does not take them", out=out)
    # diffusers' own loader does not read an SD/SDXL LyCORIS file either (LoKr only for Z-Image and Flux2)
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        diffusers_load(tmp_path / "k", unet())


def test_detect_shows_the_algorithm_and_lora_files_keep_their_json(tmp_path):
    lycoris_file(unet(), SPECS, tmp_path / "k" / "lyco.safetensors")
    res = cli("detect", tmp_path / "k")
    assert res.exit_code == 0, res.output
    rows = [[c.strip() for c in ln.strip("│┃ ").split("│" if "│" in ln else "┃")] for ln in res.output.splitlines()]
    head = next(r for r in rows if r[0] == "module")
    assert head[-1] == "algorithm"
    assert {r[0]: r[-1] for r in rows if len(r) == len(head)}["to_q"] == "loha"
    doc = json.loads(cli("detect", tmp_path / "k", "--json").output)
    assert {g["name"]: g["algorithms"] for g in doc["adapters"][0]["modules"]}["time_emb_proj"] == ["full"]
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1),
        },
        str(tmp_path / "lora.safetensors"),
    )
    doc = json.loads(cli("detect", tmp_path / "lora.safetensors", "--json").output)
    assert "algorithms" not in doc["adapters"][0]["modules"][0]  # LoRA files: detect's JSON as before


TO_Q = _name(f"{ATTN}.attn1.to_q")
TUCKER = _name("down_blocks.0.resnets.0.conv1")
PROJ = _name(f"{ATTN}.ff.net.0.proj")
TIME = _name("down_blocks.0.resnets.0.time_emb_proj")


def _drop(key):
    return lambda sd: sd.pop(key)


def _put(key, value):
    return lambda sd: sd.__setitem__(key, value)


BAD_FILES = {  # what is done to a good file -> the tensor the error names and what it says
    "missing factor": (_drop(f"{TO_Q}.hada_w2_b"), f"{TO_Q}.hada_w1_a", "LoHa module without hada_w2_b"),
    "factors that do not multiply": (
        _put(f"{TO_Q}.hada_w2_b", torch.ones(3, 8)),
        f"{TO_Q}.hada_w2_a",
        "hada_w2_a [8, 2] and hada_w2_b [3, 8] do not multiply",
    ),
    "halves of two shapes": (_put(f"{TO_Q}.hada_w2_b", torch.ones(2, 6)), f"{TO_Q}.hada_w2_a", "not one shape"),
    "one Tucker core": (_drop(f"{TUCKER}.hada_t2"), f"{TUCKER}.hada_t1", "hada_t1 alone"),
    "LoKr without w2": (_drop(f"{PROJ}.lokr_w2_a"), f"{PROJ}.lokr_w2_b", "without lokr_w2 or lokr_w2_a"),
    "LoKr w1 whole and halved": (_put(f"{PROJ}.lokr_w1_a", torch.ones(4, 2)), f"{PROJ}.lokr_w1_a", "both stored"),
    "LoKr halves of two ranks": (
        lambda sd: (
            sd.update({f"{PROJ}.lokr_w1_a": torch.ones(4, 3), f"{PROJ}.lokr_w1_b": torch.ones(3, 2)})
            or sd.pop(f"{PROJ}.lokr_w1")
        ),
        f"{PROJ}.lokr_w2_b",
        "loaders disagree",
    ),
    "diff_b of another size": (_put(f"{TIME}.diff_b", torch.ones(7)), f"{TIME}.diff_b", "is not the bias"),
    "alpha beside diff": (_put(f"{TIME}.alpha", torch.tensor(1.0)), f"{TIME}.alpha", "no scale"),
    "weight_decompose": (_put(f"{TO_Q}.dora_scale", torch.ones(8, 1)), f"{TO_Q}.dora_scale", "weight_decompose"),
    "algorithms mixed": (_put(f"{TO_Q}.lokr_w1", torch.ones(2, 2)), f"{TO_Q}.lokr_w1", "uses one algorithm"),
    "integer factor": (_put(f"{TO_Q}.hada_w1_b", torch.ones(2, 8, dtype=torch.int32)), f"{TO_Q}.hada_w1_b", "I32"),
    # factors that fit each other but not the base weight: found at the merge, before anything is written
    "LoKr of another weight": (
        _put(f"{PROJ}.lokr_w1", torch.ones(2, 2)),
        f"{PROJ}.lokr_w1",
        "kron of w1 [2, 2] and w2 [16, 4] has 256 elements, the weight [64, 8] has 512",
    ),
    "diff of another weight": (_put(f"{TIME}.diff", torch.ones(8, 16)), f"{TIME}.diff", "diff [8, 16] is not"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_lycoris_file_is_one_error_naming_file_and_tensor(tmp_path, case):
    change, tensor, message = BAD_FILES[case]
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    sd, _ = lycoris_file(base, SPECS)
    change(sd)
    (tmp_path / "k").mkdir()
    save_file(sd, str(tmp_path / "k" / "lyco.safetensors"))
    before = (tmp_path / "k" / "lyco.safetensors").read_bytes()
    out = tmp_path / "merged"
    line = one_error(cli("merge", tmp_path / "k", "--base", tmp_path / "unet", "-o", out), tensor, message, out=out)
    assert "lyco.safetensors" in line or str(tmp_path / "k") in line
    assert (tmp_path / "k" / "lyco.safetensors").read_bytes() == before


def test_report_counts_each_lycoris_algorithm_by_its_own_formula(tmp_path):
    """Per token every algorithm is one x @ ΔWᵀ; a merge costs LoHa its two rank-r products, LoKr and a full diff
    only the add (a full diff's 'rank' is its matrix's, which a LoRA formula would have multiplied in)."""
    from lora_convert.costs import lora_module_flops, merge_module_flops
    from lora_convert.inputs import load_source

    lycoris_file(unet(), SPECS, tmp_path / "k" / "lyco.safetensors")
    ck, inv = load_source(tmp_path / "k")
    try:
        mods = list(inv.modules(inv.adapters[0]).values())
        assert sorted({m.tuner for m in mods}) == ["full", "loha", "lokr"]
        for m in mods:
            area = m.in_features * m.out_features
            assert lora_module_flops(m) == 2 * area, m.module
            assert merge_module_flops(m) == (4 * m.rank * area + area if m.tuner == "loha" else area), m.module
    finally:
        ck.close()

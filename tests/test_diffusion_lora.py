"""Image-model LoRA: kohya (sd-scripts) files, diffusers' own LoRA files and PEFT adapters of a UNet,
merged into a diffusers UNet folder and converted into each other.

References, all on a tiny real UNet2DConditionModel (Linear, conv 1×1 and conv 3×3 layers, a stride-2
downsampler): PEFT's unmerged forward (``unet.add_adapter``), diffusers' own loading of each file
(``lora_state_dict`` + ``load_lora_adapter``, with kohya files only where all alphas are equal: with
unequal ones diffusers itself departs from kohya, see notes/kohya.md) and sd-scripts' merge formula,
``conv2d(down.permute(1, 0, 2, 3), up)`` for a 3×3 conv, computed here independently of lora_math.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import diffusers_load
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import UNET_XL, clip_text, peft_unet, unet, unet_out

import lora_convert as lc

TOL = 2e-6
KOHYA_MODULES = {  # module -> (rank, alpha or None): Linear, conv 1×1, conv 3×3 (stride 2 too), no alpha, alpha 0
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, 2.0),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (4, 2.0),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (4, 2.0),
    "down_blocks.0.attentions.0.proj_in": (4, 3.0),
    "up_blocks.1.resnets.0.conv_shortcut": (2, 1.0),
    "down_blocks.0.resnets.0.time_emb_proj": (4, 2.0),
    "down_blocks.0.resnets.0.conv1": (2, 1.0),
    "down_blocks.0.downsamplers.0.conv": (2, 0.0),
    "up_blocks.0.upsamplers.0.conv": (2, None),
}


def _save(model, path):
    model.save_pretrained(str(path))
    return path


def _load_unet(path):
    return UNet2DConditionModel.from_pretrained(str(path)).eval()


def _kohya_file(model, modules, path, *, prefix="lora_unet", names=None, seed=3):
    """A kohya file as sd-scripts writes one: down (r, in[, k, k]), up (out, r[, 1, 1]), 0-d alpha."""
    torch.manual_seed(seed)
    named = dict(model.named_modules())
    sd = {}
    for mod, (r, alpha) in modules.items():
        m = named[mod]
        name = f"{prefix}_{(names or {}).get(mod, mod).replace('.', '_')}"
        if isinstance(m, torch.nn.Conv2d):
            sd[f"{name}.lora_down.weight"] = torch.randn(r, m.in_channels, *m.kernel_size) * 0.3
            sd[f"{name}.lora_up.weight"] = torch.randn(m.out_channels, r, 1, 1) * 0.3
        else:
            sd[f"{name}.lora_down.weight"] = torch.randn(r, m.in_features) * 0.3
            sd[f"{name}.lora_up.weight"] = torch.randn(m.out_features, r) * 0.3
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)  # saved in the training dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})
    return sd


def sd_scripts_delta(down, up, alpha):
    """sd-scripts' ``LoRAInfModule.merge_to``, in fp32: scale = alpha / r, alpha missing or 0 -> r."""
    r = down.shape[0]
    scale = (alpha if alpha else r) / r
    down, up = down.float(), up.float()
    if down.dim() == 2:
        return up @ down * scale
    if down.shape[2:4] == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_of_a_unet_merges_exactly(tmp_path, dora):
    """PEFT's own adapter folder of a UNet (conv LoRA and conv DoRA included): merged output = PEFT's."""
    model, want = peft_unet(tmp_path, dora=dora)
    (tmp_path / "adapter").mkdir()
    sd = get_peft_model_state_dict(model)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(tmp_path / "adapter"))
    d = lc.detect(tmp_path / "adapter")
    assert {g.name: g.scalings for g in d.adapters[0].modules}["conv1"] == [4.0]  # alpha 8, rank_pattern 2
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "unet", output=tmp_path / "merged")
    assert res.files == ["diffusion_pytorch_model.safetensors"]
    assert res.ops == {"copy": 208 - 54, "dora" if dora else "merge": 54}
    got = unet_out(_load_unet(tmp_path / "merged"))
    assert (got - want).abs().max().item() <= TOL
    assert (unet_out(_load_unet(tmp_path / "unet")) - want).abs().max().item() > 0.1  # the LoRA does something
    # the same adapter as diffusers' file (component read from the module names): diffusers loads it exactly
    lc.convert(tmp_path / "adapter", "diffusers", output=tmp_path / "d")
    assert (diffusers_load(tmp_path / "d", unet()) - want).abs().max().item() <= TOL
    if not dora:  # and as a kohya file, which our merge reads back exactly
        lc.convert(tmp_path / "adapter", "kohya", output=tmp_path / "k")
        lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "m2")
        assert (unet_out(_load_unet(tmp_path / "m2")) - want).abs().max().item() <= TOL


def test_diffusers_file_merges_and_converts_to_kohya_and_back(tmp_path):
    model, want = peft_unet(tmp_path)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "dlora"),
        unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    d = lc.detect(tmp_path / "dlora")
    assert (d.dialect, d.form, d.module_prefixes) == ("diffusers", "adapter", {"unet": "unet."})
    scal = {g.name: g.scalings for g in d.adapters[0].modules}
    assert scal["proj_in"] == [0.75] and scal["to_k"] == [1.25] and scal["conv1"] == [4.0] and scal["to_q"] == [2.0]

    res = lc.merge(tmp_path / "dlora", base=tmp_path / "unet", output=tmp_path / "m1")
    assert "adapter modules under 'unet.' matched the base's top level (54 modules)" in res.warnings
    assert (unet_out(_load_unet(tmp_path / "m1")) - want).abs().max().item() <= TOL

    res = lc.convert(tmp_path / "dlora", "kohya", output=tmp_path / "kohya")
    assert res.files == ["lora.safetensors"] and res.ops == {"lora": 108, "alpha": 54}
    with safe_open(str(tmp_path / "kohya" / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        proj_alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.alpha")
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert proj_alpha.shape == () and proj_alpha.item() == 3.0
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "8"}  # conv1 r=2; the sampler r=4
    assert lc.detect(tmp_path / "kohya").dialect == "kohya"
    lc.merge(tmp_path / "kohya", base=tmp_path / "unet", output=tmp_path / "m2")
    assert (unet_out(_load_unet(tmp_path / "m2")) - want).abs().max().item() <= TOL

    res = lc.convert(tmp_path / "kohya", "diffusers", output=tmp_path / "back")
    assert res.files == ["pytorch_lora_weights.safetensors"]
    back = set(load_file(str(tmp_path / "back" / "pytorch_lora_weights.safetensors")))
    assert back == set(load_file(str(tmp_path / "dlora" / "pytorch_lora_weights.safetensors")))
    got = diffusers_load(tmp_path / "back", unet())  # diffusers reads our metadata: patterns included
    assert (got - want).abs().max().item() <= TOL


def test_kohya_merge_is_sd_scripts_formula(tmp_path):
    """Every merged weight is W + sd-scripts' delta (missing alpha and alpha 0 mean alpha = rank); all
    other tensors are the base's bytes."""
    base = unet()
    _save(base, tmp_path / "unet")
    k = _kohya_file(base, KOHYA_MODULES, tmp_path / "k" / "my_lora.safetensors")
    d = lc.detect(tmp_path / "k" / "my_lora.safetensors")
    assert d.dialect == "kohya"
    assert any("without .alpha" in w for w in d.warnings)
    res = lc.merge(tmp_path / "k" / "my_lora.safetensors", base=tmp_path / "unet", output=tmp_path / "merged")
    assert res.ops == {"copy": 198, "merge": 10}
    got = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    w0 = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    for mod, (_, alpha) in KOHYA_MODULES.items():
        name = "lora_unet_" + mod.replace(".", "_")
        want = w0[f"{mod}.weight"] + sd_scripts_delta(k[f"{name}.lora_down.weight"], k[f"{name}.lora_up.weight"], alpha)
        assert (got[f"{mod}.weight"] - want).abs().max().item() <= 1e-6, mod
    changed = {f"{m}.weight" for m in KOHYA_MODULES}
    assert all(torch.equal(got[key], w0[key]) for key in w0 if key not in changed)
    # attached to the base (PEFT's in-model layout, renamed config) and merged from there: the same bytes
    lc.convert(tmp_path / "k", "unmerged", base=tmp_path / "unet", output=tmp_path / "unmerged")
    lc.merge(tmp_path / "unmerged", output=tmp_path / "merged2")
    again = load_file(str(tmp_path / "merged2" / "model.safetensors"))
    assert again.keys() == got.keys() and all(torch.equal(again[key], got[key]) for key in got)


def test_kohya_file_with_equal_alphas_as_diffusers_loads_it(tmp_path):
    """Where diffusers follows kohya's alphas (all equal), its unmerged forward is our merged one, and
    our diffusers file of the same LoRA loads to the same output too."""
    base = unet()
    _save(base, tmp_path / "unet")
    mods = {m: (r, 2.0) for m, (r, _) in KOHYA_MODULES.items()}
    _kohya_file(base, mods, tmp_path / "k" / "lora.safetensors")
    want = diffusers_load(tmp_path / "k", unet(), weight_name="lora.safetensors")
    lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    assert (unet_out(_load_unet(tmp_path / "merged")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "k", "diffusers", output=tmp_path / "d")  # names read without the model
    assert (diffusers_load(tmp_path / "d", unet()) - want).abs().max().item() <= TOL
    with pytest.raises(lc.RouteError, match="PEFT-style form is diffusers' LoRA file.*--to diffusers"):
        lc.convert(tmp_path / "k", "adapter", output=tmp_path / "peft")


SGM_NAMES = {  # SDXL kohya names (sd-scripts' SGM UNet) of modules of the SDXL-like tiny UNet
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.proj_in": "input_blocks.3.1.proj_in",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.3.0.skip_connection",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2": "output_blocks.1.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.2.0.skip_connection",
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
}


def test_sdxl_sgm_names_are_renumbered_by_the_base_config(tmp_path):
    base = unet(**UNET_XL)
    _save(base, tmp_path / "unet")
    mods = {m: (2, 1.0) for m in SGM_NAMES}
    _kohya_file(base, mods, tmp_path / "k" / "lora.safetensors", names=SGM_NAMES)
    fresh = unet(**UNET_XL)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(tmp_path / "k"), weight_name="lora.safetensors", unet_config=fresh.config
    )
    fresh.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, adapter_name="x")
    want = unet_out(fresh)
    res = lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    assert any("SGM-numbered UNet blocks" in w for w in res.warnings), res.warnings
    assert (unet_out(_load_unet(tmp_path / "merged")) - want).abs().max().item() <= TOL
    with pytest.raises(lc.RouteError, match="SGM-numbered blocks cannot be read .*pass --base"):
        lc.convert(tmp_path / "k", "diffusers", output=tmp_path / "d")
    lc.convert(tmp_path / "k", "diffusers", base=tmp_path / "unet", output=tmp_path / "d")
    assert (diffusers_load(tmp_path / "d", unet(**UNET_XL)) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "k", "kohya", base=tmp_path / "unet", output=tmp_path / "k2")  # renamed to diffusers'
    keys = set(load_file(str(tmp_path / "k2" / "lora.safetensors")))
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in keys


CLIP_SEQ = torch.tensor([[0, 5, 9, 17, 33, 2]])


def _clip_out(model):
    with torch.no_grad():
        return model(CLIP_SEQ).last_hidden_state


def test_text_encoder_lora_merges_into_its_own_folder_and_is_left_out_of_the_unet(tmp_path):
    """One kohya file for a pipeline: its UNet modules merge into the UNet folder, its text-encoder
    modules into the text encoder's (transformers 5 saves CLIP without ``text_model.``, kohya's names keep
    it); each merge says which part it left out.  Reference for the text encoder: PEFT's unmerged forward
    with the same factors (diffusers 0.42.1's own loader drops kohya's text-encoder attention LoRA)."""
    from peft import inject_adapter_in_model
    from transformers import CLIPTextModel

    u, te = unet(), clip_text()
    _save(u, tmp_path / "unet")
    _save(te, tmp_path / "text_encoder")
    torch.manual_seed(2)
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "fc1"], init_lora_weights=False)
    peft_te = inject_adapter_in_model(cfg, clip_text())
    want = _clip_out(peft_te)
    te_sd = {}
    for n, p in peft_te.named_parameters():
        if ".lora_A." in n:
            name = "lora_te_text_model_" + n.split(".lora_A.")[0].replace(".", "_")
            te_sd[f"{name}.lora_down.weight"] = p.detach().clone()
            te_sd[f"{name}.lora_up.weight"] = peft_te.get_parameter(n.replace("lora_A", "lora_B")).detach().clone()
            te_sd[f"{name}.alpha"] = torch.tensor(6.0)
    assert len(te_sd) == 12
    unet_sd = _kohya_file(u, {m: (r, 2.0) for m, (r, _) in KOHYA_MODULES.items()}, tmp_path / "b.safetensors")
    (tmp_path / "k").mkdir()
    save_file(te_sd | unet_sd, str(tmp_path / "k" / "lora.safetensors"))
    res = lc.merge(tmp_path / "k", base=tmp_path / "text_encoder", output=tmp_path / "te_merged")
    assert "adapter modules under 'text_encoder.text_model.' matched the base's top level (4 modules)" in res.warnings
    assert any(w.startswith("10 modules of 'unet' left out") for w in res.warnings), res.warnings
    merged = CLIPTextModel.from_pretrained(str(tmp_path / "te_merged")).eval()
    assert (_clip_out(merged) - want).abs().max().item() <= TOL
    assert (_clip_out(te) - want).abs().max().item() > 0.01
    res = lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "unet_merged")
    assert any(w.startswith("4 modules of 'text_encoder' left out") for w in res.warnings), res.warnings
    res = lc.convert(tmp_path / "k", "diffusers", base=tmp_path / "unet", output=tmp_path / "d")
    assert any(w.startswith("4 modules of 'text_encoder' kept under their own names") for w in res.warnings)
    keys = set(load_file(str(tmp_path / "d" / "pytorch_lora_weights.safetensors")))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in keys and len(keys) == 2 * 14


def test_diffusers_transformer_lora_merges_into_the_transformer_folder(tmp_path):
    """A Flux-style transformer (diffusers' ``transformer.`` LoRA files): merged output equals PEFT's
    unmerged one, also through the kohya file (``lora_transformer_``, names settled by the base)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    kw = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8)
    kw |= dict(num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    model = FluxTransformer2DModel(**kw).eval()
    _save(model, tmp_path / "transformer")
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(4, 3),
        txt_ids=torch.zeros(3, 3),
    )
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out", "ff.net.2"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        want = model(**inputs).sample
    FluxPipeline.save_lora_weights(
        str(tmp_path / "lora"),
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    for src in ("lora", "kohya"):
        if src == "kohya":
            lc.convert(tmp_path / "lora", "kohya", output=tmp_path / "kohya")
        res = lc.merge(tmp_path / src, base=tmp_path / "transformer", output=tmp_path / f"merged-{src}")
        assert res.files == ["diffusion_pytorch_model.safetensors"] and res.ops["merge"] == 12
        with torch.no_grad():
            got = FluxTransformer2DModel.from_pretrained(str(tmp_path / f"merged-{src}")).eval()(**inputs).sample
        assert (got - want).abs().max().item() <= TOL, src


def test_a_name_the_base_spells_twice_is_refused(tmp_path):
    base = unet()
    _save(base, tmp_path / "unet")
    f = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["down_blocks_0.attentions.0.proj_in.weight"] = sd["down_blocks.0.attentions.0.proj_in.weight"].clone()
    save_file(sd, str(f))
    _kohya_file(base, {"down_blocks.0.attentions.0.proj_in": (2, 1.0)}, tmp_path / "k" / "lora.safetensors")
    with pytest.raises(lc.AdapterError, match="can be read as more than one module of the base"):
        lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "key, error, message",
    [
        ("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a", lc.AdapterError, r"hada_w1_a \(loha\) beside"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale", lc.UnsupportedError, "LyCORIS weight_decompose"),
        ("bundle_emb.my_token.string_to_param.*", lc.UnsupportedError, "textual-inversion embeddings"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.bias", lc.AdapterError, "not a kohya LoRA or LyCORIS key"),
    ],
)
def test_what_kohya_files_hold_beside_lora_is_refused_by_name(tmp_path, key, error, message):
    sd = _kohya_file(unet(), {"down_blocks.0.resnets.0.conv1": (2, 1.0)}, tmp_path / "k" / "lora.safetensors")
    save_file(sd | {key: torch.zeros(2)}, str(tmp_path / "k" / "lora.safetensors"))
    with pytest.raises(error, match=message) as e:
        lc.detect(tmp_path / "k")
    assert key in str(e.value)


def test_a_pipeline_folder_as_base_points_to_its_components(tmp_path):
    _save(unet(), tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _kohya_file(unet(), {"down_blocks.0.resnets.0.conv1": (2, 1.0)}, tmp_path / "k" / "lora.safetensors")
    with pytest.raises(lc.CheckpointError, match=r"a diffusers pipeline folder.*e\.g\. unet/"):
        lc.merge(tmp_path / "k", base=tmp_path / "pipe", output=tmp_path / "merged")


def test_half_a_kohya_pair_is_an_error(tmp_path):
    sd = _kohya_file(unet(), {"down_blocks.0.resnets.0.conv1": (2, 1.0)}, tmp_path / "k" / "lora.safetensors")
    del sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    save_file(sd, str(tmp_path / "k" / "lora.safetensors"))
    with pytest.raises(lc.AdapterError, match="lora_up is missing"):
        lc.detect(tmp_path / "k")


def test_what_kohya_cannot_hold_is_refused(tmp_path):
    from tiny import llama, peft_wrap

    pm = peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "llm"))
    with pytest.raises(lc.RouteError, match="cannot tell which part of a diffusion pipeline"):
        lc.convert(tmp_path / "llm", "kohya", output=tmp_path / "out")
    model, _ = peft_unet(tmp_path, dora=True)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "dora"),
        unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    with pytest.raises(lc.UnsupportedError, match="DoRA has no kohya LoRA form"):
        lc.convert(tmp_path / "dora", "kohya", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_detect_names_the_dialect(tmp_path):
    from click.testing import CliRunner

    from lora_convert.cli import main

    _kohya_file(unet(), KOHYA_MODULES, tmp_path / "k" / "lora.safetensors")
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert "dialect: kohya" in r.stdout and "'unet.' (unet)" in r.stdout
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "k"), "--json"])
    d = json.loads(r.stdout)
    assert d["dialect"] == "kohya"
    assert {g["name"]: g["scalings"] for g in d["adapters"][0]["modules"]}["conv"] == [1.0]  # two samplers: α 0, none


@pytest.mark.parametrize("alpha", [1e300, float("inf"), float("nan")])
def test_kohya_alpha_that_float32_cannot_hold_is_refused(tmp_path, alpha):
    """An F64 alpha beyond float32 would make the fp32 merge write Inf weights with exit 0 (issue 12, class 3)."""
    base = unet()
    mods = {"down_blocks.0.attentions.0.proj_in": (4, 3.0)}
    k = _kohya_file(base, mods, tmp_path / "k" / "my_lora.safetensors")
    k["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = torch.tensor(alpha, dtype=torch.float64)
    save_file(k, str(tmp_path / "k" / "my_lora.safetensors"), metadata={"ss_network_module": "networks.lora"})
    with pytest.raises(lc.AdapterError, match="alpha is not a finite number that float32 can hold"):
        lc.detect(tmp_path / "k" / "my_lora.safetensors")

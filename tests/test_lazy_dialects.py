"""The dialect registry imports a dialect's module only for a checkpoint that may be its own (issue 26, start-up):
each built-in lazy dialect's ``may_claim`` must hold wherever the dialect's own ``claims`` does — a miss would read
a VeRA, IA³, AdaLoRA, diffusers, kohya or MLX checkpoint as PEFT — and a merge of a PEFT adapter imports none of
them (nor the batch, re-quantization and LoHa/LoKr modules it has no use for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lora_convert import dialects, diffusion_names

ROOT = Path(__file__).resolve().parents[1]
LAZY = [d for d in dialects.DIALECTS if isinstance(d, dialects.LazyDialect)]

# Pieces of real tensor names of every dialect (and near misses), joined by dots into names.
PIECES = [
    "base_model", "model", "layers", "0", "self_attn", "q_proj", "mlp", "default", "weight", "bias",
    "lora_A", "lora_B", "lora_E", "ranknum", "ia3_l", "vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B",
    "lora_a", "lora_b", "lora_magnitude_vector", "hada_w1_a", "lokr_w1", "alpha", "lora_down", "lora_up",
    "unet", "transformer", "text_encoder", "text_encoder_2", "lora_unet_down_blocks_0_attn1_to_q",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_transformer_blocks_0_attn_to_k", "lora_te_x",
    "lora_unet", "Lora_A", "ia3", "vera", "lora",
    "oft_R", "oft_embedding_R", "oft_r", "boft_R", "boft_s", "hra_u", "shira_weight", "shira_indices",
    "fourierft_spectrum", "vblora_logits_A", "vblora_logits_B_topk_indices", "vblora_vector_bank", "delora_A",
    "delora_lambda", "c3a_kernel", "randlora_lambda", "randlora_gamma", "randlora_A", "oft", "hra",
    "miss_block", "road_theta", "road_alpha",
]  # fmt: skip
PEFT_TYPES = [
    None, "LORA", "VERA", "IA3", "ADALORA", "vera", "ia3", "AdaLoRA", "LOHA", "not a type",
    "OFT", "BOFT", "hra", "SHIRA", "FourierFT", "VBLORA", "DELORA", "C3A", "RANDLORA", "MISS", "ROAD",
]  # fmt: skip


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, Path]:
    """An adapter_config.json per peft_type (None: one without the key); "broken": not JSON."""
    root = tmp_path_factory.mktemp("configs")
    out: dict[str | None, Path] = {}
    for i, t in enumerate(PEFT_TYPES):
        p = root / str(i) / "adapter_config.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"r": 4, "lora_alpha": 8} | ({"peft_type": t} if t is not None else {})))
        out[t] = p
    broken = root / "broken" / "adapter_config.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    out["broken"] = broken
    return out


def _ck(names: list[str], config: Path | None, metadata: bool) -> SimpleNamespace:
    """What ``claims`` reads of a checkpoint: tensor names, the file's metadata, the adapter config's path."""
    meta = {"lora_adapter_metadata": "{}"} if metadata else {}
    return SimpleNamespace(tensors=dict.fromkeys(names), metadata=meta, adapter_config_path=config, root=Path("."))


names = st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map(".".join), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=names, peft_type=st.sampled_from([*PEFT_TYPES, "broken", "none"]), metadata=st.booleans())
@example(names=["base_model.model.layers.0.q_proj.lora_E"], peft_type="none", metadata=False)
@example(names=["model.layers.0.q_proj.ia3_l.default"], peft_type="LORA", metadata=False)
@example(names=["layers.0.q_proj.vera_lambda_b"], peft_type="IA3", metadata=False)
@example(names=["unet.down.lora_A.weight", "unet.down.lora_B.weight"], peft_type="none", metadata=False)
@example(names=["transformer.x.lora_A.weight"], peft_type="none", metadata=True)
@example(names=["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"], peft_type="none", metadata=False)
@example(names=["model.layers.0.q_proj.lora_a"], peft_type="LORA", metadata=False)
def test_may_claim_holds_wherever_the_dialect_claims(configs, names, peft_type, metadata):
    config = None if peft_type == "none" else configs[peft_type]
    ck = _ck(names, config, metadata)
    for d in LAZY:
        if d.load().claims(ck):
            assert d.may_claim(ck), (d.name, names, peft_type, metadata)


def test_each_lazy_dialect_claims_its_own_and_only_its_own(configs):
    """One checkpoint per dialect: it passes that dialect's test and is claimed, through the registry, by it
    (the examples above are not vacuous); a PEFT LoRA passes none of the tests."""
    own = {
        "adalora": _ck(["base_model.model.q_proj.lora_E"], configs["ADALORA"], False),
        "ia3": _ck(["base_model.model.k_proj.ia3_l"], configs["IA3"], False),
        "vera": _ck(["base_model.model.q_proj.vera_lambda_b"], configs["VERA"], False),
        "diffusers": _ck(["unet.down.lora_A.weight", "unet.down.lora_B.weight"], None, False),
        "kohya": _ck(["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"], None, False),
        "mlx": _ck(["model.layers.0.self_attn.q_proj.lora_a"], configs["LORA"], False),
        "oft": _ck(["base_model.model.q_proj.oft_R.weight"], configs["OFT"], False),
        "boft": _ck(["base_model.model.q_proj.boft_R", "base_model.model.q_proj.boft_s"], configs["BOFT"], False),
        "hra": _ck(["base_model.model.q_proj.hra_u"], configs["hra"], False),
        "shira": _ck(["base_model.model.q_proj.shira_weight"], configs["SHIRA"], False),
        "fourierft": _ck(["base_model.model.q_proj.fourierft_spectrum"], configs["FourierFT"], False),
        "vblora": _ck(["base_model.model.q_proj.vblora_logits_A"], configs["VBLORA"], False),
        "delora": _ck(["base_model.model.q_proj.delora_A"], configs["DELORA"], False),
        "c3a": _ck(["base_model.model.q_proj.c3a_kernel"], configs["C3A"], False),
        "randlora": _ck(["base_model.model.q_proj.randlora_lambda"], configs["RANDLORA"], False),
        "miss": _ck(["base_model.model.q_proj.miss_block"], configs["MISS"], False),
        "road": _ck(["base_model.model.q_proj.road_theta"], configs["ROAD"], False),
    }
    assert sorted(own) == sorted(d.name for d in LAZY)
    for name, ck in own.items():
        first = next(d for d in dialects.DIALECTS if d.claims(ck))
        assert first.name == name
    peft = _ck(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], configs["LORA"], False)
    assert [d.name for d in LAZY if d.may_claim(peft)] == []
    base = _ck(["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"], None, False)
    assert [d.name for d in LAZY if d.may_claim(base)] == []


def test_every_kohya_prefix_begins_lora_():
    """The kohya test looks for names beginning ``lora_``: every prefix the dialect reads does."""
    assert all(p.startswith("lora_") for p in diffusion_names.KOHYA_PREFIXES)


def test_a_merge_imports_no_other_dialect(tmp_path):
    """The README's fixture merge (a PEFT LoRA on a plain base), in a fresh interpreter: merged, and none of the
    modules it has no use for imported."""
    code = (
        "import sys, lora_convert as lc\n"
        "lc.merge(sys.argv[1], base=sys.argv[2], output=sys.argv[3])\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('lora_convert'))))\n"
    )
    fx = ROOT / "fixtures"
    argv = [str(fx / "tiny-llama-lora"), str(fx / "tiny-llama-base"), str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    loaded = set(r.stdout.split())
    assert "lora_convert.dialects.peft" in loaded
    unwanted = {f"lora_convert.dialects.{d.name}" for d in LAZY} | {
        "lora_convert.dialects.lycoris",
        "lora_convert.dialects.additive",
        "lora_convert.routes.oft_terms",
        "lora_convert.routes.additive_terms",
        "lora_convert.oft_math",
        "lora_convert.additive_math",
        "lora_convert.fleet",
        "lora_convert.routes.requantize",
        "lora_convert.routes.tuner_terms",
        "lora_convert.tuner_math",
    }
    assert loaded & unwanted == set()

"""What a new user hit (issue 25): each defect tried as the user met it, on the fixtures and tiny real models.

* the model card's ``base_model`` is the base actually used, never the adapter config's relative path;
* a forgotten ``--base`` says where the name came from, not only that the Hub is unreachable;
* one word for a checkpoint without LoRA tensors — a "full model" — wherever a person reads;
* an option's value that is wrong whatever the inputs hold is a usage error (exit 2);
* unmerging from a tied base's merge gives the tied base back.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, cli, one_error
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tiny import SEQ, llama, peft_wrap, qwen2

import lora_convert as lc

LORA, BASE = FIXTURES / "tiny-llama-lora", FIXTURES / "tiny-llama-base"
MERGED = FIXTURES / "tiny-llama-merged"


def _adapter_naming(tmp_path: Path, base_name: str) -> Path:
    """The fixture adapter, its config naming the base ``base_name``."""
    ad = tmp_path / "adapter"
    shutil.copytree(LORA, ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


def _seed_base(hub_server) -> None:
    hub_server.seed("org/base", {p.name: p.read_bytes() for p in BASE.iterdir() if p.is_file()})


# --------------------------------------------------------------------------- 1. the card's base_model


def test_card_names_the_base_used_not_the_configs_relative_path(tmp_path, monkeypatch, hub_server):
    """Run from another folder, the config's ``fixtures/tiny-llama-base`` reads as a repo id; the base used was
    a local folder, so the card has no base_model (a push would link to a repo that does not exist)."""
    monkeypatch.chdir(tmp_path)
    res = cli("merge", LORA, "--base", BASE, "-o", tmp_path / "m")
    assert res.exit_code == 0, res.output
    card = ModelCard.load(str(tmp_path / "m" / "README.md"))
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert f"Base model: `{BASE}` (a local folder)" in card.text
    _seed_base(hub_server)  # the base used, from the Hub: that repo is the base_model
    res = cli("merge", LORA, "--base", "org/base", "-o", tmp_path / "h")
    assert res.exit_code == 0, res.output
    card = ModelCard.load(str(tmp_path / "h" / "README.md"))
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "merge"


def test_config_repo_id_is_the_base_model_only_when_it_resolved(tmp_path, monkeypatch, hub_server):
    _seed_base(hub_server)
    monkeypatch.chdir(tmp_path)
    ad = _adapter_naming(tmp_path, "org/base")
    res = cli("merge", ad, "-o", tmp_path / "m")  # no --base: the config's repo id is fetched from the Hub
    assert res.exit_code == 0, res.output
    card = ModelCard.load(str(tmp_path / "m" / "README.md"))
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "merge"
    res = cli("merge", ad, "--base", BASE, "-o", tmp_path / "l")  # a local --base is the base used
    assert res.exit_code == 0, res.output
    assert ModelCard.load(str(tmp_path / "l" / "README.md")).data.base_model is None
    res = cli("convert", ad, "--to", "mlx", "--base", BASE, "-o", tmp_path / "x")  # (config.json only)
    assert res.exit_code == 0, res.output
    assert ModelCard.load(str(tmp_path / "x" / "README.md")).data.base_model is None


# --------------------------------------------------------------------------- 2. a forgotten --base


def test_forgotten_base_says_where_the_name_came_from(tmp_path, monkeypatch, hub_server):
    """The config names a relative path that is no folder here; the Hub (the test's own server) has no such repo:
    the one error line says which file named it and to pass --base, as well as what the Hub answered."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "m"
    line = one_error(
        cli("merge", LORA, "-o", out),
        f"{LORA / 'adapter_config.json'}: ",
        "base_model_name_or_path in adapter_config.json names 'fixtures/tiny-llama-base'",
        "which is not a folder here",
        "repository not found",
        "pass --base BASE",
        out=out,
    )
    assert line.count("error:") == 1
    hub_server.set_offline()
    one_error(cli("merge", LORA, "-o", out), "not a folder here", "HF_HUB_OFFLINE", "pass --base BASE", out=out)


def test_forgotten_base_that_is_no_repo_id(tmp_path, monkeypatch):
    """A name that cannot be a repo id never goes to the Hub: the same words, a RouteError."""
    monkeypatch.chdir(tmp_path)
    ad = _adapter_naming(tmp_path, "../models/llama-base")
    out = tmp_path / "m"
    res = cli("merge", ad, "-o", out, "--json")
    one_error(res, "names '../models/llama-base', which is not a folder here", "pass --base BASE", out=out)
    assert json.loads(res.stdout)["error"]["type"] == "RouteError"


# --------------------------------------------------------------------------- 7. one vocabulary

PLAIN = re.compile(r"\bplain\b", re.IGNORECASE)


@pytest.mark.parametrize(
    "args, code, said",
    [
        (["detect", BASE], 0, "form: full model (no LoRA tensors: a base, merged or fine-tuned model; --base"),
        (["detect", "--help"], 0, "or a full model"),
        (["report", BASE], 0, "full model"),
        (["report", BASE, "--markdown"], 0, "full model"),
        (["merge", BASE, "--adapter", LORA, "-o", "{out}"], 0, "(merged, from full model)"),
        (["convert", BASE, "--to", "adapter", "-o", "{out}"], 1, "a full model holds no LoRA tensors"),
        (["convert", BASE, "--to", "merged", "-o", "{out}"], 1, "holds no LoRA tensors (a full model: base, merged"),
        (["convert", MERGED, "--to", "base", "--adapter", LORA, "-o", "{out}"], 0, "(base, from full model)"),
        (["merge", BASE, "--adapter", LORA, "--base", BASE, "-o", "{out}"], 1, "the source, a full model, is"),
        (["extract", MERGED, "--base", LORA, "-o", "{out}"], 1, "give the base model itself, without LoRA tensors"),
    ],
)
def test_a_model_without_lora_is_a_full_model_wherever_a_person_reads(tmp_path, args, code, said):
    """README's words (adapter, unmerged, merged, base, full model), never the code's ``plain``: in detect's and
    report's text, help, the conversion line and the errors."""
    res = cli(*[str(a).format(out=tmp_path / "out") for a in args])
    assert res.exit_code == code, res.output
    text = res.stdout + res.stderr
    assert said in " ".join(text.split()), text
    assert not PLAIN.search(text), text


def test_json_keeps_plain_as_documented(tmp_path):
    """--json keeps its values (docs/json.md maps ``plain`` to the text's "full model")."""
    assert json.loads(cli("detect", BASE, "--json").stdout)["form"] == "plain"
    rep = json.loads(cli("report", BASE, "--json").stdout)
    assert rep["source_form"] == "plain" and [r["form"] for r in rep["rows"]] == ["plain"]
    res = json.loads(cli("merge", BASE, "--adapter", LORA, "-o", tmp_path / "m", "--json").stdout)
    assert (res["route"], res["source_form"]) == ("plain->merged", "plain")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "json.md").read_text()
    assert "call a **full model**" in doc


# --------------------------------------------------------------------------- 8. option values are usage errors


@pytest.mark.parametrize(
    "args, needle",
    [
        (["extract", MERGED, "--base", BASE, "--rank", "0"], "--rank must be at least 1"),
        (["extract", MERGED, "--base", BASE, "--energy", "1.5"], "--energy must be in (0, 1]"),
        (["extract", MERGED, "--base", BASE, "--rank", "4", "--energy", "0.9"], "give at most one of --rank"),
        (["extract", MERGED, "--base", BASE, "--include", "("], "bad --include, --exclude regex"),
        (["merge", LORA, "--base", BASE, "--max-shard-size", "10XB"], "--max-shard-size: not a size: '10XB'"),
        (["combine", LORA, LORA, "--method", "cat", "--weights", "1,x"], "the weight 'x' is not a number"),
    ],
)
def test_option_value_errors_exit_2(tmp_path, args, needle):
    """README: usage errors exit 2.  An option's value that is wrong whatever the inputs hold is one: one
    ``error:`` line, exit 2, nothing written; under --json an error document with exit_code 2."""
    out = tmp_path / "out"
    one_error(cli(*args, "-o", out), needle, out=out, code=2)
    res = cli(*args, "-o", out, "--json")
    one_error(res, needle, out=out, code=2)
    err = json.loads(res.stdout)["error"]
    assert (err["type"], err["exit_code"]) == ("OptionError", 2) and needle in err["text"]


def test_option_error_is_a_route_error_in_python(tmp_path):
    with pytest.raises(lc.OptionError, match="rank must be at least 1") as got:
        lc.extract(MERGED, base=BASE, output=tmp_path / "x", rank=0)
    assert isinstance(got.value, lc.RouteError)  # callers that caught RouteError still do
    assert not (tmp_path / "x").exists()


def test_errors_the_inputs_cause_still_exit_1(tmp_path):
    """Only the command line's own mistakes are usage errors: a rank larger than a module is the input's."""
    out = tmp_path / "out"
    one_error(cli("combine", LORA, LORA, "--method", "svd", "--rank", "40", "-o", out), "exceeds", out=out, code=1)


# --------------------------------------------------------------------------- 9. unmerge of a tied base


def _merge_then_unmerge(tmp_path: Path, base_model, save_embedding_layers: bool = True):
    base_model.save_pretrained(tmp_path / "base")
    pm = peft_wrap(base_model, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    pm.save_pretrained(tmp_path / "ad", save_embedding_layers=save_embedding_layers)
    merged = lc.merge(tmp_path / "ad", base=tmp_path / "base", output=tmp_path / "m")
    res = lc.convert(tmp_path / "m", "base", adapters=[str(tmp_path / "ad")], output=tmp_path / "u")
    got, want = load_file(tmp_path / "u" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    ties = [json.loads((tmp_path / d / "config.json").read_text())["tie_word_embeddings"] for d in ("m", "u", "base")]
    return merged, res, got, want, ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_of_a_tied_base_is_tied_again(tmp_path, dtype):
    """The merge unties a tied Qwen2 whose embedding had LoRA (head written, flag false); unmerged, the
    embedding (PEFT saved it whole beside its LoRA) is bit-identical to the head: the base's own form comes
    back — the same tensor names, tie_word_embeddings true, every value within the unmerge's bound."""
    from transformers import AutoModelForCausalLM

    merged, res, got, want, ties = _merge_then_unmerge(tmp_path, qwen2(tie=True).to(dtype))
    assert "lm_head.weight" not in want and ties == [False, True, True]  # the merge untied them; now tied again
    assert sorted(got) == sorted(want)
    bounds = res.report.bounds()
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        err = (got[k].double() - w.double()).abs().max().item()
        assert err <= bounds.get(k, 0.0), (k, err, bounds.get(k))
    assert any("written tied" in w for w in res.warnings)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=dtype).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied at load
    if dtype == torch.float32:  # the q_proj weights are the base's up to fp32 rounding: so are the logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(SEQ).logits, base(SEQ).logits, rtol=0, atol=1e-5)


def test_unmerge_keeps_an_untied_head_that_differs(tmp_path):
    """Only a head identical to the unmerged embedding is tied: an untied base stays untied, and so does a
    computed embedding (no saved copy) that the unmerge gives back only up to rounding."""
    _, res, got, want, ties = _merge_then_unmerge(tmp_path / "l", llama(tie=False))
    assert sorted(got) == sorted(want) and "lm_head.weight" in got and ties == [False, False, False]
    assert not any("written tied" in w for w in res.warnings)
    _, res, got, want, ties = _merge_then_unmerge(tmp_path / "q", qwen2(tie=True), save_embedding_layers=False)
    assert not torch.equal(got["model.embed_tokens.weight"], got["lm_head.weight"])  # (rounding)
    assert "lm_head.weight" in got and ties == [False, False, True]


def test_an_output_beside_a_single_file_input_is_allowed(tmp_path):
    """Item 4: the input is the file, not its folder; a new folder beside it replaces nothing read."""
    folder = tmp_path / "downloads"
    shutil.copytree(LORA, folder)
    src = folder / "adapter_model.safetensors"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = cli("merge", src, "--base", BASE, "-o", folder / "merged")
    assert res.exit_code == 0, res.output
    ref = load_file(str(MERGED / "model.safetensors"))
    got = load_file(str(folder / "merged" / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    # the folder given as a folder is still an input: an output inside it is refused
    one_error(cli("merge", folder, "--base", BASE, "-o", folder / "merged2"), "inside an input folder")
    # and the file itself can never be the output's target, nor lie inside it
    one_error(cli("merge", src, "--base", BASE, "-o", folder, "--force"), "lies inside the output folder")


def test_kohya_to_a_safetensors_path_is_one_file(tmp_path):
    """Item 3: `--to kohya -o NAME.safetensors` writes that one file (no folder, no card), the same bytes as
    the folder form's lora.safetensors (which test_diffusion_lora checks against diffusers and sd-scripts);
    -o FOLDER is as before."""
    from tiny import unet

    pm = peft_wrap(unet(), r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"])
    pm.save_pretrained(str(tmp_path / "adapter"))
    res = cli("convert", tmp_path / "adapter", "--to", "kohya", "-o", tmp_path / "style.safetensors")
    assert res.exit_code == 0, res.output
    one = tmp_path / "style.safetensors"
    assert one.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("adapter", "style.safetensors")]
    res = cli("convert", tmp_path / "adapter", "--to", "kohya", "-o", tmp_path / "folder")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "folder" / "lora.safetensors").read_bytes() == one.read_bytes()
    assert lc.detect(one).dialect == "kohya"
    # existing file: --force replaces it, without it refused
    one_error(cli("convert", tmp_path / "adapter", "--to", "kohya", "-o", one), "already exists")
    res = cli("convert", tmp_path / "adapter", "--to", "kohya", "-o", one, "--force")
    assert res.exit_code == 0 and (tmp_path / "folder" / "lora.safetensors").read_bytes() == one.read_bytes()

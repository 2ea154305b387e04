"""--push-to checks the token and the right to write the repo before any work, says what was written when
the push fails after it, and takes --token (never printed).  Against the fake Hub of tests/hub_server.py."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard, snapshot_download
from tiny import read_json

import lora_convert as lc
from lora_convert import pipeline
from lora_convert.cli import main

LORA, BASE = "fixtures/tiny-llama-lora", "fixtures/tiny-llama-base"


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a conversion starts writing tensors."""
    calls = []
    real = pipeline.execute
    monkeypatch.setattr(pipeline, "execute", lambda *a, **k: calls.append(1) or real(*a, **k))
    import lora_convert.assemble as assemble

    monkeypatch.setattr(assemble, "execute", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _merge(out, *extra):
    return CliRunner().invoke(main, ["merge", LORA, "--base", BASE, "-o", str(out), *extra])


def _no_token(hub_server, monkeypatch, tmp_path):
    hub_server.set_token(None)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"), raising=False)
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)


def _one_error_line(r, *needles):
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("no token", "no Hub token found"),
        ("rejected token", "the Hub rejected the token (HTTP 401)"),
        ("read-only token", "permission denied (HTTP 403)"),
        ("foreign namespace", "cannot create a repo under 'someone-else'"),
        ("read-only token, new repo", "the token is read-only"),
        ("bad repo id", "not a valid Hub repo id"),
    ],
)
def test_push_problems_are_found_before_any_work(tmp_path, hub_server, monkeypatch, no_work, case, expect):
    repo, extra = "me/x", []
    if case == "no token":
        _no_token(hub_server, monkeypatch, tmp_path)
    elif case == "rejected token":
        extra = ["--token", "hf_wrong_token_123"]
    elif case.startswith("read-only token"):
        hub_server.seed("me/x", {"README.md": b"hi"})
        extra = ["--token", hub_server.read_token]
        repo = "me/new" if case.endswith("new repo") else repo
    elif case == "foreign namespace":
        repo = "someone-else/x"
    else:
        repo = "me/x--y"
    out = tmp_path / "m"
    r = _merge(out, "--push-to", repo, *extra)
    line = _one_error_line(r, expect, repo)
    assert not out.exists() and not list(tmp_path.glob(".m.tmp-lora-convert-*")) and no_work == []
    assert "hf_wrong_token_123" not in r.output and hub_server.read_token not in r.output and "TOKEN" not in line[:7]
    assert hub_server.head(repo) is None or hub_server.history(repo)[0] == hub_server.head("me/x")


def test_api_checks_first_too_and_names_the_keyword(tmp_path, hub_server, monkeypatch, no_work):
    _no_token(hub_server, monkeypatch, tmp_path)
    with pytest.raises(lc.HubError, match="no Hub token found") as info:
        lc.merge(LORA, base=BASE, output=tmp_path / "m", push_to="me/x")
    assert "token=TOKEN" in str(info.value) and "--token" not in str(info.value)
    assert not (tmp_path / "m").exists() and no_work == []


def test_token_option_pushes_and_is_never_printed(tmp_path, hub_server, monkeypatch):
    token = hub_server.token
    _no_token(hub_server, monkeypatch, tmp_path)  # only --token can authenticate
    out = tmp_path / "m"
    args = ["merge", LORA, "--base", BASE, "-o", str(out), "--push-to", "me/tok", "--token", token, "--json"]
    monkeypatch.setattr(sys, "argv", ["lora-convert", *args])  # the command line the model card quotes
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["schema"] == "conversion/1" and d["pushed"]["repo_id"] == "me/tok"
    assert d["pushed"]["commit_oid"] == hub_server.head("me/tok")
    assert token not in r.output
    card = (out / "README.md").read_text()
    assert token not in card and "--token '***'" in card
    got = snapshot_download("me/tok", cache_dir=str(tmp_path / "dl"), token=token)
    assert ModelCard.load(f"{got}/README.md").data.library_name == "transformers"
    r = CliRunner().invoke(main, ["push", str(out), "me/tok2", "--token", token, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["schema"] == "push/1" and token not in r.output


def test_push_failing_after_the_work_says_what_was_written(tmp_path, hub_server):
    out = tmp_path / "m"
    hub_server.fail_next(r"/commit/", 500, count=20)  # every retry of the commit fails
    r = _merge(out, "--push-to", "me/late")
    line = _one_error_line(r, str(out), "written in full", "then the push failed", f"lora-convert push {out} me/late")
    assert "HTTP 500" in line
    assert read_json(out / "config.json")["model_type"] == "llama"  # complete output, kept
    assert hub_server.head("me/late") is None or len(hub_server.history("me/late")) == 1
    # a rerun does not redo the work: it says how to push what is there
    r = _merge(out, "--push-to", "me/late")
    _one_error_line(r, "already exists", f"lora-convert push {out} me/late", "--force")
    hub_server.clear_faults()
    r = CliRunner().invoke(main, ["push", str(out), "me/late"])
    assert r.exit_code == 0, r.output
    assert set(hub_server.files("me/late")) >= {"model.safetensors", "config.json", "README.md"}
    with pytest.raises(lc.OutputError, match=r"lora_convert\.push\("):  # the API says it in Python
        lc.merge(LORA, base=BASE, output=out, push_to="me/late")

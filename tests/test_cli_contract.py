"""What the CLI promises scripts and logs: --json documents (versioned, errors too), --debug anywhere, whole
names off a terminal, API errors in the API's words, and a report that says what it assumes."""

from __future__ import annotations

import io
import json
import re

import pytest
from click.testing import CliRunner
from rich.console import Console
from tiny import llama, peft_wrap

import lora_convert as lc
from lora_convert.cli import main
from lora_convert.cli_output import common_prefix, table

LORA, BASE, UNMERGED = "fixtures/tiny-llama-lora", "fixtures/tiny-llama-base", "fixtures/tiny-llama-unmerged"


def run(*args: str):
    return CliRunner().invoke(main, list(args))


# -- --json ------------------------------------------------------------------------------------------------
def test_every_json_document_is_versioned(tmp_path):
    docs = {
        "detect": run("detect", LORA, "--json"),
        "report": run("report", LORA, "--json"),
        "conversion": run("merge", LORA, "--base", BASE, "-o", str(tmp_path / "m"), "--json"),
    }
    docs["conversion-extract"] = run(
        "extract", str(tmp_path / "m"), "--base", BASE, "-o", str(tmp_path / "x"), "--rank", "8", "--json"
    )
    for kind, r in docs.items():
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["schema"] == kind.split("-")[0] + "/1" and next(iter(d)) == "schema"
    assert json.loads(docs["conversion"].stdout)["pushed"] is None
    assert "modules" in json.loads(docs["conversion-extract"].stdout)


@pytest.mark.parametrize(
    ("args", "code", "kind"),
    [
        (["detect", "/no/such/path", "--json"], 1, "CheckpointError"),
        (["merge", LORA, "-o", "{tmp}/m", "--json", "--base", "/no/base"], 1, "CheckpointError"),
        (["merge", LORA, "--base", BASE, "-o", "{tmp}", "--json"], 1, "OutputError"),
        (["report", LORA, "--json", "--seq-len", "0"], 2, "UsageError"),
        (["report", LORA, "--json", "--markdown"], 2, "UsageError"),
        (["detect", "--json"], 2, "UsageError"),
        (["merge", LORA, "--json", "--dtype", "fp8", "-o", "x"], 2, "UsageError"),
        (["nosuchcommand", "--json"], 2, "UsageError"),
    ],
)
def test_errors_under_json_are_json_documents(tmp_path, args, code, kind):
    r = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == code, r.output
    d = json.loads(r.stdout)  # stdout is one JSON document and nothing else
    assert d["schema"] == "error/1"
    e = d["error"]
    assert e["type"] == kind and e["exit_code"] == code and e["message"] and e["text"]
    if code == 1:  # our errors: the same one line on stderr, its parts in the document
        assert r.stderr.splitlines() == [f"error: {e['text']}"]
        assert e["path"] and e["text"].startswith(e["path"])
    else:  # usage errors: click's message on stderr as without --json
        assert e["message"] in r.stderr
    if kind == "OutputError":
        assert e["hint"] == "choose another path or pass --force to replace it"


def test_interrupt_under_json(tmp_path, monkeypatch):
    from lora_convert import api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "detect", interrupted)
    r = run("detect", LORA, "--json")
    assert r.exit_code == 130 and json.loads(r.stdout)["error"]["type"] == "Interrupted"


# -- --debug -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["detect", "/no/such"],
        ["report", "/no/such"],
        ["merge", "/no/such", "-o", "{tmp}/o"],
        ["convert", "/no/such", "--to", "base", "-o", "{tmp}/o"],
        ["extract", "/no/such", "--base", BASE, "-o", "{tmp}/o"],
        ["push", "/no/such", "me/x"],
    ],
)
def test_debug_is_accepted_after_every_command(tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for where in ("after", "before"):
        argv = [*args, "--debug"] if where == "after" else ["--debug", *args]
        r = run(*argv)
        assert isinstance(r.exception, lc.CheckpointError), (where, r.output)  # the traceback, not "error:"
    r = run(*args)
    assert r.exit_code == 1 and r.stderr.startswith("error: ")


# -- API errors in the API's words ------------------------------------------------------------------------
def test_api_errors_name_keyword_arguments_and_the_cli_names_options(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    cases = [
        (lambda: lc.merge(LORA, base=BASE, output=out), "pass force=True", "pass --force"),
        (lambda: lc.convert(BASE, "adapter", output=tmp_path / "a"), "pass base=BASE", "pass --base BASE"),
        (lambda: lc.report(LORA, seq_len=0), "seq_len must be at least 1", None),
        (lambda: lc.extract(BASE, base=BASE, output=tmp_path / "x", rank=0), "rank must be at least 1", None),
    ]
    for call, api_words, cli_words in cases:
        with pytest.raises(lc.LoraConvertError) as info:
            call()
        text = str(info.value)
        assert api_words in text and not re.search(r"(^|\W)--[a-z]", text), text
        if cli_words:
            assert cli_words in info.value.for_cli()
    # the two-adapter pick, through the API and the CLI
    pm = peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.add_adapter("b", type(pm.peft_config["default"])(r=4, lora_alpha=8, target_modules=["q_proj"]))
    from tiny import save_unmerged

    save_unmerged(pm, tmp_path / "u")
    (tmp_path / "u" / "b").mkdir()
    pm.peft_config["b"].save_pretrained(str(tmp_path / "u" / "b"))
    with pytest.raises(lc.RouteError, match="choose one with adapter=NAME"):
        lc.merge(tmp_path / "u", output=tmp_path / "m2")
    r = run("merge", str(tmp_path / "u"), "-o", str(tmp_path / "m2"))
    assert "choose one with --adapter NAME" in r.stderr
    r = run("merge", LORA, "--base", BASE, "-o", str(out))
    assert "pass --force to replace it" in r.stderr


# -- output off a terminal -----------------------------------------------------------------------------------
def test_off_a_terminal_names_and_lines_are_whole(tmp_path):
    r = run("merge", LORA, "--base", BASE, "-o", str(tmp_path / "m"))
    assert r.exit_code == 0
    wrote = [ln for ln in r.stdout.splitlines() if ln.startswith("wrote ")]
    assert len(wrote) == 1 and re.search(r"in \d+\.\d s$", wrote[0]), r.stdout  # not wrapped before "s"
    r = run("extract", str(tmp_path / "m"), "--base", BASE, "-o", str(tmp_path / "x"), "--rank", "4")
    assert r.exit_code == 0, r.output
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj", "o_proj"):
            assert f"model.layers.{layer}.self_attn.{proj}" in r.stdout, r.stdout
    assert "…" not in r.stdout
    r = run("report", LORA, "--base", BASE)
    assert r.exit_code == 0 and "embed_tokens" in r.stdout and "…" not in r.stdout
    r = run("detect", str(tmp_path / "x"))
    files = [ln for ln in r.stdout.splitlines() if ln.startswith("files: ")]
    assert len(files) == 1 and files[0].endswith(("B", "KB", "MB")), r.stdout


def test_on_a_terminal_the_common_prefix_is_abbreviated_not_the_tail():
    names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")]
    assert common_prefix(names) == "model.layers."
    assert common_prefix(names[:3]) == "model.layers.0.self_attn."
    assert common_prefix(["a.b", "a.b.c"]) == "a." and common_prefix(["a", "a.b"]) == ""
    assert common_prefix(["x_proj", "y_proj"]) == ""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60, color_system=None)
    rows = [[n, "32x32", "4", "0.999999", "1.234e-03"] for n in names[:3]]
    console.print(table(console, "extracted", ["module", "shape", "rank", "energy", "error"], rows))
    text = buf.getvalue()
    assert "… = model.layers.0.self_attn." in text
    for tail in ("…q_proj", "…k_proj", "…v_proj"):
        assert tail in text, text
    wide = io.StringIO()
    console = Console(file=wide, force_terminal=True, width=200, color_system=None)
    console.print(table(console, "extracted", ["module", "shape", "rank", "energy", "error"], rows))
    assert "…" not in wide.getvalue() and names[0] in wide.getvalue()  # room enough: full names


# -- report ------------------------------------------------------------------------------------------------
def test_report_says_which_base_and_what_each_column_assumes():
    rep = lc.report(LORA)  # no base given: the adapter config's relative path is used
    assert rep.base_from == "adapter_config"
    used = rep.base_used()
    assert "fixtures/tiny-llama-base" in used and "base_model_name_or_path" in used and "current folder" in used
    d = rep.to_dict()
    assert d["base_used"] == used
    rows = {r["form"]: r for r in d["rows"]}
    assert "merged once at load" in rows["adapter"]["assumes"] and rows["adapter"]["flops_lora"] == 0
    assert "assumed merged at load" in d["columns"]["LoRA FLOPs/token"]
    assert "n/a for the unmerged form" in d["columns"]["merge FLOPs (once)"]
    assert "L=2048" in d["columns"]["attention FLOPs/token (L=2048)"]
    text = run("report", LORA)
    markdown = run("report", LORA, "--markdown")
    for r in (text, markdown):
        assert r.exit_code == 0, r.output
        assert used in r.stdout
        assert "adapter: loaded on the base and merged once at load" in r.stdout
        assert "LoRA FLOPs/token: LoRA branches run unmerged" in r.stdout
        assert "merge FLOPs (once): one-off merge at load, adapter form only" in r.stdout
    assert "n/a" in text.stdout and "| n/a |" in markdown.stdout  # merge FLOPs of the unmerged row
    given = lc.report(LORA, base=BASE)
    assert given.base_from == "argument" and "given as the base" in given.base_used()
    own = lc.report(UNMERGED)
    assert own.base_from == "checkpoint" and own.base_used() == "base: the base weights inside the checkpoint"


def test_docs_json_md_shows_every_documents_keys(tmp_path):
    """docs/json.md's examples carry exactly the top-level keys the documents have."""
    from dataclasses import fields
    from pathlib import Path

    from lora_convert.io.hub import PushResult

    text = (Path(__file__).resolve().parents[1] / "docs" / "json.md").read_text()
    examples = {}
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        d = json.loads(block)
        examples[d["schema"]] = d
    real = {
        "detect/1": json.loads(run("detect", LORA, "--json").stdout),
        "report/1": json.loads(run("report", LORA, "--json").stdout),
        "conversion/1": json.loads(run("merge", LORA, "--base", BASE, "-o", str(tmp_path / "m"), "--json").stdout),
        "error/1": json.loads(run("merge", LORA, "--base", BASE, "-o", str(tmp_path / "m"), "--json").stdout),
        "dry-run/1": json.loads(
            run("merge", LORA, "--base", BASE, "-o", str(tmp_path / "d"), "--json", "--dry-run").stdout
        ),
        "verify/1": json.loads(run("verify", str(tmp_path / "m"), "--base", BASE, "--adapter", LORA, "--json").stdout),
        "spectrum/1": json.loads(
            run("spectrum", str(tmp_path / "m"), "--base", BASE, "--max-rank", "4", "--json").stdout
        ),
    }
    assert set(examples) == {*real, "push/1", "batch/1"}  # batch/1's keys: test_batch (it runs worker processes)
    for schema, doc in real.items():
        assert set(examples[schema]) == set(doc), schema
    assert set(examples["error/1"]["error"]) == set(real["error/1"]["error"])
    assert set(examples["detect/1"]["adapters"][0]) == set(real["detect/1"]["adapters"][0])
    assert set(examples["report/1"]["rows"][0]) == set(real["report/1"]["rows"][0])
    assert set(examples["push/1"]) == {"schema"} | {f.name for f in fields(PushResult)}
    assert set(examples["verify/1"]["checks"][0]) == set(real["verify/1"]["checks"][0])
    assert set(examples["dry-run/1"]["modules"][0]) == set(real["dry-run/1"]["modules"][0])

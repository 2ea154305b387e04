"""merge -> push -> snapshot_download round trip against the local fake Hub, card metadata parsed back."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from lora_convert.cli import main


def test_merge_push_download_round_trip(tmp_path, hub_server):
    from huggingface_hub import ModelCard, snapshot_download

    out = tmp_path / "merged"
    r = CliRunner().invoke(
        main,
        [
            "merge",
            "fixtures/tiny-llama-lora",
            "--base",
            "fixtures/tiny-llama-base",
            "-o",
            str(out),
            "--push-to",
            "me/merged",
            "--private",
        ],
    )
    assert r.exit_code == 0, r.output + str(r.exception)
    got = Path(snapshot_download("me/merged", cache_dir=str(tmp_path / "dl")))
    local = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in got.iterdir() if p.name != ".gitattributes") == local  # the Hub adds it
    for name in local:
        assert (got / name).read_bytes() == (out / name).read_bytes(), name
    card = ModelCard.load(str(got / "README.md"))
    assert card.data.base_model is None  # a local folder is no Hub metadata (test_model_card.py)
    assert card.data.library_name == "transformers"
    assert "lora" in card.data.tags


def test_push_adapter_to_branch_and_card(tmp_path, hub_server):
    from huggingface_hub import ModelCard, snapshot_download

    out = tmp_path / "adapter"
    r = CliRunner().invoke(
        main,
        [
            "convert",
            "fixtures/tiny-llama-unmerged",
            "--to",
            "adapter",
            "-o",
            str(out),
            "--base",
            "fixtures/tiny-llama-base",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["push", str(out), "me/ad", "--revision", "dev", "--json"])
    assert r.exit_code == 0, r.output + str(r.exception)
    got = Path(snapshot_download("me/ad", revision="dev", cache_dir=str(tmp_path / "dl")))
    assert (got / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    card = ModelCard.load(str(got / "README.md"))
    assert card.data.library_name == "peft" and "peft" in card.data.tags


def test_push_without_token_fails_cleanly(tmp_path, hub_server, monkeypatch):
    hub_server.set_token(None) if hasattr(hub_server, "set_token") else None
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"), raising=False)
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    out = tmp_path / "m"
    r = CliRunner().invoke(
        main, ["merge", "fixtures/tiny-llama-lora", "--base", "fixtures/tiny-llama-base", "-o", str(out)]
    )
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["push", str(out), "me/x"])
    assert r.exit_code == 1 and r.stderr.startswith("error: ")


def _seed_folder(hub_server, repo_id: str, folder: str) -> None:
    hub_server.seed(repo_id, {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()})


def test_merge_from_hub_repo_ids_then_offline_from_cache(tmp_path, hub_server):
    import torch
    from safetensors.torch import load_file

    _seed_folder(hub_server, "org/base", "fixtures/tiny-llama-base")
    _seed_folder(hub_server, "org/adapter", "fixtures/tiny-llama-lora")
    r = CliRunner().invoke(main, ["merge", "org/adapter", "--base", "org/base", "-o", str(tmp_path / "m1")])
    assert r.exit_code == 0, r.output + str(r.exception)
    want = load_file("fixtures/tiny-llama-merged/model.safetensors")
    got = load_file(str(tmp_path / "m1" / "model.safetensors"))
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    hub_server.set_offline(True)
    r = CliRunner().invoke(main, ["merge", "org/adapter", "--base", "org/base", "-o", str(tmp_path / "m2")])
    assert r.exit_code == 0, r.output + str(r.exception)
    assert (tmp_path / "m2" / "model.safetensors").read_bytes() == (tmp_path / "m1" / "model.safetensors").read_bytes()
    r = CliRunner().invoke(main, ["merge", "org/never-fetched", "--base", "org/base", "-o", str(tmp_path / "m3")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and not (tmp_path / "m3").exists()
    del torch

"""Model cards: Hub metadata only where the Hub can use it, parsed back with huggingface_hub's ModelCard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

import lora_convert as lc

LORA, BASE, UNMERGED = "fixtures/tiny-llama-lora", "fixtures/tiny-llama-base", "fixtures/tiny-llama-unmerged"


def _card(folder: Path) -> ModelCard:
    card = ModelCard.load(str(folder / "README.md"))
    if card.data.base_model is not None:
        validate_repo_id(card.data.base_model)  # huggingface_hub's own rule for a repo id
    return card


def _no_placeholder_link(folder: Path) -> None:
    text = (folder / "README.md").read_text()
    assert "https://github.com/)" not in text and "](http" not in text  # no link to a placeholder


def test_local_base_is_named_in_text_not_in_metadata(tmp_path):
    """The fixtures' adapter config names the base as the relative path fixtures/tiny-llama-base, which
    looks like a repo id: it is a local folder, so it is no base_model."""
    lc.merge(LORA, base=BASE, output=tmp_path / "m", command="lora-convert merge ...")
    card = _card(tmp_path / "m")
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["lora", "lora-convert"]
    assert "Base model: `fixtures/tiny-llama-base` (a local folder)" in card.text
    _no_placeholder_link(tmp_path / "m")
    lc.convert(UNMERGED, "adapter", output=tmp_path / "a", command="lora-convert convert ...")
    card = _card(tmp_path / "a")
    assert card.data.base_model is None and not any(t.startswith("base_model:") for t in card.data.tags)
    _no_placeholder_link(tmp_path / "a")


def test_hub_id_in_the_adapter_config_is_the_base_model(tmp_path):
    src = tmp_path / "unmerged"
    shutil.copytree(UNMERGED, src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    lc.convert(src, "adapter", output=tmp_path / "a")
    card = _card(tmp_path / "a")
    assert card.data.base_model == "meta-llama/Llama-3.2-1B" and card.data.base_model_relation == "adapter"
    assert "base_model:adapter:meta-llama/Llama-3.2-1B" in card.data.tags
    lc.merge(src, output=tmp_path / "m", base=BASE)  # a local --base is the base used (issue 25): no base_model
    card = _card(tmp_path / "m")
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()


@pytest.mark.parametrize("how", ["repo id", "cache snapshot path"])
def test_hub_base_is_the_base_model(tmp_path, hub_server, how):
    from huggingface_hub import snapshot_download

    hub_server.seed("org/base", {p.name: p.read_bytes() for p in Path(BASE).iterdir() if p.is_file()})
    base = "org/base@main" if how == "repo id" else snapshot_download("org/base")
    lc.merge(LORA, base=base, output=tmp_path / "m")
    card = _card(tmp_path / "m")
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "merge"
    assert "Base model: `org/base`" in card.text

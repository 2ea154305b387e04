"""Hardening the readers and writers (issue 23): one-file outputs never replace an input, kohya names
parse in linear time, pattern keys built from module names are escaped, no ``assert`` guards user data,
a truncated ``.bin`` is an error line rather than SIGBUS, and the messages of item 10.

Every refusal is one ``error:`` line naming file (and tensor), exit 1, nothing written, and every input
byte-identical (sha256 before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from test_hardening import FIXTURES, cli, one_error

# -- 1. one-file outputs never write through a link into an input -------------------------------------------


def sha_all(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (links followed), by path."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def gguf_work(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "tiny-llama-base", tmp_path / "base")
    shutil.copytree(FIXTURES / "tiny-llama-lora", tmp_path / "adapter")
    return tmp_path


def to_gguf(work: Path, out: Path, *extra: str, adapter: Path | None = None):
    return cli("convert", adapter or work / "adapter", "--to", "gguf", "--base", work / "base", "-o", out, *extra)


@pytest.mark.parametrize(
    "victim,needle",
    [
        ("base/model.safetensors", "which lies inside the input folder"),  # --to gguf reads the base's config only
        ("base/config.json", "which lies inside the input folder"),
        ("base/README.md", "which lies inside the input folder"),  # not read, but inside an input
        ("adapter/adapter_model.safetensors", "which is the input"),
        ("adapter/adapter_config.json", "which is the input"),
    ],
)
@pytest.mark.parametrize("force", [True, False], ids=["force", "plain"])
def test_a_link_to_an_input_is_refused_and_the_input_kept(gguf_work, victim, needle, force):
    before = sha_all(gguf_work / "base", gguf_work / "adapter")
    link = gguf_work / "out.gguf"
    link.symlink_to(gguf_work / victim)
    res = to_gguf(gguf_work, link, *(["--force"] if force else []))
    line = one_error(res, f"{link}: leads to {gguf_work / victim}", needle, "would replace it")
    assert "choose another output path" in line
    assert link.is_symlink() and os.readlink(link) == str(gguf_work / victim)
    assert sha_all(gguf_work / "base", gguf_work / "adapter") == before
    assert not [p for p in gguf_work.rglob("*") if ".tmp-lora-convert-" in p.name]


def test_a_file_reached_through_a_linked_folder_inside_an_input_is_refused(gguf_work):
    before = sha_all(gguf_work / "base", gguf_work / "adapter")
    (gguf_work / "base" / "old.gguf").write_bytes(b"user data")
    before[str(gguf_work / "base" / "old.gguf")] = hashlib.sha256(b"user data").hexdigest()
    (gguf_work / "via").symlink_to(gguf_work / "base")  # a linked parent folder, then a plain name
    one_error(
        to_gguf(gguf_work, gguf_work / "via" / "old.gguf", "--force"),
        f"leads to {gguf_work / 'base' / 'old.gguf'}, which lies inside the input folder",
        "would replace it",
    )
    # the adapter given as its weights file, the output a link to that file
    adapter_file = gguf_work / "adapter" / "adapter_model.safetensors"
    (gguf_work / "a.gguf").symlink_to(adapter_file)
    one_error(to_gguf(gguf_work, gguf_work / "a.gguf", "--force", adapter=adapter_file), "which is the input")
    assert sha_all(gguf_work / "base", gguf_work / "adapter") == before


def test_a_link_into_a_cache_blob_is_caught_by_the_file_it_resolves_to(gguf_work):
    """A Hub cache's snapshot holds links into ../blobs: the blob is outside the input folder, yet an input."""
    blobs = gguf_work / "cache" / "blobs"
    snap = gguf_work / "cache" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(gguf_work / "adapter" / f, blobs / f"{f}.blob")
        (snap / f).symlink_to(blobs / f"{f}.blob")
    before = sha_all(blobs)
    link = gguf_work / "out.gguf"
    link.symlink_to(blobs / "adapter_model.safetensors.blob")
    one_error(to_gguf(gguf_work, link, "--force", adapter=snap), "which is the input", "would replace it")
    assert sha_all(blobs) == before


def test_outputs_that_replace_no_input_still_work(gguf_work):
    """What stays allowed: a hard link to an input (the rename replaces the name, not the file), a new file
    inside an input folder, a link to a file that no input holds (replaced behind the link, as before).
    (A .gguf named plainly inside an input folder is replaced with --force: test_gguf's atomic test.)"""
    import gguf

    before = sha_all(gguf_work / "base", gguf_work / "adapter")
    hard = gguf_work / "hard.gguf"
    os.link(gguf_work / "adapter" / "adapter_model.safetensors", hard)
    res = to_gguf(gguf_work, hard, "--force")
    assert res.exit_code == 0, res.output
    assert sha_all(gguf_work / "base", gguf_work / "adapter") == before
    assert hard.stat().st_ino != (gguf_work / "adapter" / "adapter_model.safetensors").stat().st_ino
    names = sorted(t.name for t in gguf.GGUFReader(str(hard)).tensors)

    new = gguf_work / "adapter" / "beside.gguf"
    assert to_gguf(gguf_work, new).exit_code == 0
    assert sorted(t.name for t in gguf.GGUFReader(str(new)).tensors) == names
    new.unlink()
    assert sha_all(gguf_work / "base", gguf_work / "adapter") == before

    elsewhere = gguf_work / "elsewhere.gguf"
    elsewhere.write_bytes(b"old output")
    link = gguf_work / "link.gguf"
    link.symlink_to(elsewhere)
    assert to_gguf(gguf_work, link, "--force").exit_code == 0
    assert link.is_symlink() and sorted(t.name for t in gguf.GGUFReader(str(elsewhere)).tensors) == names

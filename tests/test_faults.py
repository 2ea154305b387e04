"""Faults: a merge interrupted by SIGKILL, SIGTERM or Ctrl-C, or by a full disk, leaves no
folder at the target, never touches its inputs, and leaves no temp folder behind (or, after
SIGKILL, one that the next run recognises and removes)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import slow_cli, temps, tmpfs, wait_for_temp

from lora_convert.cli import main
from lora_convert.errors import OutputError
from lora_convert.io.output import TMP_MARK, AtomicOutput


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> Path:
    """base/ (Llama hidden 32, 2 layers, vocab 8192: ~2 MB, over a 1 MB tmpfs) and adapter/."""
    from tiny import llama, peft_wrap

    root = tmp_path_factory.mktemp("faults")
    m = llama(vocab=8192)
    m.save_pretrained(str(root / "base"))
    peft_wrap(m, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(str(root / "adapter"))
    return root


def checksums(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


SLOW = 0.1  # seconds the child sleeps after each tensor, so that a signal lands midway


def start_slow_merge(pair: Path, out: Path, *extra: str) -> subprocess.Popen:
    return slow_cli("merge", pair / "adapter", "--base", pair / "base", "-o", out, *extra, delay=SLOW)


def wait_midway(proc: subprocess.Popen, folder: Path) -> Path:
    """Until the child's temp folder holds part of the weights file (more than 64 KiB of it)."""
    return wait_for_temp(proc, folder, min_bytes=64 * 1024 + 1)


def merge_ok(pair: Path, out: Path):
    res = CliRunner().invoke(main, ["merge", str(pair / "adapter"), "--base", str(pair / "base"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return res


def test_sigkill_midway_then_next_run_cleans(pair, tmp_path):
    before = checksums(pair / "base", pair / "adapter")
    out = tmp_path / "merged"
    proc = start_slow_merge(pair, out)
    tmp = wait_midway(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "no folder at the target after SIGKILL"
    assert tmp.exists(), "SIGKILL leaves its temp folder (nothing can run)"
    assert checksums(pair / "base", pair / "adapter") == before
    merge_ok(pair, out)
    assert not tmp.exists(), "the next run removes the dead run's temp folder"
    assert temps(tmp_path) == []
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "sig,code,needle",
    [
        (signal.SIGTERM, 1, "terminated by SIGTERM; nothing was written"),
        (signal.SIGINT, 130, "interrupted; nothing was written"),
    ],
)
def test_signal_midway_leaves_nothing(pair, tmp_path, sig, code, needle):
    before = checksums(pair / "base", pair / "adapter")
    out = tmp_path / "merged"
    proc = start_slow_merge(pair, out)
    wait_midway(proc, tmp_path)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: ") and needle in lines[0], stderr
    assert not out.exists()
    assert temps(tmp_path) == [], "the temp folder is removed on the way out"
    assert checksums(pair / "base", pair / "adapter") == before


def test_sigkill_during_force_replace_keeps_old_until_done(pair, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = start_slow_merge(pair, out, "--force")
    wait_midway(proc, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert (out / "old.txt").read_text() == "old", "the old output stays whole until the new one is complete"


def test_killed_between_the_two_renames_gets_the_old_output_back(tmp_path):
    """--force renames the old output aside, then the new one in.  SIGKILL between the two leaves no
    target: the next run puts the old output back (and still refuses to replace it without --force)."""
    dead_pid = 2**22 + 4242
    target = tmp_path / "out"
    old = tmp_path / f".out{TMP_MARK}{dead_pid}-old"
    half = tmp_path / f".out{TMP_MARK}{dead_pid}-beef"
    old.mkdir()
    (old / "old.txt").write_text("old")
    half.mkdir()
    with pytest.raises(OutputError, match="already exists"):
        with AtomicOutput(target):
            pass
    assert (target / "old.txt").read_text() == "old" and not half.exists() and not old.exists()
    with AtomicOutput(target, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (target / "new.txt").is_file() and not (target / "old.txt").exists()


def test_stale_temps_are_reported(pair, tmp_path):
    out = tmp_path / "merged"
    dead = tmp_path / f".merged{TMP_MARK}{2**22 + 99}-abcd"
    dead.mkdir()
    r = CliRunner().invoke(
        main, ["merge", str(pair / "adapter"), "--base", str(pair / "base"), "-o", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    import json

    w = json.loads(r.output)["warnings"]
    assert any("removed 1 unfinished temp folder" in x and dead.name in x for x in w), w


@pytest.fixture
def tiny_fs(tmp_path):
    with tmpfs(tmp_path / "small", "size=1m") as d:
        yield d


def test_disk_full(pair, tiny_fs):
    before = checksums(pair / "base", pair / "adapter")
    out = tiny_fs / "merged"
    res = CliRunner().invoke(main, ["merge", str(pair / "adapter"), "--base", str(pair / "base"), "-o", str(out)])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}/model.safetensors: disk full"), res.stderr
    assert "free space or write elsewhere" in lines[0]
    assert not out.exists()
    assert os.listdir(tiny_fs) == [], "temp folder removed"
    assert checksums(pair / "base", pair / "adapter") == before


def test_disk_full_outside_the_writer(tmp_path):
    """ENOSPC from any other write (config, README, tokenizer copy) is the same one-line error."""
    target = tmp_path / "out"
    with pytest.raises(OutputError) as ei:
        with AtomicOutput(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "README.md"))
    assert str(ei.value).startswith(f"{target}/README.md: disk full while writing")
    assert not target.exists() and temps(tmp_path) == []


def test_stale_temp_of_live_process_is_kept(tmp_path):
    """Only temp folders of dead runs are removed: a concurrent run's work is left alone."""
    target = tmp_path / "out"
    live = tmp_path / f".out{TMP_MARK}{os.getppid()}-abcd"
    dead_pid = 2**22 + 12345  # above pid_max's default
    dead = tmp_path / f".out{TMP_MARK}{dead_pid}-abcd"
    live.mkdir()
    dead.mkdir()
    with AtomicOutput(target) as tmp:
        (tmp / "x").write_text("x")
    assert live.exists() and not dead.exists() and (target / "x").is_file()

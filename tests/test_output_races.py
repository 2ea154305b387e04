"""The output folder under races and hostile names (issue 12, classes 1, 2 and 7).

Nothing that is not this tool's own temp folder is ever moved or deleted; without --force
nothing that is at the target when the run ends is replaced, and with --force only the folder
that was there when the run started.  Concurrency is tried on the real file system: threads
that reach the final step together, and real merges (child processes) that overlap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import FIXTURES, slow_cli, temps, wait_for_temp
from safetensors.torch import load_file

from lora_convert.cli import main
from lora_convert.errors import OutputError
from lora_convert.io.output import (
    MARKER,
    PREVIOUS,
    TMP_MARK,
    AtomicOutput,
    clean_stale,
    tmp_prefix,
)

BASE, ADAPTER = FIXTURES / "tiny-llama-base", FIXTURES / "tiny-llama-lora"
DEAD_PID = 2**22 + 777  # above the default pid_max: never alive


def tree(folder: Path, *, with_temps: bool = True) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): (p.read_text() if p.is_file() else "<dir>")
        for p in sorted(folder.rglob("*"))
        if with_temps or TMP_MARK not in str(p.relative_to(folder))
    }


def dead_temp(
    parent: Path,
    target_name: str,
    *,
    old: bool = False,
    marker: dict | None = None,
    files: dict[str, str] | None = None,
    token: str = "0badc0de",
) -> Path:
    """A temp folder as a run killed by SIGKILL leaves it (its marker no longer locked)."""
    p = parent / f"{tmp_prefix(target_name)}{DEAD_PID}-{token}{'-old' if old else ''}"
    p.mkdir()
    if marker is not None:
        (p / MARKER).write_text(json.dumps(marker))
    for k, v in (files or {}).items():
        (p / k).parent.mkdir(parents=True, exist_ok=True)
        (p / k).write_text(v)
    return p


# -- class 2: names are compared exactly, and only our marked folders are touched ------------------------


@pytest.mark.parametrize("name", ["[ab]", "*", "?", "a*", "[!x]", "**", "a[", "{a,b}"])
def test_glob_characters_in_the_output_name_touch_no_one_else(tmp_path, name):
    # another output "a" with a dead run's temp folder and an interrupted --force run's old output
    other_tmp = dead_temp(tmp_path, "a", marker={"target": "a"}, files={"w": "other"})
    other_old = dead_temp(
        tmp_path,
        "a",
        old=True,
        marker={"target": "a", "new": [0, 0]},
        files={f"{PREVIOUS}/keep": "a's old output"},
        token="1badc0de",
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("a")
    before = tree(tmp_path)
    with AtomicOutput(tmp_path / name) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / name / "x").read_text() == "x"
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(name)} == before
    assert other_tmp.exists() and other_old.exists()


@pytest.mark.parametrize(
    "kind",
    ["no-marker-not-empty", "marker-for-another-target", "marker-not-json", "a-file", "a-symlink", "suffix-not-ours"],
)
def test_only_marked_folders_for_this_target_are_removed(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "no-marker-not-empty":
        p = dead_temp(tmp_path, "out", files={"data": "someone's"})
    elif kind == "marker-for-another-target":
        p = dead_temp(tmp_path, "out", marker={"target": "other"}, files={"data": "x"})
    elif kind == "marker-not-json":
        p = dead_temp(tmp_path, "out", files={MARKER: "{", "data": "x"})
    elif kind == "a-file":
        p = tmp_path / f".out{TMP_MARK}{DEAD_PID}-0badc0de"
        p.write_text("a file")
    elif kind == "a-symlink":
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "v").write_text("v")
        p = tmp_path / f".out{TMP_MARK}{DEAD_PID}-0badc0de"
        p.symlink_to(victim)
    else:
        p = tmp_path / f".out{TMP_MARK}{DEAD_PID}-0badc0de-older"
        p.mkdir()
    before = tree(tmp_path)
    assert clean_stale(target) == []
    assert tree(tmp_path) == before and os.path.lexists(p)


def test_dead_marked_temp_is_removed_and_empty_unmarked_too(tmp_path):
    target = tmp_path / "out"
    a = dead_temp(tmp_path, "out", marker={"target": "out"}, files={"model.safetensors": "half"})
    b = dead_temp(tmp_path, "out", token="2badc0de")  # killed between mkdir and marker: empty
    assert clean_stale(target) == [a, b] and not a.exists() and not b.exists()


def test_live_run_in_another_pid_namespace_is_kept(tmp_path):
    """Liveness is the marker's lock, not the pid: a live run whose pid looks dead here is left alone."""
    p = dead_temp(tmp_path, "out", marker={"target": "out"}, files={"w": "live"})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(p / MARKER)!r}, os.O_RDWR)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert clean_stale(tmp_path / "out") == [] and (p / "w").read_text() == "live"
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale(tmp_path / "out") == [p]


def test_interrupted_force_run_old_output(tmp_path):
    """The "-old" folder of a --force run killed midway: put back when the target is missing, dropped
    when the target is the new output that run finished, kept when the target is anything else."""
    target = tmp_path / "out"
    # 1. killed between moving the old output aside and moving the new one in: the old comes back
    dead_temp(tmp_path, "out", old=True, marker={"target": "out", "new": [1, 2]}, files={f"{PREVIOUS}/o": "old"})
    clean_stale(target)
    assert (target / "o").read_text() == "old" and temps(tmp_path) == []
    # 2. killed after the new output was in place: the old one goes
    st = os.stat(target)
    t2 = dead_temp(
        tmp_path,
        "out",
        old=True,
        marker={"target": "out", "new": [st.st_dev, st.st_ino]},
        files={f"{PREVIOUS}/o": "older"},
    )
    assert clean_stale(target) == [t2] and (target / "o").read_text() == "old"
    # 3. the target is something else (made later by the user): everything stays
    t3 = dead_temp(
        tmp_path, "out", old=True, marker={"target": "out", "new": [0, 0]}, files={f"{PREVIOUS}/o": "oldest"}
    )
    assert clean_stale(target) == [] and (t3 / PREVIOUS / "o").read_text() == "oldest"


# -- class 1: the final step never replaces what it may not ---------------------------------------------


def _appear(target: Path, what: str) -> None:
    if what == "folder":
        target.mkdir()
        (target / "mine.txt").write_text("user")
    elif what == "empty-folder":
        target.mkdir()
    elif what == "file":
        target.write_text("user")
    elif what == "dangling-link":
        target.symlink_to(target.parent / "nowhere")
    elif what == "link-to-folder":
        (target.parent / "real").mkdir()
        (target.parent / "real" / "mine.txt").write_text("user")
        target.symlink_to(target.parent / "real")


APPEARING = ["folder", "empty-folder", "file", "dangling-link", "link-to-folder"]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("what", APPEARING)
def test_target_created_during_the_run_is_never_replaced(tmp_path, what, force):
    target = tmp_path / "out"
    with (
        pytest.raises(OutputError, match="appeared while this run was writing") as ei,
        AtomicOutput(target, force=force) as tmp,
    ):
        (tmp / "new.txt").write_text("new")
        _appear(target, what)
        before = tree(tmp_path, with_temps=False)
    assert os.path.lexists(target) and not (tmp_path / "out" / "new.txt").exists()
    assert temps(tmp_path) == [] and tree(tmp_path) == before
    assert "--force" in ei.value.for_cli() and "force=True" in str(ei.value)


def test_force_replaces_only_the_folder_that_was_there_at_the_start(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v").write_text("v0")
    with (
        pytest.raises(OutputError, match="was replaced while this run was writing"),
        AtomicOutput(target, force=True) as tmp,
    ):
        (tmp / "v").write_text("mine")
        os.rename(target, tmp_path / "moved")  # another run put its own output in place meanwhile
        target.mkdir()
        (target / "v").write_text("theirs")
    assert (target / "v").read_text() == "theirs" and (tmp_path / "moved" / "v").read_text() == "v0"
    assert temps(tmp_path) == []
    # the folder that was there at the start is replaced; one deleted meanwhile is no obstacle
    with AtomicOutput(target, force=True) as tmp:
        (tmp / "v").write_text("mine")
    assert (target / "v").read_text() == "mine"
    with AtomicOutput(target, force=True) as tmp:
        (tmp / "v").write_text("again")
        import shutil

        shutil.rmtree(target)
    assert (target / "v").read_text() == "again" and temps(tmp_path) == []


@pytest.mark.parametrize("force,existing", [(False, False), (True, False), (True, True)])
def test_threads_finishing_together_at_most_one_succeeds(tmp_path, force, existing):
    """Eight writers reach the final step at the same moment, five rounds: exactly one wins
    (none can when a folder is there and --force is not given), the target is that one's whole
    output, and no temp folder is left."""
    n = 8
    for rnd in range(5):
        target = tmp_path / f"out{rnd}"
        if existing:
            target.mkdir()
            (target / "who").write_text("original")
        barrier = threading.Barrier(n)
        results: dict[int, str] = {}

        def run(
            i: int, target: Path = target, barrier: threading.Barrier = barrier, results: dict[int, str] = results
        ) -> None:
            try:
                with AtomicOutput(target, force=force) as tmp:
                    for k in range(20):
                        (tmp / f"f{k}").write_text(str(i))
                    (tmp / "who").write_text(str(i))
                    barrier.wait(timeout=30)
                results[i] = "ok"
            except OutputError as exc:
                results[i] = str(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [i for i, r in results.items() if r == "ok"]
        assert len(results) == n and len(winners) == 1, results
        w = str(winners[0])
        assert {p.name: p.read_text() for p in target.iterdir()} == {**{f"f{k}": w for k in range(20)}, "who": w}
        assert all("appeared while" in r or "was replaced while" in r for r in results.values() if r != "ok")
        assert temps(tmp_path) == []


# -- one-file outputs (AtomicOutput(file=True): GGUF): the same guarantees as a folder ---------------


def _file_run(target: Path, text: str, *, force: bool = False) -> None:
    with AtomicOutput(target, force=force, file=True) as tmp:
        (tmp / target.name).write_text(text)


@pytest.mark.parametrize("name", ["[ab].gguf", "*.gguf", "?.gguf", "*"])
def test_file_output_with_glob_characters_touches_no_one_else(tmp_path, name):
    other_tmp = dead_temp(tmp_path, "a.gguf", marker={"target": "a.gguf"}, files={"a.gguf": "other"})
    other_old = dead_temp(
        tmp_path,
        "a.gguf",
        old=True,
        marker={"target": "a.gguf", "new": [0, 0]},
        files={PREVIOUS: "a's old file"},
        token="1badc0de",
    )
    (tmp_path / "a.gguf").write_text("a")
    before = tree(tmp_path)
    _file_run(tmp_path / name, "x")
    assert (tmp_path / name).read_text() == "x"
    assert {k: v for k, v in tree(tmp_path).items() if k != name} == before
    assert other_tmp.exists() and other_old.exists()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("what", APPEARING)
def test_file_target_created_during_the_run_is_never_replaced(tmp_path, what, force):
    target = tmp_path / "out.gguf"
    with (
        pytest.raises(OutputError, match="appeared while this run was writing") as ei,
        AtomicOutput(target, force=force, file=True) as tmp,
    ):
        (tmp / target.name).write_text("new")
        _appear(target, what)
        before = tree(tmp_path, with_temps=False)
    assert os.path.lexists(target) and temps(tmp_path) == [] and tree(tmp_path) == before
    assert "--force" in ei.value.for_cli() and "force=True" in str(ei.value)


def test_file_force_replaces_only_the_file_that_was_there_at_the_start(tmp_path):
    target = tmp_path / "out.gguf"
    target.write_text("v0")
    with (
        pytest.raises(OutputError, match="was replaced while this run was writing"),
        AtomicOutput(target, force=True, file=True) as tmp,
    ):
        (tmp / target.name).write_text("mine")
        os.rename(target, tmp_path / "moved")  # another run put its own file in place meanwhile
        target.write_text("theirs")
    assert target.read_text() == "theirs" and (tmp_path / "moved").read_text() == "v0" and temps(tmp_path) == []
    _file_run(target, "mine", force=True)
    assert target.read_text() == "mine"
    with AtomicOutput(target, force=True, file=True) as tmp:  # one deleted meanwhile is no obstacle
        (tmp / target.name).write_text("again")
        target.unlink()
    assert target.read_text() == "again" and temps(tmp_path) == []
    with pytest.raises(OutputError, match="already exists"):
        _file_run(target, "no force")
    assert target.read_text() == "again" and temps(tmp_path) == []


@pytest.mark.parametrize("force,existing", [(False, False), (True, False), (True, True)])
def test_file_threads_finishing_together_at_most_one_succeeds(tmp_path, force, existing):
    """As for folders: eight writers of one file reach the final step together, five rounds."""
    n = 8
    for rnd in range(5):
        target = tmp_path / f"out{rnd}.gguf"
        if existing:
            target.write_text("original")
        barrier = threading.Barrier(n)
        results: dict[int, str] = {}

        def run(
            i: int, target: Path = target, barrier: threading.Barrier = barrier, results: dict[int, str] = results
        ) -> None:
            try:
                with AtomicOutput(target, force=force, file=True) as tmp:
                    (tmp / target.name).write_text(str(i) * 1000)
                    barrier.wait(timeout=30)
                results[i] = "ok"
            except OutputError as exc:
                results[i] = str(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [i for i, r in results.items() if r == "ok"]
        assert len(results) == n and len(winners) == 1, results
        assert target.read_text() == str(winners[0]) * 1000
        assert all("appeared while" in r or "was replaced while" in r for r in results.values() if r != "ok")
        assert temps(tmp_path) == []


def test_file_write_error_names_the_target_file(tmp_path):
    """An error while writing the one file names it as the target, not as a path inside the temp folder."""
    import errno

    target = tmp_path / "out.gguf"
    with pytest.raises(OutputError) as ei, AtomicOutput(target, file=True) as tmp:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / target.name))
    assert str(ei.value).startswith(f"{target}: disk full while writing")
    assert not target.exists() and temps(tmp_path) == []


def test_file_interrupted_force_run_old_file(tmp_path):
    """A killed --force run's "-old" folder holding a file: put back, dropped or kept as for a folder."""
    target = tmp_path / "out.gguf"
    dead_temp(tmp_path, "out.gguf", old=True, marker={"target": "out.gguf", "new": [1, 2]}, files={PREVIOUS: "old"})
    clean_stale(target)
    assert target.read_text() == "old" and temps(tmp_path) == []
    st = os.stat(target)
    t2 = dead_temp(
        tmp_path,
        "out.gguf",
        old=True,
        marker={"target": "out.gguf", "new": [st.st_dev, st.st_ino]},
        files={PREVIOUS: "x"},
    )
    assert clean_stale(target) == [t2] and target.read_text() == "old"
    t3 = dead_temp(tmp_path, "out.gguf", old=True, marker={"target": "out.gguf", "new": [0, 0]}, files={PREVIOUS: "y"})
    assert clean_stale(target) == [] and (t3 / PREVIOUS).read_text() == "y"


def test_file_links_dangling_refused_and_force_replaces_the_file_behind(tmp_path):
    link = tmp_path / "out.gguf"
    link.symlink_to(tmp_path / "gone.gguf")
    with pytest.raises(OutputError, match="symbolic link"):
        _file_run(link, "x", force=True)
    link.unlink()
    real = tmp_path / "disk" / "real.gguf"
    real.parent.mkdir()
    real.write_text("old")
    link.symlink_to(real)
    with pytest.raises(OutputError, match="already exists"):
        _file_run(link, "x")
    for i in range(2):
        _file_run(link, str(i), force=True)
        assert link.is_symlink() and real.read_text() == str(i)
        assert temps(tmp_path) == [] and temps(real.parent) == []


def test_file_cleanups_racing_live_runs_never_remove_their_folders(tmp_path):
    """test_cleanups_racing_live_runs_never_remove_their_folders for one-file outputs (4 threads x 6 runs)."""
    target = tmp_path / "out.gguf"

    def one_run(i: int, j: int) -> None:
        with AtomicOutput(target, force=True, file=True) as tmp:
            (tmp / target.name).write_text(f"{i}-{j}")
            time.sleep(0.002)
            assert (tmp / target.name).read_text() == f"{i}-{j}"

    errors = _runs_beside_a_cleaner(target, 4, one_run)
    assert errors == [] and target.is_file() and temps(tmp_path) == []


# -- class 7: links, long names, parent folders ----------------------------------------------------------


@pytest.mark.parametrize("link", ["dangling", "loop", "to-missing-in-missing"])
def test_dangling_link_output_fails_before_the_work(tmp_path, link):
    target = tmp_path / "out"
    if link == "dangling":
        target.symlink_to(tmp_path / "gone")
    elif link == "loop":
        target.symlink_to(target)
    else:
        target.symlink_to(tmp_path / "a" / "b")
    for force in (False, True):
        with pytest.raises(OutputError, match="symbolic link") as ei, AtomicOutput(target, force=force):
            pytest.fail("the work ran")
        assert "remove the link" in str(ei.value)
    assert target.is_symlink() and temps(tmp_path) == []


def test_force_on_a_linked_output_replaces_the_folder_behind_the_link(tmp_path):
    real = tmp_path / "disk" / "merged"
    real.mkdir(parents=True)
    (real / "old").write_text("old")
    link = tmp_path / "out"
    link.symlink_to(real)
    with pytest.raises(OutputError, match="already exists"), AtomicOutput(link):
        pass
    for i in range(2):
        with AtomicOutput(link, force=True) as tmp:
            (tmp / "new").write_text(str(i))
        assert link.is_symlink() and (link / "new").read_text() == str(i) and not (link / "old").exists()
        assert temps(tmp_path) == [] and temps(real.parent) == []


@pytest.mark.parametrize("nbytes", [200, 250, 255])
def test_long_output_names_work(tmp_path, nbytes):
    name = ("é" * 200)[: nbytes // 2] + "x" * (nbytes % 2)
    assert len(name.encode()) == nbytes
    with AtomicOutput(tmp_path / name) as tmp:
        assert len(tmp.name.encode()) <= 255
        (tmp / "x").write_text("x")
    assert (tmp_path / name / "x").is_file() and temps(tmp_path) == []


@pytest.mark.parametrize("where", ["last", "parent"])
def test_too_long_output_name_is_one_line(tmp_path, where):
    long = "n" * 256
    out = tmp_path / long if where == "last" else tmp_path / long / "out"
    res = CliRunner().invoke(main, ["merge", str(ADAPTER), "--base", str(BASE), "-o", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "256 bytes long, more than the file system allows (255)" in lines[0], res.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("depth", [1, 3])
def test_parent_folders_made_for_the_output_go_after_a_failure(tmp_path, depth):
    top = tmp_path / "made"
    target = top.joinpath(*[f"d{i}" for i in range(depth - 1)], "out") if depth > 1 else top / "out"
    with pytest.raises(RuntimeError), AtomicOutput(target) as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("work failed")
    assert os.listdir(tmp_path) == []
    # a parent that existed before, or that holds something else, stays
    top.mkdir()
    (top / "keep").write_text("k")
    with pytest.raises(RuntimeError), AtomicOutput(top / "a" / "b" / "out"):
        raise RuntimeError
    assert os.listdir(top) == ["keep"]


def test_parent_folders_go_after_a_failed_merge(tmp_path):
    adapter = tmp_path / "adapter"
    import shutil

    shutil.copytree(ADAPTER, adapter)
    from safetensors.torch import save_file

    sd = load_file(str(adapter / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")  # fails midway
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "new" / "deeper" / "out"
    res = CliRunner().invoke(main, ["merge", str(adapter), "--base", str(BASE), "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert not (tmp_path / "new").exists()


# -- real merges, in parallel, on the real file system -----------------------------------------------------


def slow_merge(out: Path, *extra: str) -> subprocess.Popen:
    """A real merge of the fixtures, 0.08 s after each tensor: two of them overlap."""
    return slow_cli("merge", ADAPTER, "--base", BASE, "-o", out, *extra, delay=0.08)


def reference_merge(tmp_path: Path) -> dict:
    out = tmp_path / "reference"
    res = CliRunner().invoke(main, ["merge", str(ADAPTER), "--base", str(BASE), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return load_file(str(out / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_two_merges_to_one_target(tmp_path, force):
    """Two real merges to one target overlap: one succeeds and leaves a whole output, the other
    says why it did not; with --force the folder that was there before is replaced by exactly one."""
    ref = reference_merge(tmp_path)
    target = tmp_path / "runs" / "merged"
    target.parent.mkdir()
    if force:
        target.mkdir()
        (target / "before.txt").write_text("before")
    extra = ("--force",) if force else ()
    procs = [slow_merge(target, *extra) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 1)
    assert loser.startswith(f"error: {target}: ") and len(loser.strip().splitlines()) == 1, loser
    assert "appeared while this run was writing" in loser or "was replaced while this run was writing" in loser
    assert _same(load_file(str(target / "model.safetensors")), ref)
    assert not (target / "before.txt").exists()
    assert temps(target.parent) == []


def test_target_created_by_the_user_during_a_merge_survives(tmp_path):
    """(--force alike: test_target_created_during_the_run_is_never_replaced, in-process.)"""
    target = tmp_path / "merged"
    proc = slow_merge(target)
    wait_for_temp(proc, tmp_path)
    target.mkdir()
    (target / "mine.txt").write_text("the user's")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "appeared while this run was writing" in err, err
    assert os.listdir(target) == ["mine.txt"] and (target / "mine.txt").read_text() == "the user's"
    assert temps(tmp_path) == []


def _runs_beside_a_cleaner(target: Path, threads: int, one_run: Callable[[int, int], None]) -> list[str]:
    """``threads`` threads x 6 calls of ``one_run(i, j)`` writing ``target``, while one more thread does
    nothing but clean stale temp folders of it; what went wrong (losing the race to the target is fine)."""
    stop = threading.Event()
    errors: list[str] = []

    def cleaner() -> None:
        while not stop.is_set():
            try:
                clean_stale(target)
            except Exception as exc:  # noqa: BLE001 - reported by the caller's assertion
                errors.append(repr(exc))

    def runs(i: int) -> None:
        for j in range(6):
            try:
                one_run(i, j)
            except OutputError as exc:
                if "while this run was" not in str(exc):  # losing the race to the target is fine
                    errors.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - reported by the caller's assertion
                errors.append(repr(exc))

    workers = [threading.Thread(target=cleaner)] + [threading.Thread(target=runs, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers[1:]:
        t.join(120)
    stop.set()
    workers[0].join(30)
    return errors


def test_cleanups_racing_live_runs_never_remove_their_folders(tmp_path):
    """Every run cleans up before it starts; a cleanup probing a live run's marker at any moment
    (even while it is being made) must leave that run's folder alone.  6 threads x 6 runs to one
    target, plus a thread that does nothing but clean: no run loses its temp folder."""
    target = tmp_path / "out"

    def one_run(i: int, j: int) -> None:
        with AtomicOutput(target, force=True) as tmp:
            for k in range(5):
                (tmp / f"f{k}").write_text(f"{i}-{j}")
                time.sleep(0.001)

    errors = _runs_beside_a_cleaner(target, 6, one_run)
    assert errors == []
    assert len({p.read_text() for p in target.iterdir()}) == 1 and temps(tmp_path) == []

"""Hardening (issue 23): every number read from a file or an option is bounded before it is used.

Layer and head counts of config.json, fp8 and bitsandbytes block sizes, MoE top-k, integers too large
for a float, version strings, seeds and ``--layers`` selections: each class is tried with several
instances, and each must end in a correct result or one ``error:`` line naming the file, nothing written.
Where a number sizes work (layer counts, layer selections), the run happens in a child process under a
memory limit (RLIMIT_AS) and a wall-clock limit, so that a blow-up fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_convert.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
CHILD_MEMORY = 3 << 30  # address space of a bounded child: torch and transformers import within ~1.5 GB


@pytest.fixture
def work(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "tiny-llama-base", tmp_path / "base")
    shutil.copytree(FIXTURES / "tiny-llama-lora", tmp_path / "adapter")
    return tmp_path


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def one_error(res, *needles: str, out: Path | None = None, code: int = 1) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "internal error" not in lines[0] and "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    if out is not None:
        assert not out.exists()
    return lines[0]


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


# The child runs each case through the CLI in-process (one interpreter start for all of them), each under
# an alarm of ``seconds``; it prints one JSON line per case: exit code, stderr, seconds taken.
_CHILD = textwrap.dedent(
    """
    import json, signal, sys, time
    from click.testing import CliRunner
    from lora_convert.cli import main
    import gguf, transformers  # imported before the clock starts: the routes import them on first use

    class Late(Exception):
        pass

    def late(*_):
        raise Late()

    signal.signal(signal.SIGALRM, late)
    seconds, cases = json.loads(sys.argv[1])
    for args in cases:
        t0 = time.monotonic()
        signal.alarm(seconds)
        try:
            res = CliRunner().invoke(main, args, catch_exceptions=True)
            got = {"code": res.exit_code, "stderr": res.stderr, "exception": repr(res.exception)}
        except Late:
            got = {"code": None, "stderr": "", "exception": "took too long"}
        signal.alarm(0)
        got["seconds"] = time.monotonic() - t0
        print(json.dumps(got), flush=True)
    """
)


def bounded_cli(cases: list[list[object]], seconds: int = 20) -> list[dict]:
    """Run each CLI invocation in one child process under CHILD_MEMORY of address space and ``seconds`` of
    wall time per case; a case that blows either bound fails the test (its result says how)."""
    arg = json.dumps([seconds, [[str(a) for a in c] for c in cases]])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, arg],
        preexec_fn=_limit,
        capture_output=True,
        text=True,
        timeout=60 + seconds * len(cases),
        env=env,
        cwd=ROOT,
    )
    got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(got) == len(cases), f"child died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return got


def bounded_error(got: dict, *needles: str, seconds: float = 8.0) -> str:
    assert got["code"] == 1, got
    lines = [ln for ln in got["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), got
    assert "internal error" not in lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert got["seconds"] < seconds, got
    return lines[0]


# -- layer and head counts of config.json ---------------------------------------------------------------------


def test_huge_layer_count_is_one_error_fast_under_a_memory_limit(work, tmp_path):
    """num_hidden_layers sizes llama.cpp's name map (--to gguf) and report's meta-device model: 1e5 took 82 s and
    5.3 GB, 1e12 grew without end.  Both are refused at once, by name, whichever command reads config.json."""
    cases, gguf_out = [], work / "out.gguf"
    for layers in (10**5, 10**12):
        base, only_config = tmp_path / f"base-{layers}", tmp_path / f"config-only-{layers}"
        shutil.copytree(work / "base", base)
        edit_json(base / "config.json", num_hidden_layers=layers)
        only_config.mkdir()
        shutil.copy(base / "config.json", only_config)
        for b in (base, only_config):
            cases += [
                ["convert", work / "adapter", "--to", "gguf", "--base", b, "-o", gguf_out],
                ["report", work / "adapter", "--base", b],
            ]
    got = bounded_cli(cases)
    for g, case in zip(got, cases, strict=True):
        layers = str(case[-1] if case[0] == "report" else case[-3]).rsplit("-", 1)[1]
        bounded_error(g, "config.json", "num_hidden_layers", f"not {layers}", "4096")
    assert not gguf_out.exists()


def test_layer_count_within_the_cap_gives_the_same_gguf(work, tmp_path):
    """A large but allowed count changes nothing: llama.cpp's name map is built for the layers the adapter
    touches, so the file is byte-identical to the one made with the true count (and quick)."""
    want, got = tmp_path / "want.gguf", tmp_path / "got.gguf"
    assert cli("convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o", want).exit_code == 0
    edit_json(work / "base" / "config.json", num_hidden_layers=4096)
    [res] = bounded_cli([["convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o", got]])
    assert res["code"] == 0 and res["seconds"] < 10, res
    assert got.read_bytes() == want.read_bytes()


@pytest.mark.parametrize("layers", [3, 100, 4096])
def test_report_layer_count_is_bounded_by_the_weights(work, layers):
    """With weights, the count cannot exceed the tensors' highest layer index + 1 (it multiplies attention FLOPs)."""
    edit_json(work / "base" / "config.json", num_hidden_layers=layers)
    one_error(cli("report", work / "adapter", "--base", work / "base"), "num_hidden_layers is", "layers 0-1 only")


def test_report_accepts_fewer_layers_than_stored(work):
    """Layers stored beyond the count (a multi-token-prediction head) are not a lie: the report runs, and its
    attention FLOPs follow the count."""
    res = cli("report", work / "adapter", "--base", work / "base", "--json")
    assert res.exit_code == 0, res.output
    two = json.loads(res.stdout)
    edit_json(work / "base" / "config.json", num_hidden_layers=1)
    res = cli("report", work / "adapter", "--base", work / "base", "--json")
    assert res.exit_code == 0, res.output
    one = json.loads(res.stdout)
    assert json.dumps(one) != json.dumps(two)


def test_gguf_adapter_on_a_layer_the_base_lacks(work, tmp_path):
    edit_json(work / "base" / "config.json", num_hidden_layers=1)
    out = tmp_path / "x.gguf"
    res = cli("convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o", out)
    one_error(res, "LoRA on layer 1", "num_hidden_layers 1", "model.layers.1.", out=out)


@pytest.mark.parametrize(
    "change",
    [
        {"num_attention_heads": 0},
        {"num_key_value_heads": 0},
        {"num_attention_heads": 0, "num_key_value_heads": 0},
    ],
)
def test_gguf_head_counts_are_positive(work, tmp_path, change):
    """llama.cpp's q/k row permutation splits rows into heads: a head count of 0 was a ZeroDivisionError."""
    edit_json(work / "base" / "config.json", **change)
    out = tmp_path / "x.gguf"
    res = cli("convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o", out)
    one_error(res, str(work / "base"), f"{next(iter(change))} must be a positive integer, not 0", out=out)


def test_gguf_head_counts_missing_kv_is_the_attention_count(work, tmp_path):
    """num_key_value_heads absent still means 'as many as the attention heads' (not an error)."""
    cfg = json.loads((work / "base" / "config.json").read_text())
    cfg.pop("num_key_value_heads")
    (work / "base" / "config.json").write_text(json.dumps(cfg))
    res = cli("convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o", tmp_path / "x.gguf")
    assert res.exit_code == 0, res.output


# -- seeds ------------------------------------------------------------------------------------------------------


def _combine(out: Path, seed: object):
    ad = FIXTURES / "tiny-llama-lora"
    return cli("combine", ad, ad, "--method", "dare_linear", "--density", "0.5", "--seed", seed, "-o", out)


def _extract(out: Path, seed: object):
    return cli(
        "extract", FIXTURES / "tiny-llama-merged", "--base", FIXTURES / "tiny-llama-base", "--seed", seed, "-o", out
    )


@pytest.mark.parametrize("run", [_combine, _extract])
@pytest.mark.parametrize("seed", [2**64, 10**400, -1, -(2**63)])
def test_seed_out_of_range_is_a_usage_error(tmp_path, run, seed):
    """torch takes 64-bit seeds: 2**64 was an OverflowError traceback; now click's range check (exit 2)."""
    out = tmp_path / "out"
    res = run(out, seed)
    assert res.exit_code == 2, res.output
    assert "--seed" in res.stderr and "0<=x<=18446744073709551615" in res.stderr
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.parametrize("run", [_combine, _extract])
def test_largest_seed_is_taken(tmp_path, run):
    res = run(tmp_path / "out", 2**64 - 1)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("seed", [2**64, -1, True, 1.5])
def test_api_seed_is_bounded(tmp_path, seed):
    from lora_convert import api
    from lora_convert.errors import RouteError

    ad = FIXTURES / "tiny-llama-lora"
    with pytest.raises(RouteError, match="seed must be an integer from 0 to 2"):
        api.combine([ad, ad], method="dare_linear", density=0.5, seed=seed, output=tmp_path / "c")
    with pytest.raises(RouteError, match="seed must be an integer from 0 to 2"):
        api.extract(FIXTURES / "tiny-llama-merged", base=FIXTURES / "tiny-llama-base", seed=seed, output=tmp_path / "e")
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()

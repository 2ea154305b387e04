"""``detect --base`` reads both checkpoints whole and factors every changed weight: a progress bar counts the
tuned checkpoint's bytes compared (when asked: the CLI asks on a terminal), its cost is said in ``--help``,
and the analysis is the one it was before the bar and the single ‖ΔW‖ pass (issue 25 item 6)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import rich.console
from helpers import cli
from rich.console import Console
from safetensors import safe_open

import lora_convert as lc

TUNED, BASE = "fixtures/tiny-llama-merged", "fixtures/tiny-llama-base"

# ``detect fixtures/tiny-llama-merged --base fixtures/tiny-llama-base --json`` as commit e8d34bf printed it
# (before the bar, and before ‖ΔW‖²_F was measured once instead of three times).
_MODULES = {
    "lm_head.weight": ("lm_head", [96, 32], 0.9842463084361797),
    "model.embed_tokens.weight": ("embedding", [96, 32], 1.0000818015556392),
    "model.layers.0.self_attn.o_proj.weight": ("linear", [32, 32], 0.990718002944573),
    "model.layers.0.self_attn.q_proj.weight": ("linear", [32, 32], 0.9722499357183357),
    "model.layers.0.self_attn.v_proj.weight": ("linear", [16, 32], 0.9848264355558026),
    "model.layers.1.self_attn.o_proj.weight": ("linear", [32, 32], 0.9860271206539296),
    "model.layers.1.self_attn.q_proj.weight": ("linear", [32, 32], 0.9806633012865769),
    "model.layers.1.self_attn.v_proj.weight": ("linear", [16, 32], 0.9747181313011689),
}
RECORDED = {
    "changed": list(_MODULES),
    "modules": {
        name: {"kind": kind, "shape": shape, "rank_at_energy": 8, "rank_at_gap": 8, "relative_change": rel}
        for name, (kind, shape, rel) in _MODULES.items()
    },
    "k": 64,
    "summary": "o_proj, q_proj, v_proj in all 2 layers; embed_tokens, lm_head changed; rank ≤ 8 at 99.9% energy: "
    "looks like a merged LoRA of r=8",
}


def _tensor_bytes(folder: str) -> int:
    """Bytes of every tensor in the folder's safetensors file, from safetensors' own reader."""
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118


def _drawn(monkeypatch, **kw) -> tuple[lc.DetectResult, str]:
    """api.detect with the bar's stderr console a terminal writing into a buffer."""
    buf = io.StringIO()

    def terminal(*args, **kwargs) -> Console:
        assert kwargs == {"stderr": True}  # the bar draws where the CLI looked for a terminal
        return Console(file=buf, force_terminal=True, width=120, color_system=None)

    monkeypatch.setattr(rich.console, "Console", terminal)
    res = lc.detect(TUNED, base=BASE, **kw)
    return res, buf.getvalue()


def test_the_bar_counts_the_tuned_bytes_compared(monkeypatch):
    total = _tensor_bytes(TUNED)
    assert total == 86656  # 21 fp32 tensors, all in the base too
    res, drawn = _drawn(monkeypatch, progress=True)
    assert "comparing with the base" in drawn
    kb = f"{total / 1000:.1f}"
    assert f"0.0/{kb} kB" in drawn  # drawn when it starts ...
    assert f"{kb}/{kb} kB" in drawn  # ... and full when it ends: every byte compared counted once
    assert res.base_comparison == RECORDED


def test_no_bar_unless_asked(monkeypatch):
    res, drawn = _drawn(monkeypatch)
    assert drawn == ""
    assert res.form == "merged" and res.base_comparison == RECORDED


def test_json_is_the_recorded_one_and_draws_no_bar():
    res = cli("detect", TUNED, "--base", BASE, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["form"], doc["base_comparison"]) == ("merged", RECORDED)
    assert doc["differs_from_base"] == RECORDED["changed"]


def test_help_says_what_base_costs():
    text = " ".join(cli("detect", "--help").output.split())
    assert "reads both checkpoints whole" in text
    assert "effective rank (a truncated SVD) of every changed weight" in text


def test_cli_draws_the_bar_on_a_terminal_stderr_and_keeps_stdout_the_result():
    """In a pty (stderr) with stdout piped: the bar draws on the terminal, the piped result is the text alone."""
    master, slave = os.openpty()
    env = dict(os.environ, COLUMNS="100")
    cmd = [sys.executable, "-m", "lora_convert.cli", "detect", TUNED, "--base", BASE]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env) as proc:
        os.close(slave)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        stdout = proc.stdout.read().decode() if proc.stdout else ""
    os.close(master)
    assert proc.returncode == 0, drawn
    assert b"comparing with the base" in drawn and b"86.7/86.7 kB" in drawn
    assert stdout.startswith("form: merged\n")  # nothing of the bar in the result
    assert "comparing" not in stdout and "\x1b" not in stdout

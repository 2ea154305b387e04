"""What the tests share: the CLI harness, the format libraries' own readings (the references), hostile JSON
values and the output race harness.

One place for each, so that a harness made stricter is stricter for every test; test files import from here
(and from the tiny model builders), never from each other (``test_layers`` checks it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny import LayerKinds, gpt2, llama, qwen2

from lora_convert.cli import main
from lora_convert.io.output import TMP_MARK

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


# -- the CLI harness: "one error line, nothing written" --------------------------------------------------


def cli(*args: object) -> Result:
    """``lora-convert ARGS`` through click's runner, in-process; paths may be given as ``Path``."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def one_error(res: Result, *needles: str, out: Path | None = None, code: int = 1) -> str:
    """Exit ``code``, one ``error:`` line on stderr holding every needle, no traceback, and no internal error
    unless a needle asks for one; with ``out``, nothing at the output and no temp folder beside it.  Returns
    the line."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    if not any("internal error" in n for n in needles):
        assert "internal error" not in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    if out is not None:
        assert not out.exists()
        if out.parent.is_dir():
            assert not [p for p in out.parent.iterdir() if TMP_MARK in p.name]
    return lines[0]


# The CLI run as a user runs it, in a fresh interpreter: prints whether torch was imported (on stderr, last).
FRONT_DOOR = """
import sys, runpy
sys.argv = ["lora-convert", *sys.argv[1:]]
try:
    runpy.run_module("lora_convert.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", file=sys.stderr)
sys.exit(code)
"""


def front_door(*args: str) -> subprocess.CompletedProcess:
    """``lora-convert ARGS`` in a child process; its stderr ends in ``NO_TORCH`` or ``TORCH_IMPORTED``."""
    return subprocess.run(
        [sys.executable, "-c", FRONT_DOOR, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


# -- the references: what the formats' own libraries read from a file ------------------------------------


def peft_load(base: torch.nn.Module | Callable[[], torch.nn.Module], adapter_dir: Path):
    """PEFT's unmerged model of an adapter folder (the reference for every merge): fails on any warning of a
    missing or unexpected key.  ``base`` is the model, or a factory called while the warnings are watched."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = base if isinstance(base, torch.nn.Module) else base()
        pm = PeftModel.from_pretrained(model, str(adapter_dir))
    bad = [
        str(w.message)
        for w in caught
        if "key" in str(w.message).lower()
        and ("missing" in str(w.message).lower() or "unexpected" in str(w.message).lower())
    ]
    assert not bad, bad
    return pm.eval()


def read_gguf(path: Path) -> tuple[dict, dict]:
    """gguf-py's reading: ({key: (value, type name)}, {tensor: (fp32 values in torch order, ggml ne, type name)})."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {k: (f.contents(), f.types[0].name) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        ne = [int(x) for x in t.shape]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(ne)))
        tensors[t.name] = (torch.from_numpy(values.astype("float32")), ne, t.tensor_type.name)
    return kv, tensors


def peft_as_mlx(pm, folder: Path, scale: float, **config) -> None:
    """A PEFT adapter written in mlx-lm's format by hand (from the format's definition, not our writer)."""
    out = {}
    for k, v in pm.state_dict().items():
        if ".lora_" in k and ".default" in k:
            module = k.removeprefix("base_model.model.").split(".lora_")[0]
            leaf = "lora_a" if ("lora_A" in k or "lora_embedding_A" in k) else "lora_b"
            if "magnitude" in k:
                leaf = "m"
            out[f"{module}.{leaf}"] = (v if leaf == "m" else v.T).detach().contiguous().clone()
    folder.mkdir()
    save_file(out, folder / "adapters.safetensors")
    rank = next(t.shape[1] for k, t in out.items() if k.endswith(".lora_a"))
    config.setdefault("fine_tune_type", "lora")
    config.setdefault("num_layers", 16)
    config["lora_parameters"] = {"rank": rank, "scale": scale, "dropout": 0.0, **config.get("lora_parameters", {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def diffusers_load(path, fresh, weight_name=None, **kw):
    """diffusers' own loading of a LoRA file onto ``fresh`` (kohya files: network_alphas; others: metadata)."""
    from diffusers import StableDiffusionPipeline
    from tiny import unet_out

    kwargs = {"weight_name": weight_name} if weight_name else {}
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True, **kwargs, **kw)
    fresh.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, metadata=meta, adapter_name="x")
    return unet_out(fresh)


# -- hostile JSON values: every type, non-finite and huge numbers, tricky strings ----------------------------

HOSTILE = [
    float("nan"),
    float("inf"),
    -float("inf"),
    1e300,
    -1e300,
    2**70,
    -(2**70),
    -1,
    0,
    1,
    True,
    False,
    None,
    "",
    "false",
    "true",
    "none",
    "\ud800",
    "x\udfff",
    "(.|.)+(?=Z)",
    "([\\w.]|[\\w.])+(?=Z)",
    "q_proj(",
    "[/bold]",
    "\x1b[31m",
    "a" * 10_000,
    "q_proj",
    "lora_only",
    "pissa",
    "LORA",
    "LOHA",
    [],
    {},
    [1, 2],
    [[1, 2]],
    {"q_proj": 4},
    {"q_proj": "4"},
    {"(.|.)+(?=Z)": 2},
    {"embed_tokens": [1, 2]},
    3.5,
    8.0,
]
_leaf = st.one_of(
    st.sampled_from(HOSTILE),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
)
json_any = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12
)


# -- the output race harness: a real merge slowed down between tensors, so that another run or a signal lands
# midway --------------------------------------------------------------------------------------------------

SLOW_CHILD = r"""
import sys, time
import lora_convert.io.writer as w
orig = w.SafetensorsWriter.write
delay = float(sys.argv[1])
def slow(self, name, data):
    orig(self, name, data)
    self._fh.flush()
    time.sleep(delay)
w.SafetensorsWriter.write = slow
from lora_convert.cli import main
sys.argv = ["lora-convert"] + sys.argv[2:]
main()
"""


def slow_cli(*args: object, delay: float) -> subprocess.Popen:
    """``lora-convert ARGS`` in a child process that sleeps ``delay`` seconds after each tensor it writes (the
    file flushed first, so that its size shows the progress)."""
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, str(delay), *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def temps(folder: Path) -> list[Path]:
    """This tool's temp folders (and files) in ``folder``."""
    return sorted(p for p in folder.iterdir() if TMP_MARK in p.name)


def wait_for_temp(proc: subprocess.Popen, folder: Path, *, min_bytes: int = 0, timeout: float = 60) -> Path:
    """Until a temp folder in ``folder`` holds a weights file of at least ``min_bytes``; fails if the child
    ends first or the time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for t in temps(folder):
            f = t / "model.safetensors"
            if f.is_file() and f.stat().st_size >= min_bytes:
                return t
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it got midway: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the run never got midway")


# -- the PEFT case matrix: every kind of module and option the merge handles, on tiny Llama, Qwen2, GPT-2 ------
# name -> (model builder, its keywords, LoraConfig keywords).  test_merge checks each merge against PEFT's
# unmerged logits, test_verify that each verifies, merged by us and by PEFT.

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEARS = ATTN + ["gate_proj", "up_proj", "down_proj"]

PEFT_CASES: dict[str, tuple[Callable[..., torch.nn.Module], dict, dict]] = {
    "llama-attn": (llama, {}, dict(r=8, lora_alpha=16, target_modules=ATTN)),
    "llama-all-linears": (llama, {}, dict(r=4, lora_alpha=8, target_modules=ALL_LINEARS)),
    "llama-embed-lmhead": (
        llama,
        {},
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens", "lm_head"]),
    ),
    "llama-embed-lmhead-qv": (
        llama,
        {},
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    ),
    "llama-rslora": (llama, {}, dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEARS)),
    "llama-patterns": (
        llama,
        {},
        dict(
            r=4,
            lora_alpha=8,
            target_modules=ALL_LINEARS,
            rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"^model.layers.0.self_attn.v_proj": 3, "up_proj": 32},
        ),
    ),
    "llama-patterns-rslora": (
        llama,
        {},
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=ALL_LINEARS,
            rank_pattern={"q_proj": 2},
            alpha_pattern={"up_proj": 3},
        ),
    ),
    "llama-dora": (llama, {}, dict(r=4, lora_alpha=8, use_dora=True, target_modules=ALL_LINEARS + ["lm_head"])),
    "llama-dora-embed": (llama, {}, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"])),
    "llama-modules-to-save": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=ATTN, modules_to_save=["input_layernorm", "norm"]),
    ),
    "llama-modules-to-save-norm": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
    ),
    "llama-layers-to-transform": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=ALL_LINEARS, layers_to_transform=[1]),
    ),
    "llama-trainable-tokens": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=ATTN, trainable_token_indices=[3, 7, 50]),
    ),
    "llama-trainable-tokens-q": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 7, 50]),
    ),
    "qwen2-tied-embed": (qwen2, {}, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "qwen2-tied-lmhead": (qwen2, {}, dict(r=4, lora_alpha=8, target_modules=["lm_head", "v_proj"])),
    "qwen2-tied-tokens": (
        qwen2,
        {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 9]),
    ),
    "qwen2-lora-bias": (
        qwen2,
        {"tie": False},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
    ),
    "qwen2-lora-bias-qv": (
        qwen2,
        {"tie": False},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),
    ),
    "qwen2-bias-lora-only": (
        qwen2,
        {"tie": False},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only"),
    ),
    "gpt2-conv1d": (
        gpt2,
        {},
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "gpt2-conv1d-dora": (
        gpt2,
        {},
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True),
    ),
}


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """``folder`` (created) with a tmpfs of ``options`` (e.g. ``size=1m``, ``ro,size=64k``) mounted on it for the
    block: a small disk to fill, or one that refuses writes.  Skips where mounting needs privileges we lack."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs ({options}): {r.stderr.strip() or r.returncode}; needs root with CAP_SYS_ADMIN"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# -- Ray, only inside a network namespace that holds loopback alone (every address 127.x) ------------------------
def loopback_namespace_unavailable() -> str | None:
    """None where this process may make a network namespace holding only loopback; else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is missing"
    try:
        r = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30)
    except OSError as e:
        return str(e)
    return None if r.returncode == 0 else f"cannot make a network namespace (not root?): {r.stderr.decode()[:200]}"


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> its sha256: two outputs compared byte for byte."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def merge_layer_kinds_like_peft(tmp_path: Path, config: Any) -> list[str]:
    """A tiny LayerKinds model (Linear, Conv2d 3×3 and 1×1) with PEFT's tuner ``config`` on it, merged by us from
    its saved adapter: every merged tensor within 1e-6 of PEFT's ``merge_and_unload``, and ``detect``'s count PEFT's
    trainable count.  Returns the names of the tensors PEFT's merge changed (sorted), for the caller's check."""
    import copy

    from peft import get_peft_model
    from safetensors.torch import load_file

    import lora_convert as lc

    torch.manual_seed(0)
    model = LayerKinds()
    (tmp_path / "base").mkdir()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    pm = get_peft_model(model, config)
    pm.save_pretrained(str(tmp_path / "adapter"))
    want = {k: v.detach() for k, v in copy.deepcopy(pm).merge_and_unload().state_dict().items()}
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-6, k
    assert lc.detect(tmp_path / "adapter").adapters[0].lora_parameters == pm.get_nb_trainable_parameters()[0]
    return sorted(k for k in want if not torch.equal(want[k], base[k]))

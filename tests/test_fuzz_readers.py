"""Fuzzing the readers added last round (issue 23): MLX adapter configs, diffusers metadata, fp8
``quantization_config`` and bitsandbytes ``quant_state``, MoE configs, and the config.json keys GGUF export reads.

Property, as in test_fuzz_json.py: every input gives a result or our own error (a LoraConvertError naming the
file), never another exception.  Unlike there, the examples run in a child process under an address-space limit
(RLIMIT_AS) and a wall-clock alarm per example, so that a hang or a blow-up (a layer count that sizes a name map,
a range that becomes a set) fails the test instead of taking the machine.  The child starts once for every
target (a torch import costs seconds); each test reads its target's outcome.  A fixed (derandomized) set of
examples per target (310 in all), no shrinking: the whole file takes ~20 s on 2 idle cores, ~45 s loaded.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from helpers import json_any
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CHILD_MEMORY = 3 << 30  # torch, transformers and gguf import within ~1.5 GB of address space
EXAMPLE_SECONDS = 10
EXAMPLES = {"mlx": 60, "diffusers": 60, "quant_config": 40, "quant_state": 60, "moe": 30, "gguf": 60}
SETTINGS = {
    "deadline": None,
    "suppress_health_check": list(HealthCheck),
    "derandomize": True,
    "database": None,
    "phases": [Phase.explicit, Phase.generate],  # no shrinking: the first failure is reported as found
}

# numbers that have broken readers: zero, negatives, beyond int64, beyond float, floats for ints, strings for numbers
NUMBERS = st.sampled_from(
    [0, -1, 1, 2, 3, 4, 7, 8, 64, 128, 4096, 2**31, 2**63, 2**64, 10**12, 10**400, -(10**400), 1e12, 1.5, 128.0]
    + [float("nan"), float("inf"), True, False, None, "128", "nf5", "e5m2", [128, 128], [0, 0], [128], [], {}]
)
VALUES = st.one_of(NUMBERS, NUMBERS, json_any)


@st.composite
def edited(draw, valid: dict, keys: list[str]) -> dict:
    """``valid`` with 1-3 of ``keys`` (or its own) set to a hostile value or dropped."""
    data = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from(sorted(set(keys) | set(valid))))
        if draw(st.integers(0, 5)) == 0:
            data.pop(k, None)
        else:
            data[k] = draw(VALUES)
    return data


# -- the child: every target, each example bounded --------------------------------------------------------------


class Late(BaseException):
    """An example ran past EXAMPLE_SECONDS (a BaseException: no ``except Exception`` in the code under test
    can turn it into a result)."""


def _late(*_: object) -> None:
    raise Late(f"example took more than {EXAMPLE_SECONDS} s")


def ours(exc: Exception, *paths: Path) -> None:
    """Our error, naming one of ``paths`` (a file or its folder), on one line."""
    from lora_convert.errors import LoraConvertError

    if not isinstance(exc, LoraConvertError):
        raise exc
    text = str(exc)
    assert any(str(p) in text for p in paths), text
    assert "\n" not in text and "internal error" not in text


def bounded(fn, *paths: Path) -> object:
    """``fn()`` under the per-example alarm; our errors are fine (None), anything else fails the example."""
    signal.alarm(EXAMPLE_SECONDS)
    try:
        return fn()
    except Late:
        raise
    except Exception as exc:  # noqa: BLE001 - checked by ours(): our error or re-raised
        ours(exc, *paths)
        return None
    finally:
        signal.alarm(0)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def fuzz_mlx(root: Path, work: Path, n: int) -> None:
    from lora_convert import api

    src = root / "mlx"
    valid = json.loads((src / "adapter_config.json").read_text())
    folder = work / "mlx"
    shutil.copytree(src, folder)
    cfg_path = folder / "adapter_config.json"

    @settings(max_examples=n, **SETTINGS)
    @given(
        top=edited(valid, ["fine_tune_type", "use_dora", "num_layers", "lora_parameters", "lora_layers"]),
        params=st.none() | edited(valid["lora_parameters"], ["rank", "scale", "dropout", "keys", "alpha"]),
    )
    def run(top, params):
        if params is not None:
            top["lora_parameters"] = params
        cfg_path.write_text(json.dumps(top))
        out = _fresh(work / "mlx-out")
        got = bounded(lambda: api.convert(folder, "adapter", output=out), cfg_path, folder)
        if got is not None:
            written = json.loads((out / "adapter_config.json").read_text())
            assert math.isfinite(written["lora_alpha"]) and written["r"] >= 1
            assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())

    run()


DIFFUSERS_META = {
    "unet.r": 8,
    "unet.lora_alpha": 16,
    "unet.target_modules": ["q_proj", "v_proj", "o_proj"],
    "unet.use_dora": False,
    "unet.peft_version": "0.18.0",
}


def fuzz_diffusers(root: Path, work: Path, n: int) -> None:
    from lora_convert import api

    tensors = load_file(str(root / "diffusers.safetensors"))
    path = work / "pytorch_lora_weights.safetensors"
    keys = ["unet.r", "unet.lora_alpha", "unet.rank_pattern", "unet.alpha_pattern", "unet.use_rslora", "unet.bias"]
    keys += ["unet.peft_version", "unet.lora_bias", "unet.layers_to_transform", "text_encoder.r", "unet", ""]

    @settings(max_examples=n, **SETTINGS)
    @given(meta=edited(DIFFUSERS_META, keys), raw=st.integers(0, 9))
    def run(meta, raw):
        text = json.dumps(meta)
        if raw == 0:  # a value over Python's digit limit, or text that is not JSON
            text = text.replace("16", "1" * 5000, 1) if "16" in text else text[: len(text) // 2]
        save_file(tensors, str(path), metadata={"lora_adapter_metadata": text})
        d = bounded(lambda: api.detect(path), path)
        if d is not None:
            bounded(lambda: api.report(path), path)

    run()


def fuzz_quant_config(root: Path, work: Path, n: int) -> None:
    from lora_convert import api

    base = work / "fp8"
    shutil.copytree(root / "fp8", base)
    cfg_path = base / "config.json"
    valid = json.loads(cfg_path.read_text())

    @settings(max_examples=n, **SETTINGS)
    @given(qc=edited(valid["quantization_config"], ["weight_block_size", "fmt", "activation_scheme", "scale_fmt"]))
    def run(qc):
        cfg_path.write_text(json.dumps({**valid, "quantization_config": qc}))
        out = _fresh(work / "fp8-merged")
        rep = bounded(lambda: api.report(base), base)
        if rep is not None:  # read as quantized: a merge dequantizes every weight within the bounds
            bounded(lambda: api.merge(root / "adapter", base=base, output=out), base)

    run()


def fuzz_quant_state(root: Path, work: Path, n: int) -> None:
    from lora_convert import api

    base = work / "nf4"
    shutil.copytree(root / "nf4", base)
    path = base / "model.safetensors"
    sd = load_file(str(root / "nf4" / "model.safetensors"))
    key = next(k for k in sorted(sd) if ".quant_state.bitsandbytes__" in k)
    valid = json.loads(bytes(sd[key].tolist()).decode())
    keys = ["blocksize", "nested_blocksize", "shape", "quant_type", "dtype", "nested_offset"]

    @settings(max_examples=n, **SETTINGS)
    @given(state=edited(valid, keys))
    def run(state):
        sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        save_file(sd, str(path), metadata={"format": "pt"})
        out = _fresh(work / "nf4-merged")
        if bounded(lambda: api.report(base), base) is not None:
            bounded(lambda: api.merge(root / "adapter", base=base, output=out), base)

    run()


def fuzz_moe(root: Path, work: Path, n: int) -> None:
    from lora_convert import api

    base = work / "moe-base"
    shutil.copytree(root / "moe-base", base)
    cfg_path = base / "config.json"
    valid = json.loads(cfg_path.read_text())
    keys = ["num_experts", "num_local_experts", "num_experts_per_tok", "moe_topk", "top_k", "n_routed_experts"]
    keys += ["model_type", "architectures", "moe_intermediate_size", "num_hidden_layers", "decoder_sparse_step"]

    @settings(max_examples=n, **SETTINGS)
    @given(cfg=edited(valid, keys))
    def run(cfg):
        cfg_path.write_text(json.dumps(cfg))
        rep = bounded(lambda: api.report(root / "moe-adapter", base=base, seq_len=1), cfg_path, base)
        if rep is not None:
            assert all(r.extra_flops is None or r.extra_flops >= 0 for r in rep.modules)
        bounded(lambda: api.merge(root / "moe-adapter", base=base, output=_fresh(work / "moe-out")), cfg_path, base)

    run()


def fuzz_gguf(root: Path, work: Path, n: int) -> None:
    import gguf

    from lora_convert import api

    base = work / "gguf-base"
    shutil.copytree(FIXTURES / "tiny-llama-base", base)
    cfg_path = base / "config.json"
    valid = json.loads(cfg_path.read_text())
    keys = ["architectures", "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
    keys += ["hidden_size", "vocab_size", "tie_word_embeddings", "text_config", "head_dim"]

    @settings(max_examples=n, **SETTINGS)
    @given(cfg=edited(valid, keys))
    def run(cfg):
        cfg_path.write_text(json.dumps(cfg))
        out = work / "out.gguf"
        out.unlink(missing_ok=True)
        got = bounded(
            lambda: api.convert(FIXTURES / "tiny-llama-lora", "gguf", base=base, output=out),
            cfg_path,
            base,
            FIXTURES / "tiny-llama-lora",
        )
        if got is not None:
            assert len(gguf.GGUFReader(out).tensors) == 16

    run()


TARGETS = {
    "mlx": fuzz_mlx,
    "diffusers": fuzz_diffusers,
    "quant_config": fuzz_quant_config,
    "quant_state": fuzz_quant_state,
    "moe": fuzz_moe,
    "gguf": fuzz_gguf,
}


def child_main(root: str, work: str) -> None:
    """Run every target; one JSON line each: ``{"target": ..., "error": None or the failure}``."""
    from lora_convert import config

    config.PATTERN_TIMEOUT_S = 0.1
    signal.signal(signal.SIGALRM, _late)
    for name, fn in TARGETS.items():
        d = Path(work) / name
        d.mkdir(parents=True)
        try:
            fn(Path(root), d, EXAMPLES[name])
            error = None
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the target's test
            error = "".join(traceback.format_exception(exc))[-4000:]
        print(json.dumps({"target": name, "error": error}), flush=True)


# -- the parent: the inputs, one child, one test per target ---------------------------------------------------------


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str | None]:
    from quant_models import llama, save_bnb, save_fp8
    from tiny import peft_wrap
    from tiny_moe import model, peft_experts, save_base

    from lora_convert import api

    root = tmp_path_factory.mktemp("fuzz_inputs")
    api.convert(FIXTURES / "tiny-llama-lora", "mlx", base=FIXTURES / "tiny-llama-base", output=root / "mlx")
    sd = load_file(str(FIXTURES / "tiny-llama-lora" / "adapter_model.safetensors"))
    unet = {"unet." + k.removeprefix("base_model.model."): v for k, v in sd.items() if ".layers." in k}
    save_file(unet, str(root / "diffusers.safetensors"))
    save_fp8(llama(), root / "fp8")
    save_bnb(llama(), root / "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "adapter")
    m = model("qwen3_moe")
    save_base(m, root / "moe-base")
    peft_experts(m, r=3, alpha=6).save_pretrained(str(root / "moe-adapter"))

    work = tmp_path_factory.mktemp("fuzz_work")
    code = f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]; import test_fuzz_readers as t; t.child_main(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    budget = 120 + EXAMPLE_SECONDS * sum(EXAMPLES.values())
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(root), str(work)],
            preexec_fn=_limit,
            capture_output=True,
            text=True,
            timeout=budget,
            env=env,
            cwd=ROOT,
        )
        stdout, stderr, died = proc.stdout, proc.stderr, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, died = exc.stdout or "", exc.stderr or "", f"no end after {budget} s"
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    got: dict[str, str | None] = {}
    for line in stdout.splitlines():
        if line.startswith('{"target"'):
            row = json.loads(line)
            got[row["target"]] = row["error"]
    for name in TARGETS:  # a target the child never reported on: it died there (memory) or hung
        got.setdefault(name, f"the child stopped ({died}) during this target: {stderr[-3000:]}")
    return got


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_reader(outcomes, target):
    assert outcomes[target] is None, outcomes[target]

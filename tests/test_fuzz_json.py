"""Fuzzing the JSON files we parse: adapter_config.json, config.json and *.index.json.

Property: every input gives a correct result or our own error (a LoraConvertError naming the
file), never another exception, a hang or a memory blow-up.  Bounds, per example: wall time
under EXAMPLE_SECONDS and a Python-heap peak (tracemalloc) under EXAMPLE_HEAP_MB.  Regex keys
are matched with a 0.1 s timeout here (2 s in real runs) so that catastrophic ones stay cheap.
Each test runs a fixed (derandomized) set of 80-150 examples: the file takes ~20 s on 2 idle cores.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Self

import pytest
import torch
from helpers import json_any
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_convert import api
from lora_convert.config import AdapterConfig
from lora_convert.errors import LoraConvertError
from lora_convert.io.reader import open_checkpoint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EXAMPLE_SECONDS = 10.0
EXAMPLE_HEAP_MB = 64
SETTINGS = {"deadline": None, "suppress_health_check": list(HealthCheck), "derandomize": True, "database": None}

VALID_ADAPTER_CONFIG = json.loads((FIXTURES / "tiny-llama-lora" / "adapter_config.json").read_text())
VALID_CONFIG = json.loads((FIXTURES / "tiny-llama-base" / "config.json").read_text())
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")] + [
    "model.embed_tokens",
    "lm_head",
]


@st.composite
def mutated(draw, valid: dict, extra_keys: list[str]) -> bytes:
    """A valid file with a few keys changed, dropped or added — or raw damage to its bytes."""
    kind = draw(st.sampled_from(["keys", "keys", "keys", "raw", "deep", "top"]))
    if kind == "top":
        return json.dumps(draw(json_any)).encode()
    if kind == "deep":
        n = draw(st.integers(1, 3000))
        return (json.dumps(valid)[:-1] + ', "x": ' + "[" * n + "]" * n + "}").encode()
    data = json.loads(json.dumps(valid))
    keys = sorted(set(data) | set(extra_keys))
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.sampled_from(keys) | st.text(max_size=6))
        if draw(st.integers(0, 5)) == 0:
            data.pop(k, None)
        else:
            data[k] = draw(json_any)
    raw = json.dumps(data).encode()
    if kind == "raw":
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            i = draw(st.integers(0, max(0, len(b) - 1)))
            if op == "flip" and b:
                b[i] = draw(st.integers(0, 255))
            elif op == "cut":
                del b[i:]
            else:
                b[i:i] = draw(st.binary(min_size=1, max_size=4))
        raw = bytes(b)
    return raw


class Bounded:
    """Time and Python-heap bound of one example."""

    def __enter__(self) -> Self:
        tracemalloc.start()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        took = time.monotonic() - self.t0
        assert took < EXAMPLE_SECONDS, f"example took {took:.1f} s"
        assert peak < EXAMPLE_HEAP_MB * 2**20, f"example peaked at {peak / 2**20:.0f} MiB of Python heap"


def ours(exc: LoraConvertError, path: Path) -> None:
    """Our error, naming the file, printable on one line."""
    text = str(exc)
    assert str(path) in text or str(path.parent) in text, text
    assert "\n" not in text and "\x1b" not in text
    text.encode("utf-8")


@pytest.fixture(autouse=True)
def fast_pattern_timeout(monkeypatch):
    from lora_convert import config

    monkeypatch.setattr(config, "PATTERN_TIMEOUT_S", 0.1)


# -- adapter_config.json -------------------------------------------------------------------------------


@settings(max_examples=150, **SETTINGS)
@given(
    raw=mutated(
        VALID_ADAPTER_CONFIG,
        [
            "rank_pattern",
            "alpha_pattern",
            "trainable_token_indices",
            "layers_to_transform",
            "layer_replication",
            "use_dora",
            "lora_bias",
        ],
    )
)
def test_fuzz_adapter_config(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("acfg", numbered=True)
    p = d / "adapter_config.json"
    p.write_bytes(raw)
    try:
        with Bounded():
            try:
                cfg = AdapterConfig.load(p)
                for m in MODULES:
                    r, a = cfg.rank_for(m), cfg.alpha_for(m)
                    assert isinstance(r, int) and r >= 1 and math.isfinite(a)
                    s = cfg.scaling_for(m, 4)
                    assert math.isfinite(s) and abs(s) <= 3.5e38
                tokens = cfg.trainable_token_map()
                assert all(isinstance(i, int) and i >= 0 for v in tokens.values() for i in v)
                cfg.unsupported_reasons()
                json.dumps(cfg.to_dict())
            except LoraConvertError as exc:
                ours(exc, p)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- config.json, through a whole merge ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref") / "out"
    api.merge(FIXTURES / "tiny-llama-lora", base=FIXTURES / "tiny-llama-base", output=out)
    return load_file(str(out / "model.safetensors"))


@settings(max_examples=80, **SETTINGS)
@given(
    raw=mutated(
        VALID_CONFIG,
        ["tie_word_embeddings", "quantization_config", "text_config", "model_type", "vocab_size", "torch_dtype"],
    )
)
def test_fuzz_config_json_through_a_merge(tmp_path_factory, reference, raw):
    d = tmp_path_factory.mktemp("cfg", numbered=True)
    base = d / "base"
    shutil.copytree(FIXTURES / "tiny-llama-base", base)
    (base / "config.json").write_bytes(raw)
    try:
        with Bounded():
            try:
                api.merge(FIXTURES / "tiny-llama-lora", base=base, output=d / "out")
            except LoraConvertError as exc:
                ours(exc, base / "config.json")
                assert not (d / "out").exists()
                return
        got = load_file(str(d / "out" / "model.safetensors"))
        assert set(got) == set(reference)
        for k, v in got.items():  # the config may tie lm_head to the embedding: every other tensor is fixed
            if k != "lm_head.weight":
                assert torch.equal(v, reference[k]), k
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- *.index.json --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    d = root / "model"
    d.mkdir()
    sd = load_file(str(FIXTURES / "tiny-llama-base" / "model.safetensors"))
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for f, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(d / f), metadata={"format": "pt"})
    shutil.copy(FIXTURES / "tiny-llama-base" / "config.json", d)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": {k: f for f, ks in halves.items() for k in ks}})
    )
    # a decoy outside the folder, with the same names and other values: it must never be read
    save_file({k: v + 1000 for k, v in sd.items()}, str(root / "outside.safetensors"))
    return d


SHARD_NAMES = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "../outside.safetensors",
    "missing.safetensors",
    "",
    ".",
    "..",
    "/etc/passwd",
    "config.json",
    "sub/../model-00001-of-00002.safetensors",
]


@st.composite
def index_files(draw) -> bytes:
    sd_keys = sorted(load_file(str(FIXTURES / "tiny-llama-base" / "model.safetensors")))
    wm = {
        k: ("model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors")
        for i, k in enumerate(sd_keys)
    }
    kind = draw(st.sampled_from(["entries", "entries", "entries", "shape", "raw"]))
    if kind == "shape":
        return json.dumps(draw(st.one_of(json_any, st.builds(lambda v: {"weight_map": v}, json_any)))).encode()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["value", "drop", "add", "rename"]))
        k = draw(st.sampled_from(sd_keys))
        if op == "value":
            wm[k] = draw(st.sampled_from(SHARD_NAMES) | json_any)
        elif op == "drop":
            wm.pop(k, None)
        elif op == "add":
            wm[draw(st.text(max_size=8))] = draw(st.sampled_from(SHARD_NAMES))
        else:
            wm[k + draw(st.text(min_size=1, max_size=3))] = wm.pop(k, SHARD_NAMES[0])
    text = json.dumps({"metadata": draw(json_any), "weight_map": wm})
    if kind == "raw":
        b = bytearray(text.encode())
        i = draw(st.integers(0, len(b) - 1))
        b[i] = draw(st.integers(0, 255))
        return bytes(b)
    return text.encode()


@settings(max_examples=150, **SETTINGS)
@given(raw=index_files())
def test_fuzz_index_json(sharded, raw):
    index = sharded / "model.safetensors.index.json"
    original = index.read_bytes()
    truth = load_file(str(FIXTURES / "tiny-llama-base" / "model.safetensors"))
    index.write_bytes(raw)
    try:
        with Bounded():
            try:
                with open_checkpoint(sharded) as ck:
                    assert ck.tensors and set(ck.tensors) <= set(truth)
                    for name in ck:
                        assert ck.info(name).file.parent == sharded, "a shard outside the folder was read"
                        assert torch.equal(ck.read(name), truth[name]), name
            except LoraConvertError as exc:
                ours(exc, index)
    finally:
        index.write_bytes(original)


def test_index_is_bounded_by_its_byte_cap(sharded, monkeypatch):
    """An index is parsed only when within its byte cap (64 MiB in real runs; 4096 bytes here)."""
    index = sharded / "model.safetensors.index.json"
    original = index.read_bytes()
    wm = {f"t{i}": "model-00001-of-00002.safetensors" for i in range(1000)}
    index.write_text(json.dumps({"weight_map": wm}))
    try:
        from lora_convert.io import reader

        monkeypatch.setattr(reader, "MAX_INDEX_BYTES", 4096)
        with pytest.raises(LoraConvertError, match="bytes, more than the 4096 bytes an index may have"):
            open_checkpoint(sharded)
    finally:
        index.write_bytes(original)

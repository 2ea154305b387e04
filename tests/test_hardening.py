"""Hardening (issue 12): hostile names, configs and files, and races at the output.

Each class of hole is tried with several instances; every failure must be one ``error:`` line
(exit 1) naming the file, with nothing written at ``-o``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, cli, one_error
from safetensors.torch import load_file, save_file

from lora_convert.text import escape_controls, safe

ADAPTER_FILE = "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def work(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "tiny-llama-base", tmp_path / "base")
    shutil.copytree(FIXTURES / "tiny-llama-lora", tmp_path / "adapter")
    return tmp_path


def merge(work: Path, *extra: str, out: Path | None = None):
    out = out or work / "out"
    return cli("merge", work / "adapter", "--base", work / "base", "-o", out, *extra), out


def edit_config(work: Path, **changes) -> Path:
    p = work / "adapter" / "adapter_config.json"
    c = json.loads(p.read_text())
    c.update(changes)
    p.write_text(json.dumps(c))
    return p


def add_tensors(path: Path, extra: dict[str, torch.Tensor]) -> None:
    sd = load_file(str(path))
    sd.update(extra)
    save_file(sd, str(path), metadata={"format": "pt"})


def raw_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    b = header if isinstance(header, bytes) else json.dumps(header).encode()
    b += b" " * (-len(b) % 8)
    path.write_bytes(struct.pack("<Q", len(b)) + b + data)


# -- class: text that reaches the terminal ------------------------------------------------------------

HOSTILE_NAMES = [
    "[/bold]",
    "[red]x[/red]",
    "\x1b[2J\x1b[31mred",
    "x\nerror: fake line",
    "\rover",
    ":cake:",
    "rtl\u202eevil",
    "nul\x00byte",
    "c1\x9bcsi",
    "tab\there",
    "sep\u2028line",
    "back\\",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_safe_escapes_controls_and_markup(name):
    from rich.console import Console

    s = safe(name)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u2028" for c in s), repr(s)
    console = Console(record=True, width=200, emoji=False, color_system=None)
    console.print(s)
    printed = console.export_text().rstrip("\n")
    assert printed == escape_controls(name), (printed, name)


def test_safe_lone_surrogate_prints():
    assert safe("a\udcffb", markup=False) == "a\\udcffb"
    safe("a\udcffb").encode("utf-8")


def _hostile_adapter(work: Path, names: list[str]) -> None:
    add_tensors(work / "adapter" / ADAPTER_FILE, {f"base_model.model.{n}.weight": torch.zeros(2) for n in names})


@pytest.mark.parametrize("as_json", [False, True])
def test_detect_prints_hostile_names_escaped(work, as_json):
    # hostile names as modules_to_save tensors of the adapter: detect lists them
    _hostile_adapter(work, HOSTILE_NAMES)
    res = cli("detect", work / "adapter", *(["--json"] if as_json else []))
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x9b" not in res.output and "\u202e" not in res.output
    if as_json:
        json.loads(res.stdout)
    else:
        assert "[/bold]" in res.stdout, "markup printed as written"
        assert "x\\nerror: fake line" in res.stdout
        assert not [ln for ln in res.stdout.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("name", ["x\nerror: fake", "\x1b[31m[/bold]", "a\u2028b"])
def test_error_line_with_hostile_tensor_name(work, name):
    # a lora_A without its lora_B under a hostile module name: the error names it, on one line
    add_tensors(work / "adapter" / ADAPTER_FILE, {f"base_model.model.{name}.lora_A.weight": torch.zeros(2, 2)})
    res, out = merge(work)
    line = one_error(res, out=out)  # "lora_B is missing" (or, for a newline, "match no tensor of the base")
    assert escape_controls(name) in line


def test_unexpected_exception_is_one_line(work, monkeypatch):
    from lora_convert import api

    for exc in (ValueError("boom\nsecond line"), KeyError("k"), RuntimeError("[/bold]"), AssertionError()):

        def fail(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(api, "convert", fail)
        res, out = merge(work)
        one_error(res, "internal error", type(exc).__name__, "this is a bug", "--debug", out=out)
    res = cli("--debug", "merge", work / "adapter", "--base", work / "base", "-o", work / "out")
    assert isinstance(res.exception, AssertionError)


def test_oserror_is_one_line_not_a_bug(work, monkeypatch):
    from lora_convert import api

    def fail(*a, **k):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(api, "convert", fail)
    res, out = merge(work)
    line = one_error(res, "/some/file: Permission denied", out=out)
    assert "bug" not in line


def test_printing_failure_is_one_line(work, monkeypatch):
    """An exception while printing a result (after the work) is caught too."""
    from lora_convert import render

    def boom(*a, **k):
        raise UnicodeEncodeError("ascii", "é", 0, 1, "cannot encode")

    monkeypatch.setattr(render, "conversion", boom)
    res, _ = merge(work)
    one_error(res, "internal error", "UnicodeEncodeError")


# -- class 5 (files): every JSON file we parse is bounded; shards must be regular files --------------------


def _sharded(work: Path) -> Path:
    """base split into two shards with an index."""
    sd = load_file(str(work / "base" / "model.safetensors"))
    keys = sorted(sd)
    d = work / "sharded"
    d.mkdir()
    shutil.copy(work / "base" / "config.json", d)
    halves = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for f, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(d / f), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}})
    )
    return d


@pytest.mark.parametrize("which,cap", [("adapter_config", 16), ("config", 16), ("index", 64)])
def test_json_files_over_the_cap(work, which, cap):
    sharded = _sharded(work)
    path = {
        "adapter_config": work / "adapter" / "adapter_config.json",
        "config": work / "base" / "config.json",
        "index": sharded / "model.safetensors.index.json",
    }[which]
    with open(path, "r+b") as f:  # sparse: costs no disk
        f.truncate(cap * 2**20 + 1)
    base = "sharded" if which == "index" else "base"
    res = cli("merge", work / "adapter", "--base", work / base, "-o", work / "out")
    one_error(res, str(path), f"more than the {cap} MiB", out=work / "out")


@pytest.mark.parametrize("depth", [65, 200, 100_000])
@pytest.mark.parametrize("which", ["adapter_config", "config", "index"])
def test_json_nested_too_deep(work, which, depth):
    sharded = _sharded(work)
    deep = "[" * depth + "]" * depth
    if which == "index":
        path = sharded / "model.safetensors.index.json"
        idx = json.loads(path.read_text())
        path.write_text(json.dumps(idx)[:-1] + f', "extra": {deep}}}')
    else:
        path = work / "adapter" / "adapter_config.json" if which == "adapter_config" else work / "base" / "config.json"
        c = json.loads(path.read_text())
        path.write_text(json.dumps(c)[:-1] + f', "extra": {deep}}}')
    base = "sharded" if which == "index" else "base"
    res = cli("merge", work / "adapter", "--base", work / base, "-o", work / "out")
    one_error(res, str(path), "nested more than 64 levels deep", out=work / "out")


def test_json_depth_at_the_limit_is_fine(work):
    p = work / "base" / "config.json"
    c = json.loads(p.read_text())
    c["extra"] = json.loads("[" * 63 + "]" * 63)
    p.write_text(json.dumps(c))
    res, _ = merge(work)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("folder", "is a folder, not a file"),
        ("fifo", "is a named pipe (FIFO), not a file"),
        ("device", "is a device, not a file"),
        ("missing", "is missing"),
        ("dangling-link", "is missing"),
    ],
)
def test_shard_that_is_not_a_file(work, kind, needle):
    import os
    import subprocess
    import sys

    sharded = _sharded(work)
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.unlink()
    if kind == "folder":
        shard.mkdir()
    elif kind == "fifo":
        os.mkfifo(shard)
    elif kind == "device":
        shard.symlink_to("/dev/zero")
    elif kind == "dangling-link":
        shard.symlink_to(sharded / "gone")
    if kind == "fifo":  # in a subprocess with a timeout: opening a FIFO for reading could block forever
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "lora_convert.cli",
                "merge",
                str(work / "adapter"),
                "--base",
                str(sharded),
                "-o",
                str(work / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        code, lines = r.returncode, r.stderr.strip().splitlines()
    else:
        res = cli("merge", work / "adapter", "--base", sharded, "-o", work / "out")
        code, lines = res.exit_code, res.stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert "model-00002-of-00002.safetensors" in lines[0] and needle in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_loose_safetensors_that_is_not_a_file(work, kind):
    import os
    import subprocess
    import sys

    d = work / "loose"
    d.mkdir()
    shutil.copy(work / "base" / "config.json", d)
    shutil.copy(work / "base" / "model.safetensors", d / "a.safetensors")
    if kind == "fifo":
        os.mkfifo(d / "b.safetensors")
    else:
        (d / "b.safetensors").symlink_to("/dev/zero")
    if kind == "fifo":  # a subprocess with a timeout, as above
        r = subprocess.run(
            [sys.executable, "-m", "lora_convert.cli", "detect", str(d)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        code, err = r.returncode, r.stderr
    else:
        res = cli("detect", d)
        code, err = res.exit_code, res.stderr
    assert code == 1 and err.startswith(f"error: {d / 'b.safetensors'}: is a "), err


# -- class 6: adapter_config.json against a schema of types, once, at load ---------------------------------

BAD_CONFIG_VALUES = [
    ("rank_pattern", ["q_proj"]),
    ("rank_pattern", {"q_proj": "4"}),
    ("rank_pattern", {"q_proj": 2.5}),
    ("rank_pattern", {"q_proj": 0}),
    ("rank_pattern", {"q_proj": True}),
    ("alpha_pattern", {"q_proj": "big"}),
    ("alpha_pattern", {"q_proj": float("nan")}),
    ("alpha_pattern", {"q_proj": 1e39}),
    ("alpha_pattern", "q_proj"),
    ("lora_alpha", 1e300),
    ("lora_alpha", float("inf")),
    ("lora_alpha", float("nan")),
    ("lora_alpha", "16"),
    ("lora_alpha", True),
    ("r", "8"),
    ("r", 8.5),
    ("r", float("inf")),
    ("r", True),
    ("r", 0),
    ("r", -4),
    ("r", 2**70),
    ("use_rslora", "false"),
    ("use_dora", 1),
    ("fan_in_fan_out", "yes"),
    ("lora_bias", "false"),
    ("inference_mode", "true"),
    ("bias", "some"),
    ("bias", 0),
    ("target_modules", 5),
    ("target_modules", [1, 2]),
    ("modules_to_save", "lm_head"),
    ("trainable_token_indices", [[1, 2]]),
    ("trainable_token_indices", [-1]),
    ("trainable_token_indices", [2**70]),
    ("trainable_token_indices", {"embed_tokens": "1"}),
    ("trainable_token_indices", 3),
    ("layers_to_transform", "0"),
    ("init_lora_weights", 3),
    ("layer_replication", "x"),
    ("peft_type", 5),
    ("base_model_name_or_path", 7),
    ("base_model_name_or_path", "a\x00b"),
    ("task_type", []),
]


@pytest.mark.parametrize("key,value", BAD_CONFIG_VALUES, ids=[f"{k}={v!r}"[:40] for k, v in BAD_CONFIG_VALUES])
def test_adapter_config_wrong_types(work, key, value):
    p = edit_config(work, **{key: value})
    res, out = merge(work)
    one_error(res, str(p), f"{key} must be", "fix this value in adapter_config.json", out=out)
    one_error(cli("detect", work / "adapter"), f"{key} must be")


@pytest.mark.parametrize("key", sorted({k for k, _ in BAD_CONFIG_VALUES}))
def test_adapter_config_null_means_unset(work, key):
    edit_config(work, **{key: None})
    res, _ = merge(work)
    assert res.exit_code == 0, res.output


def test_adapter_config_good_values_still_load():
    from lora_convert.config import AdapterConfig

    cfg = AdapterConfig.from_dict(
        {
            "r": 4,
            "lora_alpha": -8.5,
            "use_rslora": True,
            "bias": "lora_only",
            "target_modules": "q_proj",
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"q_proj": 3.0},
            "trainable_token_indices": {"embed": [1, 2]},
            "init_lora_weights": "gaussian",
            "layers_to_transform": 0,
        }
    )
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2 and cfg.scaling_for("x.q_proj", 4) == 3.0 / 2


@pytest.mark.parametrize("key", ["q_proj(", "*", "(?P<", "[z-a]", "a{2,1}", "\\"])
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_not_a_regex(work, field, key):
    p = edit_config(work, **{field: {key: 4}})
    res, out = merge(work)
    one_error(res, str(p), f"{field} key", "is not a valid regular expression", out=out)


# Python's re never returns on these (against the fixture's module names); time bounded here
CATASTROPHIC = [r"(.|.)+(?=Z)", r"([\w.]|[\w.])+(?=Z)", r"(?:.|.)*(?=Z)"]


@pytest.mark.parametrize("key", CATASTROPHIC)
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_catastrophic_pattern_is_refused_in_bounded_time(work, monkeypatch, field, key):
    import time

    from lora_convert import config

    monkeypatch.setattr(config, "PATTERN_TIMEOUT_S", 0.2)  # 2 s in real runs; the bound of the test: < 10 s
    p = edit_config(work, **{field: {"nothing_matches_this": 4, key: 4}})
    t0 = time.monotonic()
    res, out = merge(work)
    one_error(res, str(p), f"{field} key", "takes more than 0.2 s to match module", out=out)
    assert time.monotonic() - t0 < 10


def test_slow_patterns_exhaust_the_budget(work, monkeypatch):
    from lora_convert import config

    monkeypatch.setattr(config, "PATTERN_BUDGET_S", 0.3)  # 10 s of CPU in real runs
    monkeypatch.setattr(config, "PATTERN_TIMEOUT_S", 60)  # so that only the budget can stop it, however loaded
    p = edit_config(work, rank_pattern={r"(.|..)+(?=Z)": 4})  # ~1 s per module name: under the timeout
    res, out = merge(work)
    one_error(res, str(p), "rank_pattern: matching its keys against the module names took more than 0.3 s", out=out)


PEFT_LIKE_PATTERNS = [
    "q_proj",
    "v_proj",
    "layers\\.0\\.self_attn\\.q_proj",
    "model.layers.1.*",
    "v_proj|q_proj",
    "layers.[01].self_attn.(q|v)_proj",
    "^model.layers.0.self_attn.q_proj",
    "(\\w+)+_proj",
    "(a+)+",
    "embed_tokens",
    "lm_head",
    ".*",
    "self_attn\\..*",
    "(?i:Q_PROJ)",
    "o_proj$",
]


def test_bounded_matcher_agrees_with_peft():
    """The same first key as PEFT's re.match(rf"(.*\\.)?({key})$", name), for every module of a model."""
    import re

    from lora_convert.config import AdapterConfig

    names = [
        f"model.layers.{i}.{m}"
        for i in range(3)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")
    ]
    names += ["model.embed_tokens", "lm_head", "transformer.h.0.attn.c_attn"]
    for i in range(len(PEFT_LIKE_PATTERNS)):
        keys = PEFT_LIKE_PATTERNS[i:] + PEFT_LIKE_PATTERNS[:i]  # every order: the first match wins
        cfg = AdapterConfig.from_dict({"r": 8, "rank_pattern": {k: n + 1 for n, k in enumerate(keys)}})
        for name in names:
            peft = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)
            assert cfg.rank_for(name) == (keys.index(peft) + 1 if peft else 8), (keys, name)


@pytest.mark.parametrize("name", ["x" * 300, "a/" + "b" * 300, "/" + "c" * 4000], ids=["300", "repo-like", "4001"])
def test_base_path_too_long_for_the_file_system_is_not_found(work, name):
    """base_model_name_or_path names a base we look for: a name too long for the file system is 'not
    there' (one line, as for any missing base), not an exception from the OS."""
    edit_config(work, base_model_name_or_path=name)
    res = cli("merge", work / "adapter", "-o", work / "out")
    one_error(res, "needs the base model", out=work / "out")
    assert cli("report", work / "adapter").exit_code == 0


# -- classes 3, 5, 6: names, shapes and counts in headers and .bin files -----------------------------------


@pytest.mark.parametrize("where", ["tensor", "metadata"])
@pytest.mark.parametrize("name", ["\ud800", "x.\udfff.weight", "model.norm\udcff.weight"])
def test_lone_surrogate_names_refused_on_read(work, where, name):
    path = work / "base" / "model.safetensors"
    h, data = raw_header(path)
    if where == "tensor":
        h[name] = h.pop("model.norm.weight")
    else:
        h["__metadata__"][name] = "x"
    write_raw(path, h, data)  # json.dumps writes the surrogate as a valid \\udxxx escape
    res, out = merge(work)
    one_error(res, str(path), "not valid Unicode (it holds a lone surrogate)", out=out)
    one_error(cli("detect", work / "base"), "lone surrogate")


def _bin_base(work: Path, extra: dict) -> Path:
    sd = load_file(str(work / "base" / "model.safetensors"))
    sd.update(extra)
    (work / "base" / "model.safetensors").unlink()
    path = work / "base" / "pytorch_model.bin"
    torch.save(sd, str(path))
    return path


BIN_CASES = {
    "int-key": ({5: torch.zeros(2)}, "tensor name 5 is not a string"),
    "surrogate-key": ({"bad\udcff": torch.zeros(2)}, "lone surrogate"),
    "complex64": ({"x.c": torch.zeros(2, dtype=torch.complex64)}, "dtype complex64 cannot be stored in safetensors"),
    "complex128": ({"x.c": torch.zeros(2, dtype=torch.complex128)}, "dtype complex128 cannot be stored"),
    "float8_e4m3fnuz": ({"x.f": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}, "dtype float8_e4m3fnuz cannot"),
    "float8_e5m2fnuz": ({"x.f": torch.zeros(2, dtype=torch.float8_e5m2fnuz)}, "dtype float8_e5m2fnuz cannot"),
    "sparse": ({"x.s": torch.eye(3).to_sparse()}, "a sparse_coo tensor"),
    "sparse-csr": ({"x.s": torch.eye(3).to_sparse_csr()}, "a sparse_csr tensor"),
}


@pytest.mark.parametrize("case", list(BIN_CASES))
def test_bin_tensors_safetensors_cannot_hold(work, case):
    extra, needle = BIN_CASES[case]
    path = _bin_base(work, extra)
    res, out = merge(work)
    one_error(res, str(path), needle, out=out)


OVERFLOWING_SHAPES = [[2**52] * 15 + [0], [0, 2**52, 2**12], [2**31, 2**31, 4, 0], [3, 2**51, 2**10, 0]]


@pytest.mark.parametrize("shape", OVERFLOWING_SHAPES, ids=[str(len(s)) + "d" for s in OVERFLOWING_SHAPES])
def test_zero_size_tensor_whose_other_dims_overflow(work, shape):
    path = work / "base" / "model.safetensors"
    h, data = raw_header(path)
    h["extra.weight"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data)]}
    write_raw(path, h, data)
    res, out = merge(work)
    one_error(res, str(path), "extra.weight", "too large for any tensor", out=out)


@pytest.mark.parametrize("shape", [[0, 2**50], [2**40, 0], [0, 2**30, 2**30], [0]])
def test_zero_size_tensors_with_big_dims_are_copied(work, shape):
    path = work / "base" / "model.safetensors"
    h, data = raw_header(path)
    h["extra.weight"] = {"dtype": "BF16", "shape": shape, "data_offsets": [len(data), len(data)]}
    write_raw(path, h, data)
    res, out = merge(work, "--dtype", "fp16")
    assert res.exit_code == 0, res.output
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("extra.weight").get_shape() == shape


def test_too_many_tensors_in_one_header_stops_the_parse():
    """The parse stops after max_tensors objects: a header of many empty tensors costs at most that."""
    from lora_convert.errors import CheckpointError
    from lora_convert.io.safetensors_format import parse_header

    for n, cap in ((5000, 1000), (1001, 1000), (20, 3)):
        body = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
        raw = ("{" + body + "}").encode()
        with pytest.raises(CheckpointError, match=f"holds more than {cap} tensors"):
            parse_header(Path("x.safetensors"), raw, 8 + len(raw), max_tensors=cap)
    raw = b'{"t":{"dtype":"F32","shape":[' + b",".join([b"1"] * 200_000) + b'],"data_offsets":[0,4]}}'
    with pytest.raises(CheckpointError, match="more JSON values than 100 tensors could"):
        parse_header(Path("x.safetensors"), raw, 8 + len(raw) + 4, max_tensors=100)
    ok = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert list(parse_header(Path("x.safetensors"), ok, 8 + len(ok) + 4, max_tensors=1).tensors) == ["t"]


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_tensor_cap_counts_every_shard(work, monkeypatch, layout):
    from lora_convert.io import reader

    monkeypatch.setattr(reader, "MAX_TENSORS", 15)  # 300,000 in real runs; the fixture has 21 tensors
    if layout == "sharded":
        d = _sharded(work)
        needle, where = "holds more than 5 tensors", d / "model-00002-of-00002.safetensors"
    else:
        d, where = work / "base", _bin_base(work, {})
        needle = "holds more than 15 tensors"
    one_error(cli("detect", d), str(where), needle)


# -- class 3: a merge never rounds a delta into a weight that is not floating point ----------------------------


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.int16, torch.float8_e4m3fn]
)
@pytest.mark.parametrize("target", ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"])
def test_non_float_target_weight_is_refused(work, dtype, target):
    path = work / "base" / "model.safetensors"
    sd = load_file(str(path))
    sd[target] = (sd[target] * 100).to(dtype)
    save_file(sd, str(path), metadata={"format": "pt"})
    from lora_convert.io.safetensors_format import dtype_name

    res, out = merge(work)
    one_error(res, target, f"the LoRA targets a weight stored as {dtype_name(dtype)}", out=out)


def test_non_float_tensor_that_no_lora_targets_is_copied_bit_exact(work):
    path = work / "base" / "model.safetensors"
    add_tensors(path, {"model.position_ids": torch.arange(64, dtype=torch.int64).reshape(1, 64)})
    res, out = merge(work, "--dtype", "bf16")
    assert res.exit_code == 0, res.output
    got = load_file(str(out / "model.safetensors"))["model.position_ids"]
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(64).reshape(1, 64))


# -- class 6: config.json keys we read, type-checked at load (found by the fuzzer) -----------------------------

BAD_MODEL_CONFIG = [
    ("model_type", ["gpt2"]),
    ("architectures", 1.5),
    ("architectures", [1]),
    ("tie_word_embeddings", "yes"),
    ("vocab_size", "96"),
    ("vocab_size", -1),
    ("hidden_size", 2.5),
    ("text_config", []),
    ("quantization_config", True),
    ("quantization_config", {"quant_method": 4}),
    ("layer_types", "full"),
    ("sliding_window", True),
    ("num_hidden_layers", 2**60),
]


# each bad value at the top level and inside text_config (where text_config itself is not read again)
BAD_MODEL_CONFIG_AT = [
    pytest.param(k, v, nested, id=f"{k}={v!r}-{'text_config' if nested else 'top'}")
    for nested in (False, True)
    for k, v in BAD_MODEL_CONFIG
    if not (nested and k == "text_config")
]


@pytest.mark.parametrize("key,value,nested", BAD_MODEL_CONFIG_AT)
def test_model_config_wrong_types(work, key, value, nested):
    p = work / "base" / "config.json"
    c = json.loads(p.read_text())
    if nested:
        c["text_config"] = {key: value}
    else:
        c[key] = value
    p.write_text(json.dumps(c))
    prefix = "text_config." if nested else ""
    res, out = merge(work)
    one_error(res, str(p), f"{prefix}{key} must be", out=out)
    one_error(cli("report", work / "adapter", "--base", work / "base"), f"{prefix}{key} must be")


@pytest.mark.parametrize("key,value", [("architectures", "LlamaForCausalLM"), ("num_attention_heads", "4")])
def test_model_config_alone_wrong_types(work, key, value):
    """A base given by its config.json alone (convert --to gguf) is type-checked the same way."""
    only = work / "config-only"
    only.mkdir()
    c = json.loads((work / "base" / "config.json").read_text())
    c[key] = value
    (only / "config.json").write_text(json.dumps(c))
    out = work / "a.gguf"
    res = cli("convert", work / "adapter", "--to", "gguf", "--base", only, "-o", out)
    one_error(res, str(only / "config.json"), f"{key} must be", out=out)


def test_metadata_kept_for_a_checkpoint_is_bounded(work, monkeypatch):
    """Each file's __metadata__ is kept for the checkpoint: all files together are capped (16 MiB)."""
    from lora_convert.io import safetensors_format

    monkeypatch.setattr(safetensors_format, "MAX_METADATA_BYTES", 2000)
    d = work / "loose"
    d.mkdir()
    sd = load_file(str(work / "base" / "model.safetensors"))
    keys = sorted(sd)
    for i, part in enumerate((keys[:10], keys[10:])):
        save_file({k: sd[k] for k in part}, str(d / f"{i}.safetensors"), metadata={f"k{i}": "x" * 1500})
    one_error(cli("detect", d), str(d / "1.safetensors"), "__metadata__ of the checkpoint's files adds up to more")
    save_file({k: sd[k] for k in keys[10:]}, str(d / "1.safetensors"), metadata={"format": "pt"})
    assert cli("detect", d).exit_code == 0


def test_non_contiguous_bin_tensor_is_copied_once_not_per_block(tmp_path, monkeypatch):
    """Class 4: a .bin tensor stored non-contiguously (a transpose) read in many blocks is made
    contiguous once, not once per block (which made time quadratic in the tensor's size)."""
    from lora_convert.io.reader import open_checkpoint

    w = torch.arange(512 * 384, dtype=torch.float32).reshape(512, 384)
    torch.save({"w": w.t(), "b": torch.ones(3)}, str(tmp_path / "pytorch_model.bin"))
    calls = []
    contiguous = torch.Tensor.contiguous

    def counted(self, *a, **k):
        calls.append(tuple(self.shape))
        return contiguous(self, *a, **k)

    with open_checkpoint(tmp_path) as ck:
        monkeypatch.setattr(torch.Tensor, "contiguous", counted)
        flat = torch.cat([ck.read_flat("w", i, i + 4096) for i in range(0, w.numel(), 4096)])
        rows = torch.cat([ck.read_rows("w", i, i + 8) for i in range(0, 384, 8)])
    assert torch.equal(flat, w.t().reshape(-1)) and torch.equal(rows, w.t())
    assert calls.count((384, 512)) == 1, calls  # 48 + 48 blocks, one copy


@pytest.mark.parametrize("depth", [100, 100_000])
def test_diffusers_metadata_nested_too_deep_is_our_error(tmp_path, depth):
    """diffusers' lora_adapter_metadata (a JSON string in the header) nested without end: one AdapterError."""
    from types import SimpleNamespace

    from lora_convert.dialects.diffusers import METADATA_KEY, component_configs
    from lora_convert.errors import AdapterError

    ck = SimpleNamespace(metadata={METADATA_KEY: "[" * depth + "]" * depth}, root=tmp_path)
    with pytest.raises(AdapterError, match=METADATA_KEY):
        component_configs(ck)


def test_plain_pattern_keys_agree_with_peft_and_stay_cheap():
    """Module names and ``^`` + escaped paths (what AdapterConfig.for_modules writes, hundreds of them for a
    kohya or diffusers LoRA) are compared as strings: the same first key as PEFT's re.match, and 2,000 keys
    against 2,000 modules well within the CPU budget."""
    import random
    import re
    import time

    from lora_convert.config import AdapterConfig

    rng = random.Random(0)
    parts = ["down_blocks", "0", "1", "attentions", "attn1", "to_q", "to_k", "q_proj", "layers", "model", "x"]
    names = sorted({".".join(rng.choice(parts) for _ in range(rng.randint(1, 6))) for _ in range(400)})
    names += ["model.layers.0.q_proj\n", "a-b.q_proj", "q_proj", "xq_proj", "model.x1q_proj"]
    keys = ["q_proj", "to_q", "1.to_k", "attn1.to_q", "x", "layers.0", "0.q_proj", "q.proj", "......", ".x"]
    keys += [f"^{re.escape(n)}" for n in rng.sample(names, 30)] + rng.sample(names, 30)
    cfg = AdapterConfig.from_dict({"r": 8, "rank_pattern": {k: i + 1 for i, k in enumerate(keys)}})
    for name in names:
        peft = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)
        assert cfg.rank_for(name) == (keys.index(peft) + 1 if peft else 8), (name, peft)
    many = [f"down_blocks.{i // 100}.attentions.{i % 100}.to_q" for i in range(2000)]
    cfg = AdapterConfig.from_dict({"r": 8, "rank_pattern": {f"^{re.escape(n)}": 4 for n in many[::2]}})
    t0 = time.thread_time()
    assert [cfg.rank_for(n) for n in many] == [4, 8] * 1000
    assert time.thread_time() - t0 < 5


def test_unexpected_exception_under_json_is_an_error_document(work, monkeypatch):
    """Under --json an unexpected failure is an error/1 document too (docs/json.md), and --debug after
    the command still shows the traceback."""
    from lora_convert import api

    def fail(*a, **k):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(api, "detect", fail)
    res = cli("detect", work / "adapter", "--json")
    line = one_error(res, "internal error (ValueError: boom second line)", "this is a bug")
    doc = json.loads(res.stdout)["error"]
    assert (doc["type"], doc["exit_code"], "error: " + doc["text"]) == ("ValueError", 1, line)
    res = cli("detect", work / "adapter", "--debug")
    assert isinstance(res.exception, ValueError)

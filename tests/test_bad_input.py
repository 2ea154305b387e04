"""Bad input: every failure a user can cause is one ``error:`` line, exit 1, and no output folder.

Each case copies tiny real checkpoints (a 2-layer Llama with hidden size 32 and a PEFT
adapter), breaks one thing, runs ``lora-convert merge`` through click's CliRunner and checks
the single error line names the file (and tensor) and that nothing appeared at ``-o``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, tmpfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_convert.errors import LoraConvertError
from lora_convert.io.reader import open_checkpoint
from lora_convert.io.safetensors_format import MAX_HEADER_BYTES

ADAPTER_FILE = "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """base/ (Llama, hidden 32, 2 layers), adapter/ (LoRA r=4 on q,v), big_base/ (hidden 48)."""
    from tiny import llama, peft_wrap

    root = tmp_path_factory.mktemp("bad_input")
    m = llama()
    m.save_pretrained(str(root / "base"))
    m.save_pretrained(str(root / "sharded"), max_shard_size="20KB")
    pm = peft_wrap(m, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.save_pretrained(str(root / "adapter"))
    from tiny import decoder_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    other = LlamaForCausalLM(decoder_config(hidden=48, inter=64))
    other.save_pretrained(str(root / "other_base"))
    assert len(list((root / "sharded").glob("model-*.safetensors"))) >= 2
    return root


@pytest.fixture
def work(tiny, tmp_path) -> Path:
    for name in ("base", "adapter", "sharded"):
        shutil.copytree(tiny / name, tmp_path / name)
    return tmp_path


def merge(work: Path, *extra: str, src: str = "adapter", base: str = "base"):
    out = work / "out"
    return cli("merge", str(work / src), "--base", str(work / base), "-o", str(out), *extra), out


# -- safetensors helpers ---------------------------------------------------------------------------


def split_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict | bytes, data: bytes, *, claim: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claim is None else claim) + raw + data)


def tensor_keys(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# -- rows of the table: safetensors ------------------------------------------------------------------


def _truncate(h, d):
    return h, d[:-100], None


def _header_too_long(h, d):
    return h, d, 10_000_000


def _not_json(h, d):
    return b"{this is not json" + b" " * 8, d, None


def _not_utf8(h, d):
    return b'{"a": "\xff\xfe"}', b"", None


def _overlap(h, d):
    k = tensor_keys(h)
    h[k[1]]["data_offsets"] = [o - 4 for o in h[k[1]]["data_offsets"]]
    return h, d, None


def _gap(h, d):
    k = tensor_keys(h)[-1]
    h[k]["data_offsets"] = [o + 4 for o in h[k]["data_offsets"]]
    return h, d + b"\0" * 4, None


def _past_end(h, d):
    k = tensor_keys(h)[-1]
    h[k]["data_offsets"][1] += 4
    return h, d, None


def _bad_span(h, d):
    k = tensor_keys(h)[0]
    h[k]["shape"] = [h[k]["shape"][0] + 1, h[k]["shape"][1]]
    return h, d, None


def _unknown_dtype(h, d):
    h[tensor_keys(h)[0]]["dtype"] = "F17"
    return h, d, None


def _trailing(h, d):
    return h, d + b"junk", None


def _huge_header(h, d):
    return h, d, MAX_HEADER_BYTES + 1


SAFETENSORS_CASES = {
    "truncated": (_truncate, ["truncated"]),
    "header-longer-than-file": (_header_too_long, ["truncated: header claims 10000000 bytes"]),
    "header-not-json": (_not_json, ["header is not valid JSON"]),
    "header-not-utf8": (_not_utf8, ["header is not UTF-8"]),
    "overlap": (_overlap, ["overlaps"]),
    "gap": (_gap, ["gap of 4 bytes"]),
    "past-end": (_past_end, ["past the end"]),
    "shape-vs-span": (_bad_span, ["needs", "data_offsets span"]),
    "unknown-dtype": (_unknown_dtype, ["unknown dtype 'F17'"]),
    "trailing-bytes": (_trailing, ["4 trailing bytes"]),
    "header-over-100MB": (_huge_header, ["header claims 100000001 bytes (limit 100000000)"]),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
@pytest.mark.parametrize("which", ["adapter", "base"])
def test_broken_safetensors(work, case, which):
    fn, needles = SAFETENSORS_CASES[case]
    path = work / which / (ADAPTER_FILE if which == "adapter" else "model.safetensors")
    h, d = split_st(path)
    h, d, claim = fn(h, d)
    write_st(path, h, d, claim=claim)
    before = path.read_bytes()
    res, out = merge(work)
    line = one_error(res, str(path), *needles, out=out)
    if case in ("overlap", "gap", "past-end", "shape-vs-span", "unknown-dtype"):
        assert any(f"{path}: {k}: " in line for k in h if k != "__metadata__"), "the tensor is named"
    assert path.read_bytes() == before, "inputs are never modified"


def test_empty_file(work):
    path = work / "adapter" / ADAPTER_FILE
    path.write_bytes(b"")
    res, out = merge(work)
    one_error(res, str(path), "truncated: 0 bytes", out=out)


# -- index.json ------------------------------------------------------------------------------------------


def _index(work: Path) -> tuple[Path, dict]:
    p = work / "sharded" / "model.safetensors.index.json"
    return p, json.loads(p.read_text())


def test_index_missing_shard(work):
    p, idx = _index(work)
    shard = sorted(set(idx["weight_map"].values()))[-1]
    (work / "sharded" / shard).unlink()
    res, out = merge(work, base="sharded")
    one_error(res, str(p), f"names shard '{shard}', which is missing", "download every shard", out=out)


@pytest.mark.parametrize("rel", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS"])
def test_index_shard_outside_folder(work, rel):
    # a perfectly valid shard lies outside the folder: it must not be read
    p, idx = _index(work)
    outside = work / "outside.safetensors"
    shard = sorted(set(idx["weight_map"].values()))[-1]
    shutil.copy(work / "sharded" / shard, outside)
    rel = str(outside) if rel == "ABS" else rel
    idx["weight_map"] = {k: (rel if v == shard else v) for k, v in idx["weight_map"].items()}
    p.write_text(json.dumps(idx))
    res, out = merge(work, base="sharded")
    one_error(res, str(p), "escapes the checkpoint folder", out=out)


def test_index_tensor_twice(work):
    p, idx = _index(work)
    shards = sorted(set(idx["weight_map"].values()))
    k = next(iter(idx["weight_map"]))
    items = [f'"{k}": "{shards[0]}"', f'"{k}": "{shards[1]}"'] + [
        f'"{a}": "{b}"' for a, b in idx["weight_map"].items() if a != k
    ]
    p.write_text('{"metadata": {}, "weight_map": {' + ", ".join(items) + "}}")
    res, out = merge(work, base="sharded")
    one_error(res, str(p), k, "two shards", out=out)


def test_loose_shards_hold_same_tensor(work):
    d = work / "loose"
    d.mkdir()
    shutil.copy(work / "base" / "config.json", d)
    sd = load_file(str(work / "base" / "model.safetensors"))
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:10]}, str(d / "a.safetensors"))
    save_file({k: sd[k] for k in keys[9:]}, str(d / "b.safetensors"))
    res, out = merge(work, base="loose")
    one_error(res, str(d / "b.safetensors"), keys[9], "two shards", out=out)


# -- pickles ------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_bin_pickle_payload_never_runs(work, zipfile):
    marker = work / "PWNED"
    sd = load_file(str(work / "adapter" / ADAPTER_FILE))
    sd["evil"] = _Evil(str(marker))  # type: ignore[assignment]
    (work / "adapter" / ADAPTER_FILE).unlink()
    torch.save(sd, str(work / "adapter" / "adapter_model.bin"), _use_new_zipfile_serialization=zipfile)
    res, out = merge(work)
    one_error(
        res,
        str(work / "adapter" / "adapter_model.bin"),
        "refused to unpickle: it asks to import posix.system",
        "convert it to safetensors from a trusted source",
        out=out,
    )
    assert not marker.exists(), "the payload ran"
    # detect refuses the same way
    one_error(cli("detect", str(work / "adapter")), "refused to unpickle")
    assert not marker.exists()


def test_legacy_bin_adapter_still_merges(work):
    """The pre-zip torch.save format cannot be mmapped but is read (weights_only) all the same."""
    sd = load_file(str(work / "adapter" / ADAPTER_FILE))
    (work / "adapter" / ADAPTER_FILE).unlink()
    torch.save(sd, str(work / "adapter" / "adapter_model.bin"), _use_new_zipfile_serialization=False)
    res, out = merge(work)
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()


# -- adapter vs base ---------------------------------------------------------------------------------------


def test_adapter_for_another_model(work, tiny):
    res, out = merge(work, base=str(tiny / "other_base"))
    one_error(
        res, "model.layers.0.self_attn.q_proj", "(32, 32)", "(48, 48)", "is this adapter for this base model?", out=out
    )


def _rename_keys(path: Path, fn) -> None:
    sd = load_file(str(path))
    save_file({fn(k): v for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def test_adapter_wrong_prefix(work):
    _rename_keys(
        work / "adapter" / ADAPTER_FILE, lambda k: k.replace("base_model.model.model.layers", "base_model.model.layers")
    )
    res, out = merge(work)
    one_error(
        res,
        "4 of 4 adapter modules match no tensor of the base",
        "layers.0.self_attn.q_proj",
        "lack the 'model' prefix",
        "model.layers.0.self_attn.q_proj",
        out=out,
    )


def test_adapter_matches_only_some_modules(work):
    _rename_keys(work / "adapter" / ADAPTER_FILE, lambda k: k.replace("layers.1.", "layers.7."))
    res, out = merge(work)
    one_error(res, "2 of 4 adapter modules match no tensor of the base", "model.layers.7.self_attn.q_proj", out=out)


def test_adapter_keys_match_nothing(work):
    _rename_keys(
        work / "adapter" / ADAPTER_FILE,
        lambda k: k.replace("self_attn.q_proj", "attn.c_attn").replace("self_attn.v_proj", "attn.c_proj"),
    )
    res, out = merge(work)
    one_error(res, "match no tensor of the base", "attn.c_attn", out=out)


# -- adapter_config.json ------------------------------------------------------------------------------------


def _cfg(work: Path) -> tuple[Path, dict]:
    p = work / "adapter" / "adapter_config.json"
    return p, json.loads(p.read_text())


def test_adapter_config_missing(work):
    (work / "adapter" / "adapter_config.json").unlink()
    res, out = merge(work)
    one_error(res, str(work / "adapter"), "adapter_config.json is missing", out=out)


def test_adapter_config_not_json(work):
    p, _ = _cfg(work)
    p.write_text('{"r": 4,')
    res, out = merge(work)
    one_error(res, str(p), "not valid JSON", out=out)


def test_adapter_config_not_object(work):
    p, _ = _cfg(work)
    p.write_text("[1, 2]")
    res, out = merge(work)
    one_error(res, str(p), "not a JSON object", out=out)


def test_adapter_config_bad_r(work):
    p, c = _cfg(work)
    c["r"] = "four"
    p.write_text(json.dumps(c))
    res, out = merge(work)
    one_error(res, str(p), 'r must be a positive integer, not "four"', out=out)


def test_adapter_config_r_disagrees_refused(work):
    """PEFT refuses to load it (size mismatch), and alpha/r is not the trained scaling under either rank."""
    p, c = _cfg(work)
    c["r"] = 16
    p.write_text(json.dumps(c))
    res, out = merge(work)
    one_error(res, str(p), "config says r=16, the tensors have rank 4", "PEFT refuses to load it", out=out)


def test_adapter_config_unknown_peft_type(work):
    p, c = _cfg(work)
    c["peft_type"] = "FANCY"
    p.write_text(json.dumps(c))
    res, out = merge(work)
    one_error(res, str(p), "peft_type FANCY is not LoRA", out=out)


# -- tensors --------------------------------------------------------------------------------------------------


def _edit_adapter(work: Path, fn) -> Path:
    path = work / "adapter" / ADAPTER_FILE
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def test_lora_a_without_b(work):
    _edit_adapter(work, lambda sd: sd.pop(f"{Q0}.lora_B.weight"))
    res, out = merge(work)
    one_error(res, f"{Q0}.lora_A.weight", "lora_B is missing for module", out=out)


def test_rank_zero(work):
    def fn(sd):
        sd[f"{Q0}.lora_A.weight"] = torch.empty(0, 32)
        sd[f"{Q0}.lora_B.weight"] = torch.empty(32, 0)

    _edit_adapter(work, fn)
    res, out = merge(work)
    one_error(res, f"{Q0}.lora_A.weight", "rank 0", out=out)


def test_rank_mismatch(work):
    _edit_adapter(work, lambda sd: sd.__setitem__(f"{Q0}.lora_B.weight", torch.zeros(32, 3)))
    res, out = merge(work)
    one_error(res, f"{Q0}.lora_A.weight", "rank mismatch", out=out)


def test_nan_in_adapter(work):
    def fn(sd):
        sd[f"{Q0}.lora_B.weight"][3, 1] = float("nan")

    _edit_adapter(work, fn)
    res, out = merge(work)
    one_error(res, f"{Q0}.lora_B.weight", "NaN or Inf", out=out)


def test_inf_in_result(work):
    def fn(sd):
        sd[f"{Q0}.lora_B.weight"].fill_(3e38)
        sd[f"{Q0}.lora_A.weight"].fill_(3e38)

    _edit_adapter(work, fn)
    res, out = merge(work)
    one_error(res, "model.layers.0.self_attn.q_proj.weight", "merged weight holds NaN or Inf", out=out)


# -- unsupported ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"peft_type": "POLY"}, "peft_type POLY is not LoRA"),  # (OFT merges now: a tuner PEFT cannot merge)
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changes the base weights"),
        ({"init_lora_weights": "olora"}, "changes the base weights"),
    ],
)
def test_unsupported_adapter(work, change, needle):
    p, c = _cfg(work)
    c.update(change)
    p.write_text(json.dumps(c))
    res, out = merge(work)
    one_error(res, needle, out=out)


def test_quantized_base_config(work):
    p = work / "base" / "config.json"
    c = json.loads(p.read_text())
    c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    p.write_text(json.dumps(c))
    res, out = merge(work)
    one_error(
        res, str(work / "base"), "quantization_config says bitsandbytes but no tensor is stored that way", out=out
    )


def test_quantized_base_tensors(work):
    path = work / "base" / "model.safetensors"
    sd = load_file(str(path))
    sd["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(32)
    save_file(sd, str(path), metadata={"format": "pt"})
    res, out = merge(work)
    one_error(
        res,
        "model.layers.0.self_attn.q_proj.weight_scale: the base holds quantized weights but config.json has no "
        "quantization_config",
        out=out,
    )


# -- output -----------------------------------------------------------------------------------------------------


def test_output_exists_refused_then_force_replaces(work):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    res, _ = merge(work)
    one_error(res, str(out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "old"
    res, _ = merge(work, "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in work.iterdir() if ".tmp-lora-convert-" in p.name]


def test_output_is_a_file(work):
    out = work / "out"
    out.write_text("x")
    res, _ = merge(work, "--force")
    one_error(res, str(out), "not a folder")
    assert out.read_text() == "x"


@pytest.mark.parametrize("inside", ["adapter", "base"])
def test_output_inside_input(work, inside):
    out = work / inside / "merged"
    res = cli("merge", str(work / "adapter"), "--base", str(work / "base"), "-o", str(out))
    one_error(res, str(out), "inside an input folder", out=out)


def test_output_contains_input_with_force(work):
    res = cli("merge", str(work / "adapter"), "--base", str(work / "base"), "-o", str(work), "--force")
    one_error(res, f"an input ({work / 'adapter'}) lies inside the output folder", "--force would delete")
    assert (work / "adapter" / ADAPTER_FILE).is_file()


def test_output_parent_is_a_file(work):
    (work / "afile").write_text("x")
    out = work / "afile" / "out"
    res = cli("merge", str(work / "adapter"), "--base", str(work / "base"), "-o", str(out))
    one_error(res, str(work / "afile"), "is a file")


def test_output_not_writable(work):
    with tmpfs(work / "ro", "ro,size=64k") as d:
        res = cli("merge", str(work / "adapter"), "--base", str(work / "base"), "-o", str(d / "out"))
        one_error(res, str(d), "not writable")
        assert os.listdir(d) == []


def test_usage_error_exits_2(work):
    res = cli("merge", str(work / "adapter"), "--bogus")
    assert res.exit_code == 2


def test_bad_max_shard_size(work):
    res, out = merge(work, "--max-shard-size", "lots")
    assert res.exit_code in (1, 2), res.output
    assert "not a size" in res.stderr and "Traceback" not in res.output
    assert not out.exists()


def test_missing_source_and_base(work):
    one_error(
        cli("merge", str(work / "nope"), "--base", str(work / "base"), "-o", str(work / "o")),
        str(work / "nope"),
        "no such file or folder",
    )
    one_error(merge(work, base="nope")[0], str(work / "nope"))


def test_debug_shows_traceback(work):
    (work / "adapter" / "adapter_config.json").write_text("{")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_convert.cli",
            "--debug",
            "merge",
            str(work / "adapter"),
            "--base",
            str(work / "base"),
            "-o",
            str(work / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "AdapterError" in r.stderr


# -- property: random damage to a valid file --------------------------------------------------------------------


def _valid_st() -> bytes:
    import io

    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    sd = {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.bias": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }
    del io
    return save(sd, metadata={"format": "pt"})


VALID = _valid_st()
(_HN,) = struct.unpack("<Q", VALID[:8])
VALID_HEADER = json.loads(VALID[8 : 8 + _HN])
_json_leaf = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from(["F32", "I64", "BF16", "BOOL", "F8_E4M3", "X"]),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=4),
)
_json_any = st.recursive(
    _json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=8
)


@st.composite
def damaged(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "header", "length", "truncate", "append"]))
    raw = bytearray(VALID)
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "length":
        n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(_HN - 16, _HN + 16).filter(lambda x: x >= 0)))
        return struct.pack("<Q", n) + bytes(raw[8:])
    if kind == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if kind == "append":
        return bytes(raw) + draw(st.binary(min_size=1, max_size=16))
    header = json.loads(json.dumps(VALID_HEADER))
    name = draw(st.sampled_from(sorted(header)))
    entry = header[name]
    if isinstance(entry, dict) and name != "__metadata__":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "whole"]))
        if field == "drop":
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif field == "whole":
            header[name] = draw(_json_any)
        elif field == "shape" and draw(st.booleans()):
            entry["shape"] = draw(st.lists(st.integers(0, 2**62), max_size=17))
        elif field == "data_offsets" and draw(st.booleans()):
            entry["data_offsets"] = draw(st.lists(st.integers(-(2**63), 2**64), max_size=3))
        else:
            entry[field] = draw(_json_any)
    else:
        header[name] = draw(_json_any)
    if draw(st.booleans()):
        header[draw(st.text(max_size=5))] = draw(_json_any)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + VALID[8 + _HN :]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=damaged())
def test_reader_property(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("prop", numbered=True)
    p = d / "model.safetensors"
    p.write_bytes(data)
    try:
        with open_checkpoint(p) as ck:
            total = 0
            for name in ck:
                t = ck.read(name)
                assert tuple(t.shape) == ck.info(name).shape
                total += t.numel() * t.element_size()
            assert total <= len(data), "never allocates more than the file holds"
    except LoraConvertError as exc:
        assert str(p) in str(exc)
    finally:
        shutil.rmtree(d, ignore_errors=True)

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
from helpers import FIXTURES, cli, one_error, tmpfs

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


# -- 3. kohya names parse in linear time, and a name's length is capped ------------------------------------


def _old_read_kohya_name(name: str) -> tuple[str, bool]:
    """The reading before issue 23 (every span of tokens tried: cubic), the reference for equal results."""
    from lora_convert import diffusion_names
    from lora_convert.dialects.kohya import _COMPOUNDS, _known

    tokens = name.split("_")
    n = len(tokens)
    ways = [0] * n + [1]
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, n + 1):
            if _known(tokens[i:j]):
                ways[i] = min(2, ways[i] + ways[j])
    parts, i = [], 0
    while i < n:
        j = next((j for j in range(n, i + 1, -1) if "_".join(tokens[i:j]) in _COMPOUNDS), i + 1)
        parts.append("_".join(tokens[i:j]))
        i = j
    return ".".join(parts), ways[0] == 1 and all(_known([p]) or p in diffusion_names.KOHYA_COMPOUNDS for p in parts)


def _vocabulary() -> list[str]:
    from lora_convert import diffusion_names

    words = set(diffusion_names.KOHYA_PLAIN_NAMES)
    for c in diffusion_names.KOHYA_COMPOUNDS | diffusion_names.KOHYA_SGM_COMPOUNDS:
        words.update(c.split("_"))
    return sorted(words) + ["0", "1", "12", "", "x", "foo", "blocks", "time", "emb"]


def test_kohya_names_read_as_before():
    """The bounded parse gives the old parse's reading and sureness on every name of up to 10 tokens drawn
    from the known names' own tokens (compounds split, so every join is tried) and on real names."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lora_convert.dialects.kohya import read_kohya_name

    real = [
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "mid_block_resnets_1_time_emb_proj",
        "input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "output_blocks_2_0_skip_connection",
        "text_model_encoder_layers_11_self_attn_out_proj",
        "time_embed_0",
        "single_transformer_blocks_3_attn_to_q",
    ]
    for name in real:
        assert read_kohya_name(name) == _old_read_kohya_name(name), name

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.sampled_from(_vocabulary()), min_size=1, max_size=10))
    def same(tokens):
        name = "_".join(tokens)
        assert read_kohya_name(name) == _old_read_kohya_name(name), name

    same()


PARSE_TIMING = r"""
import sys, time
from lora_convert.dialects.kohya import read_kohya_name
for size in (6_000, 100_000):
    for unit in ("a_", "down_blocks_0_", "time_emb_proj_", "proj_in_out_", "_"):
        name = (unit * size)[:size]
        t0 = time.perf_counter()
        reading, sure = read_kohya_name(name)
        print(f"{time.perf_counter() - t0:.4f}", size, repr(unit), reading.count("."), sure)
"""


def test_long_kohya_names_parse_in_linear_time():
    """6 KB and 100 KB names of several shapes, parsed in a child under a wall-clock limit (a cubic parse
    hangs the child, not the test run).  Each takes ~0.1-0.3 s here; the bound is 10 s so that a loaded CI
    machine cannot fail it, while the old cubic parse did not finish a 6 KB name in a minute."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PARSE_TIMING], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 10
    for line in lines:
        seconds, _size, _unit, dots, _sure = line.split()
        assert float(seconds) < 10.0 and int(dots) > 0, line


def _kohya_sd(names: dict[str, float], rank: int = 2, width: int = 4, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, alpha in names.items():
        sd[f"lora_unet_{n}.lora_down.weight"] = torch.randn(rank, width, generator=g)
        sd[f"lora_unet_{n}.lora_up.weight"] = torch.randn(width, rank, generator=g)
        sd[f"lora_unet_{n}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("length", [1025, 6_000, 100_000])
def test_a_kohya_name_over_the_cap_is_one_error_line(tmp_path, length):
    from safetensors.torch import save_file

    name = ("down_blocks_0_" * 10**4)[:length].rstrip("_") + "x"
    (tmp_path / "k").mkdir()
    save_file(_kohya_sd({name: 1.0, "proj_in": 1.0}), str(tmp_path / "k" / "lora.safetensors"))
    before = sha_all(tmp_path / "k")
    out = tmp_path / "out"
    line = one_error(cli("convert", tmp_path / "k", "--to", "diffusers", "-o", out), out=out)
    assert line.startswith(f"error: {tmp_path / 'k' / 'lora.safetensors'}: lora_unet_down_blocks_0_")
    assert f"a module name of {len(name)} characters (at most 1024" in line
    assert not out.exists() and sha_all(tmp_path / "k") == before


# -- 8. pattern keys built from module names are escaped; no assert guards them -----------------------------


def _foo_model():
    import torch

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.foo = torch.nn.Module()
            self.foo.bar = torch.nn.Linear(4, 4, bias=False)
            self.fooXbar = torch.nn.Linear(4, 4, bias=False)
            self.baz = torch.nn.Linear(4, 4, bias=False)

    torch.manual_seed(1)
    return M()


@pytest.mark.parametrize("optimize", [False, True], ids=["plain", "python-O"])
def test_foo_bar_beside_fooXbar_keeps_each_alpha(tmp_path, optimize):
    """``foo.bar`` (kohya ``foo_bar``, alpha 1) beside ``fooXbar`` (alpha 2): an unescaped key ``foo.bar``
    also matches ``fooXbar``, which only an assert caught — so under ``python -O`` the diffusers file said
    alpha 1 for fooXbar, exit 0.  Each module's alpha, as PEFT itself loads and merges the file, must be the
    kohya file's, with and without -O; and our merge's weights the exact W + alpha/r * up @ down."""
    import json
    import subprocess
    import sys

    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    alphas = {"foo_bar": 1.0, "fooXbar": 2.0, "baz": 2.0}
    (tmp_path / "k").mkdir()
    kohya = _kohya_sd(alphas)
    save_file(kohya, str(tmp_path / "k" / "lora.safetensors"))
    (tmp_path / "base").mkdir()
    model = _foo_model()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(base_sd, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    want = {}
    for name, alpha in alphas.items():
        key = f"{name.replace('_', '.')}.weight"
        up, down = kohya[f"lora_unet_{name}.lora_up.weight"], kohya[f"lora_unet_{name}.lora_down.weight"]
        want[key] = base_sd[key] + alpha / 2 * up @ down

    def run(*args: str) -> None:
        if not optimize:  # in-process (the test process keeps its asserts)
            res = cli(*args)
            assert res.exit_code == 0, res.output
            return
        r = subprocess.run(
            [sys.executable, "-O", "-m", "lora_convert.cli", *args], capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr

    run(
        "convert", str(tmp_path / "k"), "--to", "diffusers", "--base", str(tmp_path / "base"), "-o", str(tmp_path / "d")
    )
    f = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    fields = {k.removeprefix("unet."): v for k, v in meta.items()}
    config = LoraConfig(**{k: v for k, v in fields.items() if k in LoraConfig.__dataclass_fields__})
    pm = get_peft_model(_foo_model(), config)
    lora = {"base_model.model." + k.removeprefix("unet."): v for k, v in load_file(str(f)).items()}
    assert not set_peft_model_state_dict(pm, lora).unexpected_keys
    merged = pm.merge_and_unload().state_dict()
    for key, w in want.items():
        torch.testing.assert_close(merged[key], w, rtol=0, atol=1e-6, msg=f"PEFT's load of the file: {key}")

    if optimize:
        return  # (our merge scales by each module's own .alpha, never by the patterns: checked once, plainly)
    run("merge", str(tmp_path / "k"), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "m"))
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    for key, w in want.items():
        torch.testing.assert_close(ours[key], w, rtol=0, atol=1e-6, msg=f"our merge: {key}")


def test_pattern_keys_are_escaped_and_read_back_exactly():
    """for_modules escapes every key (anchoring one that would also match another module's end), and the
    string fast path gives re's own answer for escaped keys — checked against PEFT's get_pattern_key."""
    from peft.utils.other import get_pattern_key

    from lora_convert.config import AdapterConfig

    names = ["unet.foo.bar", "unet.fooXbar", "unet.a-b", "unet.a.b", "b", "x.b", "unet.c(d)", "unet.e+f", "unet.g[0]"]
    alphas = {n: float(i + 1) for i, n in enumerate(names)}
    cfg = AdapterConfig.for_modules({n: 4 for n in names}, alphas)
    for n in names:
        assert cfg.alpha_for(n) == alphas[n], n
        key = get_pattern_key(list(cfg.alpha_pattern), n)
        assert cfg.alpha_pattern.get(key, cfg.lora_alpha) == alphas[n], n
    assert "^b" in cfg.alpha_pattern and "unet\\.fooXbar" in cfg.alpha_pattern


# -- 9. a .bin base truncated during a merge: an error line, not SIGBUS -------------------------------------

TRUNCATE_AFTER_OPEN = r"""
import os, sys
import lora_convert.io.sources as s
orig = s.BinSource.__init__
def init(self, path, **kw):
    orig(self, path, **kw)
    os.truncate(path, int(os.path.getsize(path) * float(os.environ["KEEP"])))  # after listing, before reading
s.BinSource.__init__ = init
from lora_convert.cli import main
sys.argv = ["lora-convert"] + sys.argv[1:]
main()
"""


def _bin_base(root: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(FIXTURES / "tiny-llama-base", root / "base")
    sd = load_file(str(root / "base" / "model.safetensors"))
    (root / "base" / "model.safetensors").unlink()
    torch.save(sd, str(root / "base" / "pytorch_model.bin"))
    shutil.copytree(FIXTURES / "tiny-llama-lora", root / "adapter")
    return root / "base" / "pytorch_model.bin"


@pytest.mark.parametrize("keep", [0.5])
def test_a_bin_base_truncated_mid_merge_is_one_error_line(tmp_path, keep):
    import subprocess
    import sys

    path = _bin_base(tmp_path)
    adapter_before = sha_all(tmp_path / "adapter")
    out = tmp_path / "merged"
    args = ["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "-o", str(out)]
    r = subprocess.run(
        [sys.executable, "-c", TRUNCATE_AFTER_OPEN, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KEEP": str(keep)},
    )
    assert r.returncode == 1, (r.returncode, r.stderr)  # not -SIGBUS (exit 135 from a shell)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {path}: ") and "file ended while reading this tensor" in lines[0]
    tensor = lines[0].removeprefix(f"error: {path}: ").split(":")[0]
    assert tensor.endswith(".weight")  # names the tensor
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-lora-convert-" in p.name]
    assert sha_all(tmp_path / "adapter") == adapter_before


def test_bin_tensors_read_without_mmap_equal_torch_load(tmp_path):
    """Every way a state dict's tensors can sit in memory (views, transposes, expands, empties, shared
    storages) reads back equal to torch.load's own tensors, whole and from an offset; a compressed record is
    refused by name."""
    import zipfile

    import torch

    from lora_convert.errors import CheckpointError
    from lora_convert.io.sources import BinSource

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g)
    sd = {
        "a": a,
        "t": a.t(),
        "row": a[2],
        "col": a[:, 3],
        "e": torch.zeros(0, 4),
        "i": torch.arange(10),
        "h": torch.randn(3, 3, generator=g).half(),
        "bf": torch.randn(4, generator=g).bfloat16(),
        "x": a[1].expand(3, 7),
    }
    path = tmp_path / "sd.bin"
    torch.save(sd, str(path))
    src = BinSource(path)
    assert src._offsets  # read from the file, not loaded into memory
    for k, v in sd.items():
        info = src.infos()[k]
        whole = src.read_into(info, 0, info.nbytes, None)
        assert torch.equal(whole.view(v.dtype).reshape(v.shape), v), k
        cut = info.nbytes // 2 // v.element_size() * v.element_size()
        tail = src.read_into(info, cut, info.nbytes - cut, None)
        assert torch.equal(tail, v.contiguous().reshape(-1).view(torch.uint8)[cut:]), k
    src.close()

    packed = tmp_path / "packed.bin"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for zi in zin.infolist():
            zout.writestr(zi.filename, zin.read(zi))
    with pytest.raises(CheckpointError, match="not stored as plain bytes") as ei:
        BinSource(packed)
    assert ei.value.path == str(packed) and ei.value.tensor in sd


# -- 10. messages: kohya alphas and factor dtypes, GGUF disk full, combine's options first ------------------


def _kohya_dir(tmp_path: Path, alpha, *, down_dtype=None) -> Path:
    import torch
    from safetensors.torch import save_file

    sd = _kohya_sd({"down_blocks_0_attentions_0_proj_in": 1.0, "mid_block_resnets_0_conv1": 2.0}, rank=4)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd[f"{key}.alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)
    if down_dtype is not None:
        sd[f"{key}.lora_down.weight"] = (sd[f"{key}.lora_down.weight"] * 10).to(down_dtype)
    (tmp_path / "k").mkdir()
    save_file(sd, str(tmp_path / "k" / "lora.safetensors"))
    return tmp_path / "k"


ALPHA_KEY = "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda t: t.tensor(True), "alpha stored as BOOL: a kohya alpha is one floating-point number"),
        (lambda t: t.tensor(8, dtype=t.int64), "alpha stored as I64"),
        (lambda t: t.tensor(8, dtype=t.uint8), "alpha stored as U8"),
        (lambda t: t.tensor(1.0).to(t.float8_e8m0fnu), "alpha stored as F8_E8M0"),
        (lambda t: t.tensor(3e38), "alpha 3e+38 is beyond any real one (at most 1e+06)"),
        (lambda t: t.tensor(2e6, dtype=t.float64), "alpha 2e+06 is beyond any real one"),
        (lambda t: t.tensor(-1.0), "alpha -1 is negative"),
        (lambda t: t.tensor(float("nan"), dtype=t.float16), "alpha is not a finite number"),
    ],
    ids=["bool", "i64", "u8", "f8e8m0", "3e38", "2e6", "negative", "nan"],
)
def test_a_kohya_alpha_that_is_no_real_alpha_is_refused_by_name(tmp_path, make, needle):
    import torch

    k = _kohya_dir(tmp_path, make(torch))
    before = sha_all(k)
    out = tmp_path / "out"
    one_error(
        cli("convert", k, "--to", "diffusers", "-o", out), f"{k / 'lora.safetensors'}: {ALPHA_KEY}: {needle}", out=out
    )
    one_error(cli("detect", k), f"{k / 'lora.safetensors'}: {ALPHA_KEY}: {needle}")
    assert sha_all(k) == before


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"])
def test_a_kohya_alpha_in_any_float_dtype_is_read(tmp_path, dtype):
    import json

    import torch

    k = _kohya_dir(tmp_path, torch.tensor(2.0).to(getattr(torch, dtype)))
    res = cli("detect", k, "--json")
    assert res.exit_code == 0, res.output
    scal = {g["name"]: g["scalings"] for g in json.loads(res.stdout)["adapters"][0]["modules"]}
    assert scal["proj_in"] == [0.5] and scal["conv1"] == [0.5]  # alpha 2 / rank 4 (conv1: alpha 2 as F32)


@pytest.mark.parametrize("dtype", ["int32", "int8", "uint8", "bool"])
def test_integer_lora_factors_are_refused_by_name(tmp_path, dtype):
    import torch
    from safetensors.torch import load_file, save_file

    k = _kohya_dir(tmp_path, 1.0, down_dtype=getattr(torch, dtype))
    one_error(cli("detect", k), str(k / "lora.safetensors"), "lora_down.weight", "LoRA factors are floating-point")
    # a PEFT adapter alike
    shutil.copytree(FIXTURES / "tiny-llama-lora", tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(n for n in sorted(sd) if n.endswith("lora_B.weight"))
    sd[key] = (sd[key] * 100).to(getattr(torch, dtype))
    save_file(sd, str(f))
    before = sha_all(tmp_path / "adapter")
    shutil.copytree(FIXTURES / "tiny-llama-base", tmp_path / "base")
    out = tmp_path / "merged"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, f"{f}: {key}: a LoRA tensor stored as", "LoRA factors are floating-point", out=out)
    assert sha_all(tmp_path / "adapter") == before


@pytest.fixture
def tiny_fs(tmp_path):
    with tmpfs(tmp_path / "small", "size=12k") as d:
        yield d


def test_gguf_disk_full_is_the_message_every_sink_gives(gguf_work, tiny_fs):
    """A GGUF that fills the disk was a short file with exit 0 (numpy's tofile lost the failed flush); now
    the one line a full disk gives for any other output: PATH: disk full while writing (hint)."""
    before = sha_all(gguf_work / "base", gguf_work / "adapter")
    lines = {}
    for kind, out in (("gguf", tiny_fs / "a.gguf"), ("mlx", tiny_fs / "m")):
        res = cli("convert", gguf_work / "adapter", "--to", kind, "--base", gguf_work / "base", "-o", out)
        line = one_error(res, "disk full while writing", "(free space or write elsewhere)")
        assert not out.exists() and os.listdir(tiny_fs) == []
        lines[kind] = line
    assert lines["gguf"] == f"error: {tiny_fs / 'a.gguf'}: disk full while writing (free space or write elsewhere)"
    assert lines["mlx"] == lines["gguf"].replace("a.gguf", "m/adapters.safetensors")
    assert sha_all(gguf_work / "base", gguf_work / "adapter") == before


@pytest.mark.parametrize(
    "opts,needle",
    [
        (["--method", "bogus"], "unknown --method 'bogus'"),
        (["--method", "ties"], "--method ties needs --density"),
        (["--method", "ties", "--density", "2"], "--density must be in (0, 1]"),
        (["--method", "ties", "--density", "nan"], "--density must be in (0, 1]"),
        (["--method", "linear", "--density", "0.5"], "--density does not apply to linear"),
    ],
)
def test_combine_checks_its_options_before_opening_any_adapter(tmp_path, opts, needle):
    """Checked first: the adapters named here do not even exist."""
    out = tmp_path / "out"
    one_error(cli("combine", tmp_path / "missing-a", tmp_path / "missing-b", *opts, "-o", out), needle, out=out, code=2)


# -- fuzzing kohya names and alpha tensors, each case under a time and a memory limit ------------------------
#
# The examples run in one child process (imports paid once) under RLIMIT_AS, each example under a wall-clock
# alarm that raises inside it; the parent kills the child at an overall timeout.  A hang or a blow-up fails
# this test, not the machine.

FUZZ_CHILD = r"""
import math, os, signal, sys, tempfile, time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from lora_convert import diffusion_names as names
from lora_convert.dialects import read_inventory
from lora_convert.errors import LoraConvertError
from lora_convert.io.reader import open_checkpoint

EXAMPLE_SECONDS = 5.0
SETTINGS = dict(max_examples=int(sys.argv[2]), deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
WORDS = sorted(set(names.KOHYA_PLAIN_NAMES) | {w for c in names.KOHYA_COMPOUNDS | names.KOHYA_SGM_COMPOUNDS
                                                for w in c.split("_")}) + ["0", "7", "12", ""]
FLOATS = ["float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"]
OTHERS = ["int64", "int32", "uint8", "bool", "float8_e8m0fnu"]


class Hang(Exception):
    pass


def alarm(signum, frame):
    raise Hang(f"an example ran over {EXAMPLE_SECONDS} s")


signal.signal(signal.SIGALRM, alarm)


def bounded(fn):
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_SECONDS)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def inventory(sd):
    with tempfile.TemporaryDirectory() as d:
        save_file(sd, os.path.join(d, "lora.safetensors"))
        ck = open_checkpoint(Path(d) / "lora.safetensors")
        try:
            return bounded(lambda: read_inventory(ck))
        finally:
            ck.close()


def pair(name, rank=2, alpha=None):
    sd = {f"lora_unet_{name}.lora_down.weight": torch.ones(rank, 3),
          f"lora_unet_{name}.lora_up.weight": torch.ones(3, rank)}
    if alpha is not None:
        sd[f"lora_unet_{name}.alpha"] = alpha
    return sd


token = st.one_of(st.sampled_from(WORDS), st.text(st.sampled_from("ab_.0\n-é"), max_size=6))
name = st.one_of(
    st.lists(token, min_size=1, max_size=12).map("_".join),
    st.tuples(st.lists(token, min_size=1, max_size=4), st.integers(1, 3000)).map(lambda t: "_".join(t[0] * t[1])),
)


@settings(**SETTINGS)
@given(st.lists(name, min_size=1, max_size=3, unique=True))
def names(ns):
    sd = {}
    for n in ns:
        sd.update(pair(n))
    try:
        inv = inventory(sd)
    except LoraConvertError:
        return
    got = {m.a_key for m in inv.modules("default").values()}
    assert got == {f"lora_unet_{n}.lora_down.weight" for n in ns}, (ns, got)


value = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 4.0, 1e6, 1e6 + 1, -0.0]))


@settings(**SETTINGS)
@given(st.sampled_from(FLOATS + OTHERS), st.sampled_from([(), (1,), (2,), (1, 1), (0,)]), value)
def alphas(dtype, shape, v):
    try:
        t = torch.full(shape, v, dtype=torch.float64).to(getattr(torch, dtype))
    except (RuntimeError, OverflowError):
        return
    stored = float(t.reshape(-1)[0].double()) if t.numel() else None
    ok = (dtype in FLOATS and t.numel() == 1 and math.isfinite(stored) and 0 <= stored <= 1e6)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"
    try:
        inv = inventory(pair("down_blocks_0_attentions_0_proj_in", rank=4, alpha=t))
    except LoraConvertError as exc:
        assert not ok, (dtype, shape, v, str(exc))
        assert exc.tensor == key and exc.path and exc.path.endswith("lora.safetensors"), str(exc)
        return
    assert ok, ("accepted", dtype, shape, v)
    (m,) = inv.modules("default").values()
    assert m.scaling == (stored or 4.0) / 4, (dtype, v, m.scaling)


t0 = time.monotonic()
{"names": names, "alphas": alphas}[sys.argv[1]]()
print(f"ok in {time.monotonic() - t0:.1f} s")
"""


@pytest.mark.parametrize("target,examples", [("names", 150), ("alphas", 200)])
def test_fuzz_kohya_names_and_alphas_under_limits(target, examples):
    import resource
    import subprocess
    import sys

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # torch maps ~2 GB of address space idle

    r = subprocess.run(
        [sys.executable, "-c", FUZZ_CHILD, target, str(examples)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limits,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.startswith("ok in"), r.stdout

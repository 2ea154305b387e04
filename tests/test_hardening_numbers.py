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
from helpers import FIXTURES, ROOT, cli, one_error

CHILD_MEMORY = 3 << 30  # address space of a bounded child: torch and transformers import within ~1.5 GB


@pytest.fixture
def work(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "tiny-llama-base", tmp_path / "base")
    shutil.copytree(FIXTURES / "tiny-llama-lora", tmp_path / "adapter")
    return tmp_path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


# The child runs each case through the CLI in-process (one interpreter start for all of them), each under
# an alarm of ``seconds``; it prints one JSON line per case: exit code, stderr, seconds taken.  The first case
# runs once more before the others, untimed, so that imports are not counted (an output it wrote is removed).
_CHILD = textwrap.dedent(
    """
    import json, pathlib, shutil, signal, sys, time
    from click.testing import CliRunner
    from lora_convert.cli import main
    import gguf, transformers  # imported before the clock starts: the routes import them on first use

    class Late(BaseException):  # (no "except Exception" under test can swallow it)
        pass

    def late(*_):
        raise Late()

    signal.signal(signal.SIGALRM, late)
    seconds, cases = json.loads(sys.argv[1])
    signal.alarm(seconds)  # the first case once, untimed: the route's lazy imports are not the case's cost
    CliRunner().invoke(main, cases[0], catch_exceptions=True)
    signal.alarm(0)
    if "-o" in cases[0]:
        out = pathlib.Path(cases[0][cases[0].index("-o") + 1])
        shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
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


def bounded_error(got: dict, *needles: str, seconds: float = 10.0) -> str:
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


# -- integers too large for a float, version strings -------------------------------------------------------------

HUGE = 10**400  # 401 digits: float(HUGE) and math.isfinite(HUGE) raise OverflowError


@pytest.mark.parametrize(
    "change, key",
    [
        ({"lora_alpha": HUGE}, "lora_alpha"),
        ({"lora_alpha": -HUGE}, "lora_alpha"),
        ({"lora_alpha": 2**128}, "lora_alpha"),  # just beyond float32: an int, compared exactly
        ({"alpha_pattern": {"q_proj": HUGE}}, "alpha_pattern"),
        ({"lora_dropout": HUGE}, "lora_dropout"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"peft_version": "9" * 5000}, "peft_version"),
        ({"peft_version": "0." * 40}, "peft_version"),
    ],
)
def test_adapter_config_numbers_too_large(work, change, key):
    edit_json(work / "adapter" / "adapter_config.json", **change)
    out = work / "out"
    res = cli("merge", work / "adapter", "--base", work / "base", "-o", out)
    one_error(res, "adapter_config.json", f"{key} must be", "fix this value in adapter_config.json", out=out)


def test_adapter_config_largest_float32_alpha_is_taken(work):
    """The bound is float32's largest value, inclusive; an int alpha just below it is accepted as before."""
    from lora_convert.config import AdapterConfig

    edit_json(work / "adapter" / "adapter_config.json", lora_alpha=2**127, peft_version="0.19.1.dev0+g0123abc")
    cfg = AdapterConfig.load(work / "adapter" / "adapter_config.json")
    assert cfg.lora_alpha == float(2**127)


@pytest.fixture
def mlx_adapter(tmp_path) -> Path:
    out = tmp_path / "mlx"
    res = cli("convert", FIXTURES / "tiny-llama-lora", "--to", "mlx", "--base", FIXTURES / "tiny-llama-base", "-o", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize(
    "params, key",
    [({"scale": HUGE}, "scale"), ({"scale": -HUGE}, "scale"), ({"dropout": HUGE}, "dropout"), ({"rank": HUGE}, "rank")],
)
def test_mlx_numbers_too_large(mlx_adapter, params, key):
    p = mlx_adapter / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["lora_parameters"].update(params)
    p.write_text(json.dumps(cfg))
    one_error(cli("detect", mlx_adapter), str(p), f"lora_parameters.{key} must be")


def _diffusers_file(path: Path, meta: dict | str) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(FIXTURES / "tiny-llama-lora" / "adapter_model.safetensors"))
    tensors = {"unet." + k.removeprefix("base_model.model."): v for k, v in sd.items() if ".layers." in k}
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": text})
    return path


DIFFUSERS_META = {"unet.r": 8, "unet.lora_alpha": 16, "unet.target_modules": ["q_proj", "v_proj", "o_proj"]}


@pytest.mark.parametrize(
    "meta, needle",
    [
        ({**DIFFUSERS_META, "unet.lora_alpha": HUGE}, "unet.lora_alpha must be"),
        ({**DIFFUSERS_META, "unet.alpha_pattern": {"q_proj": -HUGE}}, "unet.alpha_pattern must be"),
        ({**DIFFUSERS_META, "unet.peft_version": "1" * 5000}, "unet.peft_version must be"),
        ('{"unet.r": 8, "unet.lora_alpha": ' + "7" * 5000 + "}", "is not valid JSON"),  # over Python's digit limit
    ],
)
def test_diffusers_metadata_numbers_name_the_file_and_key(tmp_path, meta, needle):
    """A diffusers LoRA file has no adapter_config.json: the error names the .safetensors file and its
    lora_adapter_metadata key, and never tells the user to fix an adapter_config.json."""
    f = _diffusers_file(tmp_path / "pytorch_lora_weights.safetensors", meta)
    line = one_error(cli("detect", f), str(f), "lora_adapter_metadata", needle)
    assert "adapter_config.json" not in line


def test_diffusers_metadata_valid_is_read(tmp_path):
    f = _diffusers_file(tmp_path / "pytorch_lora_weights.safetensors", DIFFUSERS_META)
    res = cli("detect", f, "--json")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "text, want",
    [
        ("0.19.1.dev0", (0, 19, 1)),
        ("0.18.0", (0, 18, 0)),
        ("0.19.1+g0123abc", (0, 19, 1)),
        ("v0.17", (0, 17)),
        ("1", (1,)),
        ("", None),
        (None, None),
        ("unknown", "unknown"),
        ("dev-0.19", "dev-0.19"),
        ("9" * 30, "9" * 30),  # not a version number: more digits than any release has
    ],
)
def test_peft_version_parsing(text, want):
    from lora_convert.config import AdapterConfig
    from lora_convert.routes.moe import peft_version

    assert peft_version(AdapterConfig.from_dict({"peft_version": text})) == want


def test_unparsable_peft_version_is_said_as_such(tmp_path):
    """Square experts need PEFT's version; an unparsable one was reported as 'records no peft_version'."""
    from tiny_moe import H, model, peft_experts, save_base

    import lora_convert as lc

    m = model("qwen3_moe", moe_intermediate_size=H // 2)
    save_base(m, tmp_path / "base")
    peft_experts(m).save_pretrained(str(tmp_path / "adapter"))
    edit_json(tmp_path / "adapter" / "adapter_config.json", peft_version="unknown")
    with pytest.raises(lc.AdapterError, match=r"peft_version 'unknown' is unparsable") as exc:
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m")
    assert "records no peft_version" not in str(exc.value)
    assert not (tmp_path / "m").exists()


# -- quantization_config and bitsandbytes quant_state ---------------------------------------------------------------


@pytest.fixture(scope="module")
def quant_bases(tmp_path_factory) -> Path:
    from quant_models import llama, save_bnb, save_fp8

    root = tmp_path_factory.mktemp("quant_numbers")
    save_fp8(llama(), root / "fp8")
    save_bnb(llama(), root / "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    return root


@pytest.fixture
def fp8_base(quant_bases, tmp_path) -> Path:
    shutil.copytree(quant_bases / "fp8", tmp_path / "fp8")
    return tmp_path / "fp8"


@pytest.fixture
def nf4_base(quant_bases, tmp_path) -> Path:
    shutil.copytree(quant_bases / "nf4", tmp_path / "nf4")
    return tmp_path / "nf4"


def _quant_config(base: Path, **changes) -> None:
    p = base / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"].update(changes)
    p.write_text(json.dumps(cfg))


# ``report`` reads the layout and stops at a bad one (``detect`` shows it as a warning, exit 0)
@pytest.mark.parametrize(
    "size", [[0, 0], [128, 0], [-128, 128], [128], [], {}, ["128", 128], [128.0, 128.0], [128, 128, 128], [True, 1]]
)
def test_fp8_block_size_is_two_positive_integers(fp8_base, size):
    _quant_config(fp8_base, weight_block_size=size)
    one_error(
        cli("report", fp8_base),
        str(fp8_base),
        "quantization_config: weight_block_size must be two positive integers",
        "config.json",
    )


def test_fp8_block_size_valid_is_read_and_gives_the_grid(fp8_base):
    res = cli("detect", fp8_base, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["quantization"]["scheme"] == "fp8 e4m3, 128×128 blocks"
    _quant_config(fp8_base, weight_block_size=[128, 64])  # a valid size that does not fit the stored scales
    one_error(cli("report", fp8_base), "weight_scale_inv has shape [1, 2], expected [1, 4]")


@pytest.mark.parametrize("fmt", ["e5m2", "E4M3", 4, ""])
def test_fp8_fmt_must_name_the_stored_format(fp8_base, fmt):
    _quant_config(fp8_base, fmt=fmt)
    one_error(cli("report", fp8_base), str(fp8_base), "fmt is", "stored as fp8 e4m3")


def test_fp8_fmt_e4m3_is_read(fp8_base):
    _quant_config(fp8_base, fmt="e4m3")
    res = cli("detect", fp8_base, "--json")
    assert res.exit_code == 0, res.output


def _quant_state(base: Path, **changes) -> str:
    """Change the first 4-bit quant_state JSON of ``base``; its key."""
    import torch
    from safetensors.torch import load_file, save_file

    path = base / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sorted(sd) if ".quant_state.bitsandbytes__" in k)
    state = json.loads(bytes(sd[key].tolist()).decode())
    for k, v in changes.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(sd, str(path), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"blocksize": 0}, "blocksize must be a positive integer, not 0"),
        ({"blocksize": -64}, "blocksize must be a positive integer"),
        ({"blocksize": 64.0}, "blocksize must be a positive integer"),
        ({"blocksize": "64"}, "blocksize must be a positive integer"),
        ({"blocksize": None}, "blocksize must be a positive integer, not null"),
        ({"blocksize": HUGE}, "blocksize must be a positive integer"),
        ({"nested_blocksize": 0}, "nested_blocksize must be a positive integer"),
        ({"shape": [-128, -128]}, "shape must be a list of non-negative integers"),
        ({"shape": [128.0, 128]}, "shape must be a list of non-negative integers"),
        ({"quant_type": "nf5"}, "quant_type is \"nf5\" but its tensor name says 'nf4'"),
        ({"quant_type": "fp4"}, "quant_type is \"fp4\" but its tensor name says 'nf4'"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"dtype": ["bfloat16"]}, "dtype must be one of"),  # (unhashable: found by the fuzzer)
    ],
)
def test_bnb_quant_state_numbers_are_bounded(nf4_base, change, needle):
    key = _quant_state(nf4_base, **change)
    one_error(cli("report", nf4_base), str(nf4_base), key, "bitsandbytes quant state:", needle)


def test_bnb_unknown_type_in_the_tensor_name(nf4_base):
    """A quant_state named for a 4-bit type bitsandbytes does not have is reported under its own name."""
    from safetensors.torch import load_file, save_file

    path = nf4_base / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sorted(sd) if ".quant_state.bitsandbytes__nf4" in k)
    sd[key.replace("__nf4", "__nf5")] = sd.pop(key)
    save_file(sd, str(path), metadata={"format": "pt"})
    one_error(cli("report", nf4_base), "4-bit type 'nf5'", "known: nf4, fp4")


def test_bnb_valid_state_is_read(nf4_base):
    res = cli("detect", nf4_base, "--json")
    assert res.exit_code == 0, res.output
    assert "nf4" in json.loads(res.stdout)["quantization"]["scheme"]


# -- MoE top-k ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_case(tmp_path_factory) -> Path:
    from tiny_moe import model, peft_experts, save_base

    root = tmp_path_factory.mktemp("moe_numbers")
    m = model("qwen3_moe")
    save_base(m, root / "base")
    peft_experts(m, r=3, alpha=6).save_pretrained(str(root / "adapter"))
    return root


@pytest.fixture
def moe(moe_case, tmp_path) -> Path:
    shutil.copytree(moe_case / "base", tmp_path / "base")
    (tmp_path / "adapter").symlink_to(moe_case / "adapter")
    return tmp_path


def _experts_flops(root: Path) -> int:
    import lora_convert as lc

    rep = lc.report(root / "adapter", base=root / "base", seq_len=1)
    return next(r for r in rep.modules if r.kind == "experts").extra_flops


@pytest.mark.parametrize("top_k", [-2, 0, 10**12, 1e12, 2.0, "2", True, "E+1"])
def test_moe_top_k_is_bounded_by_the_experts(moe, top_k):
    """num_experts_per_tok of -2, 0 or 1e12 made report count every expert without a word."""
    from tiny_moe import E

    top_k = E + 1 if top_k == "E+1" else top_k
    edit_json(moe / "base" / "config.json", num_experts_per_tok=top_k)
    res = cli("report", moe / "adapter", "--base", moe / "base")
    one_error(res, str(moe / "base"), f"num_experts_per_tok must be an integer from 1 to {E}", "config.json")


def test_moe_top_k_bound_comes_from_the_tensors_without_num_experts(moe):
    """Without num_experts in config.json, the tensors' own expert count bounds top-k."""
    from tiny_moe import E

    cfg = json.loads((moe / "base" / "config.json").read_text())
    for key in ("num_experts", "num_local_experts"):
        cfg.pop(key, None)
    cfg["num_experts_per_tok"] = E + 1
    (moe / "base" / "config.json").write_text(json.dumps(cfg))
    one_error(cli("report", moe / "adapter", "--base", moe / "base"), f"from 1 to {E} ", f"not {E + 1}")


def test_moe_top_k_in_range_scales_the_expert_flops(moe):
    """Every top-k from 1 to E is taken, and the experts' LoRA FLOPs are proportional to it."""
    from tiny_moe import E

    got = {}
    for k in (1, E):
        edit_json(moe / "base" / "config.json", num_experts_per_tok=k)
        got[k] = _experts_flops(moe)
    assert got[E] == E * got[1] > 0


# -- --layers selections -------------------------------------------------------------------------------------------


def _extract_layers(out: Path, layers: str):
    tuned, base = FIXTURES / "tiny-llama-merged", FIXTURES / "tiny-llama-base"
    return ["extract", tuned, "--base", base, "--layers", layers, "-o", out]


def test_layer_selection_is_ranges_not_a_set():
    """0-10000000 built a set of ten million ints (1 GB); larger bounds took all memory."""
    import tracemalloc

    from lora_convert.routes.extract import parse_layers

    tracemalloc.start()
    sel = parse_layers("0-999999998, 5, 7-9, 999999990-999999999")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    assert sel is not None and sel.ranges == ((0, 999999999),)
    assert 0 in sel and 999999999 in sel and 10**9 not in sel and -1 not in sel and None not in sel
    assert parse_layers("9, 3-4, 5, 0").ranges == ((0, 0), (3, 5), (9, 9))
    assert parse_layers("") is None and parse_layers(None) is None


def test_layer_selection_membership_equals_the_expanded_set():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lora_convert.routes.extract import parse_layers

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(
        st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), min_size=1, max_size=6), st.lists(st.integers(0, 50))
    )
    def check(parts, have):
        spec = ",".join(f"{a}-{a + n}" if n else str(a) for a, n in parts)
        want = {i for a, n in parts for i in range(a, a + n + 1)}
        sel = parse_layers(spec)
        assert {i for i in range(-1, 60) if i in sel} == want
        have = sorted(set(have))
        lacking = sel.missing(have)
        assert (lacking is None) == want.issubset(have)
        if lacking is not None:
            assert lacking in want and lacking not in have and lacking == min(want - set(have))

    check()


def test_layers_the_model_lacks_are_an_error_listing_its_layers(tmp_path):
    """issue 25 item 5: --layers 7 on a 2-layer model extracted nothing from the layers, exit 0.  Huge ranges
    are checked in the same bounded time and memory (a child under a memory limit)."""
    out = tmp_path / "out"
    cases = [_extract_layers(out, s) for s in ("7", "0-10000000", "0-999999999", "1,2", "0-1,3")]
    got = bounded_cli(cases)
    for g, lacking in zip(got, ("7", "2", "2", "2", "3"), strict=True):
        bounded_error(g, "tiny-llama-merged", f"names layer {lacking}, which the model lacks: it has layers 0-1")
    assert not out.exists()


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("5-3", "empty range '5-3'"),
        ("x", "cannot read 'x'"),
        ("1-2-3", "cannot read '1-2-3'"),
        ("-1", "cannot read '-1'"),
        ("1" * 5000, "more than 9 digits"),  # int() of 5,000 digits is a ValueError beyond Python's digit limit
        ("0-9999999999", "more than 9 digits"),
    ],
)
def test_unreadable_layers_are_a_usage_error(tmp_path, spec, needle):
    out = tmp_path / "out"
    res = cli(*_extract_layers(out, spec))
    assert res.exit_code == 2, res.output
    assert "error: --layers: " in res.stderr and needle in res.stderr
    assert "Traceback" not in res.output and not out.exists()


def test_layers_select_exactly_those_layers(tmp_path):
    from safetensors import safe_open

    res = cli(*_extract_layers(tmp_path / "one", "1"))
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "one" / "adapter_model.safetensors"), "pt") as f:
        layers = {k.split(".layers.")[1].split(".")[0] for k in f.keys() if ".layers." in k}
    assert layers == {"1"}


@pytest.mark.parametrize("offset", [[128, 128], "0.5", float("nan"), float("inf"), HUGE, True])
def test_bnb_nested_offset_is_a_finite_number(nf4_base, tmp_path, offset):
    """Found by the fuzzer (test_fuzz_readers.py): a list as nested_offset was a TypeError mid-merge."""
    key = _quant_state(nf4_base, nested_offset=offset)
    one_error(cli("report", nf4_base), key, "nested_offset must be a finite number")


@pytest.mark.parametrize("change", [{"hidden_size": 2**40, "intermediate_size": 2**40}, {"vocab_size": 2**47}])
def test_report_config_only_base_with_sizes_torch_cannot_hold(work, change):
    """A base given by config.json alone is built on the meta device by transformers: sizes whose product
    overflows torch's storage size were an internal error."""
    only_config = work / "config-only"
    only_config.mkdir()
    shutil.copy(work / "base" / "config.json", only_config)
    edit_json(only_config / "config.json", **change)
    res = cli("report", work / "adapter", "--base", only_config)
    if res.exit_code == 0:  # a size torch can hold on the meta device is a result: the base's parameters counted
        rep = json.loads(cli("report", work / "adapter", "--base", only_config, "--json").stdout)
        assert rep["rows"][0]["base_parameters"] > 2**40
    else:
        one_error(res, str(only_config / "config.json"), "transformers cannot build a model from it")


@pytest.fixture(scope="module")
def ct_block_base(tmp_path_factory) -> Path:
    from quant_models import llama, save_ct

    root = tmp_path_factory.mktemp("ct_numbers")
    save_ct(llama(), root / "ct", "FP8_BLOCK")
    return root / "ct"


@pytest.mark.parametrize("size", [[0, 0], [128], "128", [128.0, 128.0], [[128], [128]], {}])
def test_compressed_tensors_block_structure_is_two_positive_integers(ct_block_base, tmp_path, size):
    """The same bound as fp8's weight_block_size, for compressed-tensors' block_structure ([0, 0] divided by
    zero, a nested list was unhashable)."""
    base = tmp_path / "ct"
    shutil.copytree(ct_block_base, base)
    cfg = json.loads((base / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    weights = next(g["weights"] for g in groups.values() if g.get("weights", {}).get("strategy") == "block")
    assert weights["block_structure"] == [128, 128]
    res = cli("report", base, "--json")
    assert res.exit_code == 0, res.output
    weights["block_structure"] = size
    (base / "config.json").write_text(json.dumps(cfg))
    one_error(cli("report", base), str(base), "block_structure must be two positive integers")


# -- verify --ulps ---------------------------------------------------------------------------------------------


def _verify(merged: Path, ulps: object):
    base, lora = FIXTURES / "tiny-llama-base", FIXTURES / "tiny-llama-lora"
    return cli("verify", merged, "--base", base, "--adapter", lora, "--ulps", ulps)


@pytest.mark.parametrize("ulps, code", [("1e300", 2), ("1e7", 2), ("4194304", 2), ("1e6", 1), ("64", 1)])
def test_verify_tolerance_never_passes_a_random_model(tmp_path, ulps, code):
    """--ulps 1e300 passed a random model: now --ulps is 0..1e6 (a usage error beyond), and whatever it says an
    element may be off by at most 1/16 of its magnitude, so a random model fails at any accepted value."""
    import torch
    from safetensors.torch import load_file, save_file

    rand = tmp_path / "random"
    shutil.copytree(FIXTURES / "tiny-llama-merged", rand)
    sd = load_file(str(rand / "model.safetensors"))
    save_file(
        {k: torch.randn_like(v) for k, v in sd.items()}, str(rand / "model.safetensors"), metadata={"format": "pt"}
    )
    res = _verify(rand, ulps)
    assert res.exit_code == code, res.output
    if code == 2:
        assert "--ulps" in res.stderr and "Traceback" not in res.output
    else:
        assert "MERGED is NOT BASE" in res.output, res.output


def test_verify_tolerance_in_bf16_passes_a_correct_merge(tmp_path):
    """In bf16 a correct merge verifies at the default and with a generous --ulps."""
    out = tmp_path / "bf16"
    res = cli(
        "merge", FIXTURES / "tiny-llama-lora", "--base", FIXTURES / "tiny-llama-base", "--dtype", "bf16", "-o", out
    )
    assert res.exit_code == 0, res.output
    for ulps in ("0", "63"):
        res = _verify(out, ulps)
        assert res.exit_code == 0, res.output


# -- report --seq-len -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [2**32 + 1, 10**400])
def test_report_seq_len_is_bounded(seq_len):
    """A 401-digit --seq-len was an OverflowError when the FLOPs were shown."""
    import lora_convert as lc

    res = cli("report", FIXTURES / "tiny-llama-lora", "--base", FIXTURES / "tiny-llama-base", "--seq-len", seq_len)
    assert res.exit_code == 2 and "--seq-len" in res.stderr and "Traceback" not in res.output, res.output
    with pytest.raises(lc.RouteError, match=r"seq_len must be at most 4294967296"):
        lc.report(FIXTURES / "tiny-llama-lora", base=FIXTURES / "tiny-llama-base", seq_len=seq_len)


def test_report_largest_seq_len_is_shown():
    res = cli("report", FIXTURES / "tiny-llama-lora", "--base", FIXTURES / "tiny-llama-base", "--seq-len", 2**32)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("e", [0, -4, 10**12, True, "4"])
def test_unsloth_marker_expert_count_is_bounded(moe_case, tmp_path, e):
    """The Unsloth marker's num_experts divides lora_A's rows: 0 was a ZeroDivisionError."""
    import lora_convert as lc

    adapter = tmp_path / "adapter"
    shutil.copytree(moe_case / "adapter", adapter)
    params = {"gate_up_proj": {"num_experts": e}, "down_proj": {"num_experts": e}}
    edit_json(adapter / "adapter_config.json", unsloth_fused_expert_lora={"parameters": params})
    with pytest.raises(
        lc.AdapterError, match=r"unsloth_fused_expert_lora num_experts for .* must be an integer from 1"
    ):
        lc.merge(adapter, base=moe_case / "base", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsloth_marker_true_expert_count_is_taken(moe_case, tmp_path):
    from tiny_moe import E

    import lora_convert as lc

    adapter = tmp_path / "adapter"
    shutil.copytree(moe_case / "adapter", adapter)
    params = {"gate_up_proj": {"num_experts": E}, "down_proj": {"num_experts": E}}
    edit_json(adapter / "adapter_config.json", unsloth_fused_expert_lora={"parameters": params})
    lc.merge(adapter, base=moe_case / "base", output=tmp_path / "out")
    lc.merge(moe_case / "adapter", base=moe_case / "base", output=tmp_path / "want")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "want" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_verify_names_nan_in_merged(tmp_path, bad):
    """A NaN in a merged tensor the adapter touches was reported as 'wrong scale c = nan'."""
    from safetensors.torch import load_file, save_file

    merged = tmp_path / "merged"
    shutil.copytree(FIXTURES / "tiny-llama-merged", merged)
    sd = load_file(str(merged / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key][0, 0] = bad
    save_file(sd, str(merged / "model.safetensors"), metadata={"format": "pt"})
    res = cli(
        "verify", merged, "--base", FIXTURES / "tiny-llama-base", "--adapter", FIXTURES / "tiny-llama-lora", "--json"
    )
    assert res.exit_code != 0, res.output
    checks = {c["tensor"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks[key]["status"] == "not finite", checks[key]
    assert "1 of " in checks[key]["detail"] and "nan" not in checks[key]["detail"].replace("NaN", "")
    assert all(c["status"] == "ok" for k, c in checks.items() if k != key)


def test_the_bounded_child_turns_a_blow_up_into_a_failure():
    """The harness itself: an allocation past CHILD_MEMORY fails in the child (MemoryError) rather than taking
    the machine, which is what makes the bounded cases above (and test_fuzz_readers.py) safe to run."""
    code = "import sys\ntry:\n    x = bytearray(4 << 30)\nexcept MemoryError:\n    sys.exit(3)\n"
    proc = subprocess.run([sys.executable, "-c", code], preexec_fn=_limit, capture_output=True, timeout=60)
    assert proc.returncode == 3, proc


def test_gguf_adapter_layer_index_beyond_the_base_is_refused_before_the_name_map(work, tmp_path):
    """A hostile adapter naming layer 999999999 does not size llama.cpp's name map: refused by name first."""
    from safetensors.torch import load_file, save_file

    path = work / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(path))
    sd = {k.replace(".layers.1.", ".layers.999999999."): v for k, v in sd.items()}
    save_file(sd, str(path), metadata={"format": "pt"})
    out = tmp_path / "x.gguf"
    res = cli("convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o", out)
    one_error(res, "LoRA on layer 999999999", "num_hidden_layers 2", out=out)


@pytest.mark.parametrize("lpb", [-1, 0, True, 10**9, 2.0, [2, 2]])
def test_sgm_names_with_a_layers_per_block_that_cannot_be_read(lpb):
    """A UNet config's layers_per_block of 0 or -1 divided by zero while SGM block names were read: such a
    config cannot say where a block lies, so the name is not translated (the module then matches nothing)."""
    from lora_convert.diffusion_names import sgm_to_diffusers

    cfg = {"layers_per_block": lpb, "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    assert sgm_to_diffusers("input_blocks.4.0.in_layers.2", cfg) is None
    good = {**cfg, "layers_per_block": 2}
    assert sgm_to_diffusers("input_blocks.4.0.in_layers.2", good) == "down_blocks.1.resnets.0.conv1"

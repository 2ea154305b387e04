"""Other libraries' import-time chatter stays out of lora-convert's output; our own warnings do not.

The CLI runs in a fresh process (in this one, pytest has imported everything already).  bitsandbytes logs
"Failed to load CPU gemm_4bit_forward from kernels-community ..." on import on CPUs with AVX512-BF16
(``python -c "import bitsandbytes"`` shows whether this machine is one); the mechanism itself is checked on
any CPU with a stand-in module that logs and warns on import the way those libraries do.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from quant_models import llama as quant_llama
from quant_models import save_bnb
from tiny import llama, peft_wrap

import lora_convert as lc
from lora_convert.third_party import import_quietly

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("kernels-community", "gemm_4bit", "Failed to load", "UserWarning", "FutureWarning", "DeprecationWarning")


def run(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lora_convert.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def no_noise(stderr: str) -> None:
    """Nothing but our own lines (``warning: ...``, ``note: ...``), and none of the libraries' words."""
    assert not [n for n in NOISE if n in stderr], stderr
    assert all(line.startswith(("warning: ", "note: ")) for line in stderr.splitlines()), stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    save_bnb(quant_llama(hidden=64, inter=128), root / "bnb", load_in_4bit=True, bnb_4bit_quant_type="nf4")
    targets = ["q_proj", "v_proj"]
    peft_wrap(quant_llama(hidden=64, inter=128), r=4, lora_alpha=8, target_modules=targets).save_pretrained(
        str(root / "qadapter")
    )
    base = llama()
    base.save_pretrained(str(root / "base"))
    peft_wrap(base, r=4, lora_alpha=8, target_modules=targets).save_pretrained(str(root / "adapter"))
    return root


def test_requantize_into_bitsandbytes_prints_only_our_warning(work, tmp_path):
    r = run("merge", work / "qadapter", "--base", work / "bnb", "-o", tmp_path / "m", "--requantize")
    assert r.returncode == 0, r.stderr
    assert "warning: the base is quantized (bitsandbytes nf4): merged weights re-quantized" in r.stderr
    no_noise(r.stderr)


def test_logits_check_through_peft_is_quiet(work, tmp_path):
    """verify --logits builds PEFT's model; PEFT imports bitsandbytes while doing so."""
    lc.merge(work / "adapter", base=work / "base", output=tmp_path / "m")
    r = run("verify", tmp_path / "m", "--base", work / "base", "--adapter", work / "adapter", "--logits")
    assert r.returncode == 0 and "logits: max |Δ|" in r.stdout, r.stdout + r.stderr
    assert r.stderr == ""


def test_gguf_and_report_from_a_config_are_quiet(work, tmp_path):
    """gguf and transformers (a base given by its config.json alone) imported on the way."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_bytes((work / "base" / "config.json").read_bytes())
    r = run("convert", work / "adapter", "--to", "gguf", "--base", tmp_path / "cfg", "-o", tmp_path / "a.gguf")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run("report", work / "adapter", "--base", tmp_path / "cfg")
    assert r.returncode == 0 and "note: base has no weights" in r.stderr, r.stderr
    no_noise(r.stderr)


def test_import_quietly_hides_import_chatter_only(tmp_path):
    """A stand-in library that logs a warning and warns on import: silent through import_quietly, and its
    logger and the warnings filters are as they were afterwards (later warnings, ours included, show)."""
    (tmp_path / "noisy_stand_in.py").write_text(
        textwrap.dedent(
            """
            import logging, warnings
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
            warnings.warn("a UserWarning of the library's own")
            """
        )
    )
    code = textwrap.dedent(
        """
        import logging, sys, warnings
        sys.path.insert(0, sys.argv[1])
        from lora_convert.third_party import import_quietly
        import_quietly("noisy_stand_in")
        assert logging.getLogger("bitsandbytes").level == logging.NOTSET
        logging.getLogger("bitsandbytes.later").warning("logged after the import")
        warnings.warn("warned after the import")
        """
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "gemm_4bit" not in r.stderr and "library's own" not in r.stderr, r.stderr
    assert "logged after the import" in r.stderr and "warned after the import" in r.stderr, r.stderr


def test_import_quietly_passes_import_errors_through():
    with pytest.raises(ImportError):
        import_quietly("no_such_module_for_lora_convert")

"""The golden set: every route on the fixtures and on tiny real models, with a sha256 of every file it writes.

Refactors and hardening promise byte-identical outputs for valid inputs.  This script makes that a
check: build the inputs once (transformers + PEFT, as the tests do), run the CLI of a given checkout on
each case, and record every output file's hash and every ``--json`` document.  Run it on two checkouts
and compare:

    python bench/golden.py --inputs /tmp/golden-in --code . --out /tmp/after.json
    python bench/golden.py --inputs /tmp/golden-in --code /tmp/before --out /tmp/before.json
    python bench/golden.py --compare /tmp/before.json /tmp/after.json

The inputs folder is built on first use and reused (same inputs for both runs); outputs are written to
one fixed folder so that paths in model cards and JSON are the same in both runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"

# name: argv, with {i} = the inputs folder, {o} = this case's output path, {f} = fixtures
CASES: dict[str, list[str]] = {
    "fix-detect-adapter": ["detect", "{f}/tiny-llama-lora", "--json"],
    "fix-detect-unmerged": ["detect", "{f}/tiny-llama-unmerged", "--json"],
    "fix-detect-merged": ["detect", "{f}/tiny-llama-merged", "--base", "{f}/tiny-llama-base", "--json"],
    "fix-merge": ["merge", "{f}/tiny-llama-lora", "--base", "{f}/tiny-llama-base", "-o", "{o}"],
    "fix-merge-unmerged": ["merge", "{f}/tiny-llama-unmerged", "-o", "{o}"],
    "fix-merge-bf16": ["merge", "{f}/tiny-llama-lora", "--base", "{f}/tiny-llama-base", "-o", "{o}", "--dtype", "bf16"],
    "fix-split": ["convert", "{f}/tiny-llama-unmerged", "--to", "adapter", "-o", "{o}"],
    "fix-strip": ["convert", "{f}/tiny-llama-unmerged", "--to", "base", "-o", "{o}"],
    "fix-attach": ["convert", "{f}/tiny-llama-lora", "--to", "unmerged", "--base", "{f}/tiny-llama-base", "-o", "{o}"],
    "fix-extract": ["extract", "{f}/tiny-llama-merged", "--base", "{f}/tiny-llama-base", "-o", "{o}", "--rank", "8"],
    "fix-gguf": ["convert", "{f}/tiny-llama-lora", "--to", "gguf", "--base", "{f}/tiny-llama-base", "-o", "{o}.gguf"],
    "fix-mlx": ["convert", "{f}/tiny-llama-lora", "--to", "mlx", "-o", "{o}"],
    "fix-report": ["report", "{f}/tiny-llama-lora", "--base", "{f}/tiny-llama-base", "--json"],
    "qwen2-merge": ["merge", "{i}/qwen2-adapter", "--base", "{i}/qwen2-base", "-o", "{o}"],
    "qwen2-unmerged-merge": ["merge", "{i}/qwen2-unmerged", "-o", "{o}"],
    "qwen2-strip": ["convert", "{i}/qwen2-unmerged", "--to", "base", "-o", "{o}"],
    "qwen2-split": ["convert", "{i}/qwen2-unmerged", "--to", "adapter", "-o", "{o}"],
    "qwen2-attach": ["convert", "{i}/qwen2-adapter", "--to", "unmerged", "--base", "{i}/qwen2-base", "-o", "{o}"],
    "qwen2-gguf": ["convert", "{i}/qwen2-adapter", "--to", "gguf", "--base", "{i}/qwen2-base", "-o", "{o}.gguf"],
    "qwen2-mlx": ["convert", "{i}/qwen2-adapter", "--to", "mlx", "--base", "{i}/qwen2-base", "-o", "{o}"],
    "qwen2u-merge": ["merge", "{i}/qwen2u-adapter", "--base", "{i}/qwen2u-base", "-o", "{o}"],
    "qwen2u-attach": ["convert", "{i}/qwen2u-adapter", "--to", "unmerged", "--base", "{i}/qwen2u-base", "-o", "{o}"],
    "qwen2u-gguf": ["convert", "{i}/qwen2u-adapter", "--to", "gguf", "--base", "{i}/qwen2u-base", "-o", "{o}.gguf"],
    "qwen2u-mlx": ["convert", "{i}/qwen2u-adapter", "--to", "mlx", "--base", "{i}/qwen2u-base", "-o", "{o}"],
    "gpt2-merge": ["merge", "{i}/gpt2-adapter", "--base", "{i}/gpt2-base", "-o", "{o}"],
    "gpt2-unmerged-merge": ["merge", "{i}/gpt2-unmerged", "-o", "{o}"],
    "gpt2-strip": ["convert", "{i}/gpt2-unmerged", "--to", "base", "-o", "{o}"],
    "gpt2-split": ["convert", "{i}/gpt2-unmerged", "--to", "adapter", "-o", "{o}"],
    "dora-merge": ["merge", "{i}/dora-adapter", "--base", "{i}/llama-base", "-o", "{o}"],
    "dora-merge-fp16": ["merge", "{i}/dora-adapter", "--base", "{i}/llama-base", "-o", "{o}", "--dtype", "fp16"],
    "stack-merge": [
        "merge",
        "{i}/llama-base",
        "--adapter",
        "{i}/plain-adapter",
        "--adapter",
        "{i}/plain2-adapter:0.5",
        "-o",
        "{o}",
    ],
    "plain-merge": ["merge", "{i}/plain-adapter", "--base", "{i}/llama-base", "-o", "{o}"],
    "unmerge": ["convert", "{i}/plain-merged", "--to", "base", "--adapter", "{i}/plain-adapter", "-o", "{o}"],
    "verify": ["verify", "{i}/plain-merged", "--base", "{i}/llama-base", "--adapter", "{i}/plain-adapter", "--json"],
    "combine-cat": ["combine", "{i}/plain-adapter", "{i}/plain2-adapter:0.5", "--method", "cat", "-o", "{o}"],
    "moe-merge": ["merge", "{i}/moe-adapter", "--base", "{i}/moe-base", "-o", "{o}"],
    "moe-per-expert": [
        "convert",
        "{i}/moe-adapter",
        "--to",
        "adapter",
        "--base",
        "{i}/moe-base",
        "--moe-layout",
        "per-expert",
        "-o",
        "{o}",
    ],
    "moe-report": ["report", "{i}/moe-adapter", "--base", "{i}/moe-base", "--json"],
    "fp8-merge": ["merge", "{i}/fp8-adapter", "--base", "{i}/fp8-base", "-o", "{o}"],
    "unet-kohya": ["convert", "{i}/unet-adapter", "--to", "kohya", "-o", "{o}"],
    "unet-diffusers": ["convert", "{i}/unet-adapter", "--to", "diffusers", "-o", "{o}"],
    "unet-merge-kohya": ["merge", "{i}/unet-kohya.safetensors", "--base", "{i}/unet-base", "-o", "{o}"],
}


def build_inputs(inp: Path) -> None:
    """The tiny models and adapters, made once with transformers + PEFT (tests/ builders)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import quant_models
    import tiny
    import tiny_moe
    import torch
    from safetensors.torch import load_file, save_file

    tmp = inp.with_name(inp.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def pair(name: str, base, **lora) -> None:
        base.save_pretrained(tmp / f"{name}-base")
        pm = tiny.peft_wrap(base, **lora)
        pm.save_pretrained(str(tmp / f"{name}-adapter"))
        tiny.save_unmerged(pm, tmp / f"{name}-unmerged")

    targets = ["embed_tokens", "lm_head", "q_proj", "v_proj", "down_proj"]
    pair("qwen2", tiny.qwen2(), r=4, lora_alpha=8, use_rslora=True, target_modules=targets, rank_pattern={"v_proj": 6})
    pair("qwen2u", tiny.qwen2(tie=False), r=4, lora_alpha=8, target_modules=targets, alpha_pattern={"q_proj": 3})
    pair("gpt2", tiny.gpt2(), r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    tiny.llama().save_pretrained(tmp / "llama-base")
    for name, seed, kw in [("dora", 1, {"use_dora": True}), ("plain", 2, {}), ("plain2", 3, {})]:
        pm = tiny.peft_wrap(
            tiny.llama(), seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], **kw
        )
        pm.save_pretrained(str(tmp / f"{name}-adapter"))
    merged = tiny.peft_wrap(tiny.llama(), seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"])
    merged.merge_and_unload().save_pretrained(tmp / "plain-merged")

    moe = tiny_moe.model("qwen3_moe")
    tiny_moe.save_base(moe, tmp / "moe-base")
    tiny_moe.peft_experts(moe).save_pretrained(str(tmp / "moe-adapter"))

    q = quant_models.llama()
    quant_models.save_fp8(q, tmp / "fp8-base")
    tiny.peft_wrap(quant_models.llama(), r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]).save_pretrained(
        str(tmp / "fp8-adapter")
    )

    unet = tiny.unet()
    unet.save_pretrained(tmp / "unet-base")
    pu = tiny.peft_wrap(unet, r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1", "proj_in"])
    pu.save_pretrained(str(tmp / "unet-adapter"))
    # the same adapter as a kohya file, written by the current code as a fixed input for the merge case
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_convert.cli",
            "convert",
            str(tmp / "unet-adapter"),
            "--to",
            "kohya",
            "-o",
            str(tmp / "k"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    (kfile,) = [p for p in (tmp / "k").rglob("*.safetensors")] if (tmp / "k").is_dir() else [tmp / "k"]
    save_file(load_file(str(kfile)), str(tmp / "unet-kohya.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(tmp / "k", ignore_errors=True) if (tmp / "k").is_dir() else (tmp / "k").unlink()
    del torch
    tmp.rename(inp)


def digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_cases(inp: Path, code: Path, work: Path, only: list[str] | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code.resolve()), "HF_HUB_OFFLINE": "1"}
    result = {}
    for name, argv in CASES.items():
        if only and name not in only:
            continue
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        out = work / name
        args = [a.format(i=inp, o=out, f=FIX) for a in argv]
        # cwd=code: ``python -m`` puts the working folder first on sys.path, ahead of PYTHONPATH, so a run started
        # from another checkout would otherwise test that checkout's code
        r = subprocess.run(
            [sys.executable, "-m", "lora_convert.cli", *args],
            env=env,
            cwd=code.resolve(),
            capture_output=True,
            text=True,
        )
        entry: dict = {"exit": r.returncode}
        if "--json" in args:
            entry["json"] = _json_or_text(r.stdout)
        produced = [p for p in work.iterdir()]
        for p in produced:
            entry.setdefault("files", {}).update({f"{p.name}/{k}": v for k, v in digest(p).items()})
        if r.returncode != 0:
            entry["stderr"] = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []
        result[name] = entry
        print(f"{name:24s} exit {r.returncode}  {len(entry.get('files', {}))} files", flush=True)
    return result


def _json_or_text(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def compare(a: dict, b: dict) -> int:
    bad = 0
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            bad += 1
            print(f"DIFFERS: {name}")
            ea, eb = a.get(name, {}), b.get(name, {})
            for key in sorted(set(ea) | set(eb)):
                if ea.get(key) != eb.get(key):
                    if key == "files":
                        fa, fb = ea.get("files", {}), eb.get("files", {})
                        for f in sorted(set(fa) | set(fb)):
                            if fa.get(f) != fb.get(f):
                                print(f"   file {f}: {fa.get(f, '-')[:12]} -> {fb.get(f, '-')[:12]}")
                    else:
                        print(
                            f"   {key}: {json.dumps(ea.get(key))[:300]}\n   {'':{len(key)}}  {json.dumps(eb.get(key))[:300]}"
                        )
    print(f"{len(set(a) | set(b)) - bad} identical, {bad} different")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=Path, default=Path("/tmp/lora-convert-golden/inputs"))
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout whose lora_convert runs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-convert-golden/out"))
    ap.add_argument("--out", type=Path, help="write the manifest here")
    ap.add_argument("--only", nargs="*", help="case names")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    a = ap.parse_args()
    if a.compare:
        return compare(*(json.loads(p.read_text()) for p in a.compare))
    if not a.inputs.exists():
        build_inputs(a.inputs)
    manifest = run_cases(a.inputs, a.code, a.work, a.only)
    if a.out:
        a.out.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

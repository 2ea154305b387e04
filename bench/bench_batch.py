"""A fleet of adapters on the 1.1B-shaped base: a shell loop of single runs vs ``batch`` vs ``batch --ray local``;
and the scaling estimate for a 600B-class extraction (per-module factorisation cost measured here).

    python bench/bench_batch.py                      # 16 adapters -> GGUF, three ways (needs bench/synth.py's set)
    python bench/bench_batch.py --op merge -n 4      # 4 merges into the 2.2 GB base (2.2 GB written each)
    python bench/bench_batch.py --scaling            # the factorisation costs and the node-count table only

``batch --ray local`` runs inside a network namespace holding only loopback (``unshare -n``, as root): Ray then
advertises 127.0.0.1 and nothing else (this workplace flags traffic to other addresses).  Without it that mode is
skipped.  The fleet: the cached r=16 adapter with its B factors scaled by 0.5 + i/8 (different bytes per adapter,
cheap to make).  Every figure comes with the machine's load (``uptime``): the cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, OUT_ROOT, child_env, lora_convert_cmd, rm

SYNTH = BENCH_DIR / ".cache" / "synth"
BASE = SYNTH / "base-L22-s0"
ADAPTER = SYNTH / "adapter-r16-L22-s0"


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def make_fleet(n: int, folder: Path) -> list[Path]:
    """``n`` adapters: the cached one with B scaled by 0.5 + i/8 (written once, kept in bench/out)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = None
    out = []
    for i in range(n):
        d = folder / f"adapter-{i:02d}"
        out.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        if tensors is None:
            tensors = load_file(str(ADAPTER / "adapter_model.safetensors"))
        scale = 0.5 + i / 8
        scaled = {k: (v * scale).to(v.dtype) if "lora_B" in k else v for k, v in tensors.items()}
        d.mkdir(exist_ok=True)
        save_file(scaled, str(d / "adapter_model.safetensors"))
        shutil.copy(ADAPTER / "adapter_config.json", d / "adapter_config.json")
        del scaled
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def job_args(op: str, adapter: Path, out: Path) -> list[str]:
    if op == "gguf":
        return ["convert", str(adapter), "--to", "gguf", "--base", str(BASE), "-o", str(out / f"{adapter.name}.gguf")]
    return ["merge", str(adapter), "--base", str(BASE), "-o", str(out / adapter.name)]


def timed(argv: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **child_env()}, **kw)
    return time.monotonic() - t0, r


def fleet(args: argparse.Namespace) -> list[dict]:
    adapters = make_fleet(args.n, OUT_ROOT / "fleet")
    tool = lora_convert_cmd()
    rows = []
    modes = ["loop", "batch", "ray"] if not args.modes else args.modes.split(",")
    for mode in modes:
        out = OUT_ROOT / f"fleet-{args.op}-{mode}"
        rm(out)
        out.mkdir(parents=True)
        jobs = out / "jobs.jsonl"
        jobs.write_text("".join(json.dumps(job_args(args.op, a, out)) + "\n" for a in adapters))
        before = load()
        if mode == "loop":
            t0 = time.monotonic()
            for a in adapters:
                r = subprocess.run(
                    [*tool, *job_args(args.op, a, out)], capture_output=True, env={**os.environ, **child_env()}
                )
                assert r.returncode == 0, r.stderr
            wall = time.monotonic() - t0
        elif mode == "batch":
            wall, r = timed([*tool, "batch", str(jobs), "--json", "--state", str(out / "state")])
            assert r.returncode == 0, r.stderr[-2000:]
        else:
            if os.geteuid() != 0 or shutil.which("unshare") is None:
                print("ray: skipped (no network namespace: not root)")
                continue
            inner = " ".join(
                shlex.quote(a)
                for a in [*tool, "batch", str(jobs), "--json", "--ray", "local", "--state", str(out / "state")]
            )
            wall, r = timed(["unshare", "-n", "bash", "-c", f"ip link set lo up && exec {inner}"])
            assert r.returncode == 0, r.stderr[-2000:]
        files = sorted(p for p in out.rglob("*") if p.is_file() and "state" not in p.parts and p.name != "jobs.jsonl")
        rows.append(
            {
                "mode": mode,
                "jobs": args.n,
                "wall_s": round(wall, 1),
                "jobs_per_min": round(60 * args.n / wall, 1),
                "load_before": before,
                "load_after": load(),
                "files": len(files),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        digests = {p.relative_to(out).as_posix(): p.stat().st_size for p in files}
        rows[-1]["sizes"] = sum(digests.values())
        if not args.keep:
            rm(out)
    return rows


# -- 600B-class extraction: what one module costs here, and the node-count table -------------------------------------
# DeepSeek-V3 shapes (out, in): routed/shared expert gate/up (2048, 7168), down (7168, 2048); MLA attention per layer.
SHAPES = {
    "expert down (7168x2048)": (7168, 2048),
    "expert gate/up (2048x7168)": (2048, 7168),
    "attn q_a (1536x7168)": (1536, 7168),
    "attn q_b (24576x1536)": (24576, 1536),
    "attn kv_a (576x7168)": (576, 7168),
    "attn kv_b (32768x512)": (32768, 512),
    "attn o (7168x16384)": (7168, 16384),
}
EXPERT_MATRICES = 61 * 256 * 3  # the count (≈ 47k); 58 MoE layers x 256 routed + shared is close to it
BYTES = 2 * 1.34e12  # tuned and base, bf16 (671B parameters each)


def scaling(rank: int, reps: int) -> dict:
    import torch

    from lora_convert.svd import factorise

    torch.set_num_threads(1)  # one core's cost: a node runs one module per core
    gen = torch.Generator().manual_seed(0)
    cost = {}
    for name, (m, n) in SHAPES.items():
        base = torch.randn(m, n, generator=gen).to(torch.bfloat16)
        tuned = (base.float() + 1e-2 * torch.randn(m, 32, generator=gen) @ torch.randn(32, n, generator=gen)).to(
            torch.bfloat16
        )
        walls, cpus = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            delta = tuned.float() - base.float()  # what extraction does per module: ΔW in fp32, then the SVD
            f = factorise(delta, rank)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        # CPU seconds of one thread: one core's cost, whatever else shares the machine (the wall is beside it)
        cost[name] = {"seconds": min(cpus), "wall": min(walls), "method": f.method, "load": load()}
        print(json.dumps({name: cost[name]}), flush=True)
    expert = (cost["expert down (7168x2048)"]["seconds"] + 2 * cost["expert gate/up (2048x7168)"]["seconds"]) / 3
    attn = sum(v["seconds"] for k, v in cost.items() if k.startswith("attn"))
    core_seconds = EXPERT_MATRICES * expert + 61 * attn
    return {
        "rank": rank,
        "per_module": cost,
        "core_seconds": core_seconds,
        "expert_mean_s": expert,
        "attn_layer_s": attn,
    }


def table(core_seconds: float, cores: int, node_bw: float, storage_bw: float) -> list[dict]:
    rows = []
    for nodes in (1, 2, 4, 8, 16, 32, 64, 128):
        compute = core_seconds / (nodes * cores)
        io = BYTES / min(nodes * node_bw, storage_bw)
        rows.append(
            {
                "nodes": nodes,
                "TB_per_node": round(BYTES / nodes / 1e12, 3),
                "compute_min": round(compute / 60, 1),
                "read_min": round(io / 60, 1),
                "wall_min": round(max(compute, io) / 60, 1),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=16, help="adapters in the fleet")
    p.add_argument("--op", choices=["gguf", "merge"], default="gguf")
    p.add_argument("--modes", help="comma-separated subset of loop,batch,ray")
    p.add_argument("--scaling", action="store_true", help="only the 600B-class extraction estimate")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--cores", type=int, default=64, help="cores per node assumed in the table")
    p.add_argument("--node-gbps", type=float, default=2.0, help="GB/s one node reads from shared storage")
    p.add_argument("--storage-gbps", type=float, default=100.0, help="GB/s the shared storage serves in all")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    if args.scaling:
        s = scaling(args.rank, args.reps)
        print(json.dumps({k: v for k, v in s.items() if k != "per_module"}))
        for row in table(s["core_seconds"], args.cores, args.node_gbps * 1e9, args.storage_gbps * 1e9):
            print(json.dumps(row))
        return
    if not BASE.is_dir():
        sys.exit(f"no synthetic base at {BASE}: run python bench/synth.py first (or link bench/.cache)")
    fleet(args)


if __name__ == "__main__":
    main()

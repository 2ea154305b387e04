#!/usr/bin/env bash
# The GPU path, checked where a CUDA GPU exists: the Llama-3-8B-shaped merge and extraction with
# --device cuda against the same commands on the CPU, with wall times.
#
#   bash bench/gpu_check.sh            # merge (8B, 32 layers) and extraction (a 4-layer 8B slice)
#   FULL=1 bash bench/gpu_check.sh     # also extract the whole 8B model on the GPU (16 GB more disk)
#   DEVICE=cpu bash bench/gpu_check.sh # dry run of the plumbing on a machine without a GPU
#
# Checks: the merged safetensors files equal the CPU's byte for byte (if not, how many elements differ
# and by how many ulps: fp32 GEMMs on two devices may differ in the last bit before the single rounding);
# the extracted adapters' errors equal each other and the optimum (bench_extract.py --floor prints it).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" != cpu ]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
    python -c "import torch; print('GPU:', torch.cuda.get_device_name(0))"
fi
OUT=bench/out/gpu-check
rm -rf "$OUT"; mkdir -p "$OUT"
paths=$(python bench/synth.py --size 8b --what base adapter)
BASE=$(echo "$paths" | python -c "import json,sys; print(json.load(sys.stdin)['base'])")
ADAPTER=$(echo "$paths" | python -c "import json,sys; print(json.load(sys.stdin)['adapter'])")
slice=$(python bench/synth.py --size 8b --layers 4 --what base tuned)
SBASE=$(echo "$slice" | python -c "import json,sys; print(json.load(sys.stdin)['base'])")
STUNED=$(echo "$slice" | python -c "import json,sys; print(json.load(sys.stdin)['tuned'])")
LC="python -m lora_convert.cli"

timed() {  # timed LABEL CMD...: run, print the wall time
    local label=$1; shift
    local t0; t0=$(date +%s.%N)
    "$@" > "$OUT/$label.json"
    awk -v l="$label" -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%-28s %8.2f s\n", l, b - a }'
}

echo "== merge, 8B shapes (32 layers, r=16 on all linears + embeddings + lm_head)"
timed merge-cpu $LC merge "$ADAPTER" --base "$BASE" -o "$OUT/merged-cpu" --json
timed "merge-on-$DEVICE" $LC merge "$ADAPTER" --base "$BASE" -o "$OUT/merged-dev" --device "$DEVICE" --json
python - "$OUT/merged-cpu" "$OUT/merged-dev" <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors import safe_open

a, b = map(Path, sys.argv[1:])
files = sorted(p.name for p in a.glob("*.safetensors"))
same = [f for f in files if (a / f).read_bytes() == (b / f).read_bytes()]
print(f"merged files identical: {len(same)} of {len(files)}")
for f in sorted(set(files) - set(same)):
    with safe_open(a / f, "pt") as fa, safe_open(b / f, "pt") as fb:
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if torch.equal(x, y):
                continue
            n = int((x != y).sum())
            ulp = ((x.float() - y.float()).abs() / torch.finfo(x.dtype).eps / x.float().abs().clamp_min(1e-30)).max()
            print(f"  {k}: {n} of {x.numel()} elements differ, at most {float(ulp):.2f} ulp")
EOF

echo "== extraction, 4-layer slice of the 8B shapes (rank 16)"
timed extract-cpu $LC extract "$STUNED" --base "$SBASE" -o "$OUT/x-cpu" --rank 16 --json
timed "extract-on-$DEVICE" $LC extract "$STUNED" --base "$SBASE" -o "$OUT/x-dev" --rank 16 --device "$DEVICE" --json
python - "$OUT/extract-cpu.json" "$OUT/extract-on-$DEVICE.json" <<'EOF'
import json, sys

a, b = (json.load(open(p)) for p in sys.argv[1:])
print(f"worst error: cpu {a['worst_error']:.6e}, device {b['worst_error']:.6e}; "
      f"mean: cpu {a['mean_error']:.6e}, device {b['mean_error']:.6e}")
worst = max(abs(x["error"] - y["error"]) / max(x["error"], 1e-30) for x, y in zip(a["modules"], b["modules"]))
print(f"largest relative difference of a module's error between the devices: {worst:.2e}")
EOF
python bench/bench_extract.py --size 8b --layers 4 --skip-mergekit --floor --cache warm 2>/dev/null | grep -E "^optimal"

if [ "${FULL:-0}" = 1 ]; then
    echo "== extraction, the whole 8B model on $DEVICE"
    full=$(python bench/synth.py --size 8b --what tuned)
    TUNED=$(echo "$full" | python -c "import json,sys; print(json.load(sys.stdin)['tuned'])")
    timed "extract-full-$DEVICE" $LC extract "$TUNED" --base "$BASE" -o "$OUT/x-full" --rank 16 --device "$DEVICE" --json
fi
rm -rf "$OUT"/merged-* "$OUT"/x-*

#!/usr/bin/env bash
# The prepared GPU check: the `gpu` tests, then pipelines/benchmarks/gpu.py, results under
# $OUT as they are measured, in at most ~9 minutes. Run FIRST whenever a GPU machine is lent.
#
#   bash pipelines/benchmarks/gpu_check.sh wheels   # HERE (with pip's registry): fetch .whl/
#   bash pipelines/benchmarks/gpu_check.sh          # THERE (device machine, no network)
#
# The device machine gets a copy of the working tree, not our .venv (6.6 GB, Python 3.11;
# the carry limit is 64 MiB). Its own python3 (3.12) has torch, torchvision, timm, h5py,
# tifffile, opencv, scikit-image, pytest and nvidia-ml-py; what wsi-mil needs beyond that
# travels as wheels in .whl/ (git-excluded, named in the run's carry) and is installed with
# --no-index into /tmp/site. The repository is imported from the tree (PYTHONPATH), not
# pip-installed. docs/extract.md ("On the GPU: figures") says how to call it.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
WHEELS="$ROOT/.whl"
# Pinned to what the project's venv runs (pyproject bounds); the device has the rest. tifffile
# travels too: tiffslide 3.0.1 wants 2025.5.21 ≤ tifffile < 2026.5.2, whatever the device holds.
PKGS=(openslide-python==1.4.7 openslide-bin==4.0.1.2 tiffslide==3.0.1 imagecodecs==2026.3.6
      zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 shapely==2.2.0
      dask==2026.8.0 distributed==2026.8.0 tornado==6.6.1 partd==1.4.2 locket==1.0.0
      tblib==3.2.2 zict==3.0.0 tifffile==2026.3.3)

if [[ "${1:-}" == "wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    PY=${PY:-.venv/bin/python}
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 -d "$WHEELS" "${PKGS[@]}" || exit 1
    du -sh "$WHEELS"
    echo "carry: [\".whl\"]; command: bash pipelines/benchmarks/gpu_check.sh"
    exit 0
fi

START=$SECONDS
TOTAL=${GPU_CHECK_SECONDS:-540}       # the whole script; a device command may run 600 s
TESTS=${GPU_CHECK_TEST_SECONDS:-150}  # the gpu tests' share
OUT=${OUT:-$ROOT/pipelines/benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
left() { echo $(( TOTAL - (SECONDS - START) )); }

{
    echo "== gpu_check $(date -u +%FT%TZ) in $ROOT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl || echo "wheel install FAILED"
        export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .whl/ carried: run 'bash pipelines/benchmarks/gpu_check.sh wheels' here and carry .whl"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # Tests that call the console script find it without an install.
    mkdir -p /tmp/site/bin
    printf '#!/bin/sh\nexec %s -c "from wsi_mil.cli import main; main()" "$@"\n' "$PY" > /tmp/site/bin/wsi-mil
    chmod +x /tmp/site/bin/wsi-mil
    export PATH="/tmp/site/bin:$PATH"
    "$PY" - <<'EOF'
import importlib
for m in ("torch", "torchvision", "timm", "tifffile", "imagecodecs", "openslide", "tiffslide", "h5py", "dask", "wsi_mil"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:12s} {getattr(mod, '__version__', 'ok')}")
    except Exception as exc:  # noqa: BLE001 - a report, not a program
        print(f"{m:12s} MISSING: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== pytest -m gpu (at most ${TESTS} s)" | tee "$OUT/pytest_gpu.log"
# GPU decode and the CUDA extraction tests first (pytest keeps the first of duplicates); no
# test may hold the rest up for more than 90 s (pytest-timeout is on the device image).
timeout --kill-after=10 "$TESTS" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --timeout 90 \
    --junitxml="$OUT/pytest_gpu.xml" tests/features/test_gpu_decode.py tests/gpu tests 2>&1 | tee -a "$OUT/pytest_gpu.log"
echo "pytest exit ${PIPESTATUS[0]} after $(( SECONDS - START )) s" | tee -a "$OUT/pytest_gpu.log"

# The benchmark rewrites $OUT/gpu.json after every measurement; its own budget stops it
# starting work that would not fit, and timeout ends it if a step overruns.
BENCH=$(( $(left) - 15 ))
if (( BENCH > 60 )); then
    echo "== benchmark (budget $(( BENCH - 30 )) s, limit ${BENCH} s)" | tee "$OUT/bench.log"
    timeout --kill-after=10 "$BENCH" "$PY" pipelines/benchmarks/gpu.py --json "$OUT/gpu.json" \
        --budget-s $(( BENCH - 30 )) --cache /tmp/wsi_mil_bench_gpu 2>&1 | tee -a "$OUT/bench.log"
    echo "benchmark exit ${PIPESTATUS[0]} after $(( SECONDS - START )) s" | tee -a "$OUT/bench.log"
else
    echo "no time left for the benchmark" | tee "$OUT/bench.log"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "== done in $(( SECONDS - START )) s; files in $OUT"

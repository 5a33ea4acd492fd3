#!/usr/bin/env bash
# The GPU tier in as few device calls as possible (each call: 10 minutes at most).
#
#   bash bench/gpu_session.sh tests     # GPU tests: kernel matrix, sync-free step, CUDA graph, FSDP1 offload
#   bash bench/gpu_session.sh bench-a   # python -m bench: S1, S2 (flat buffers, buckets)
#   bash bench/gpu_session.sh bench-b   # python -m bench: S3-S5, full step, multi-rank; bench.hosttime
#
# Needs no install: run from the repository root (python puts it on sys.path). Results go under
# $OUT when set (the device tool's output folder), else bench/results; commit them from there.
set -uo pipefail
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
part="${1:-tests}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/gpu-device-$part.txt"
case "$part" in
tests)
    timeout 560 python -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_ops.py tests/test_update_triton.py tests/test_scaler_distributed.py \
        2>&1 | tee "$OUT/gpu-tests.log" | tail -40
    ;;
bench-a)
    timeout 560 python -m bench --scenarios S1,S2 --tag a --out "$OUT" 2>&1 | tail -60
    ;;
bench-b)
    timeout 480 python -m bench --scenarios S3,S4,S5,step,multirank --tag b --out "$OUT" 2>&1 | tail -60
    timeout 60 python -m bench.hosttime 2>&1 | tee "$OUT/hosttime.md"
    ;;
*)
    echo "usage: $0 tests|bench-a|bench-b" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The GPU check (issue 22): one prepared script for a lent GPU machine, under 8 minutes on one
# H100/H200, from a clean copy of the repository without ../shared (random-weight models only).
#
#     bash bench/gpu_wheels.sh                      # here, once: the wheels that machine lacks
#     device run: bash bench/gpu_check.sh, carry [".whl"], timeout_s 540
#
# Writes $OUT/gpu_check.txt (or ./gpu_check.txt without $OUT) as it goes: the card, what
# runtime.dtype=auto chooses there, the CUDA tests, and bench/throughput.py on random-llama-1b in
# bf16 and in fp32 (split against plain peft: tokens/s, ratio, MFU against the measured matrix
# peak in that dtype, device peak memory against the planner's prediction).
# Each part has its own time limit, so one that hangs does not cost the others.
# Then the batched server pass against one device at a time (bench/batched_server.py), 16 and 64
# devices of B=1, T=128, cut at block 2 (U-shaped and plain), random-llama-1b in bf16: server
# tokens/s and ratio.
# Parts to run as arguments (default: tests throughput batched; `profile` adds a torch.profiler
# table, CPU and CUDA time, of the 64-device pass): `bash bench/gpu_check.sh tests profile`;
# DTYPES (default "bf16 fp32") and FLEETS (default "16 64") narrow the last two for a rerun.
# The CUDA tests' whole log is also written to $OUT/cuda_tests.log (a test that hangs dumps every
# thread's stack there after 40 s).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.txt"
parts=" ${*:-tests throughput batched} "
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/tests:$PWD/bench"
{
    echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "== wheels from .whl into /tmp/site (no index, no dependencies: the machine has them)"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    else
        echo "== no .whl folder: run bench/gpu_wheels.sh here and carry .whl (the nf4 test needs bitsandbytes)"
    fi
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| peft', peft.__version__)"
    python3 -c "from splitpeft.config import RuntimeConfig; from splitpeft.model.runtime import resolve_runtime; print(resolve_runtime(RuntimeConfig(server_device='auto', device_device='auto', dtype='auto')).dtype_reason)"
    if [[ $parts == *" tests "* ]]; then
        echo "== CUDA tests"
        timeout 150 python3 -m pytest -q -m cuda tests/cuda -p no:cacheprovider -o faulthandler_timeout=40 -rA --tb=short 2>&1 \
            | tee "${OUT:-.}/cuda_tests.log" | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|Timeout" | tail -20
    fi
    [[ $parts == *" throughput "* ]] && for dtype in ${DTYPES:-bf16 fp32}; do
        echo "== throughput: split against plain peft, random-llama-1b, $dtype, B=8, T=512"
        timeout 90 python3 bench/throughput.py --device cuda --dtype "$dtype" --model random-llama-1b \
            --batch-size 8 --seq-len 512 --steps 6 --repeats 3 2>&1 | grep -v -i "warn\|^  warnings" | tail -12
    done
    [[ $parts == *" batched "* ]] && for devices in ${FLEETS:-16 64}; do
        echo "== batched server pass: $devices devices, random-llama-1b, bf16, cut at block 2, B=1, T=128"
        timeout $((devices > 16 ? 150 : 90)) python3 bench/batched_server.py --device cuda --model random-llama-1b --dtypes bf16 \
            --placements "${PLACEMENTS:-u_shaped,plain}" --devices "$devices" --reps 3 2>&1 | grep -v -i warn | tail -7
    done
    if [[ $parts == *" profile "* ]]; then  # not in the default parts: where the 64-device pass goes
        echo "== profile of the batched pass: 64 devices, random-llama-1b, bf16, U-shaped, B=1, T=128"
        timeout 150 python3 bench/batched_server.py --device cuda --model random-llama-1b --dtypes bf16 \
            --placements u_shaped --devices 64 --reps 1 --profile 15 2>&1 | grep -v -i warn | tail -90
    fi
    echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$out"

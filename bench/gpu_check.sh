#!/usr/bin/env bash
# The GPU check (issue 22): one prepared script for a lent GPU machine, under 8 minutes on one
# H100/H200, from a clean copy of the repository without ../shared (random-weight models only).
#
#     bash bench/gpu_wheels.sh                      # here, once: the wheels that machine lacks
#     device run: bash bench/gpu_check.sh, carry [".whl"], timeout_s 540
#
# Writes $OUT/gpu_check.txt (or ./gpu_check.txt without $OUT): the card, the CUDA tests, and
# bench/throughput.py on random-llama-1b in bf16 (split against plain peft: tokens/s, ratio, MFU
# against the measured bf16 matrix peak, device peak memory against the planner's prediction).
# Each part has its own time limit, so one that hangs does not cost the others.
# Then the batched server pass against one device at a time (bench/batched_server.py), 16 and 64
# devices of B=1, T=128, U-shaped at block 2, random-llama-1b in bf16: server tokens/s and ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/tests:$PWD/bench"
{
    echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    if compgen -G ".whl/*" > /dev/null; then
        echo "== wheels from .whl (only what is missing)"
        python3 -m pip install -q --no-index --find-links .whl \
            "bitsandbytes==0.50.2" "gguf==0.19.0" "sacrebleu==2.6.0" "rouge-score==0.1.2" "nltk==3.10.4" \
            absl-py defusedxml accelerate pyyaml regex pytest 2>&1 | tail -3
    else
        echo "== no .whl folder: run bench/gpu_wheels.sh here and carry .whl (tests needing bitsandbytes may fail)"
    fi
    echo "== CUDA tests"
    timeout 240 python3 -m pytest -q -m cuda tests/cuda -p no:cacheprovider 2>&1 | tail -15
    echo "== throughput: split against plain peft, random-llama-1b, bf16, B=8, T=512"
    timeout 200 python3 bench/throughput.py --device cuda --dtype bf16 --model random-llama-1b \
        --batch-size 8 --seq-len 512 --steps 6 --repeats 2 2>&1 | grep -v Warning | tail -20
    for devices in 16 64; do
        echo "== batched server pass: $devices devices, random-llama-1b, bf16, U-shaped k=2, B=1, T=128"
        timeout 150 python3 bench/batched_server.py --device cuda --model random-llama-1b --dtypes bf16 \
            --placements u_shaped --devices "$devices" --reps 3 2>&1 | grep -v Warning | tail -6
    done
    echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$out"

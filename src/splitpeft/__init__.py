"""splitpeft: split-learning LoRA fine-tuning of LLMs across heterogeneous devices."""

import logging
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module-level `__getattr__` (PEP 562) for its public API: `exports` maps each name
    to the module that defines it, imported on first use. So `from splitpeft.model import load_model`
    works without every package importing all of its modules (and torch, peft, flwr) up front."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name]), name)

    return __getattr__

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels`
# package (a faster 4-bit CPU GEMM downloaded from the hub) is absent; its own kernels are used
# instead, so the notice says nothing a user can act on offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

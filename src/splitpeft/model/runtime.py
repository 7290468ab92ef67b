"""Where and in what precision each party runs: torch device, dtype of the frozen base, its
quantization, gradient checkpointing (the config's `runtime` section, checked against this machine).

Precision, for every placement::

    frozen base (embedding, norms, head)   runtime.dtype (fp32 | bf16 | fp16)
    frozen block linears                   runtime.dtype, or bitsandbytes nf4 / int8 (base_quantization)
    activations and cut gradients          runtime.dtype (fp16: gradients cross the cut unscaled in fp32)
    LoRA A, B, their gradients, AdamW      fp32 always (a branch multiplies in the activations' dtype
                                           with its factors cast to it: adapters.BranchLinear)
    loss                                   fp32 (bf16 / fp16 logits are upcast a chunk of rows at a
                                           time: loss.LowPrecisionCrossEntropy)
    updates written into a frozen weight   computed in fp32, then rounded into runtime.dtype up or
    (merges, warm residuals W - s B A)     down at random (`stochastic_round`): unbiased, where
                                           nearest rounding drops every change below half a unit

Quantization uses bitsandbytes rather than torchao: peft wraps bitsandbytes' `Linear4bit` and
`Linear8bitLt` with its own LoRA layers (the QLoRA path FlowerTune and the DLoRA paper's low-bit
bases use), and bitsandbytes >= 0.48 has CPU kernels for both, so the same code runs in CI and on
a GPU. NF4 is stored without double quantization (one fp32 absmax per block of 64 weights), so the
memory model's account of it is exact.

Every combination this machine cannot run stops in `resolve_runtime` with one line naming the key.

`runtime.dtype=auto` takes bf16 where both sides' hardware has bf16 matrix units (a CUDA device
that supports bf16; a CPU with AMX-BF16, AVX512-BF16 or Arm's BF16 instructions) and fp32
elsewhere; `Runtime.dtype_reason` says which and why (the run's start-up line and its report).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import subprocess
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitpeft.config import ConfigError, RuntimeConfig

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


NF4_BLOCK_SIZE = 64
"""Weights per NF4 quantization block (one fp32 absmax each)."""


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """`x` (fp32 or fp64) in `dtype`: nearest for fp32 and wider, otherwise each element rounded
    to one of its two neighbours in `dtype` with probability in proportion to closeness, so that
    the expected result is `x` itself.

    Why: a LoRA update is a small fraction of the weight it is merged into (0.1-1% on SmolLM2),
    and a bf16 unit is 0.4-0.8% of a weight, so rounding W + delta to the nearest bf16 keeps W
    wherever |delta| is below half a unit. Measured on a main-job update merged in three rounds,
    a third each (`bench/bf16_merge.py`): with nearest rounding the loss moved 0.55 of the update's
    effect the wrong way; rounded stochastically it moved 1.00 of it, as the exact sum does.

    Deterministic: the draws are seeded by `key` and `x`'s bytes and made on the CPU, so every
    holder of the same weight (the server, its mirrors, workers, a deployed device, on a GPU or
    not) rounds the same update the same way."""
    if torch.finfo(dtype).bits >= 32:  # an fp32 unit is far below any update: nearest, as plain addition
        return x.to(dtype)
    source = x.detach().contiguous().cpu()
    seed = zlib.crc32(source.numpy().data.cast("B"), zlib.crc32(key.encode()))
    # Drawn on the CPU whatever x's device: a CUDA generator's stream differs from the CPU's for
    # the same seed, and a GPU server must round as its CPU devices do, or their frozen weights part.
    if x.dtype == torch.float32 and dtype == torch.bfloat16:
        return _stochastic_bf16(x.contiguous(), seed)
    nearest = x.to(dtype)
    back = nearest.to(x.dtype)
    towards = torch.where(back < x, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(nearest, towards)
    gap = other.to(x.dtype) - back  # inf beside the largest finite value: probability 0
    chance = torch.where(gap != 0, (x - back) / gap, torch.zeros_like(x))
    draw = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype).to(x.device)
    return torch.where(draw < chance, other, nearest)


_BF16_KEPT_BITS = -(1 << 16)
"""0xFFFF0000 as an int32: the bits of an fp32 number that a bf16 keeps."""

_BF16_LARGEST = torch.finfo(torch.bfloat16).max
"""No fp32 value of at most this magnitude rounds up past it (its dropped bits are zero)."""


def uniform_16_bits(count: int, seed: int) -> torch.Tensor:
    """`count` independent integers uniform in [0, 2^16), as int32 on the CPU, from numpy's PCG64
    seeded with `seed`: each 64-bit draw read as four 16-bit halves (little-endian on every
    machine, so every holder draws the same). A quarter of the draws torch's Mersenne twister
    makes for `randint(0, 2^16)`, at about a quarter of its time on a 1536 x 576 weight."""
    raw = np.random.PCG64(seed).random_raw((count + 3) // 4).astype("<u8", copy=False)
    return torch.from_numpy(raw.view("<u2")[:count].astype(np.int32))


def _stochastic_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 `x` rounded into bf16 at random, on the bits: a bf16 is an fp32 without its low 16
    bits, so adding a uniform integer in [0, 2^16) to x's bits and clearing them rounds |x| up
    with probability (the dropped bits) / 2^16, which is x's distance from the bf16 below it over
    the gap to the one above (the gap is uniform in fp32 steps within a binade; sign-magnitude
    bits make it the same for negative x). Two integer passes and a cast where every |x| is at
    most the largest bf16 (one min-max pass says so, NaN included); otherwise also the selects
    that keep NaN as NaN and never round a finite x up to inf. The general path's nextafter,
    division and selects were a fifth of a bf16 round of the main job (bench/profile_step.py)."""
    noise = uniform_16_bits(x.numel(), seed).view(x.shape).to(x.device)
    bits = x.view(torch.int32)
    rounded = (bits + noise).bitwise_and_(_BF16_KEPT_BITS)
    low, high = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    if -_BF16_LARGEST <= float(low) and float(high) <= _BF16_LARGEST:  # False for NaN
        return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    truncated = bits.bitwise_and(_BF16_KEPT_BITS)
    rounded = torch.where(rounded == 0x7F800000, truncated, rounded)  # past the largest finite bf16
    rounded = torch.where(rounded == -0x800000, truncated, rounded)  # -inf's bits
    out = rounded.view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)


@dataclass(frozen=True)
class Runtime:
    """The `runtime` section resolved on this machine."""

    server_device: torch.device
    device_device: torch.device
    dtype: torch.dtype
    quantization: str  # none | int8 | nf4
    quantize_devices: bool
    quantize_server: bool
    gradient_checkpointing: bool
    dtype_reason: str = "runtime.dtype as configured"  # why this dtype (runtime.dtype=auto says what it found)

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def device_quantization(self) -> str:
        return self.quantization if self.quantize_devices else "none"

    def server_quantization(self) -> str:
        return self.quantization if self.quantize_server else "none"

    @property
    def loss_scaling(self) -> bool:
        """fp16 activations need their gradients scaled in backward, or small ones flush to zero."""
        return self.dtype == torch.float16


CPU_FP32 = Runtime(torch.device("cpu"), torch.device("cpu"), torch.float32, "none", False, False, False)


def resolve_runtime(config: RuntimeConfig) -> Runtime:
    """The runtime of `config` on this machine; ConfigError naming the key if it cannot run here."""
    server = _torch_device(config.server_device, "runtime.server_device")
    device = _torch_device(config.device_device, "runtime.device_device")
    if config.dtype == "auto":
        dtype_name, reason = auto_dtype(server, device)
    else:
        dtype_name, reason = config.dtype, f"runtime.dtype={config.dtype} as configured"
    dtype = DTYPES[dtype_name]
    if dtype == torch.float16:
        for key, where in (("runtime.server_device", server), ("runtime.device_device", device)):
            if where.type != "cuda":
                raise ConfigError(f"runtime.dtype=fp16 needs CUDA ({key} is {where}); use bf16 on CPU")
    quantize_devices = config.base_quantization != "none" and config.quantize in ("devices", "both")
    quantize_server = config.base_quantization != "none" and config.quantize in ("server", "both")
    for key, where, wanted in (("runtime.device_device", device, quantize_devices),
                               ("runtime.server_device", server, quantize_server)):
        if wanted:
            problem = quantization_problem(config.base_quantization, where.type, dtype_name)
            if problem:
                raise ConfigError(f"runtime.base_quantization={config.base_quantization} cannot run on {key}={where}: {problem}")
    return Runtime(server, device, dtype, config.base_quantization, quantize_devices, quantize_server,
                   config.gradient_checkpointing, reason)


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX512, Arm (Linux "Features": bf16)


@cache
def _cpuinfo() -> list[tuple[str, str]] | None:
    """Linux /proc/cpuinfo as (key in lower case, value) per line, or None where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    pairs = (line.partition(":") for line in cpuinfo.read_text(errors="replace").splitlines())
    return [(key.strip().lower(), value.strip()) for key, _, value in pairs]


@cache
def cpu_bf16_feature() -> str | None:
    """The first of BF16_CPU_FLAGS this CPU reports (Linux /proc/cpuinfo flags or Arm features; on
    macOS the sysctl hw.optional.arm.FEAT_BF16), or None: no bf16 matrix units to use."""
    cpuinfo = _cpuinfo()
    if cpuinfo is not None:
        flags = {flag for key, value in cpuinfo if key in ("flags", "features") for flag in value.split()}
        return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)
    if platform.system() == "Darwin":
        try:
            found = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return "bf16" if found.stdout.strip() == "1" else None
    return None


@cache
def processor_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo "model name", else the platform's word for it):
    bf16 products round differently on other processors' kernels, so a report names the one it ran on."""
    named = next((value for key, value in _cpuinfo() or [] if key == "model name" and value), None)
    return named or platform.processor() or platform.machine() or "unknown"


def machine_info(runtime: Runtime) -> dict[str, object]:
    """What a run's numbers depend on beyond its config: the processor and its bf16 flag, each CUDA
    device's name, torch's version and its threads."""
    gpus = sorted({str(torch.cuda.get_device_name(d)) for d in (runtime.server_device, runtime.device_device) if d.type == "cuda"})
    return {"processor": processor_name(), "cpu_bf16": cpu_bf16_feature(), "gpus": gpus,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


M_ARENA_MAX = -8  # mallopt's parameter number (glibc's malloc.h)


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc, whose malloc has `mallopt` and `malloc_trim`; else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(count: int) -> str:
    """Let glibc's malloc make at most `count` arenas from now on (`runtime.malloc_arenas`; 0 leaves
    its default); returns what the process's allocator now is, for the report.

    Why: glibc gives a thread that allocates its own arena (up to 8 a core) and never moves freed
    memory between arenas, so the threads a round starts (one a device in lockstep) each keep
    the pages of the tensors they freed. A 720-step hybrid run held 5.6 GB in 12 arenas with
    1.3 GB in use. Arenas made before the call stay."""
    libc = _glibc()
    if libc is None:
        return "not glibc: the C library's own malloc"
    if "MALLOC_ARENA_MAX" in os.environ:
        return f"glibc malloc, MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} from the environment"
    if count == 0:
        return "glibc malloc, its default arenas (runtime.malloc_arenas=0)"
    if libc.mallopt(M_ARENA_MAX, count) != 1:
        return f"glibc malloc, its default arenas (mallopt refused {count})"
    return f"glibc malloc, at most {count} arena{'s' if count > 1 else ''} (runtime.malloc_arenas)"


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim(0)`, every arena); True
    if any went back. Freed tensors' pages otherwise stay with the process: glibc returns only a
    heap's top, and after the first large free it serves tensors up to 32 MB from the heap rather
    than from their own mappings. A no-op elsewhere."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def resident_bytes(pid: int | None = None) -> int | None:
    """A process's resident memory now (Linux /proc/<pid>/statm; this process's without `pid`), or
    None where there is none (another system, a process that has ended)."""
    try:
        pages = int(Path(f"/proc/{'self' if pid is None else pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _bf16_units(where: torch.device) -> tuple[bool, str]:
    """Whether `where` has bf16 matrix units, and what says so."""
    if where.type == "cuda":
        name = torch.cuda.get_device_name(where)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{where} ({name}) computes in bf16"
        return False, f"{where} ({name}) has no bf16 support"
    feature = cpu_bf16_feature()
    if feature is not None:
        return True, f"the CPU has {feature}"
    return False, f"the CPU reports none of {', '.join(BF16_CPU_FLAGS)}"


def auto_dtype(server: torch.device, device: torch.device) -> tuple[str, str]:
    """runtime.dtype=auto: ("bf16", why) where the server's and the devices' hardware both have bf16
    matrix units, else ("fp32", why): a side without them would run bf16 products several times
    slower than fp32, and the two sides share the frozen weights' dtype."""
    answers = {str(where): _bf16_units(where) for where in dict.fromkeys((server, device))}
    if all(ok for ok, _ in answers.values()):
        return "bf16", "runtime.dtype=auto chose bf16: " + "; ".join(why for _, why in answers.values())
    return "fp32", "runtime.dtype=auto chose fp32: " + "; ".join(why for ok, why in answers.values() if not ok)


def _torch_device(text: str, key: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={text} but no CUDA GPU is visible (torch.cuda.is_available() is False); use cpu or auto")
        index_text = text.partition(":")[2] or str(torch.cuda.current_device())
        if not index_text.isdigit() or int(index_text) >= torch.cuda.device_count():
            raise ConfigError(f"{key}={text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", int(index_text))
    raise ConfigError(f"{key} must be cpu, cuda, cuda:N or auto, not {text!r}")


@cache
def quantization_problem(mode: str, device_type: str, dtype_name: str) -> str | None:
    """Why bitsandbytes cannot run `mode` on `device_type` here (None: it can).

    Decided by running it: a small quantized linear does a forward and a backward on that device.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes==0.50.2)"
    try:
        device = torch.device(device_type)
        layer = quantized_linear(nn.Linear(64, 64, bias=False), mode, DTYPES[dtype_name], device)
        x = torch.randn(2, 64, dtype=DTYPES[dtype_name], device=device, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "its backward gives no finite input gradient"
    except Exception as error:  # any failure of the library on this device is the answer
        return f"bitsandbytes has no working kernel for it ({type(error).__name__}: {str(error)[:120]})"
    return None


def quantized_linear(linear: nn.Linear, mode: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A frozen bitsandbytes copy of `linear` on `device`: nf4 (4-bit NormalFloat) or int8."""
    import bitsandbytes as bnb

    weight = linear.weight.detach().to("cpu", torch.float32)
    bias = linear.bias.detach().to("cpu", dtype) if linear.bias is not None else None
    layer: nn.Module
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=dtype,
                                  compress_statistics=False, quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, compress_statistics=False,
                                         quant_type="nf4", blocksize=NF4_BLOCK_SIZE)
    elif mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="cpu")
        layer.weight = bnb.nn.Int8Params(weight.to(dtype), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unknown quantization {mode!r}")
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes as the weight moves to its device


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear (checked by name: bitsandbytes may be absent)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")

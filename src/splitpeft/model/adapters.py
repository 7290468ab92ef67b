"""LoRA adapters: per-module ranks, injection with peft, reading/writing A and B, PEFT export.

A LoRA branch on a linear layer computes `x -> W x + s B A x` with
A: (r, d_in), B: (d_out, r), B zero-initialised, s = alpha / r (`scale`; alpha / sqrt(r) with
rsLoRA, peft's `use_rslora`). Modules are named by their full path in the
base model (e.g. "model.layers.3.self_attn.q_proj"); a rank map {module name: r} says which
modules of a party carry adapters (rank 0 = none). Injection and export use peft
(`inject_adapter_in_model`, `get_peft_model` with `rank_pattern`); only moving A/B between
parties and serialising them is ours.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, cast

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from splitpeft.model.backbone import Backbone, share_frozen_copy
from splitpeft.storage import atomic_folder

ADAPTER_NAME = "default"


class AdapterError(ValueError):
    """Adapter weights or rank maps that do not fit the model."""


class LoraWeights(NamedTuple):
    """One module's adapter: A (r, d_in), B (d_out, r)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, scale: float) -> torch.Tensor:
        """The dense update scale * B A, shape (d_out, d_in)."""
        return scale * (self.B @ self.A)


AdapterSet = dict[str, LoraWeights]


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrap peft's model construction (`get_peft_model`, `PeftModel.from_pretrained`): peft reads
    `model.is_gradient_checkpointing`, which transformers 5 deprecated with a FutureWarning on every
    call; known and harmless (peft only asks whether to enable input gradients), so that one warning
    is silenced here and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def target_module_names(backbone: Backbone, targets: Iterable[str], blocks: Iterable[int]) -> list[str]:
    """Full names of the linears in `blocks` whose last name component is in `targets`."""
    wanted = set(targets)
    prefixes = tuple(backbone.block_prefix(j) for j in blocks)
    names = [
        name
        for name, module in backbone.model.named_modules()
        if name.startswith(prefixes) and name.rsplit(".", 1)[-1] in wanted
        and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
    ]
    return names


def scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The branch scale s of a rank-`rank` adapter: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_config(ranks: Mapping[str, int], alpha: float, dropout: float, fan_in_fan_out: bool,
                rslora: bool = False) -> LoraConfig:
    """A peft LoraConfig targeting exactly the modules of `ranks` with r > 0, at those ranks."""
    active = {name: r for name, r in ranks.items() if r > 0}
    if not active:
        raise AdapterError("no module has a rank above 0: nothing to adapt")
    default_rank = max(active.values())
    return LoraConfig(
        r=default_rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works (scaling = alpha / r)
        use_rslora=rslora,
        lora_dropout=dropout,
        target_modules=sorted(active),
        rank_pattern={re.escape(name): r for name, r in active.items() if r != default_rank},
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )


def is_fan_in_fan_out(model: PreTrainedModel) -> bool:
    """GPT-2 stores its linears as Conv1D (weight shape (d_in, d_out))."""
    return model.config.model_type == "gpt2"


def inject(model: PreTrainedModel, ranks: Mapping[str, int], alpha: float, dropout: float = 0.0,
           device: torch.device | None = None, rslora: bool = False) -> PreTrainedModel:
    """Add LoRA branches to `model` in place (peft), for the modules and ranks in `ranks`.

    A module whose frozen weight this party does not hold (on the meta device: dlora's device
    runs branches of blocks it never loads) gets its adapter on `device` (default CPU)."""
    unknown = set(ranks) - {name for name, _ in model.named_modules()}
    if unknown:
        raise AdapterError(f"no such modules in the model: {sorted(unknown)[:5]}")
    if any(r > 0 for r in ranks.values()):
        inject_adapter_in_model(lora_config(ranks, alpha, dropout, is_fan_in_fan_out(model), rslora), model)
    for layer in lora_layers(model).values():
        if any(p.device.type == "meta" for p in lora_ab(layer)):
            for branch in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                branch.to_empty(device=device or torch.device("cpu"))
            layer.reset_lora_parameters(ADAPTER_NAME, True)  # peft's own init: A random, B = 0
    for name, parameter in model.named_parameters():
        is_adapter = ".lora_" in name
        if is_adapter and parameter.dtype != torch.float32:
            # peft creates a branch in its base layer's dtype; adapters, their gradients and AdamW
            # state stay fp32 whatever the base.
            parameter.data = parameter.data.float()
        parameter.requires_grad_(is_adapter)
    for layer in lora_layers(model).values():
        # peft would cast a bf16 input to the fp32 adapter: an fp32 product and an fp32 copy of
        # the input per adapted module. The factors cast themselves instead (`BranchLinear`).
        layer.cast_input_dtype_enabled = False
        for factor in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
            factor.__class__ = BranchLinear  # same module, same parameter: only forward changes
    return model


class BranchLinear(nn.Linear):
    """A LoRA factor (A or B, no bias) stored in fp32 that multiplies in its input's dtype.

    x (..., d_in) -> x W^T with W cast to x's dtype, as torch.autocast would: in bf16 the matrix
    units accumulate in fp32 and autograd returns W's gradient to fp32, where AdamW keeps its
    state; in fp32 the cast is W itself (the same product as nn.Linear, bit for bit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype))


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Module name -> peft LoRA layer, for every adapted module of `model`."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def lora_branch(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The LoRA branch s * B A x of a peft layer, without its base linear: (..., d_in) -> (..., d_out).

    Computed as peft's layer computes it (the factors choose their compute dtype, `BranchLinear`);
    the output is in `x`'s dtype. dlora's device computes its branches with it (it holds no base
    linear), and the server's batched pass adds each session's branch to its own rows
    (`model/batched.py`)."""
    a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
    return (b(a(layer.lora_dropout[ADAPTER_NAME](x))) * layer.scaling[ADAPTER_NAME]).to(x.dtype)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(model).values() for p in lora_ab(layer)]


def lora_ab(layer: LoraLayer) -> tuple[nn.Parameter, nn.Parameter]:
    """The A and B weight parameters of `layer`'s adapter."""
    return _weight(layer.lora_A[ADAPTER_NAME]), _weight(layer.lora_B[ADAPTER_NAME])


def _weight(module: nn.Module) -> nn.Parameter:
    # nn.Module.__getattr__ is typed `Tensor | Module`; a LoRA A/B linear's weight is a Parameter.
    return cast(nn.Parameter, module.weight)


def read_adapters(model: nn.Module | Mapping[str, LoraLayer], names: Iterable[str] | None = None) -> AdapterSet:
    """Detached copies of A and B for every adapted module (or only `names`); `model` may be its
    `lora_layers` already found."""
    layers = model if isinstance(model, Mapping) else lora_layers(model)
    selected = layers if names is None else {n: layers[n] for n in names}
    return {name: LoraWeights(*(p.detach().clone() for p in lora_ab(layer))) for name, layer in selected.items()}


def write_adapters(model: nn.Module | Mapping[str, LoraLayer], weights: Mapping[str, LoraWeights]) -> None:
    """Copy A and B into the model's adapters (or into `lora_layers` already found); names and
    shapes must match exactly. Every module is checked before any is written, so a bad one leaves
    the model as it was."""
    layers = model if isinstance(model, Mapping) else lora_layers(model)
    targets = []
    for name, value in weights.items():
        if name not in layers:
            raise AdapterError(f"module {name!r} has no adapter in this model")
        a, b = lora_ab(layers[name])
        if value.A.shape != a.shape or value.B.shape != b.shape:
            raise AdapterError(
                f"{name}: adapter shapes A{tuple(value.A.shape)} B{tuple(value.B.shape)} do not "
                f"match the model's A{tuple(a.shape)} B{tuple(b.shape)}"
            )
        targets.append((a, b, value))
    with torch.no_grad():
        for a, b, value in targets:
            a.copy_(value.A)
            b.copy_(value.B)


def to_tensors(weights: Mapping[str, LoraWeights]) -> dict[str, torch.Tensor]:
    """Flatten to the names used on the wire: "<module>.A" / "<module>.B"."""
    flat = {}
    for name, value in weights.items():
        flat[f"{name}.A"] = value.A
        flat[f"{name}.B"] = value.B
    return flat


def from_tensors(tensors: Mapping[str, torch.Tensor]) -> AdapterSet:
    """Inverse of `to_tensors`; every module needs both A and B of matching rank."""
    modules = {key.rsplit(".", 1)[0] for key in tensors}
    weights = {}
    for name in modules:
        a, b = tensors.get(f"{name}.A"), tensors.get(f"{name}.B")
        if a is None or b is None:
            raise AdapterError(f"adapter {name!r} lacks its A or B matrix")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter {name!r}: A{tuple(a.shape)} and B{tuple(b.shape)} do not form a LoRA pair")
        weights[name] = LoraWeights(a, b)
    return weights


def export_peft(
    base: PreTrainedModel,
    weights: Mapping[str, LoraWeights],
    alpha: float,
    path: Path,
    *,
    merged: bool = False,
    rslora: bool = False,
) -> None:
    """Write a standard PEFT adapter folder (and optionally merged full weights under merged/).

    The folder is written to a temporary sibling and renamed into place, so a crash never leaves
    an adapter folder that looks complete.
    """
    with peft_quietly():
        model = get_peft_model(
            copy.deepcopy(base) if merged else share_frozen_copy(base),
            lora_config({n: w.rank for n, w in weights.items()}, alpha, 0.0, is_fan_in_fan_out(base), rslora),
        )
    write_adapters(model, weights)
    with atomic_folder(Path(path)) as staging:
        model.save_pretrained(str(staging))  # peft annotates save_directory as str
        if merged:
            cast(PreTrainedModel, model.merge_and_unload()).save_pretrained(staging / "merged")

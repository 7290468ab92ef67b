"""A party's part of the base model: only the frozen tensors it runs are materialised.

A device at split k runs the embedding, blocks [0, k) and, when the labels stay on it, the final
norm and head; the server runs blocks [k, L) and the head. Everything else stays on the meta
device (shape only, no memory), so a 5 GB device can hold the first blocks of a 7B model.

Two ways to get a part:

- `load_part(name, part, ...)`: build the model on the meta device and read just the part's
  tensors from the safetensors files (the embedded model's converted cache, a tiny model saved
  once to the cache, any HF folder or cached hub id). This is what a real device does.
- `view_part(base, part, ...)`: the same part of a model already in memory (the simulation):
  kept tensors are the base's own (no copy when device and precision match, so a noise-free
  merge into the base is seen by every view), the rest are meta.

Either way `resident_bytes(model)` counts the frozen tensors the party actually holds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from splitpeft.model.attention import ATTENTION
from splitpeft.model.backbone import Backbone, ModelError, backbone_of
from splitpeft.model.runtime import is_quantized, quantized_linear


@dataclass(frozen=True)
class Part:
    """Which frozen tensors a party holds: the embedding, blocks [start, end), the head."""

    blocks: range
    embedding: bool
    head: bool

    @classmethod
    def whole(cls, num_blocks: int) -> Part:
        return cls(range(num_blocks), True, True)

    def parameter_names(self, backbone: Backbone) -> set[str]:
        """Names (as `named_parameters(remove_duplicate=False)` gives them) of the part's tensors."""
        model = backbone.model
        embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
        head_ids = {id(p) for module in backbone.head_modules() for p in module.parameters()}
        prefixes = tuple(backbone.block_prefix(j) for j in self.blocks)
        names = set()
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if ".lora_" in name:
                continue
            if (name.startswith(prefixes)
                    or (self.embedding and (id(parameter) in embedding_ids or _is_position_table(name)))
                    or (self.head and id(parameter) in head_ids)):
                names.add(name)
        return names


def _is_position_table(name: str) -> bool:
    return name.endswith("wpe.weight")  # GPT-2's learned positions travel with the token embedding


# --------------------------------------------------------------------------- in memory


def view_part(base: PreTrainedModel, part: Part, *, device: torch.device | None = None,
              dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A structural copy of `base` holding only `part` (the rest on the meta device).

    Kept tensors are `base`'s own when already on `device` in `dtype`, else converted copies."""
    keep = part.parameter_names(backbone_of(base))
    memo: dict[int, object] = {}
    groups: dict[int, list[str]] = {}
    owners: dict[int, nn.Parameter] = {}
    for name, parameter in base.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
        owners[id(parameter)] = parameter
    for key, names in groups.items():
        parameter = owners[key]
        if any(name in keep for name in names):
            memo[key] = _placed(parameter, device, dtype)
        else:
            memo[key] = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False)
    for tensor in _int8_state(base):
        if device is None or tensor.device == device:
            memo[id(tensor)] = tensor  # shared with the base, as its weight is
    view = copy.deepcopy(base, memo)
    if device is not None:
        _buffers_to(view, device)
    return view


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move every buffer (rotary tables) to `device`; parameters are placed by the caller."""
    for name, buffer in list(model.named_buffers()):
        if buffer.device != device:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name).register_buffer(leaf, buffer.to(device), persistent=False)


def _placed(parameter: nn.Parameter, device: torch.device | None, dtype: torch.dtype | None) -> nn.Parameter:
    target_device = device if device is not None else parameter.device
    convert_dtype = dtype is not None and parameter.is_floating_point() and parameter.dtype != dtype
    if parameter.device == target_device and not convert_dtype:
        return parameter
    if type(parameter) is not nn.Parameter:  # a quantized parameter moves with its own .to()
        return cast(nn.Parameter, parameter.to(target_device))
    data = parameter.detach().to(target_device, dtype if convert_dtype else parameter.dtype, copy=True)
    return nn.Parameter(data, requires_grad=False)


# --------------------------------------------------------------------------- from files


PartFn = Callable[[Backbone], Part]


"""The part to load, decided once the model's shapes (its number of blocks) are known."""


def load_part(folder: Path, part_of: PartFn, *, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The model in `folder` (config.json + safetensors) with only the part `part_of(backbone)`
    materialised on `device` in `dtype`; nothing else is read from disk."""
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the model config in {folder}: {error}") from None
    config._attn_implementation = ATTENTION
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    backbone = backbone_of(model)
    keep = part_of(backbone).parameter_names(backbone)
    files = safetensors_files(folder)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or not getattr(model.config, "tie_word_embeddings", False):
        tied = {}
    by_name = dict(model.named_parameters(remove_duplicate=False))
    for name in sorted(keep):
        source = name
        if name in tied and not _in_files(name, files, model):
            source = str(tied[name])  # a tied head is stored once, as the embedding
        tensor = _read(source, files, model, folder)
        if tuple(tensor.shape) != tuple(by_name[name].shape):
            raise ModelError(f"{folder}: tensor {source} has shape {tuple(tensor.shape)}, the model expects {tuple(by_name[name].shape)}")
        _assign(model, name, nn.Parameter(tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype),
                                          requires_grad=False))
    for target, source in tied.items():  # tied weights are one tensor under two names, as in memory
        if source in keep:
            _assign(model, str(target), model.get_parameter(str(source)))
        elif target in keep:
            _assign(model, str(source), model.get_parameter(str(target)))
    _buffers_to(model, device)
    model.requires_grad_(False)
    model.eval()
    return model


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelError(f"{folder} has no model.safetensors (or index): a part can only be read from safetensors files")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def _stored_name(name: str, files: dict[str, Path], model: PreTrainedModel) -> str | None:
    if name in files:
        return name
    prefix = f"{model.base_model_prefix}."
    if name.startswith(prefix) and name[len(prefix):] in files:  # e.g. GPT-2 hub files lack "transformer."
        return name[len(prefix):]
    return None


def _in_files(name: str, files: dict[str, Path], model: PreTrainedModel) -> bool:
    return _stored_name(name, files, model) is not None


def _read(name: str, files: dict[str, Path], model: PreTrainedModel, folder: Path) -> torch.Tensor:
    stored = _stored_name(name, files, model)
    if stored is None:
        raise ModelError(f"{folder}: the safetensors files lack tensor {name}")
    with safe_open(str(files[stored]), framework="pt") as handle:
        return handle.get_tensor(stored)


def _assign(model: nn.Module, name: str, parameter: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, parameter)


# --------------------------------------------------------------------------- quantization, accounting


def quantize_blocks(model: PreTrainedModel, blocks: Iterable[int], mode: str, dtype: torch.dtype) -> PreTrainedModel:
    """Replace every materialised linear of `blocks` by its bitsandbytes `mode` copy, in place."""
    if mode == "none":
        return model
    backbone = backbone_of(model)
    if model.config.model_type == "gpt2":
        raise ModelError("runtime.base_quantization: GPT-2 stores its block linears as Conv1D, which "
                         "bitsandbytes does not quantize; use a LLaMA-family model or base_quantization=none")
    prefixes = tuple(backbone.block_prefix(j) for j in blocks)
    for name, module in list(model.named_modules()):
        if not name.startswith(prefixes) or type(module) is not nn.Linear or module.weight.device.type == "meta":
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, quantized_linear(module, mode, dtype, module.weight.device))
    return model


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] | None = None) -> tuple[int, set[int]]:
    """(bytes, data pointers) of the distinct storages among `tensors`, skipping those in `exclude`:
    tensors sharing a storage (views, tied weights) count once, as memory does."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if exclude is None or storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()), set(seen)


def frozen_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The frozen tensors `model` really holds: parameters that are not LoRA and not on meta,
    with a quantized weight's statistics (absmax, scales) that live beside it."""
    held: list[torch.Tensor] = []
    for name, parameter in model.named_parameters():
        if ".lora_" in name or parameter.device.type == "meta":
            continue
        held.append(parameter)
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            held += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
        scales = getattr(parameter, "SCB", None)
        if isinstance(scales, torch.Tensor):
            held.append(scales)
    return held + _int8_state(model)


def _int8_state(model: nn.Module) -> list[torch.Tensor]:
    """Tensors bitsandbytes' int8 layers keep in `module.state` after their first forward (the
    int8 weight and its per-row scales move there from the parameter), meta ones aside."""
    held = []
    for module in model.modules():
        state = getattr(module, "state", None)
        for tensor in (getattr(state, "CB", None), getattr(state, "SCB", None)):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                held.append(tensor)
    return held


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the frozen tensors `model` holds (distinct storages)."""
    return storage_bytes(frozen_tensors(model))[0]



def quantized_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_quantized(module)]

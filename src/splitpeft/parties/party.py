"""A party is one holder of adapters: a device, or the server's session for one device.

Every party has its own structural copy of the base model (the frozen weights are shared, not
copied), its own LoRA branches on the modules it runs, and its own optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from splitpeft.model.adapters import (
    AdapterSet,
    LoraWeights,
    inject,
    lora_ab,
    lora_layers,
    lora_parameters,
    read_adapters,
    write_adapters,
)
from splitpeft.model.backbone import backbone_of, share_frozen_copy
from splitpeft.model.parts import Part, frozen_tensors, resident_bytes, view_part
from splitpeft.model.runtime import CPU_FP32, Runtime


class Party:
    def __init__(
        self,
        base: PreTrainedModel,
        ranks: Mapping[str, int],
        *,
        alpha: float,
        dropout: float,
        lr: float,
        weight_decay: float = 0.0,
        part: Part | None = None,
        runtime: Runtime = CPU_FP32,
        on_server: bool = False,
    ) -> None:
        """`part`: the frozen tensors this party holds (None: a view of all of `base`);
        `runtime` says on which torch device and, with `on_server`, for which side."""
        self.alpha = alpha
        self.runtime = runtime
        self.torch_device = runtime.server_device if on_server else runtime.device_device
        self.dtype = runtime.dtype
        frozen = share_frozen_copy(base) if part is None else view_part(base, part, device=self.torch_device, dtype=self.dtype)
        self.model = inject(frozen, ranks, alpha, dropout, device=self.torch_device)
        if runtime.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad, so the hook transformers
            # adds to make embedding outputs require grad (for reentrant checkpointing) comes off again.
            self.model.activation_checkpointing_enable({"use_reentrant": False})
            self.model.disable_input_require_grads()
        self.backbone = backbone_of(self.model)
        self.modules = sorted(lora_layers(self.model))
        self.ranks = {name: rank for name, rank in ranks.items() if rank > 0}
        self.parameters = lora_parameters(self.model)
        self.optimizer = (
            torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay) if self.parameters else None
        )
        self.scaler = torch.amp.GradScaler(self.torch_device.type) if runtime.loss_scaling and self.parameters else None
        self.model.train()

    def frozen_tensors(self) -> list[torch.Tensor]:
        """The frozen base tensors this party really holds (not on the meta device)."""
        return frozen_tensors(self.model)

    def resident_bytes(self) -> int:
        """Bytes of those frozen tensors."""
        return resident_bytes(self.model)

    def load(self, adapters: Mapping[str, LoraWeights]) -> None:
        """Load this party's modules from a larger set of adapters (e.g. the global state).

        An adapter arriving with B == 0 starts from its initialisation (noise-free aggregation
        merged the previous one into the frozen weight): its AdamW moments described the old
        adapter, so they are dropped rather than applied to the new one.
        """
        incoming = {name: adapters[name] for name in self.modules}
        write_adapters(self.model, incoming)
        if self.optimizer is None:
            return
        layers = lora_layers(self.model)
        for name, weights in incoming.items():
            if not bool(weights.B.any()):
                layer = layers[name]
                for parameter in lora_ab(layer):
                    self.optimizer.state.pop(parameter, None)

    def adapters(self) -> AdapterSet:
        """This party's adapters, on the CPU (where the federation's state lives)."""
        return {name: LoraWeights(w.A.cpu(), w.B.cpu()) for name, w in read_adapters(self.model).items()}

    # ------------------------------------------------------------------ backward, with fp16 loss scaling
    #
    # Under runtime.dtype=fp16 each party scales its own backward by its own dynamic scale S
    # (torch.amp.GradScaler): a loss as S * loss, a gradient arriving across the cut as S * g.
    # What it sends across the cut is unscaled again and in fp32 (`outgoing_grad`), so neither side
    # needs the other's scale, and small gradients do not flush to zero in fp16 on the way. An
    # overflowed step (non-finite gradients) is skipped by the scaler, which lowers S, and sends a
    # zero gradient on. Other dtypes: plain backward.

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None, *, retain_graph: bool = False) -> None:
        """Backward from a loss (`grad` None) or from an output receiving `grad` across the cut."""
        if self.scaler is None:
            tensor.backward(grad, retain_graph=retain_graph)
            return
        if grad is None:
            self.scaler.scale(tensor.float()).backward(retain_graph=retain_graph)
        else:
            tensor.backward(self.scaler.scale(grad.float()).to(tensor.dtype), retain_graph=retain_graph)

    def outgoing_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """The gradient on `tensor` to send across the cut (zeros where backward never reached)."""
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        if self.scaler is None:
            return grad
        grad = grad.float() / self.scaler.get_scale()
        return grad if bool(torch.isfinite(grad).all()) else torch.zeros_like(grad)

    @property
    def wire_grad_dtype(self) -> torch.dtype:
        """dtype of gradients crossing the cut: fp32 under fp16 (unscaled), else the runtime dtype."""
        return torch.float32 if self.scaler is not None else self.dtype

    def optimizer_step(self) -> None:
        if self.optimizer is None:
            return
        if self.scaler is None:
            self.optimizer.step()
        elif any(p.grad is not None for p in self.parameters):
            self.scaler.step(self.optimizer)  # unscales; skips the step if a gradient is not finite
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]

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

    def optimizer_step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]

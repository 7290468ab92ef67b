"""A party is one holder of adapters: a device, or the server's session for one device.

Every party has its own structural copy of the base model (the frozen weights are shared, not
copied), its own LoRA branches on the modules it runs, and its own optimiser. Under noise-free's
warm start (`WarmStart`) a party trains each module against its own copy of the frozen weight,
the shared one minus its adapter's product (`Party.load`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from splitpeft.model.adapters import (
    ADAPTER_NAME,
    AdapterSet,
    LoraWeights,
    is_fan_in_fan_out,
    lora_ab,
    read_adapters,
    write_adapters,
)
from splitpeft.model.backbone import Backbone
from splitpeft.model.guards import nonfinite_state
from splitpeft.model.parts import Part, frozen_tensors, resident_bytes
from splitpeft.model.runtime import CPU_FP32, Runtime, stochastic_round
from splitpeft.parties.shells import Shell, ShellPool, ShellSpec


@dataclass
class Parked:
    """What a parked party keeps besides its store ticket: which parameters (by index in the
    shell) have AdamW state and under which keys, which are frozen, which modules a warm start
    trained against, the shell's parameter names (shared) and whether its tensors were checked finite."""

    ticket: int
    moments: list[int]
    moment_keys: tuple[str, ...]
    frozen: list[int]
    warm: list[str]
    parameter_names: list[str]
    parameter_keys: list[str]
    clean: bool = False


@dataclass(frozen=True)
class WarmStart:
    """How a party takes noise-free's warm adapters (`federation.noise_free_start=warm`).

    The shared frozen weight W holds the whole aggregate, and the adapter (A, B) a party is given
    is part of it; the party trains against its own W - s B A (s = alpha / r), so it starts the
    round computing W exactly. `keep_moments` (`federation.noise_free_moments`): False drops each
    loaded adapter's AdamW moments (and step count) at every round start, because the warm factors
    U sqrt(S) and sqrt(S) V^T of the aggregate are a new basis, not the party's own A and B moved
    a little: a factorisation is unique only up to B G, G^-1 A, and the SVD fixes G by the
    aggregate's singular vectors, so the old per-coordinate moments (exp_avg_sq most of all)
    describe other coordinates. True carries them over as they are, for comparison."""

    keep_moments: bool = False
    low_rank: bool = False  # federation.noise_free_frozen=low_rank: W x - s B (A x), no copy of W (`Shell.correct_weight`)


@dataclass(frozen=True)
class Training:
    """How every party of a run trains its adapters, built once from the config
    (`federation.fleet.training_of`) and handed to each: the branch's scale alpha / r (alpha /
    sqrt(r) with `rslora`), its `dropout`, AdamW's `lr` and `weight_decay`, the `runtime` (torch
    devices, dtype), noise-free's `warm` start (None: adapters are added to the shared frozen
    weights as they are), and whether a dlora server keeps training the killed adapters it holds
    (`train_killed`, `kill_revive.server_trains_killed`)."""

    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    rslora: bool = False
    runtime: Runtime = CPU_FP32
    warm: WarmStart | None = None
    train_killed: bool = False


DEFAULT_TRAINING = Training()


class Party:
    def __init__(
        self,
        base: PreTrainedModel,
        ranks: Mapping[str, int],
        training: Training = DEFAULT_TRAINING,
        *,
        part: Part | None = None,
        on_server: bool = False,
        pool: ShellPool | None = None,
    ) -> None:
        """`training`: how it trains (`Training`); `part`: the frozen tensors this party holds
        (None: a view of all of `base`); `on_server`: it runs on the server's torch device.
        `pool`: the party borrows its shell (model, branches, optimiser) from it when it first
        needs one and gives it back at `park`; None: it builds its own now and keeps it."""
        alpha, dropout, lr, weight_decay = training.alpha, training.dropout, training.lr, training.weight_decay
        runtime, warm, rslora = training.runtime, training.warm, training.rslora
        self.training = training
        self.alpha = alpha
        self.rslora = rslora
        self.warm = warm
        self.runtime = runtime
        self.torch_device = runtime.server_device if on_server else runtime.device_device
        self.dtype = runtime.dtype
        self.ranks = {name: rank for name, rank in ranks.items() if rank > 0}
        self.modules = sorted(self.ranks)  # peft adds a branch to exactly these (`inject`)
        self.spec = ShellSpec(tuple(sorted(ranks.items())), alpha, dropout, lr, weight_decay, part, runtime, on_server, rslora)
        self._pool = pool
        self._shell: Shell | None = None if pool is not None else Shell(base, self.spec)
        self._parked: Parked | None = None
        # Server sessions under a warm start keep the (s, A0, B0) of each module trained against
        # its own copy W - s B0 A0 (fp32): the batched pass applies the copy as W x - s B0 (A0 x).
        self.warm_factors: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
        self._keep_warm_factors = on_server
        self._warm_loaded: dict[str, LoraWeights] = {}  # under a warm start: the adapters it trains against
        self.scaler = torch.amp.GradScaler(self.torch_device.type) if runtime.loss_scaling and self.modules else None

    # ------------------------------------------------------------------ the shell it computes with

    @property
    def shell(self) -> Shell:
        """This party's shell, borrowed from its pool (and its parked state put back) if it has none."""
        return self._bind(restore=True)

    @property
    def model(self) -> PreTrainedModel:
        return self.shell.model

    @property
    def backbone(self) -> Backbone:
        return self.shell.backbone

    @property
    def adapter_layers(self) -> dict[str, LoraLayer]:
        """Module name -> its LoRA layer in this party's model, found once per shell."""
        return self.shell.layers

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return self.shell.parameters

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.shell.optimizer

    @property
    def is_parked(self) -> bool:
        return self._shell is None

    def _bind(self, *, restore: bool) -> Shell:
        """Borrow a shell if this party holds none, and put its parked state into it: moments and
        frozen flags always, the adapters (and a warm start's own weights) if `restore` (`load`
        writes new ones anyway)."""
        if self._shell is not None:
            return self._shell
        assert self._pool is not None
        shell = self._pool.acquire(self.spec)
        self._shell = shell
        parked, self._parked = self._parked, None
        if parked is None:
            return shell
        # views of one flat buffer (`pack`): whatever outlives this call is copied out of it, since
        # one kept view (a moment the optimiser holds) would keep the whole buffer, the party's
        # parked adapters and warm adapters with it, alive for as long as the moment lives
        tensors = self._pool.store.take(parked.ticket)
        if shell.optimizer is not None:
            for index in parked.moments:
                parameter = shell.parameters[index]
                shell.optimizer.state[parameter] = {  # AdamW keeps a CPU step count unless fused
                    key: _moment(tensors[f"m/{index}/{key}"], key, parameter, shell.optimizer) for key in parked.moment_keys}
        for index in parked.frozen:
            shell.parameters[index].requires_grad_(False)
        self._warm_loaded = {name: LoraWeights(weights.A.clone(), weights.B.clone())
                             for name, weights in _weights(tensors, "w", parked.warm).items()}
        if restore:
            write_adapters(shell.layers, _weights(tensors, "a", self.modules))
            layers = shell.layers
            for name, weights in list(self._warm_loaded.items()):
                self._train_against(name, layers[name], weights)
        return shell

    def park(self) -> None:
        """Give the shell back to the pool, keeping this party's adapters, AdamW moments, frozen
        flags and warm-start adapters as tensors (in memory or spilled). No-op without a pool, or
        parked already. Only between steps: a half-done step's graph would be lost."""
        if self._pool is None or self._shell is None:
            return
        shell = self._shell
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in shell.layers.items():  # `pack` copies them: no clone here
            tensors[f"a/{name}/A"], tensors[f"a/{name}/B"] = lora_ab(layer)
        moments = self.optimizer_moments()
        keys: tuple[str, ...] = ()
        for index, state in moments.items():
            keys = tuple(sorted(state))
            for key in keys:
                tensors[f"m/{index}/{key}"] = state[key]
        for name, weights in self._warm_loaded.items():
            tensors[f"w/{name}/A"], tensors[f"w/{name}/B"] = weights.A, weights.B
        frozen = [index for index, parameter in enumerate(shell.parameters) if not parameter.requires_grad]
        self._parked = Parked(self._pool.store.put(tensors), list(moments), keys, frozen, sorted(self._warm_loaded),
                              shell.parameter_names, shell.parameter_keys)
        self._warm_loaded = {}
        self.warm_factors = {}
        self._shell = None
        self._pool.release(self.spec, shell)

    def close(self) -> None:
        """Forget this party: its shell goes back to the pool, its parked tensors are dropped."""
        if self._pool is None:
            return
        if self._shell is not None:
            shell, self._shell = self._shell, None
            self._pool.release(self.spec, shell)
        if self._parked is not None:
            self._pool.store.drop(self._parked.ticket)
            self._parked = None

    def _parked_tensors(self) -> dict[str, torch.Tensor]:
        assert self._pool is not None and self._parked is not None
        return self._pool.store.peek(self._parked.ticket)

    @property
    def _shared_weights(self) -> dict[str, torch.Tensor]:
        return self.shell.shared_weights

    def frozen_tensors(self) -> list[torch.Tensor]:
        """The frozen base tensors this party really holds (not on the meta device)."""
        return frozen_tensors(self.model)

    def resident_bytes(self) -> int:
        """Bytes of those frozen tensors (a parked party: those a shell of its spec holds, the
        shared frozen weights; no shell is kept for it)."""
        if self._shell is None and self._pool is not None:
            return self._pool.resident_bytes(self.spec)
        return resident_bytes(self.model)

    def optimizer_moments(self) -> dict[int, dict[str, torch.Tensor]]:
        """AdamW's state per parameter index (in the shell's order), bound or parked, without
        borrowing a shell: {index: {"step", "exp_avg", "exp_avg_sq"}}."""
        if self._shell is None:
            if self._parked is None:
                return {}
            tensors, parked = self._parked_tensors(), self._parked
            return {i: {key: tensors[f"m/{i}/{key}"] for key in parked.moment_keys} for i in parked.moments}
        optimizer = self._shell.optimizer
        if optimizer is None:
            return {}
        return {i: dict(optimizer.state[p]) for i, p in enumerate(self._shell.parameters) if optimizer.state.get(p)}

    def warm_copies(self) -> list[torch.Tensor]:
        """The party's own frozen weights W - s B A of a warm start, held beside the shared ones;
        under `warm.low_rank` the factors its corrections hold instead."""
        if self.warm is not None and self.warm.low_rank:
            return self.shell.correction_tensors()
        layers = self.shell.layers
        weights = [cast(torch.Tensor, layers[name].get_base_layer().weight) for name in self._shared_weights]
        return [w for w, shared in zip(weights, self._shared_weights.values()) if w is not shared]

    def load(self, adapters: Mapping[str, LoraWeights]) -> None:
        """Load this party's modules from a larger set of adapters (e.g. the global state).

        An adapter arriving with B == 0 starts from its initialisation (noise-free aggregation
        merged the previous one into the frozen weight): its AdamW moments described the old
        adapter, so they are dropped rather than applied to the new one. Under a warm start each
        module is trained against W - s B A (`_train_against`), and the moments of every loaded
        adapter are dropped unless `warm.keep_moments` (see `WarmStart`).
        """
        incoming = {name: adapters[name] for name in self.modules}
        self._bind(restore=False)  # what a parked party held is overwritten here
        write_adapters(self.shell.layers, incoming)
        layers = self.shell.layers
        if self.warm is not None:
            for name, weights in incoming.items():
                self._train_against(name, layers[name], weights)
        if self.optimizer is None:
            return
        reset_all = self.warm is not None and not self.warm.keep_moments
        for name, weights in incoming.items():
            if reset_all or not bool(weights.B.any()):
                layer = layers[name]
                for parameter in lora_ab(layer):
                    self.optimizer.state.pop(parameter, None)

    def _train_against(self, name: str, layer: LoraLayer, weights: LoraWeights) -> None:
        """Warm start: module `name` computes (W - s B A) x + s B A x = W x, W the shared frozen
        weight (d_out, d_in) with every merged aggregate, (A, B) = `weights`, s = alpha / r.

        W - s B A is this party's own copy, computed afresh from W at every load (so loading twice
        is loading once, and a later merge into W is seen); with B == 0 the layer goes back to W
        itself. In float64 (fp32 for a bf16 / fp16 W), then cast to W's dtype: exact to fp32's
        rounding of W - s B A for an fp32 W; for a bf16 / fp16 W rounded up or down at random, so
        that its expectation is W - s B A (nearest rounding would keep W wherever s B A is below
        half a unit, and the party would train against W + s B A).
        Costs one (d_out, d_in) copy per warm module per party (the shared copy stays as it is);
        under `warm.low_rank` none: the module computes W x - s B (A x) on the shared W
        (`Shell.correct_weight`), holding only the factors.
        A server session builds its copy only when its own model first runs the module: a shared
        server pass (`model/batched.py`) computes W x - s B0 (A0 x) from `warm_factors` instead and
        never reads it, so a batched server holds no copy per session and spends no (d_out, d_in)
        pass on one (a fifth of a bf16 round of the main job went to building them)."""
        shell = self.shell
        shared = self._shared_weights[name]
        base_layer = layer.get_base_layer()
        if shared.device.type == "meta":
            return
        shell.cancel_deferred(name)
        self.warm_factors.pop(name, None)
        self._warm_loaded.pop(name, None)
        if not bool(weights.B.any()):
            if base_layer.weight is not shared:
                base_layer.weight = shared
            return
        scale = float(layer.scaling[ADAPTER_NAME])
        self._warm_loaded[name] = weights  # to rebuild the copy after parking
        a0, b0 = weights.A, weights.B
        if self._keep_warm_factors:  # copies: a deferred copy is built from the factors as loaded
            a0 = weights.A.to(shared.device, torch.float32, copy=True)
            b0 = weights.B.to(shared.device, torch.float32, copy=True)
            self.warm_factors[name] = (scale, a0, b0)
        fan_in_fan_out = is_fan_in_fan_out(self.model)

        def own_copy() -> torch.Tensor:
            # float64 for an fp32 weight (exact to fp32's rounding); for bf16 / fp16 weights fp32 is
            # as exact after the cast, and a float64 (d_out, d_in) pass per module per holder per
            # round was 18% of a bf16 round of the main job (bench/profile_step.py).
            work = torch.float64 if shared.dtype == torch.float32 else torch.float32
            product = scale * (b0.to(work) @ a0.to(work))  # (d_out, d_in)
            if fan_in_fan_out:  # GPT-2 Conv1D stores (d_in, d_out)
                product = product.T
            with torch.no_grad():  # a bf16 / fp16 W: rounded stochastically, unbiased (stochastic_round)
                return stochastic_round(shared.to(work) - product.to(shared.device), shared.dtype, name)

        if self.warm is not None and self.warm.low_rank:
            # (a server session's factors are fp32 copies there already: `to` returns them as they are)
            shell.correct_weight(name, scale, a0.to(shared.device, torch.float32), b0.to(shared.device, torch.float32))
        elif self._keep_warm_factors:
            shell.defer_weight(name, own_copy)
        else:
            base_layer.weight = torch.nn.Parameter(own_copy(), requires_grad=False)

    def adapters(self) -> AdapterSet:
        """This party's adapters, on the CPU (where the federation's state lives); a parked
        party's from what it keeps, without borrowing a shell."""
        if self._shell is None and self._parked is not None:
            return _weights(self._parked_tensors(), "a", self.modules)  # parked state is in CPU memory
        return {name: LoraWeights(w.A.cpu(), w.B.cpu()) for name, w in read_adapters(self.shell.layers).items()}

    # ------------------------------------------------------------------ backward, with fp16 loss scaling
    #
    # Under runtime.dtype=fp16 each party scales its own backward by its own dynamic scale S
    # (torch.amp.GradScaler): a loss as S * loss, a gradient arriving across the cut as S * g.
    # What it sends across the cut is unscaled again and in fp32 (`outgoing_grad`), so neither side
    # needs the other's scale, and small gradients do not flush to zero in fp16 on the way. An
    # overflowed step (non-finite gradients) is skipped by the scaler, which lowers S, and sends a
    # zero gradient on. Other dtypes: plain backward.

    def wave_warm_factors(self) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
        """(s, A0, B0) in fp32 of every module whose frozen weight is this party's own copy
        W - s B0 A0 (a warm start): what a shared pass over the common W subtracts on its rows."""
        if self._keep_warm_factors or not self._warm_loaded:
            return self.warm_factors
        layers = self.shell.layers
        return {name: (float(layers[name].scaling[ADAPTER_NAME]), weights.A.to(torch.float32), weights.B.to(torch.float32))
                for name, weights in self._warm_loaded.items()}

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

    def nonfinite(self) -> str | None:
        """The name of the first trainable adapter or AdamW moment of this party that is not finite, or None.
        A parked party is checked in what it keeps, without borrowing a shell, and once only."""
        parked = self._parked
        if self._shell is None and parked is None:
            return None  # never bound: it holds nothing yet (its first `load` gives it its adapters)
        if self._shell is None and parked is not None:
            if parked.clean or self._pool is not None and self._pool.store.all_finite(parked.ticket):
                parked.clean = True
                return None
            tensors = self._parked_tensors()
            names = parked.parameter_names
            kept = [(names[i], tensors[f"a/{parked.parameter_keys[i]}"]) for i in range(len(names)) if i not in parked.frozen]
            kept += [(f"{names[i]}.{key}", tensors[f"m/{i}/{key}"]) for i in parked.moments for key in parked.moment_keys]
            bad = nonfinite_state(kept)
            parked.clean = bad is None
            return bad
        named: list[tuple[str, torch.Tensor]] = [(name, p) for name, p in self.named_adapter_parameters() if p.requires_grad]
        if self.optimizer is not None:
            index = {id(p): name for name, p in self.named_adapter_parameters()}
            named += [(f"{index.get(id(p), '?')}.{key}", value) for p, state in self.optimizer.state.items()
                      for key, value in state.items() if torch.is_tensor(value)]
        return nonfinite_state(named)

    def named_adapter_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name in the model, parameter) of every adapter factor: the only parameters that train."""
        shell = self.shell
        return list(zip(shell.parameter_names, shell.parameters))

    def reset_if_nonfinite(self) -> str | None:
        """Drop the optimiser state (moments, step counts) if an adapter or moment is not finite;
        returns the first such tensor's name. The adapters themselves are reloaded at the next
        round start (`load`), so nothing non-finite outlives the round or reaches a checkpoint."""
        bad = self.nonfinite()
        if bad is None:
            return None
        was_parked = self.is_parked
        if self.optimizer is not None:  # a parked party borrows its shell for this (rare) reset
            self.optimizer.state.clear()
        if was_parked:
            self.park()
        return bad

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]


def _moment(value: torch.Tensor, key: str, parameter: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A parked AdamW state tensor where the optimiser wants it, in a storage of its own (`value` is
    a view of a parked party's buffer): the moments beside their parameter; the step count on the
    parameter's device for the fused and capturable kernels, on the CPU otherwise (as torch's AdamW
    creates it)."""
    if key != "step":
        return value.to(parameter.device, copy=True)
    group = optimizer.param_groups[0]
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    return value.to(parameter.device if on_device else "cpu", copy=True)


def _weights(tensors: Mapping[str, torch.Tensor], prefix: str, names: Iterable[str]) -> dict[str, LoraWeights]:
    """The (A, B) of `names` from a parked party's tensors, under "<prefix>/<name>/A" and "/B"."""
    return {name: LoraWeights(tensors[f"{prefix}/{name}/A"], tensors[f"{prefix}/{name}/B"]) for name in names}

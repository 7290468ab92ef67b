"""One server pass for many devices (`server.batch_devices`).

Every device's server session is its own party (its own adapters, its own AdamW), but the frozen
blocks are the same for all of them. So when the steps of several sessions arrive together (in the
simulator every device of a round steps in lockstep; over gRPC the steps that arrive within
`server.batch_window_ms`), the server runs its frozen blocks once over all their rows::

    rows of device 0 (B0, T0, d) ─┐ padded on the right to the wave's longest T, concatenated on the batch axis
    rows of device 1 (B1, T1, d) ─┤
    rows of device 2 (joins at its own cut k2 > k0) ──────┐
                                  ▼                       ▼
          block k0 ... block k2-1 ──────────────── cat ── block k2 ... block L-1 ── (head, per-row losses)
          every adapted linear: W x once for all rows, + each session's s B A x on its own rows only

Exactness: the mask is causal, so positions padded after a row change nothing before them, and
every operation of a block is per row (attention per sequence), so each session's rows, and the
gradients of its adapters, are those it would get alone. Backward runs once for the wave (one
`torch.autograd.backward` over every session's loss or head gradient); then each session takes its
own guarded optimiser step (`ServerSession.optimizer_step`), so a session whose step is bad rolls
back alone. Equal to one session at a time to float rounding (tests/parties/test_batched_server.py).

A session trained against its own frozen copy W - s B0 A0 (noise-free's warm start) gets the
shared W x plus the low-rank correction - s B0 (A0 x) on its rows (`Party.warm_factors`), which is
the same product without a (d_out, d_in) matmul per session.

The pass holds one structural copy of the server's frozen model (`host`: the base's own tensors,
no adapters); forward hooks on its adapted linears add each session's branch while a wave runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from splitpeft.model.adapters import ADAPTER_NAME, lora_ab, lora_branch
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loss import labelled_positions, token_loss
from splitpeft.model.parts import Part, view_part


class WaveSession(Protocol):
    """What the pass reads of a server session."""

    device_id: str
    split_layer: int
    warm_factors: dict[str, tuple[float, torch.Tensor, torch.Tensor]]  # (s, A0, B0) of its own W - s B0 A0

    @property
    def model(self) -> PreTrainedModel: ...

    @property
    def adapter_layers(self) -> Mapping[str, LoraLayer]: ...  # its model's LoRA layers, found once


@dataclass
class Member:
    """One session's part of a wave: its rows in the concatenated batch and what it sent."""

    session: WaveSession
    hidden: torch.Tensor                # (B, T, d) as received, a leaf that requires grad
    labels: torch.Tensor | None = None  # (B, T) int64 where the server computes the loss
    rows: slice = field(default_factory=lambda: slice(0, 0))  # its rows in the wave's batch
    final: torch.Tensor | None = None   # (B, T, d) its output after the last block
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    # (s, A0, B0) per module of its own frozen copy W - s B0 A0 (a warm start); default: the session's
    warm: dict[str, tuple[float, torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.warm is None:
            self.warm = self.session.warm_factors

    @property
    def seq_len(self) -> int:
        return int(self.hidden.shape[1])


@dataclass
class Wave:
    """A forward pass shared by several sessions, until each has sent its head gradient (U-shaped)."""

    members: list[Member]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # device id -> head gradient received

    def drop(self, device_id: str) -> None:
        """A member's step was aborted: the others no longer wait for its head gradient."""
        self.members = [m for m in self.members if m.session.device_id != device_id]
        self.grads.pop(device_id, None)


class BranchHost:
    """A structural copy of a frozen model (`part` of `base`) whose adapted linears add, while a
    pass runs, each member's own LoRA branch on that member's rows (see the module docstring)."""

    def __init__(self, base: PreTrainedModel, part: Part, *, device: torch.device, dtype: torch.dtype) -> None:
        num_blocks = backbone_of(base).num_blocks
        self.host = view_part(base, part, device=device, dtype=dtype)
        self.host.requires_grad_(False)
        self.host.train()  # as the sessions' models (dropout, if the model has any, as in one-at-a-time)
        self.backbone = backbone_of(self.host)
        self.num_blocks = num_blocks
        self._members: Sequence[Member] = ()
        for name, module in self.host.named_modules():
            if _is_linear(module):
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def add_branches(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            members = self._members
            if not members or not any(name in m.layers for m in members):
                return output
            stacked = _stacked_branches(name, members, inputs[0], output)
            if stacked is not None:
                return stacked
            pieces = []
            for member, xs in zip(members, by_member(inputs[0], members)):
                layer = member.layers.get(name)
                if layer is None:
                    pieces.append(xs.new_zeros((*xs.shape[:-1], output.shape[-1])))
                    continue
                delta = lora_branch(layer, xs)
                warm = member.warm.get(name) if member.warm else None
                if warm is not None:  # the session's own frozen copy is W - s B0 A0
                    scale, a0, b0 = warm
                    delta = delta - (scale * ((xs.to(a0.dtype) @ a0.T) @ b0.T)).to(delta.dtype)
                pieces.append(delta)
            return output + torch.cat(pieces)
        return add_branches

    @contextmanager
    def _running(self, members: Sequence[Member]) -> Iterator[None]:
        self._members = members
        try:
            yield
        finally:
            self._members = ()


class BatchedPass(BranchHost):
    """The server's frozen model, run once for the rows of many sessions (see the module docstring).

    One forward at a time runs on it (its hooks read the members of the pass running). A forward
    that outlives the call that started it (a dlora wave, whose worker waits for its devices'
    branches) holds it with `acquire` until `release`; steps that arrive meanwhile (devices of a
    round out of step with that pass) wait, and start the next pass once its forward has ended."""

    def __init__(self, base: PreTrainedModel, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(base, Part(range(backbone_of(base).num_blocks), embedding=False, head=True),
                         device=device, dtype=dtype)
        self._lock = threading.Lock()
        self.in_use = False

    def acquire(self) -> BatchedPass:
        with self._lock:
            if self.in_use:
                raise RuntimeError("the shared pass is held by another pass's forward (dlora's server_wave defers "
                                   "steps that would start another one)")
            self.in_use = True
            return self

    def release(self) -> None:
        with self._lock:
            self.in_use = False

    def forward(self, members: list[Member], extra_hooks: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Run every member from its cut (`session.split_layer`) through the last block; sets each
        member's `rows` and `final`, and orders `members` as their rows are; returns the wave's
        output (N, T_max, d). `extra_hooks`: module name -> forward hook added for this pass (dlora's
        remote branches), which reads the members joined so far from `joined()`."""
        handles = [self.host.get_submodule(name).register_forward_hook(hook) for name, hook in (extra_hooks or {}).items()]
        try:
            return self._forward(members)
        finally:
            for handle in handles:
                handle.remove()

    def joined(self) -> Sequence[Member]:
        """The members in the pass so far, in the order of their rows (during `forward`)."""
        return self._members

    def _forward(self, members: list[Member]) -> torch.Tensor:
        t_max = max(m.seq_len for m in members)
        joins = sorted({m.session.split_layer for m in members})
        joined: list[Member] = []
        x: torch.Tensor | None = None
        position = joins[0]
        with self._running(joined):
            for k in joins:
                if x is not None:
                    x = self.backbone.blocks(x, position, k)
                position = k
                for member in (m for m in members if m.session.split_layer == k):
                    member.layers = dict(member.session.adapter_layers)
                    start = 0 if x is None else int(x.shape[0])
                    member.rows = slice(start, start + int(member.hidden.shape[0]))
                    padded = F.pad(member.hidden, (0, 0, 0, t_max - member.seq_len))
                    x = padded if x is None else torch.cat([x, padded])
                    joined.append(member)
            assert x is not None
            x = self.backbone.blocks(x, position, self.num_blocks)
        for member, rows in zip(joined, by_member(x, joined)):
            member.final = rows[:, : member.seq_len]
        members[:] = joined
        return x

    def losses(self, members: list[Member], output: torch.Tensor) -> list[torch.Tensor]:
        """Each member's loss (`head_loss` on its own rows and labels), from one head pass over
        every member's labelled positions. output (N, T_max, d)."""
        t_max, width = int(output.shape[1]), int(output.shape[-1])
        positions, targets, counts = [], [], []
        for member in members:
            assert member.labels is not None
            where, target = labelled_positions(member.labels, width=t_max)
            positions.append(where + member.rows.start * t_max)
            targets.append(target)
            counts.append(int(where.numel()))
        logits = self.backbone.head(output.reshape(-1, width).index_select(0, torch.cat(positions)))  # (n, V)
        return [token_loss(rows, target) for rows, target in zip(logits.split(counts), targets)]


def _stacked_branches(name: str, members: Sequence[Member], x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """The linear's `output` (N*M, ..., d_out) plus every member's branch on module `name`, as two
    batched products over the member axis, (N, M, d_in) x (N, d_in, r) x (N, r, d_out), the second
    summed with `output` (`baddbmm`: no (N, M, d_out) branch tensor written and read again, which
    on a CPU costs more than the product where d_out is the MLP's width); None where the members
    do not all adapt `name` at one rank on as many rows (each member's branch is then computed on
    its own rows). Out of place: adding into a view of `output` in place would make autograd clone
    and copy the whole (N, M, d_out) gradient back in the backward (`CopySlices`): a clone and
    three copies more a module (bench/branch_sum.py).

    As each member's own layer computes it, the factors cast to the input's dtype
    (`adapters.BranchLinear`), but with the scale inside A (below). The warm start's - s0 B0 (A0 x)
    rides in the same two products, as r more rank: [s A; -s0 A0] and [B, B0], in the input's
    dtype with the products accumulating in fp32 (in bf16 this rounds s0 B0 A0 far less than the
    copy W - s0 B0 A0 a session alone computes with, rounded into bf16 itself).
    Dropout, where configured, draws one mask for all rows (the same distribution as per member):
    on the branch's rows, not the correction's (the copy is frozen weight, which sees no dropout)."""
    layers = [m.layers.get(name) for m in members]
    if any(layer is None for layer in layers):
        return None
    present = [layer for layer in layers if layer is not None]
    if len({m.rows.stop - m.rows.start for m in members}) != 1 or len({layer.r[ADAPTER_NAME] for layer in present}) != 1:
        return None
    n, d_in = len(members), x.shape[-1]
    factors = [lora_ab(layer) for layer in present]
    # Each member's scale s goes into its A (N, r, d_in) before the products, not onto their
    # (N, M, d_out) result: one pass over the factors instead of one over every row's output
    # (about half of the pass's aten::mul time, an eighth of its self CPU time, in
    # `bench/batched_server.py --model tiny-llama --devices 64 --profile`). The same product to
    # float rounding; in bf16 s A is rounded once where one at a time rounds s (B A x).
    stacked_a = torch.stack([f[0] for f in factors])
    scales = torch.tensor([float(layer.scaling[ADAPTER_NAME]) for layer in present], dtype=stacked_a.dtype)
    a = (stacked_a * scales.to(stacked_a.device).view(n, 1, 1)).to(x.dtype)  # (N, r, d_in)
    b = torch.stack([f[1] for f in factors]).to(x.dtype)  # (N, d_out, r)
    dropout = present[0].lora_dropout[ADAPTER_NAME]
    xs = dropout(x).reshape(n, -1, d_in)  # (N, M, d_in)
    warm = [m.warm.get(name) if m.warm else None for m in members]
    base = output.reshape(n, -1, output.shape[-1])  # (N, M, d_out): the linear's own output
    if not any(w is not None for w in warm):
        return torch.baddbmm(base, torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)).view(output.shape)
    a0 = torch.stack([-w[0] * w[1] if w is not None else torch.zeros_like(f[0]) for w, f in zip(warm, factors)])
    b0 = torch.stack([w[2] if w is not None else torch.zeros_like(f[1]) for w, f in zip(warm, factors)])
    a0, b0 = a0.to(a.device, x.dtype), b0.to(b.device, x.dtype)
    if not isinstance(dropout, nn.Identity):  # dropped rows for the branch, all rows for the correction
        with_branch = torch.baddbmm(base, torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        return torch.baddbmm(with_branch, torch.bmm(x.reshape(n, -1, d_in), a0.transpose(1, 2)), b0.transpose(1, 2)).view(output.shape)
    down = torch.bmm(xs, torch.cat([a, a0], dim=1).transpose(1, 2))  # (N, M, 2r)
    return torch.baddbmm(base, down, torch.cat([b, b0], dim=2).transpose(1, 2)).view(output.shape)


def by_member(batch: torch.Tensor, members: Sequence[Member]) -> tuple[torch.Tensor, ...]:
    """`batch` split into each member's rows (contiguous, in order): views whose backward is one
    cat, where indexing each member's rows would write a zero-filled gradient of the whole batch
    per member."""
    return batch.split([m.rows.stop - m.rows.start for m in members])


def _is_linear(module: nn.Module) -> bool:
    """A linear a LoRA adapter can sit on: torch's Linear (quantized ones subclass it) or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class DevicePass(BranchHost):
    """The devices' frozen part (embedding and blocks), run once for the rows of several devices
    that cut at the same block (`federation.device_waves`): each device's rows get its own
    adapters' branches, as on the server (`_stacked_branches`). A member's `hidden` is its (B, T)
    token ids; rows are padded on the right to the wave's longest T, which changes nothing before
    them (the mask is causal)."""

    def __init__(self, base: PreTrainedModel, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(base, Part(range(backbone_of(base).num_blocks), embedding=True, head=False),
                         device=device, dtype=dtype)

    def forward(self, members: list[Member], split_layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each member's (embedded, cut): its rows of the embedding and of blocks [0, split_layer)'s
        output, (B, T, d) each, in the graph of one pass (one backward serves them all)."""
        t_max = max(m.seq_len for m in members)
        start = 0
        for member in members:
            member.layers = dict(member.session.adapter_layers)
            member.rows = slice(start, start + int(member.hidden.shape[0]))
            start = member.rows.stop
        ids = torch.cat([F.pad(m.hidden, (0, t_max - m.seq_len)) for m in members])  # (N, T_max)
        with self._running(members):
            embedded = self.backbone.embed(ids)
            cut = self.backbone.blocks(embedded, 0, split_layer)
        return [(e[:, : m.seq_len], c[:, : m.seq_len])
                for m, e, c in zip(members, by_member(embedded, members), by_member(cut, members))]

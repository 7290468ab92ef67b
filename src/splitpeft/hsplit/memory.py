"""ARMSC, adaptive rank and split-point configuration: from each device's budget to its plan.

Inputs: a device's budget (`DeviceProfile`), the model's shapes (`ModelShapes`, read from the
real model), IWI scores per candidate linear, and the rank set Q (0 = no adapter). Output: a
`DevicePlan` with the split layer k and a rank per module of blocks [0, k).

The memory model (`memory_breakdown`, `predict_peak_bytes`) predicts what the device's meter
measures (`DeviceMeter`: resident tensors + every distinct tensor autograd saves for backward):

    peak = frozen + adapters + activations

    frozen      = embedding (+ GPT-2 wpe) + blocks [0, k) (+ final norm and LM head when the device
                  keeps the labels; a head tied to the embedding counts once)
    adapters    = copies x sum_m r_m (d_in_m + d_out_m) x dtype_bytes
                  copies = 4: weights, gradients, AdamW exp_avg and exp_avg_sq
    activations = sum over device blocks of what autograd saves there (below)
                  + rotary cos/sin tables (LLaMA family) + the head and loss (labels on device)

Activations, per block, with N = B T tokens, d hidden, f MLP width, q/k/v widths d_q, d_k, d_v,
h heads, s = dtype bytes. A frozen linear saves only its (resident) weight; its input is kept
only by a LoRA branch, whose A-input and rank-r intermediate A x are saved. Nothing upstream of
the first adapter needs gradients, so nothing is saved there: whether a term counts depends on
whether its tensors require grad ("live"), which the functions below follow exactly.

    norm_in      N (d + c) s     input norm: its input and c per-token statistics
                                  (RMSNorm c = 1: rsqrt; LayerNorm c = 2: mean, rstd)   [live in]
    attn_input   N d s           normed input, kept by LoRA A of q/k/v (c_attn)        [q/k/v adapted]
    attention    N (d_q + d_k + d_v) s + B h T 4
                                  sdpa's query, key, value and log-sum-exp              [q/k/v need grad]
    attn_output  N d s           sdpa output = o_proj (attn c_proj) input, one storage  [attention or o adapted]
    norm_mid     N (d + c) s     post-attention norm                                    [live after attention]
    mlp_input    N d s           normed input, kept by LoRA A of gate/up (c_fc)        [gate/up adapted]
    mlp_act      LLaMA: N f s (2 [gate needs grad] + [up needs grad])
                                  SiLU input, SiLU output (for up's grad), up output (for SiLU's grad)
                 GPT-2: 4 N f s   gelu_new keeps its input, tanh, 0.5 x and 1 + tanh
    mlp_output   N f s           down_proj (mlp c_proj) input                           [down adapted]
    lora         sum_m N r_m s   each adapter's intermediate A x
    rotary       2 T d_head s    cos and sin, once per forward                          [LLaMA, q/k need grad]
    head         N (d + c) s + B (T - 1) V 4 + 8 B (T - 1) + 4
                                  final norm, log-softmax output, targets, total weight [labels on device]

The prediction is exact for the meter's account on the tiny test models (scalar constants of a
few bytes aside) and is checked against the measured peak in tests/test_planner.py.

ARMSC (`plan_device`): the deepest k whose frozen weights + activations + a minimal adapter
(the smallest non-zero rank on the top-scoring module of blocks [0, k)) fit the memory budget;
then, greedily, the module with the highest score per byte of raising it to its next rank in Q
is raised, while the prediction stays within budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedModel

from splitpeft.hsplit.importance import base_linear, linear_dims
from splitpeft.model.adapters import target_module_names
from splitpeft.model.backbone import backbone_of
from splitpeft.parties.meter import storage_bytes

ADAPTER_COPIES = 4


"""Adapter weights, their gradients, AdamW exp_avg and exp_avg_sq."""


LOG_SUM_EXP_BYTES = 4


"""sdpa keeps its log-sum-exp in float32 whatever the model dtype."""


# Role of each adaptable linear in its block, by the end of its module name.
ROLES: dict[str, dict[str, str]] = {
    "llama": {
        "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
        "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    },
    "gpt2": {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "fc", "mlp.c_proj": "down"},
}


ATTENTION_INPUT_ROLES = {"q", "k", "v", "qkv"}


MLP_INPUT_ROLES = {"gate", "up", "fc"}


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShapes:
    """What the memory and FLOP models need to know about a model, read from the model itself."""

    family: str  # "llama" (LLaMA, Qwen2, Mistral) or "gpt2"
    num_blocks: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    head_dim: int
    qkv_dims: tuple[int, int, int]  # output widths of the q, k, v projections
    vocab_size: int
    dtype_bytes: int
    embedding_bytes: int  # token embedding (+ GPT-2 position embedding)
    head_bytes: int  # final norm + LM head, not counting storage shared with the embedding
    block_bytes: tuple[int, ...]  # frozen parameters of each block
    block_linear_macs: tuple[int, ...]  # sum of d_in d_out over all linears of each block
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # candidate -> (d_in, d_out)
    module_block: dict[str, int] = field(default_factory=dict)
    module_role: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: PreTrainedModel, target_modules: Iterable[str] | None = None) -> ModelShapes:
        """Shapes of `model` (plain or with LoRA injected); `target_modules` are short names
        ("q_proj") or full module names; default: the family's default targets."""
        backbone = backbone_of(model)
        config = model.config
        family = "gpt2" if config.model_type == "gpt2" else "llama"
        num_blocks = backbone.num_blocks
        targets = list(target_modules) if target_modules is not None else list(backbone.default_target_modules)
        if any("." in t for t in targets):
            names = targets
        else:
            names = target_module_names(backbone, targets, range(num_blocks))
        if family == "gpt2":
            hidden, heads = config.n_embd, config.n_head
            intermediate = config.n_inner or 4 * hidden
            head_dim = hidden // heads
            qkv = (hidden, hidden, hidden)
        else:
            hidden, heads = config.hidden_size, config.num_attention_heads
            intermediate = config.intermediate_size
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            qkv = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)

        params = dict(model.named_parameters())
        embedding = list(model.get_input_embeddings().parameters())
        embedding += [p for n, p in params.items() if "wpe" in n]
        embedding_bytes, embedding_storages = storage_bytes(embedding)
        head_bytes, _ = storage_bytes(
            (p for m in backbone.head_modules() for p in m.parameters()), exclude=embedding_storages
        )
        block_bytes, block_macs = [], []
        for j in range(num_blocks):
            prefix = backbone.block_prefix(j)
            in_block = [p for n, p in params.items() if prefix in n and ".lora_" not in n]
            block_bytes.append(storage_bytes(in_block)[0])
            macs = 0
            for name, module in model.named_modules():
                if prefix in name and not hasattr(module, "base_layer") and _is_linear(module):
                    d_in, d_out = linear_dims(module)
                    macs += d_in * d_out
            block_macs.append(macs)

        modules, module_block, module_role = {}, {}, {}
        prefixes = [backbone.block_prefix(j) for j in range(num_blocks)]
        for name in names:
            modules[name] = linear_dims(base_linear(model, name))
            module_block[name] = next(j for j, p in enumerate(prefixes) if name.startswith(p))
            module_role[name] = _role(family, name)
        return cls(
            family=family, num_blocks=num_blocks, hidden_size=hidden, intermediate_size=intermediate,
            num_heads=heads, head_dim=head_dim, qkv_dims=qkv, vocab_size=config.vocab_size,
            dtype_bytes=next(model.parameters()).element_size(), embedding_bytes=embedding_bytes,
            head_bytes=head_bytes, block_bytes=tuple(block_bytes), block_linear_macs=tuple(block_macs),
            modules=modules, module_block=module_block, module_role=module_role,
        )

    def modules_before(self, split_layer: int) -> list[str]:
        """Candidate modules of blocks [0, split_layer), in model order."""
        return [name for name in self.modules if self.module_block[name] < split_layer]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _role(family: str, name: str) -> str:
    for suffix, role in ROLES[family].items():
        if name == suffix or name.endswith("." + suffix):
            return role
    raise ValueError(f"{name!r} is not an adaptable linear of a {family} block (known: {', '.join(ROLES[family])})")


# --------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class BlockSaved:
    """What autograd saves in one block: bytes, whether its output needs grad, whether it used rotary."""

    bytes: int
    live_out: bool
    rotary: bool


def block_saved(shapes: ModelShapes, roles: Mapping[str, int], live_in: bool, batch_size: int, seq_len: int) -> BlockSaved:
    """Bytes autograd keeps for one block (terms in the module docstring).

    `roles` maps the block's adapted roles ("q", "gate", ... "qkv", "fc") to their ranks;
    `live_in` says whether the block's input requires grad (an adapter upstream).
    """
    n, s = batch_size * seq_len, shapes.dtype_bytes
    d, f = shapes.hidden_size, shapes.intermediate_size
    stats = 1 if shapes.family == "llama" else 2
    adapted = {role for role, r in roles.items() if r > 0}
    total = sum(n * r * s for r in roles.values() if r > 0)  # lora: A x per adapter
    if live_in:
        total += n * (d + stats) * s  # norm_in
    if adapted & ATTENTION_INPUT_ROLES:
        total += n * d * s  # attn_input
    attention_grad = live_in or bool(adapted & ATTENTION_INPUT_ROLES)
    if attention_grad:
        total += n * sum(shapes.qkv_dims) * s + batch_size * shapes.num_heads * seq_len * LOG_SUM_EXP_BYTES
    if attention_grad or "o" in adapted:
        total += n * d * s  # attn_output
    live_mid = attention_grad or "o" in adapted
    if live_mid:
        total += n * (d + stats) * s  # norm_mid
    if adapted & MLP_INPUT_ROLES:
        total += n * d * s  # mlp_input
    if shapes.family == "llama":
        gate_grad = live_mid or "gate" in adapted
        up_grad = live_mid or "up" in adapted
        total += n * f * s * (2 * gate_grad + up_grad)  # mlp_act
        mlp_grad = gate_grad or up_grad
    else:
        mlp_grad = live_mid or "fc" in adapted
        total += 4 * n * f * s * mlp_grad  # mlp_act (gelu_new)
    if "down" in adapted:
        total += n * f * s  # mlp_output
    rotary = shapes.family == "llama" and (live_in or bool(adapted & {"q", "k"}))
    return BlockSaved(total, mlp_grad or "down" in adapted, rotary)


def _roles_per_block(shapes: ModelShapes, split_layer: int, ranks: Mapping[str, int]) -> list[dict[str, int]]:
    per_block: list[dict[str, int]] = [{} for _ in range(split_layer)]
    for name, r in ranks.items():
        if r <= 0:
            continue
        if name not in shapes.modules:
            raise ValueError(f"{name!r} is not a candidate module of this model")
        j = shapes.module_block[name]
        if j >= split_layer:
            raise ValueError(f"{name!r} is in block {j}, not on the device (split_layer {split_layer})")
        per_block[j][shapes.module_role[name]] = r
    return per_block


def rotary_bytes(shapes: ModelShapes, seq_len: int) -> int:
    """cos and sin tables (T, d_head) each, shared by all blocks of one forward (LLaMA family)."""
    return 2 * seq_len * shapes.head_dim * shapes.dtype_bytes if shapes.family == "llama" else 0


def head_saved_bytes(shapes: ModelShapes, batch_size: int, seq_len: int) -> int:
    """Final norm + log-softmax output + int64 targets + total weight, when the device computes the loss."""
    n, s = batch_size * seq_len, shapes.dtype_bytes
    stats = 1 if shapes.family == "llama" else 2
    shifted = batch_size * (seq_len - 1)
    # With B = 1 the shifted targets are a view of the labels: the whole (T,) storage is kept.
    target_elements = shifted if batch_size > 1 else seq_len
    return n * (shapes.hidden_size + stats) * s + shifted * shapes.vocab_size * 4 + 8 * target_elements + 4


def frozen_bytes(shapes: ModelShapes, split_layer: int, labels_on_device: bool) -> int:
    """Frozen weights the device holds: embedding + blocks [0, k) (+ head with the labels)."""
    return shapes.embedding_bytes + sum(shapes.block_bytes[:split_layer]) + (shapes.head_bytes if labels_on_device else 0)


def adapter_bytes(shapes: ModelShapes, ranks: Mapping[str, int], copies: int = ADAPTER_COPIES) -> int:
    """copies x sum_m r_m (d_in + d_out) x dtype_bytes."""
    return copies * shapes.dtype_bytes * sum(r * sum(shapes.modules[m]) for m, r in ranks.items() if r > 0)


@dataclass(frozen=True)
class MemoryBreakdown:
    """The three named terms of the predicted peak."""

    frozen_bytes: int
    adapter_bytes: int
    activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.frozen_bytes + self.adapter_bytes + self.activation_bytes


def memory_breakdown(
    shapes: ModelShapes,
    split_layer: int,
    ranks: Mapping[str, int],
    batch_size: int,
    seq_len: int,
    labels_on_device: bool = False,
) -> MemoryBreakdown:
    """Predicted peak of a `split` device, by term (see the module docstring for the formula)."""
    if not 0 <= split_layer <= shapes.num_blocks:
        raise ValueError(f"split_layer {split_layer} is out of range 0..{shapes.num_blocks}")
    per_block = _roles_per_block(shapes, split_layer, ranks)
    activations, live, rotary = 0, False, False
    for roles in per_block:
        saved = block_saved(shapes, roles, live, batch_size, seq_len)
        activations += saved.bytes
        live, rotary = saved.live_out, rotary or saved.rotary
    if rotary:
        activations += rotary_bytes(shapes, seq_len)
    if labels_on_device:
        activations += head_saved_bytes(shapes, batch_size, seq_len)
    return MemoryBreakdown(frozen_bytes(shapes, split_layer, labels_on_device), adapter_bytes(shapes, ranks), activations)


def predict_peak_bytes(
    shapes: ModelShapes,
    split_layer: int,
    ranks: Mapping[str, int],
    batch_size: int,
    seq_len: int,
    labels_on_device: bool = False,
) -> int:
    """Predicted peak memory of a `split` device: frozen + adapters + activations (module docstring)."""
    return memory_breakdown(shapes, split_layer, ranks, batch_size, seq_len, labels_on_device).peak_bytes


def flops_per_step(
    shapes: ModelShapes,
    split_layer: int,
    ranks: Mapping[str, int],
    batch_size: int,
    seq_len: int,
    labels_on_device: bool = False,
) -> float:
    """Estimated device FLOPs of one training step (forward + backward), N = B T:

        forward  = sum_blocks [2 N sum_lin d_in d_out + 4 N T d_q] + sum_m 2 N r_m (d_in + d_out)
        backward = sum_live_blocks [2 N sum_lin d_in d_out + 10 N T d_q] + sum_m 4 N r_m (d_in + d_out)
        head     = 4 N d V (forward + input gradient), with the labels on the device

    Attention is counted as full T x T products, as torch's FlopCounterMode counts sdpa; frozen
    linears need only their input gradient, and only where something upstream is adapted.
    """
    n, t = batch_size * seq_len, seq_len
    attention_width = shapes.qkv_dims[0]
    per_block = _roles_per_block(shapes, split_layer, ranks)
    total, live = 0.0, False
    for j, roles in enumerate(per_block):
        total += 2 * n * shapes.block_linear_macs[j] + 4 * n * t * attention_width
        live_out = block_saved(shapes, roles, live, batch_size, seq_len).live_out
        if live or roles:
            total += 2 * n * shapes.block_linear_macs[j] + 10 * n * t * attention_width
        live = live_out
    total += sum(6 * n * r * sum(shapes.modules[m]) for m, r in ranks.items() if r > 0)
    if labels_on_device:
        total += 4 * n * shapes.hidden_size * shapes.vocab_size
    return float(total)


def split_bytes_per_step(shapes: ModelShapes, batch_size: int, seq_len: int, labels_on_device: bool = False) -> int:
    """Tensor bytes crossing the link per step (headers aside): the cut activations up and their
    gradient down, plus int32 labels up, or (labels on device) the final hidden states down and
    their gradient up."""
    hidden = batch_size * seq_len * shapes.hidden_size * shapes.dtype_bytes
    return 4 * hidden if labels_on_device else 2 * hidden + 4 * batch_size * seq_len

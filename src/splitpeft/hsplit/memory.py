"""The memory and FLOP model of a `split` device, in the precision it runs: what ARMSC plans with.

The prediction (`memory_breakdown`, `predict_peak_bytes`) is what the device's meter (`DeviceMeter`)
measures on CPU, resident tensors + every distinct tensor autograd saves for backward, plus what
that meter cannot see (`unmetered`, below):

    peak = frozen + adapters + activations + unmetered

    frozen      = embedding (+ GPT-2 wpe) + blocks [0, k) (+ final norm and LM head when the device
                  keeps the labels; a head tied to the embedding counts once), each tensor as stored:
                  in the runtime dtype (s bytes: fp32 4, bf16 / fp16 2), except the block linears
                  under runtime.base_quantization, n = d_in d_out weights (a bias stays in the dtype):
                      nf4   ceil(n / 2) packed + 4 ceil(n / 64) absmax + 64 (16-entry fp32 code table)
                      int8  n + 4 d_out (one fp32 scale per row, SCB)
    adapters    = copies x sum_m r_m (d_in_m + d_out_m) x 4
                  copies = 4: weights, gradients, AdamW exp_avg and exp_avg_sq, fp32 whatever the base
                  + under noise-free's warm start (`warm`, `warm_bytes`): `copy`, each adapted
                  module's own frozen weight W - s B A beside the shared one, sum_m d_in_m d_out_m s;
                  `low_rank`, the A and B it corrects W x with (fp32, and in bf16 / fp16 once more
                  in that dtype), sum_m r_m (d_in_m + d_out_m) (4 + s, or 4 in fp32)
    activations = sum over device blocks of what autograd saves there (below)
                  + rotary cos/sin tables (LLaMA family) + the head and loss (labels on device)

Activations, per block, with N = B T tokens, d hidden, f MLP width, q/k/v widths d_q, d_k, d_v,
h heads and s the runtime dtype's bytes. A frozen linear, quantized or not, saves only its
resident weight; its input is kept only by a LoRA branch. A branch computes in its input's dtype
(`adapters.BranchLinear`): it saves the input itself, one storage for every branch reading it, and
in bf16 / fp16 the copies of its fp32 factors in that dtype (factor_casts below; in fp32 the
factors are the resident adapters). Nothing upstream of the first adapter needs gradients, so nothing is saved there:
whether a term counts depends on whether its tensors require grad ("live"), which the functions
below follow exactly.

    norm_in      LLaMA: N (d + 1) 4    RMSNorm computes in fp32: its fp32 input and rsqrt   [live in]
                 GPT-2: N (d + 2) s    LayerNorm: input, mean, rstd (the CPU kernel keeps the dtype)
    attn_input   N d s                 LoRA A input of q/k/v (c_attn)                         [q/k/v adapted]
    attention    N (d_q + d_k + d_v) a + B h T 4 + N d a
                                        sdpa's query, key, value, fp32 log-sum-exp and output
                                        (the output is o_proj's input, one storage)           [q/k/v need grad]
                 a = s, or 4 where attention runs in fp32 (`model/attention.py`: bf16 / fp16 on
                 a CPU, T <= 160); o_proj's input is then the output cast back, its own
                 storage: + N d s                                                             [o adapted]
    o_input      N d s                 o_proj's LoRA input, the sdpa output when sdpa kept none [o adapted]
    norm_mid     as norm_in            post-attention norm                                    [live after attention]
    mlp_input    N d s                 LoRA A input of gate/up (c_fc)                         [gate/up adapted]
    mlp_act      LLaMA: N f s (2 [gate needs grad] + [up needs grad])
                                        SiLU input, SiLU output (for up's grad), up output (for SiLU's grad)
                 GPT-2: 4 N f s         gelu_new keeps its input, tanh, 0.5 x and 1 + tanh
    mlp_output   N f s                 down_proj (mlp c_proj) LoRA input                      [down adapted]
    lora         sum_m N r_m s         each adapter's intermediate A x
    factor_casts sum_m r_m (d_out_m + d_in_m [input needs grad]) s
                                        B and A cast to s bytes for the product                [bf16 / fp16]
    rotary       2 T d_head s          cos and sin, once per forward                          [LLaMA, q/k need grad]
    head         fp32:  8 n + norm + n V 4 + 8 n + 4
                                        on the n <= N labelled positions (`loss.head_loss`):
                                        their int64 indices, final norm (as norm_in),
                                        log-softmax, int64 targets, total weight              [labels on device]
                 bf16 / fp16: 8 n + norm + n V s + 4 n + 8 n
                                        indices, final norm, the logits, fp32 log-sum-exp,
                                        int64 targets (`loss.LowPrecisionCrossEntropy`)       [labels on device]

Unmetered: memory the CPU meter's saved-tensor hooks cannot see (on CUDA the meter reads the
allocator, which sees it):

- int8: bitsandbytes keeps each frozen linear's input on its autograd node (`ctx.A`, not
  `save_for_backward`) whenever that input requires grad: q/k/v input N d s [live in], gate/up
  input N d s [live after attention], down input N f s [gate or up need grad]. o_proj's input is
  sdpa's saved output, and a LoRA branch saves the same storage as its base linear's input: those
  count once (where attention runs in fp32 o_proj's input is its own storage: + N d s unless o is
  adapted). nf4 keeps only its (resident) weight.
- gradient checkpointing (runtime.gradient_checkpointing, non-reentrant, every block): inside a
  checkpointed block nothing is saved. The checkpoint saves each block's input, N d s, which the
  meter sees (counted under activations), and keeps the rotary tables and the int8 inputs (all of
  them: their LoRA and sdpa twins are not kept any more) for as long as the block has a graph,
  i.e. is live or adapted. In backward the checkpoint recomputes a block's activations (the table
  above, less the block input that a norm saves itself: GPT-2 always, LLaMA in fp32) through its
  own saved-tensor hooks, one block at a time: the largest recompute counts. A block with no graph
  saves its input and frees it at once; the meter, which de-duplicates by data pointer and never
  forgets, counts such an input unless the allocator reuses its address; the prediction does not.

Like the meter, the prediction adds everything a step saves, as if all of it were alive at once,
and leaves out transients: gradients in flight, bitsandbytes' dequantized weight inside a
quantized matmul (d_in d_out s), the fp32 logits before their log-softmax (fp32), the chunk of
fp32 rows of `LowPrecisionCrossEntropy` (bf16 / fp16). Base-model dropout is taken
as 0 (the tiny test models, LLaMA-2): dropout would keep masks that are not counted here.

The prediction equals the meter's account on the tiny test models in fp32, bf16, nf4 and int8
(tests/hsplit/test_planner.py, test_memory_precision.py). `ModelShapes.from_config` gives the same
shapes from a transformers config alone (built on the meta device), so paper-size models are
planned without weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from splitpeft.hsplit.importance import base_linear, linear_dims
from splitpeft.model.adapters import target_module_names
from splitpeft.model.attention import computes_in_fp32
from splitpeft.model.backbone import backbone_of
from splitpeft.model.parts import frozen_tensors, storage_bytes
from splitpeft.model.runtime import DTYPES, NF4_BLOCK_SIZE, is_quantized

ADAPTER_COPIES = 4


"""Adapter weights, their gradients, AdamW exp_avg and exp_avg_sq."""


ADAPTER_DTYPE_BYTES = 4


"""Adapters, their gradients and AdamW state are fp32 always."""


LOG_SUM_EXP_BYTES = 4


"""sdpa keeps its log-sum-exp in float32 whatever the model dtype."""


ATTENTION_FP32_BYTES = 4


"""Bytes per element of what sdpa saves where attention runs in fp32 (`model/attention.py`)."""


NF4_CODE_BYTES = 16 * 4


"""The 16-entry fp32 NF4 code table bitsandbytes keeps with every quantized linear."""


INT8_SCALE_BYTES = 4


"""One fp32 scale (SCB) per output row of an int8 linear."""


QUANTIZATIONS = ("none", "int8", "nf4")


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


def quantized_weight_bytes(d_in: int, d_out: int, quantization: str) -> int:
    """Bytes bitsandbytes holds for a (d_out, d_in) weight: nf4 packs two weights per byte with one
    fp32 absmax per block of 64 and a 16-entry fp32 code table; int8 one byte per weight and an
    fp32 scale per row; none: not quantized (0, the caller counts the dtype)."""
    n = d_in * d_out
    if quantization == "nf4":
        return (n + 1) // 2 + 4 * -(-n // NF4_BLOCK_SIZE) + NF4_CODE_BYTES
    if quantization == "int8":
        return n + INT8_SCALE_BYTES * d_out
    if quantization == "none":
        return 0
    raise ValueError(f"unknown quantization {quantization!r} (known: {', '.join(QUANTIZATIONS)})")


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShapes:
    """What the memory and FLOP models need to know about a model in the precision a device runs it."""

    family: str  # "llama" (LLaMA, Qwen2, Mistral) or "gpt2"
    num_blocks: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    head_dim: int
    qkv_dims: tuple[int, int, int]  # output widths of the q, k, v projections
    vocab_size: int
    dtype_bytes: int  # runtime dtype: frozen base (unless quantized), activations, the cut
    embedding_bytes: int  # token embedding (+ GPT-2 position embedding)
    head_bytes: int  # final norm + LM head, not counting storage shared with the embedding
    block_bytes: tuple[int, ...]  # frozen tensors of each block as stored (quantized linears included)
    block_linear_macs: tuple[int, ...]  # sum of d_in d_out over all linears of each block
    quantization: str = "none"  # block linears: none | int8 | nf4
    on_cpu: bool = True  # the device computes on a CPU (where short bf16 / fp16 attention runs in fp32)
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # candidate -> (d_in, d_out)
    module_block: dict[str, int] = field(default_factory=dict)
    module_role: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: PreTrainedModel, target_modules: Iterable[str] | None = None) -> ModelShapes:
        """Shapes of `model` (plain or with LoRA injected, possibly quantized by `quantize_blocks`),
        with byte counts read from the tensors it holds; `target_modules` are short names ("q_proj")
        or full module names; default: the family's default targets. Every block must be
        materialised (a party's view leaves other blocks on the meta device)."""
        backbone = backbone_of(model)
        embedding = list(model.get_input_embeddings().parameters())
        embedding += [p for n, p in model.named_parameters() if n.endswith("wpe.weight")]
        embedding_bytes, embedding_storages = storage_bytes(embedding)
        head_bytes, _ = storage_bytes(
            (t for m in backbone.head_modules() for t in frozen_tensors(m)), exclude=embedding_storages
        )
        block_bytes = tuple(storage_bytes(_held(_block(model, backbone.block_prefix(j))))[0]
                            for j in range(backbone.num_blocks))
        dtype_bytes = embedding[0].element_size()
        shapes = _read_shapes(model, target_modules, dtype_bytes, _quantization_of(model),
                              embedding_bytes, head_bytes, block_bytes)
        devices = {p.device.type for p in model.parameters()} - {"meta"}
        return replace(shapes, on_cpu=devices <= {"cpu"})

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        *,
        dtype: torch.dtype | str = torch.float32,
        quantization: str = "none",
        target_modules: Iterable[str] | None = None,
        device: torch.device | str = "cpu",
    ) -> ModelShapes:
        """Shapes of the model `config` describes, run in `dtype` ("fp32" | "bf16" | "fp16" or a torch
        dtype) on `device` with its block linears quantized by bitsandbytes as `quantization` says:
        built on the meta device, so no weight is allocated (a 7B model plans in well under a
        second). Byte counts are what `from_model` reads from the real, quantized model."""
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
        if quantization != "none" and config.model_type == "gpt2":
            raise ValueError("runtime.base_quantization: GPT-2 stores its block linears as Conv1D, which bitsandbytes "
                             "does not quantize; use a LLaMA-family model or base_quantization=none")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        backbone = backbone_of(model)
        embedding = list(model.get_input_embeddings().parameters())
        embedding += [p for n, p in model.named_parameters() if n.endswith("wpe.weight")]
        counted = {id(p) for p in embedding}
        head = [p for m in backbone.head_modules() for p in m.parameters() if id(p) not in counted]
        block_bytes = []
        for j in range(backbone.num_blocks):
            block = _block(model, backbone.block_prefix(j))
            total = 0
            for module in block.modules():
                for name, parameter in module.named_parameters(recurse=False):
                    if quantization != "none" and type(module) is nn.Linear and name == "weight":
                        total += quantized_weight_bytes(module.in_features, module.out_features, quantization)
                    else:
                        total += _nbytes([parameter])
            block_bytes.append(total)
        shapes = _read_shapes(model, target_modules, torch.finfo(torch_dtype).bits // 8, quantization,
                              _nbytes(embedding), _nbytes(head), tuple(block_bytes))
        return replace(shapes, on_cpu=torch.device(device).type == "cpu")

    def modules_before(self, split_layer: int) -> list[str]:
        """Candidate modules of blocks [0, split_layer), in model order."""
        return [name for name in self.modules if self.module_block[name] < split_layer]

    @property
    def casts_adapter_weights(self) -> bool:
        """Whether a LoRA branch multiplies with copies of its fp32 factors in the runtime dtype
        (any dtype but fp32: `BranchLinear`)."""
        return self.dtype_bytes != ADAPTER_DTYPE_BYTES

    def attention_in_fp32(self, seq_len: int) -> bool:
        """Whether a T = seq_len forward's attention runs in fp32 (`model/attention.computes_in_fp32`)."""
        return computes_in_fp32(self.on_cpu, self.dtype_bytes == 2, seq_len, seq_len)

    def norm_saved_bytes(self, tokens: int) -> int:
        """What one norm saves: RMSNorm its fp32 input and rsqrt, LayerNorm its input, mean and rstd."""
        if self.family == "llama":
            return tokens * (self.hidden_size + 1) * 4
        return tokens * (self.hidden_size + 2) * self.dtype_bytes

    def norm_keeps_input(self) -> bool:
        """Whether a block's input norm saves the block input itself (not a copy of it)."""
        return self.family == "gpt2" or self.dtype_bytes == 4  # RMSNorm upcasts a bf16 / fp16 input


def _held(module: nn.Module) -> list[torch.Tensor]:
    """`frozen_tensors`, plus the scales of int8 linears that have run: bitsandbytes' first forward
    moves them from the weight (`weight.SCB`, where `frozen_tensors` looks) into `module.state`."""
    held = frozen_tensors(module)
    for layer in module.modules():
        state = getattr(layer, "state", None)
        scales = getattr(state, "SCB", None)
        if type(layer).__name__ == "Linear8bitLt" and getattr(layer.weight, "SCB", None) is None and scales is not None:
            held.append(scales)
    return held


def _block(model: nn.Module, prefix: str) -> nn.Module:
    """The block module whose parameters start with `prefix` (peft's wrapper prefix allowed)."""
    return next(module for name, module in model.named_modules() if f"{name}.".endswith(prefix))


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (by identity: meta tensors have no storage to compare)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _quantization_of(model: nn.Module) -> str:
    kinds = set()
    for module in model.modules():
        if is_quantized(module):
            kinds.add("int8" if type(module).__name__ == "Linear8bitLt" else getattr(module.weight, "quant_type", "nf4"))
    if len(kinds) > 1 or not kinds <= set(QUANTIZATIONS):
        raise ValueError(f"the model's linears are quantized as {sorted(kinds)}: one of nf4 or int8 expected")
    return kinds.pop() if kinds else "none"


def _read_shapes(model: PreTrainedModel, target_modules: Iterable[str] | None, dtype_bytes: int, quantization: str,
                 embedding_bytes: int, head_bytes: int, block_bytes: tuple[int, ...]) -> ModelShapes:
    """The shapes both constructors share: widths from the config, candidates and MACs from the modules."""
    backbone = backbone_of(model)
    config = model.config
    family = "gpt2" if config.model_type == "gpt2" else "llama"
    num_blocks = backbone.num_blocks
    targets = list(target_modules) if target_modules is not None else list(backbone.default_target_modules)
    names = targets if any("." in t for t in targets) else target_module_names(backbone, targets, range(num_blocks))
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

    block_macs = []
    for j in range(num_blocks):
        prefix = backbone.block_prefix(j)
        macs = 0
        for name, module in model.named_modules():
            if prefix in name and not hasattr(module, "base_layer") and _is_linear(module) and ".lora_" not in name:
                d_in, d_out = linear_dims(module)
                macs += d_in * d_out
        block_macs.append(macs)

    modules, module_block, module_role = {}, {}, {}
    prefixes = [backbone.block_prefix(j) for j in range(num_blocks)]
    for name in names:
        modules[name] = linear_dims(base_linear(model, name))
        module_block[name] = next(j for j, p in enumerate(prefixes) if name.startswith(p))
        module_role[name] = _role(family, name)
    return ModelShapes(
        family=family, num_blocks=num_blocks, hidden_size=hidden, intermediate_size=intermediate,
        num_heads=heads, head_dim=head_dim, qkv_dims=qkv, vocab_size=config.vocab_size,
        dtype_bytes=dtype_bytes, embedding_bytes=embedding_bytes, head_bytes=head_bytes,
        block_bytes=block_bytes, block_linear_macs=tuple(block_macs), quantization=quantization,
        modules=modules, module_block=module_block, module_role=module_role,
    )


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
    """What one block keeps for backward, as the module docstring's terms add up.

    `bytes`: what autograd saves (the meter sees it), without checkpointing; `input_bytes`: the
    block's input, which a checkpoint saves instead; `recompute_bytes`: what backward recomputes
    under checkpointing beyond that input; `int8_bytes` / `int8_checkpointed_bytes`: linear inputs
    an int8 base keeps out of the meter's sight, without / with checkpointing; `graph`: whether
    the block has anything to backpropagate (live input or an adapter)."""

    bytes: int
    live_out: bool
    rotary: bool
    graph: bool = False
    input_bytes: int = 0
    recompute_bytes: int = 0
    int8_bytes: int = 0
    int8_checkpointed_bytes: int = 0


def block_saved(shapes: ModelShapes, roles: Mapping[str, int], live_in: bool, batch_size: int, seq_len: int) -> BlockSaved:
    """Bytes one block keeps for backward (terms in the module docstring).

    `roles` maps the block's adapted roles ("q", "gate", ... "qkv", "fc") to their ranks;
    `live_in` says whether the block's input requires grad (an adapter upstream).
    """
    n, s = batch_size * seq_len, shapes.dtype_bytes
    d, f = shapes.hidden_size, shapes.intermediate_size
    adapted = {role for role, r in roles.items() if r > 0}

    def lora_inputs(group: set[str], width: int) -> int:
        return n * width * s * min(len(adapted & group), 1)  # one storage, whatever the branches reading it

    total = sum(n * r * s for r in roles.values() if r > 0)  # lora: A x per adapter
    if live_in:
        total += shapes.norm_saved_bytes(n)  # norm_in
    total += lora_inputs(ATTENTION_INPUT_ROLES, d)  # attn_input
    attention_grad = live_in or bool(adapted & ATTENTION_INPUT_ROLES)
    fp32_attention = shapes.attention_in_fp32(seq_len)
    if attention_grad:  # attention: q, k, v, log-sum-exp, output
        a = ATTENTION_FP32_BYTES if fp32_attention else s
        total += n * sum(shapes.qkv_dims) * a + batch_size * shapes.num_heads * seq_len * LOG_SUM_EXP_BYTES + n * d * a
        if fp32_attention and "o" in adapted:
            total += n * d * s  # o_input: the fp32 output cast back is o_proj's input, its own storage
    if "o" in adapted and not attention_grad:
        total += n * d * s  # o_input
    live_mid = attention_grad or "o" in adapted
    if live_mid:
        total += shapes.norm_saved_bytes(n)  # norm_mid
    total += lora_inputs(MLP_INPUT_ROLES, d)  # mlp_input
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
    if shapes.casts_adapter_weights:  # factor_casts: B's always, A's when its input needs a gradient
        input_grad = {"q": live_in, "k": live_in, "v": live_in, "qkv": live_in, "o": attention_grad,
                      "gate": live_mid, "up": live_mid, "fc": live_mid, "down": mlp_grad}
        for role, r in roles.items():
            if r > 0:
                d_in, d_out = role_dims(shapes, role)
                total += r * d_out * s + (r * d_in * s if input_grad[role] else 0)

    graph = live_in or bool(adapted)
    int8 = int8_checkpointed = 0
    if shapes.quantization == "int8":
        # Inputs of the frozen linears that require grad; a LoRA branch saves the same storage.
        kept = [(live_in, n * d * s, ATTENTION_INPUT_ROLES), (live_mid, n * d * s, MLP_INPUT_ROLES),
                (mlp_grad, n * f * s, {"down"})]
        int8 = sum(size for needed, size, group in kept if needed and not adapted & group)
        if fp32_attention and attention_grad and "o" not in adapted:
            int8 += n * d * s  # o_proj's input, the output cast back: no sdpa twin to share with
        # Under checkpointing nothing else keeps them, o_proj's input (the sdpa output) included.
        int8_checkpointed = sum(size for needed, size, _ in kept if needed) + n * d * s * attention_grad
    rotary = shapes.family == "llama" and (live_in or bool(adapted & {"q", "k"}))
    input_bytes = n * d * s
    recompute = total - (input_bytes if live_in and shapes.norm_keeps_input() else 0)
    return BlockSaved(
        bytes=total, live_out=mlp_grad or "down" in adapted, rotary=rotary, graph=graph,
        input_bytes=input_bytes if graph else 0, recompute_bytes=recompute if graph else 0,
        int8_bytes=int8, int8_checkpointed_bytes=int8_checkpointed if graph else 0,
    )


def role_dims(shapes: ModelShapes, role: str) -> tuple[int, int]:
    """(d_in, d_out) of the linear that plays `role` in a block."""
    d, f = shapes.hidden_size, shapes.intermediate_size
    d_q, d_k, d_v = shapes.qkv_dims
    return {"q": (d, d_q), "k": (d, d_k), "v": (d, d_v), "qkv": (d, d_q + d_k + d_v), "o": (d_q, d),
            "gate": (d, f), "up": (d, f), "fc": (d, f), "down": (f, d)}[role]


def blocks_saved(shapes: ModelShapes, per_block: Sequence[Mapping[str, int]], batch_size: int, seq_len: int,
                 start: int = 0, live: bool = False) -> list[BlockSaved]:
    """`block_saved` for blocks [start, len(per_block)), liveness flowing from one to the next."""
    out = []
    for roles in per_block[start:]:
        saved = block_saved(shapes, roles, live, batch_size, seq_len)
        out.append(saved)
        live = saved.live_out
    return out


def activation_terms(shapes: ModelShapes, saved: Sequence[BlockSaved], seq_len: int,
                     checkpointing: bool = False) -> tuple[int, int]:
    """(activations the meter sees, unmetered bytes) of the device blocks, head aside."""
    if checkpointing:
        metered = sum(b.input_bytes for b in saved)
        rotary = any(b.graph for b in saved)
        unmetered = sum(b.int8_checkpointed_bytes for b in saved) + max((b.recompute_bytes for b in saved), default=0)
        return metered, unmetered + (rotary_bytes(shapes, seq_len) if rotary else 0)
    rotary = any(b.rotary for b in saved)
    metered = sum(b.bytes for b in saved) + (rotary_bytes(shapes, seq_len) if rotary else 0)
    return metered, sum(b.int8_bytes for b in saved)


def roles_per_block(shapes: ModelShapes, split_layer: int, ranks: Mapping[str, int]) -> list[dict[str, int]]:
    """For each device block, its adapted roles and their ranks."""
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
    """cos and sin tables (T, d_head) each, in the runtime dtype, shared by all blocks of one forward (LLaMA family)."""
    return 2 * seq_len * shapes.head_dim * shapes.dtype_bytes if shapes.family == "llama" else 0


def head_saved_bytes(shapes: ModelShapes, batch_size: int, seq_len: int, labelled: int | None = None) -> int:
    """What the head and the loss save when the device computes the loss. `head_loss` runs them on
    the n labelled positions only (`labelled`; None: every one of the B T positions, the bound a
    plan made before the data holds to): the int64 positions picked, the final norm, then in fp32
    torch's cross-entropy: log-softmax output n V 4, int64 targets, total weight; in bf16 / fp16
    `LowPrecisionCrossEntropy`: the logits n V s, fp32 log-sum-exp n 4, int64 targets."""
    n = batch_size * seq_len if labelled is None else labelled
    if shapes.dtype_bytes == 4:
        return 8 * n + shapes.norm_saved_bytes(n) + n * shapes.vocab_size * 4 + 8 * n + 4
    return 8 * n + shapes.norm_saved_bytes(n) + n * shapes.vocab_size * shapes.dtype_bytes + 4 * n + 8 * n


def frozen_bytes(shapes: ModelShapes, split_layer: int, labels_on_device: bool) -> int:
    """Frozen weights the device holds: embedding + blocks [0, k) (+ head with the labels)."""
    return shapes.embedding_bytes + sum(shapes.block_bytes[:split_layer]) + (shapes.head_bytes if labels_on_device else 0)


# federation.noise_free_frozen: how a warm holder computes with W - s B A (None: no warm start)
WarmFrozen = Literal["copy", "low_rank"]


def warm_bytes(shapes: ModelShapes, ranks: Mapping[str, int], warm: WarmFrozen | None) -> int:
    """What noise-free's warm start adds to a holder (`Party._train_against`), by
    `federation.noise_free_frozen`:

        copy      sum_m d_in d_out s                 every adapted module's own frozen weight
        low_rank  sum_m r_m (d_in + d_out) (4 + s)   its A and B in fp32 and in the runtime dtype
                                                     (4 alone in fp32: one tensor serves both)

    s the runtime dtype's bytes (a quantized base never runs noise_free); None: no warm start, 0."""
    if warm is None:
        return 0
    if warm == "low_rank":
        per_value = ADAPTER_DTYPE_BYTES + (shapes.dtype_bytes if shapes.dtype_bytes != ADAPTER_DTYPE_BYTES else 0)
        return per_value * sum(r * sum(shapes.modules[m]) for m, r in ranks.items() if r > 0)
    return shapes.dtype_bytes * sum(shapes.modules[m][0] * shapes.modules[m][1] for m, r in ranks.items() if r > 0)


def adapter_bytes(shapes: ModelShapes, ranks: Mapping[str, int], copies: int = ADAPTER_COPIES) -> int:
    """copies x sum_m r_m (d_in + d_out) x 4 (fp32, whatever the base's dtype)."""
    return copies * ADAPTER_DTYPE_BYTES * sum(r * sum(shapes.modules[m]) for m, r in ranks.items() if r > 0)


@dataclass(frozen=True)
class MemoryBreakdown:
    """The named terms of the predicted peak."""

    frozen_bytes: int
    adapter_bytes: int
    activation_bytes: int  # saved for backward, as the CPU meter sees it
    unmetered_bytes: int = 0  # int8's kept linear inputs, checkpointing's recompute (module docstring)

    @property
    def metered_bytes(self) -> int:
        """What the device meter's CPU tensor account measures."""
        return self.frozen_bytes + self.adapter_bytes + self.activation_bytes

    @property
    def peak_bytes(self) -> int:
        return self.metered_bytes + self.unmetered_bytes


def memory_breakdown(
    shapes: ModelShapes,
    split_layer: int,
    ranks: Mapping[str, int],
    batch_size: int,
    seq_len: int,
    labels_on_device: bool = False,
    checkpointing: bool = False,
    warm: WarmFrozen | None = None,
    labelled: int | None = None,
) -> MemoryBreakdown:
    """Predicted peak of a `split` device, by term (see the module docstring for the formula);
    `warm`: noise-free's warm start, whose per-module copies or factors count with the adapters;
    `labelled`: the positions a step's loss counts (None: all B T, an upper bound; `head_saved_bytes`)."""
    if not 0 <= split_layer <= shapes.num_blocks:
        raise ValueError(f"split_layer {split_layer} is out of range 0..{shapes.num_blocks}")
    saved = blocks_saved(shapes, roles_per_block(shapes, split_layer, ranks), batch_size, seq_len)
    activations, unmetered = activation_terms(shapes, saved, seq_len, checkpointing)
    if labels_on_device:
        activations += head_saved_bytes(shapes, batch_size, seq_len, labelled)
    adapters = adapter_bytes(shapes, ranks) + warm_bytes(shapes, ranks, warm)
    return MemoryBreakdown(frozen_bytes(shapes, split_layer, labels_on_device), adapters, activations, unmetered)


def predict_peak_bytes(
    shapes: ModelShapes,
    split_layer: int,
    ranks: Mapping[str, int],
    batch_size: int,
    seq_len: int,
    labels_on_device: bool = False,
    checkpointing: bool = False,
    warm: WarmFrozen | None = None,
    labelled: int | None = None,
) -> int:
    """Predicted peak memory of a `split` device: frozen + adapters + activations + unmetered (module docstring)."""
    return memory_breakdown(shapes, split_layer, ranks, batch_size, seq_len, labels_on_device, checkpointing,
                            warm, labelled).peak_bytes


def flops_per_step(
    shapes: ModelShapes,
    split_layer: int,
    ranks: Mapping[str, int],
    batch_size: int,
    seq_len: int,
    labels_on_device: bool = False,
    checkpointing: bool = False,
    labelled: int | None = None,
    warm: WarmFrozen | None = None,
) -> float:
    """Estimated device FLOPs of one training step (forward + backward), N = B T:

        forward  = sum_blocks [2 N sum_lin d_in d_out + 4 N T d_q] + sum_m 2 N r_m (d_in + d_out)
        backward = sum_live_blocks [2 N sum_lin d_in d_out + 10 N T d_q] + sum_m 4 N r_m (d_in + d_out)
                   (+ the forward of every live block again, with gradient checkpointing)
        warm     = sum_m 4 N r_m (d_in + d_out) under a `low_rank` warm start: W x - s B0 (A0 x),
                   forward and its input gradient (a `copy` costs no FLOPs)
        head     = 4 n d V (forward + input gradient), with the labels on the device, on the n
                   labelled positions (`labelled`; None: all N, an upper bound)

    Attention is counted as full T x T products, as torch's FlopCounterMode counts sdpa; frozen
    linears need only their input gradient, and only where something upstream is adapted.
    """
    n, t = batch_size * seq_len, seq_len
    attention_width = shapes.qkv_dims[0]
    per_block = roles_per_block(shapes, split_layer, ranks)
    total, live = 0.0, False
    for j, roles in enumerate(per_block):
        forward = 2 * n * shapes.block_linear_macs[j] + 4 * n * t * attention_width
        forward += sum(2 * n * r * sum(shapes.modules[m]) for m, r in ranks.items() if r > 0 and shapes.module_block[m] == j)
        total += forward
        live_out = block_saved(shapes, roles, live, batch_size, seq_len).live_out
        if live or roles:
            total += 2 * n * shapes.block_linear_macs[j] + 10 * n * t * attention_width + (forward if checkpointing else 0)
        live = live_out
    branches = sum(4 * n * r * sum(shapes.modules[m]) for m, r in ranks.items() if r > 0)
    total += 2 * branches if warm == "low_rank" else branches  # the correction: as many again
    if labels_on_device:
        total += 4 * (n if labelled is None else labelled) * shapes.hidden_size * shapes.vocab_size
    return float(total)


def server_flops_per_step(
    shapes: ModelShapes,
    split_layer: int,
    server_rank: int,
    batch_size: int,
    seq_len: int,
    labels_on_device: bool = False,
    labelled: int | None = None,
) -> float:
    """Estimated server FLOPs of one device's training step at split k, N = B T: every server
    block [k, L) forward and backward with a rank-`server_rank` adapter on each candidate module
    (the server session's adapters), and the head and loss when the labels are on the server:

        sum_{j >= k} [4 N sum_lin d_in d_out + 14 N T d_q] + sum_{m in j >= k} 6 N r (d_in + d_out)
        + 4 n d V (plain split only; n labelled positions, `labelled`, None: all N)

    Every server block is live in backward (its input gradient goes down to the device).
    """
    n, t = batch_size * seq_len, seq_len
    attention_width = shapes.qkv_dims[0]
    total = 0.0
    for j in range(split_layer, shapes.num_blocks):
        total += 4 * n * shapes.block_linear_macs[j] + 14 * n * t * attention_width
    if server_rank > 0:
        total += sum(6 * n * server_rank * sum(dims) for m, dims in shapes.modules.items()
                     if shapes.module_block[m] >= split_layer)
    if not labels_on_device:
        total += 4 * (n if labelled is None else labelled) * shapes.hidden_size * shapes.vocab_size
    return float(total)


def split_bytes_per_step(shapes: ModelShapes, batch_size: int, seq_len: int, labels_on_device: bool = False,
                         gradient_bytes: int | None = None) -> int:
    """Tensor bytes crossing the link per step (headers aside): the cut activations up (runtime
    dtype) and their gradient down, plus int32 labels up, or (labels on device) the final hidden
    states down and their gradient up. Gradients travel in the runtime dtype (`gradient_bytes`
    per value, default the dtype's), except under fp16, where each side sends them unscaled in
    fp32 (parties/party.py): pass gradient_bytes=4 for an fp16 run."""
    values = batch_size * seq_len * shapes.hidden_size
    activation = values * shapes.dtype_bytes
    gradient = values * (shapes.dtype_bytes if gradient_bytes is None else gradient_bytes)
    return 2 * (activation + gradient) if labels_on_device else activation + gradient + 4 * batch_size * seq_len

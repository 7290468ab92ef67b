"""Config against the loaded model and this machine (federation/preflight.py): what `validate`
cannot know before the model is loaded is refused in one line naming the key, before training.

Issue 12, finding 10: lora.rank beyond the model's widths and plans larger than the machine's
memory ran until the kernel killed them; a frame limit too small for one step dropped every device.
"""

import pytest
import torch
from conftest import tiny_config

from splitpeft.config import ConfigError
from splitpeft.federation.preflight import (
    check_against_model,
    check_held_out,
    check_memory,
    predicted_peak_bytes,
    step_frame_bytes,
)
from splitpeft.hsplit.memory import ModelShapes, adapter_bytes
from splitpeft.model.loading import load_model
from splitpeft.placements.registry import placement_of
from splitpeft.transport.messages import Kind, Message, encode


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name).model for name in ("tiny-llama", "tiny-gpt2")}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("placement", ["placement.placement=split", "placement.labels_on_device=true",
                                       "placement.placement=dlora", "placement.placement=centralized"])
def test_the_tiny_preset_passes(models, model, placement):
    config = tiny_config(model, placement)
    check_against_model(config, models[model], placement_of(config))


@pytest.mark.parametrize("model,overrides,message", [
    ("tiny-llama", ["lora.rank=17"], "lora.rank 17 exceeds min(d_in, d_out) = 16 of model.layers.0.self_attn.k_proj (32 -> 16)"),
    ("tiny-llama", ["placement.split_layer=9"], "placement.split_layer 9 is out of range: tiny-llama has 4 blocks (0..4)"),
    ("tiny-llama", ["hsplit.planner=armsc", "fleet.memory_range=[1000000,9000000]", "hsplit.rank_set=[0,4,64]"],
     "hsplit.rank_set [64]: above min(d_in, d_out) of every adapted module (at most 32)"),
    ("tiny-llama", ["transport.max_message_bytes=65536"],
     "transport.max_message_bytes 65536 is too small for one step's activations (150016 bytes at federation.batch_size 4 x data.max_length 160)"),
    ("tiny-gpt2", ["data.max_length=300"], "data.max_length 300 exceeds the 256 positions of tiny-gpt2"),
    ("tiny-gpt2", ["eval.max_new_tokens=256"], "eval.max_new_tokens 256 leaves no room for a prompt in the 256 positions of tiny-gpt2"),
    ("tiny-llama", ["eval.max_new_tokens=300"], "eval.max_new_tokens 300 leaves no room for a prompt in the 256 positions of tiny-llama"),
    ("tiny-llama", ["federation.batch_size=65536", "data.max_length=131072"], "more than the"),
])
def test_a_config_that_does_not_fit_the_model_or_machine_is_one_line_naming_the_key(models, model, overrides, message):
    config = tiny_config(model, *overrides)
    with pytest.raises(ConfigError) as raised:
        check_against_model(config, models[model], placement_of(config))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_memory_check_refuses_exactly_past_the_prediction(models):
    config = tiny_config("tiny-llama")
    shapes = ModelShapes.from_config(models["tiny-llama"].config)
    placement = placement_of(config)
    peak = predicted_peak_bytes(config, shapes, placement)
    check_memory(config, shapes, peak, placement)
    with pytest.raises(ConfigError, match=r"the run needs about .* GiB .* federation.batch_size 4"):
        check_memory(config, shapes, peak - 1, placement)
    # one more device adds its adapters, their gradients and AdamW moments (4 fp32 copies)
    more = tiny_config("tiny-llama", "federation.num_devices=4")
    assert predicted_peak_bytes(more, shapes, placement_of(more)) - peak == adapter_bytes(shapes, dict.fromkeys(shapes.modules, 4))


def test_the_step_frame_is_the_cut_activations_and_labels(models):
    """(B, T, d) fp32 + int32 labels (+ header room): the size `encode` gives for them."""
    config = tiny_config("tiny-llama", "federation.batch_size=2", "data.max_length=16")
    shapes = ModelShapes.from_config(models["tiny-llama"].config)
    frame = encode(Message(Kind.ACTIVATIONS, {"hidden": torch.zeros(2, 16, 32), "labels": torch.zeros(2, 16, dtype=torch.int32)}))
    assert len(frame) <= step_frame_bytes(config, shapes, placement_of(config)) <= len(frame) + 64 * 1024


def test_simulate_checks_the_config_against_the_model_before_training(capsys):
    from splitpeft.cli import main

    assert main(["simulate", "--preset", "tiny", "--out", "/tmp/never-written-run", "lora.rank=33"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.rank 33 exceeds" in err[0]
    from pathlib import Path
    assert not Path("/tmp/never-written-run").exists()


def test_the_simulation_server_enforces_the_runs_step_limits():
    from conftest import tiny_config

    from splitpeft.federation.simulation import Simulation
    from splitpeft.parties.server import StepLimits

    config = tiny_config("tiny-llama")
    assert Simulation(config).server.limits == StepLimits.from_config(config)


def test_the_held_out_set_is_checked_against_the_context(models, caplog):
    """Issue 21 finding 4: a held-out prompt longer than the model's context trained the whole run
    and then crashed its evaluation. Generation now keeps the end of such a prompt, so the preflight
    warns with the counts instead of refusing, and a learned position table no longer needs room for
    data.max_length + eval.max_new_tokens (only for the new tokens and one prompt token)."""
    from splitpeft.data.batching import encode
    from splitpeft.data.examples import Example

    config = tiny_config("tiny-gpt2", "data.max_length=250", "eval.max_new_tokens=40", "eval.groups=3")
    check_against_model(config, models["tiny-gpt2"], placement_of(config))  # was refused: 250 + 40 > 256
    tokenizer = load_model("tiny-gpt2").tokenizer
    long_mr = "name : Aromi | " * 400  # about 3 KB, well past 256 tokens
    held_out = [Example(f"Meaning representation: {long_mr}{i}\nDescription:", " Aromi.", f"long-{i}") for i in range(2)]
    held_out += [Example("Meaning representation: name : Zizzi\nDescription:", " Zizzi.", "short"),
                 Example(f"Meaning representation: {long_mr}late\nDescription:", " Aromi.", "beyond eval.groups")]
    encoded = encode(held_out, tokenizer, config.data.max_length)
    with caplog.at_level("WARNING", logger="splitpeft.federation.preflight"):
        counts = check_held_out(config, models["tiny-gpt2"], tokenizer, held_out, encoded)
    assert counts == {"prompts_truncated": 2}  # perplexity's sequences are within data.max_length 250 < 256
    assert ("2 of the 3 held-out prompts generation uses are longer than the 216 tokens the context of tiny-gpt2 "
            "leaves them (256 positions less eval.max_new_tokens 40)") in caplog.text
    # a rotary model whose data.max_length exceeds its context: perplexity keeps the last positions
    llama = tiny_config("tiny-llama", "data.max_length=300", "eval.generation=false")
    long_encoded = encode(held_out, tokenizer, llama.data.max_length)
    counts = check_held_out(llama, models["tiny-llama"], tokenizer, held_out, long_encoded)
    assert counts == {"perplexity_truncated": 3}

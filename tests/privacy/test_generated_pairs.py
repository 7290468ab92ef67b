"""The attackers' own training text (issue 24, item 3): completions the server samples from the
model it knows, a plain-text corpus named by the user, the learned inverter trained until its
validation accuracy flattens, and noise augmentation at the run's own sigma."""

from __future__ import annotations

import torch
from conftest import tiny_config
from test_attackers import LEARNED, private_score, traffic

from splitpeft.data.batching import encode
from splitpeft.data.builtin import builtin_examples
from splitpeft.data.sources import load_examples
from splitpeft.defences.cut import Defence
from splitpeft.model.loading import load_model
from splitpeft.privacy.attackers import make_attacker
from splitpeft.privacy.audit import auxiliary_examples
from splitpeft.privacy.corpus import sampled_completions
from splitpeft.privacy.meter import Exposure, MeterSettings, measure


def test_sampled_completions_are_seeded_keep_their_prompts_and_leave_the_callers_random_state():
    loaded = load_model("tiny-llama", seed=0)
    prompts = builtin_examples(seed=0)[:3]
    outside = torch.random.get_rng_state()
    first = sampled_completions(loaded.model, loaded.tokenizer, prompts, 4, max_new_tokens=12, seed=5)
    assert torch.equal(torch.random.get_rng_state(), outside)
    assert first == sampled_completions(loaded.model, loaded.tokenizer, prompts, 4, max_new_tokens=12, seed=5)
    assert first != sampled_completions(loaded.model, loaded.tokenizer, prompts, 4, max_new_tokens=12, seed=6)
    assert 0 < len(first) <= 12
    assert {e.prompt for e in first} <= {p.prompt for p in prompts}
    # several draws per prompt differ: sampling, not greedy decoding
    per_prompt = [e.completion for e in first if e.prompt == prompts[0].prompt]
    assert len(set(per_prompt)) > 1


def test_aux_generate_adds_the_models_samples_to_the_attackers_text(tmp_path):
    corpus = tmp_path / "public.txt"
    corpus.write_text("The cat sat on the mat.\n\nA public line of text.\nAnother one here.\n")
    examples = load_examples("text", str(corpus))
    assert [e.completion for e in examples] == ["The cat sat on the mat.", "A public line of text.", "Another one here."]
    assert all(e.prompt == "" for e in examples)
    config = tiny_config("tiny-llama", "privacy.aux_source=text", f"privacy.aux_path={corpus}", "privacy.aux_generate=2")
    loaded = load_model("tiny-llama", seed=0)
    plain = auxiliary_examples(config, loaded.tokenizer, [])
    assert len(plain) == 3  # nothing to sample from: the text alone
    grown = auxiliary_examples(config, loaded.tokenizer, [], sample_from=loaded.model)
    assert grown[:3] == plain and 3 < len(grown) <= 9


def test_the_learned_inverter_stops_where_its_validation_accuracy_flattens_and_keeps_its_best():
    seen = traffic("tiny-llama", 2)
    attacker = make_attacker("learned", seen.knowledge, seed=0, steps=2000, width=32, batch_size=8, patience=2,
                             eval_every=20)
    attacker.fit(seen.aux)
    report = attacker.fit_report()
    curve = report["validation_curve"]
    print(report)
    assert report["stopped_at"] < 2000 and report["stopped_at"] == curve[-1][0]
    accuracies = [a for _, a in curve]
    best = max(accuracies)
    assert all(a < best + 0.005 for a in accuracies[-2:])  # the last two checks gained too little
    accuracy = private_score(seen, [attacker.reconstruct(batch) for batch, _ in seen.private]).token_accuracy
    assert accuracy > seen.chance + 0.4


def test_noise_augmentation_draws_fresh_noise_every_step():
    """Fitted on the clean states with noise_std, the inverter trains on new draws each step: a
    different model than one fitted on one fixed noisy copy, and still far above chance when the
    noise is moderate."""
    seen = traffic("tiny-llama", 2)
    rms = float(torch.cat([b.hidden[b.mask] for b, _ in seen.aux]).pow(2).mean().sqrt())
    augmented = make_attacker("learned", seen.knowledge, seed=0, noise_std=0.3 * rms, **LEARNED)
    augmented.fit(seen.aux)
    plain = make_attacker("learned", seen.knowledge, seed=0, **LEARNED)
    plain.fit(seen.aux)
    assert augmented.fit_report()["noise_augmented"] and not plain.fit_report()["noise_augmented"]
    assert augmented.losses != plain.losses
    guesses = [augmented.reconstruct(batch) for batch, _ in seen.private]
    assert private_score(seen, guesses).token_accuracy > seen.chance + 0.3


def test_the_meter_augments_the_learned_inverter_with_the_defences_noise_unless_the_wire_compresses():
    loaded = load_model("tiny-llama", seed=0)
    examples = encode(builtin_examples(seed=0), loaded.tokenizer, 48)
    noisy = Defence(noise_multiplier=0.5, clip_norm=1.0)
    exposure = Exposure("split", 1, labels=True, head_gradient=False)

    def learned_fit(compression: str) -> dict:
        settings = MeterSettings(attackers=("learned",), learned_steps=10, learned_patience=1, batch_size=8,
                                 defence=noisy, compression=compression)
        table = measure(loaded.model, examples[:24], [(exposure, examples[40:44])], settings,
                        pad_id=int(loaded.tokenizer.pad_token_id))
        return next(r for r in table["rows"] if r["attacker"] == "learned")["fit"]

    assert learned_fit("none")["noise_augmented"]
    assert not learned_fit("bf16")["noise_augmented"]

"""The privacy meter: it attacks what really crosses the wire, every attacker beats chance on
undefended traffic, its numbers are reproducible, strong noise brings it to chance, and the
planner's privacy floor uses its table."""

import json

import pytest
import torch
from conftest import tiny_config

from splitpeft.cli import main
from splitpeft.data.batching import encode
from splitpeft.data.builtin import builtin_examples
from splitpeft.defences.cut import Defence
from splitpeft.federation.simulation import Simulation
from splitpeft.hsplit.armsc import PlanError
from splitpeft.hsplit.planning import leakage_at
from splitpeft.model.loading import load_model
from splitpeft.privacy.meter import Exposure, MeterSettings, capture_batch, exposure_of, measure
from splitpeft.transport.compression import decompress
from splitpeft.transport.messages import Kind, decode

FAST = ["placement.labels_on_device=true", "privacy.learned_steps=40", "privacy.aux_examples=48", "privacy.audit_examples=12", "data.max_length=64"]


@pytest.mark.parametrize("overrides,kind,name", [
    (["placement.labels_on_device=false", "placement.split_layer=2"], Kind.ACTIVATIONS, "hidden"),
    (["placement.split_layer=1", "placement.labels_on_device=true", "transport.compression=int8"], Kind.HEAD_GRADIENT, "grad"),
    (["placement.placement=dlora", "placement.dlora_device_blocks=1", "transport.compression=bf16"], Kind.ACTIVATIONS, "hidden"),
])
def test_the_meter_sees_exactly_what_the_device_sends(overrides, kind, name):
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "federation.local_steps=1", *overrides))
    frames, batches = [], []
    sim.channels["device-0"].tap = lambda _d, direction, frame: frames.append((direction, decompress(decode(frame))))
    device = sim.devices[0]
    original = device.data.next
    device.data.next = lambda: batches.append(original()) or batches[-1]
    model = sim.global_model()  # before training: the adapters the device starts the round with
    sim.run_round()
    sent = next(m for d, m in frames if d == "up" and m.kind == kind).tensors[name]
    config = sim.config
    exposure = exposure_of(sim.placement, device.split_layer)
    seen = capture_batch(model, batches[0], exposure, Defence(), compression=config.transport.compression)
    observed = seen.hidden if name == "hidden" else seen.head_grad
    torch.testing.assert_close(observed, sent.float(), rtol=1e-5, atol=1e-6)
    if exposure.labels:
        assert torch.equal(seen.labels, batches[0].labels)


@pytest.fixture(scope="module")
def tiny_data():
    loaded = load_model("tiny-llama", seed=0)
    examples = encode(builtin_examples(seed=0), loaded.tokenizer, 64)
    return loaded, examples[:64], examples[100:116]


def _measure(loaded, aux, private, exposures, **settings):
    options = {"learned_steps": 40, "batch_size": 8, "seed": 3, **settings}
    return measure(loaded.model, aux, [(e, private) for e in exposures], MeterSettings(**options),
                   pad_id=int(loaded.tokenizer.pad_token_id))


def test_every_attacker_beats_chance_on_undefended_traffic_and_repeats_with_its_seed(tiny_data):
    loaded, aux, private = tiny_data
    exposures = [Exposure("split", 2, labels=True, head_gradient=False),
                 Exposure("split_u", 2, labels=False, head_gradient=True),
                 Exposure("dlora", 0, labels=False, head_gradient=True)]
    first = _measure(loaded, aux, private, exposures)
    chance = first["chance_token_accuracy"]
    attackers = {row["attacker"] for row in first["rows"]}
    assert attackers == {"embedding_nn", "linear", "learned", "labels", "gradient"}
    for row in first["rows"]:
        if row["attacker"] == "embedding_nn" and row["split_layer"] > 0:
            continue  # meant for k = 0 (dlora's raw embeddings)
        assert row["token_accuracy"] > chance + 0.1, row
    dlora = next(r for r in first["leakage"] if r["placement"] == "dlora")
    assert dlora["token_accuracy"] > 0.99  # raw embeddings map back to every token
    assert _measure(loaded, aux, private, exposures) == first


def test_the_meter_runs_the_known_weights_search_on_request_and_counts_it_in_the_leakage(tiny_data):
    """privacy.attackers with search: it runs the device's own k blocks (the model the meter
    audits, with its adapters) and, being exact here, is the leakage's strongest attacker."""
    loaded, aux, private = tiny_data
    exposure = Exposure("split_u", 3, labels=False, head_gradient=True)
    table = _measure(loaded, aux[:16], private[:4], [exposure], attackers=("linear", "search", "bisr"),
                     search_candidates=8, search_lm_candidates=4, bisr_steps=60, bisr_lr=0.05)
    rows = {row["attacker"]: row["token_accuracy"] for row in table["rows"]}
    assert rows["search"] == 1.0 and rows["search"] >= rows["linear"]
    assert rows["bisr"] > table["chance_token_accuracy"] + 0.5  # the optimisation attacker runs there too
    assert table["leakage"][0]["token_accuracy"] == 1.0
    assert table["leakage"][0]["strongest_activation_attacker"] in ("search", "linear")


def test_strong_noise_brings_every_attacker_near_chance(tiny_data):
    loaded, aux, private = tiny_data
    noisy = Defence(noise_multiplier=200.0, clip_norm=1.0, gradient_clip_norm=1e-3)
    table = _measure(loaded, aux, private, [Exposure("split_u", 1, labels=False, head_gradient=True)], defence=noisy)
    chance = table["chance_token_accuracy"]
    for row in table["rows"]:
        assert row["token_accuracy"] <= chance + 0.06, row
    assert table["leakage"][0]["token_accuracy"] <= chance + 0.06


def test_a_run_with_the_audit_reports_each_devices_leakage(tmp_path):
    out = tmp_path / "run"
    code = main(["simulate", "--preset", "tiny", "--out", str(out), "--no-progress", "privacy.audit=true",
                 "eval.generation=false", "eval.baseline=false", "federation.rounds=1", *FAST])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    privacy = report["privacy"]
    assert set(privacy["devices"].values()) == {"split_u@2"}
    assert privacy["leakage"][0]["token_accuracy"] > privacy["chance_token_accuracy"]
    assert privacy["accounting"] is None  # no noise, no (epsilon, delta)
    assert (out / "leakage.png").stat().st_size > 0


def test_every_run_reports_a_cheap_privacy_estimate_beside_perplexity(tmp_path, capsys):
    """privacy.estimate (on by default): without the audit, the report still says how much of each
    exposure's text the linear map and the side channels recover, and the summary prints it."""
    out = tmp_path / "run"
    code = main(["simulate", "--preset", "tiny", "--out", str(out), "--no-progress", "eval.generation=false",
                 "eval.baseline=false", "federation.rounds=1", "data.max_length=64"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert "privacy" not in report
    estimate = report["privacy_estimate"]
    assert {row["attacker"] for row in estimate["rows"]} <= {"linear", "labels", "gradient"}
    assert set(estimate["devices"].values()) == {"split@2"}  # the tiny preset: plain split at block 2
    assert estimate["leakage"][0]["token_accuracy"] > estimate["chance_token_accuracy"]
    assert "an estimate" in estimate["note"]
    assert "privacy (estimate" in capsys.readouterr().out
    off = tmp_path / "off"
    assert main(["simulate", "--preset", "tiny", "--out", str(off), "--no-progress", "eval.generation=false",
                 "eval.baseline=false", "federation.rounds=1", "privacy.estimate=false"]) == 0
    assert "privacy_estimate" not in json.loads((off / "report.json").read_text())


def test_the_privacy_command_writes_a_table_the_planner_can_use(tmp_path):
    out = tmp_path / "table"
    args = ["privacy", "--preset", "tiny", "--depths", "0,1,3", "--out", str(out), *FAST]
    assert main(args) == 0
    table = json.loads((out / "privacy.json").read_text())
    assert {(r["placement"], r["split_layer"]) for r in table["leakage"]} == {
        ("dlora", 0), *((p, k) for p in ("split", "split_u") for k in (0, 1, 3))}
    assert (out / "leakage.png").is_file() and "| split_u | 3 |" in (out / "privacy.md").read_text()
    assert main(args) == 2  # an existing folder is not replaced without --overwrite
    assert leakage_at(table, "split_u", 2) == leakage_at(table, "split_u", 1)  # unmeasured: the shallower one


def _table(tmp_path, values):
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps({"leakage": [{"placement": "split_u", "split_layer": k, "token_accuracy": v}
                                            for k, v in values.items()]}))
    return str(path)


HSPLIT = ["placement.labels_on_device=true", "hsplit.planner=armsc", "federation.aggregator=noise_free", "hsplit.max_split=3", "federation.num_devices=3"]


def test_the_planner_keeps_every_device_within_the_leakage_ceiling(tmp_path):
    table = _table(tmp_path, {0: 1.0, 1: 0.9, 2: 0.7, 3: 0.4})
    sim = Simulation(tiny_config("tiny-llama", *HSPLIT, "fleet.memory_bytes=[4000000,4000000,4000000]",
                                 "hsplit.max_split=3", "hsplit.min_split=2"))  # the optimiser goes shallow: the floor binds
    assert {d.split_layer for d in sim.devices} == {2}
    sim = Simulation(tiny_config("tiny-llama", *HSPLIT, "fleet.memory_bytes=[4000000,4000000,4000000]",
                                 f"hsplit.leakage_table={table}", "hsplit.max_leakage=0.5"))
    assert {d.split_layer for d in sim.devices} == {3}
    assert {row["expected_leakage"] for row in sim.info()["plans"]} == {0.4}
    with pytest.raises(PlanError, match="privacy floor"):
        Simulation(tiny_config("tiny-llama", *HSPLIT, "fleet.memory_bytes=[700000,4000000,4000000]",
                               f"hsplit.leakage_table={table}", "hsplit.max_leakage=0.5"))


def test_a_fixed_split_below_the_floor_is_refused(tmp_path):
    table = _table(tmp_path, {0: 1.0, 2: 0.8})
    with pytest.raises(PlanError, match="below the privacy floor"):
        Simulation(tiny_config("tiny-llama", "placement.split_layer=2", "placement.labels_on_device=true", f"hsplit.leakage_table={table}",
                               "hsplit.max_leakage=0.5"))


def test_an_activation_attacker_reconstructs_each_depth_once_without_noise(tiny_data, monkeypatch):
    """Plain and U-shaped split at one depth show the same states: without noise the meter reuses
    the reconstruction (the search's minutes are spent once per depth); under noise each
    exposure's own draw is attacked."""
    from splitpeft.privacy.attackers import LinearInverter

    loaded, aux, private = tiny_data
    calls = []
    original = LinearInverter.reconstruct
    monkeypatch.setattr(LinearInverter, "reconstruct", lambda self, batch: calls.append(1) or original(self, batch))
    exposures = [Exposure("split", 2, labels=True, head_gradient=False),
                 Exposure("split_u", 2, labels=False, head_gradient=True)]
    table = _measure(loaded, aux, private, exposures, attackers=("linear",))
    batches = -(-len(private) // 8)
    assert len(calls) == batches
    assert table["rows"][0]["token_accuracy"] == table["rows"][1]["token_accuracy"]
    calls.clear()
    _measure(loaded, aux, private, exposures, attackers=("linear",),
             defence=Defence(noise_multiplier=0.01, clip_norm=10.0, gradient_clip_norm=1e-3))
    assert len(calls) == 2 * batches


def test_the_leakage_is_the_strongest_combination_not_the_strongest_attacker_alones():
    """An activation attacker weaker alone can combine better with the side channel: its errors sit
    where the head gradient is exact. The leakage takes the best combination."""
    from splitpeft.privacy.meter import _combined

    truth = [torch.tensor([[1, 2, 3, 4]])]
    mask = [torch.ones(1, 4, dtype=torch.bool)]
    guesses = {"linear": [torch.tensor([[1, 2, 9, 9]])],   # 0.5 alone, right on the prompt
               "search": [torch.tensor([[1, 9, 3, 4]])],   # 0.75 alone
               "gradient": [torch.tensor([[-1, -1, 3, 4]])]}  # the completion, exactly
    row = _combined(Exposure("split_u", 4, labels=False, head_gradient=True), guesses, truth, mask)
    assert row["token_accuracy"] == 1.0
    assert row["attackers"] == ["linear", "gradient"] and row["strongest_activation_attacker"] == "search"


def test_the_server_attacks_with_the_model_it_knows_not_the_devices(tiny_data):
    """`server_model`: the devices' traffic comes from `model`, the server's own traffic (what its
    attackers train on) and its knowledge from `server_model`. A server that knows another
    function than the devices' (here another random model of the same shapes) learns a map that
    does not fit their traffic."""
    loaded, aux, private = tiny_data
    exposure = Exposure("split", 2, labels=False, head_gradient=False)
    options = MeterSettings(attackers=("linear",), learned_steps=40, batch_size=8, seed=3)
    pad_id = int(loaded.tokenizer.pad_token_id)
    knows = measure(loaded.model, aux, [(exposure, private)], options, pad_id=pad_id)
    stranger = load_model("tiny-llama", seed=1).model
    unknown = measure(loaded.model, aux, [(exposure, private)], options, pad_id=pad_id, server_model=stranger)
    accuracy = {name: table["rows"][0]["token_accuracy"] for name, table in (("knows", knows), ("unknown", unknown))}
    assert accuracy["knows"] > accuracy["unknown"] + 0.2, accuracy
    same = measure(loaded.model, aux, [(exposure, private)], options, pad_id=pad_id, server_model=loaded.model)
    assert same == knows  # the default is the server knowing the devices' model

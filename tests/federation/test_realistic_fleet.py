"""Issue 23 item 4: fleets whose devices come and go, differ in speed, and miss deadlines."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.fleet import draw, read_trace
from splitpeft.federation.simulation import STRAGGLER, RoundError, Simulation

FAST = ["federation.local_steps=1", "federation.rounds=2", "data.max_length=48"]


def test_devices_are_online_with_their_probability_and_only_online_ones_train():
    sim = Simulation(tiny_config("tiny-llama", *FAST, "federation.num_devices=12", "fleet.availability=0.5"))
    rounds = [sim.run_round() for _ in range(2)]
    again = Simulation(tiny_config("tiny-llama", *FAST, "federation.num_devices=12", "fleet.availability=0.5"))
    for record in rounds:
        assert 0 < record.online < 12 and len(record.selected) == record.online  # all online devices train
        assert sorted(record.completed) == sorted(record.selected)
    assert rounds[0].selected != rounds[1].selected  # drawn afresh each round
    same = [[d.device_id for d in again.selected_devices(r)] for r in range(2)]
    assert same == [r.selected for r in rounds]  # seeded: a resumed or distributed run draws the same


def test_a_device_past_the_round_deadline_is_dropped_as_a_straggler_and_its_update_discarded():
    """Compute spread 100x (lognormal); the deadline falls between the fastest and the slowest."""
    common = [*FAST, "federation.num_devices=8", "fleet.compute_distribution=lognormal:1e9:1.5",
              "fleet.bandwidth_bytes_per_s=1e9"]
    probe = Simulation(tiny_config("tiny-llama", *common, "federation.rounds=1"))
    first = probe.run_round()
    took = sorted((s.simulated_s or 0) + (s.simulated_server_s or 0) for s in first.devices.values())
    deadline = (took[3] + took[4]) / 2
    sim = Simulation(tiny_config("tiny-llama", *common, f"federation.round_deadline_s={deadline}"))
    record = sim.run_round()
    late = {e["device"] for e in record.dropped if e["error"].startswith(STRAGGLER)}
    assert len(late) == 4 and sorted(record.completed) == sorted(set(record.selected) - late)
    for device_id, stats in record.devices.items():
        assert ((stats.simulated_s + stats.simulated_server_s) > deadline) == (device_id in late)
    assert record.simulated_round_s == pytest.approx(deadline)  # the server waited until the deadline
    # Only the in-time devices (and their server sessions) reached the aggregate: the same round
    # with the late devices failing mid-round gives the same global adapters.
    failing = Simulation(tiny_config("tiny-llama", *common))
    for device in failing.devices:
        if device.device_id in late:
            def lost(*args, **kwargs):
                raise ConnectionError("gone")
            device.local_phase = lost
    failing.run_round()
    for name, weights in sim.state.global_adapters.items():
        other = failing.state.global_adapters[name]
        assert torch.equal(weights.A, other.A) and torch.equal(weights.B, other.B), name


def test_over_selection_keeps_the_devices_that_finish_first():
    sim = Simulation(tiny_config("tiny-llama", *FAST, "federation.num_devices=10", "federation.devices_per_round=4",
                                 "federation.over_select=1.5", "fleet.compute_distribution=uniform:1e8:1e10"))
    record = sim.run_round()
    assert len(record.selected) == 6 and len(record.completed) == 4
    over = [e for e in record.dropped if e["error"].startswith("over-selected")]
    assert len(over) == 2
    took = {d: s.simulated_s + s.simulated_server_s for d, s in record.devices.items()}
    assert max(took[d] for d in record.completed) <= min(took[e["device"]] for e in over)


def test_a_trace_gives_each_device_its_compute_memory_links_and_availability(tmp_path):
    trace = tmp_path / "fleet.csv"
    trace.write_text("device,flops_per_s,memory_bytes,up_bytes_per_s,down_bytes_per_s,availability\n"
                     "a,1e9,4e9,1e6,1e7,1.0\nb,2e9,8e9,2e6,2e7,0.0\nc,3e9,2e9,3e6,3e7,1.0\n")
    sim = Simulation(tiny_config("tiny-llama", *FAST, "federation.num_devices=5", f"fleet.trace={trace}"))
    profiles = sim.profiles
    assert [p.flops_per_s for p in profiles] == [1e9, 2e9, 3e9, 1e9, 2e9]  # rows reused in turn
    assert [p.up_bytes_per_s for p in profiles][:3] == [1e6, 2e6, 3e6] and profiles[2].bandwidth_bytes_per_s == 3e7
    record = sim.run_round()
    assert record.selected == ["device-0", "device-2", "device-3"]  # the devices of row b are never online
    stats = record.devices["device-0"]
    expected = stats.flops / 1e9 + stats.bytes_up / 1e6 + stats.bytes_down / 1e7
    assert stats.simulated_s == pytest.approx(expected)


@pytest.mark.parametrize("text, problem", [
    ("flops_per_s,memory_bytes\n1,2\n", "missing columns ['up_bytes_per_s', 'down_bytes_per_s', 'availability']"),
    ("flops_per_s,memory_bytes,up_bytes_per_s,down_bytes_per_s,availability\n1e9,1e9,1e6,1e6,1.5\n",
     "line 2: availability 1.5 must be in [0, 1]"),
    ("flops_per_s,memory_bytes,up_bytes_per_s,down_bytes_per_s,availability\n1e9,lots,1e6,1e6,1\n",
     "line 2: memory_bytes 'lots' is not a number"),
    ("flops_per_s,memory_bytes,up_bytes_per_s,down_bytes_per_s,availability\n1e9,1e9,nan,1e6,1\n",
     "line 2: up_bytes_per_s nan must be a finite number > 0"),
    ("flops_per_s,memory_bytes,up_bytes_per_s,down_bytes_per_s,availability\n", "no devices in it"),
])
def test_a_bad_trace_is_refused_naming_line_and_column(tmp_path, text, problem):
    trace = tmp_path / "fleet.csv"
    trace.write_text(text)
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        read_trace(str(trace))
    with pytest.raises(ValueError, match="no such file"):
        read_trace(str(tmp_path / "absent.csv"))


def test_named_distributions_draw_what_they_say():
    generator = np.random.default_rng(0)
    values = draw("lognormal:1e9:0.5", 4000, generator)
    assert np.median(values) == pytest.approx(1e9, rel=0.05) and np.std(np.log(values)) == pytest.approx(0.5, rel=0.05)
    uniform = draw("uniform:2:3", 1000, generator)
    assert min(uniform) >= 2 and max(uniform) <= 3
    for bad, problem in [("normal:1:2", "unknown distribution"), ("lognormal:-1:1", "median > 0"),
                         ("uniform:3:2", "LOW <= HIGH"), ("lognormal:a:b", "must be numbers")]:
        with pytest.raises(ValueError, match=problem):
            draw(bad, 3, generator)


def test_a_round_with_no_device_online_stops_the_run_naming_why(tmp_path):
    trace = tmp_path / "fleet.csv"
    trace.write_text("flops_per_s,memory_bytes,up_bytes_per_s,down_bytes_per_s,availability\n1e9,1e9,1e6,1e6,0\n")
    sim = Simulation(tiny_config("tiny-llama", *FAST, f"fleet.trace={trace}"))
    with pytest.raises(RoundError, match="no device was online"):
        sim.run_round()

"""Model poisoning: how far attackers move the global update, per combiner, attack, fleet size and
with Kill and Revive (issue 21: findings 2, 3 and 11).

    .venv/bin/python bench/poisoning.py [--model tiny-llama] [--local-steps 3]

Every cell runs the same federation twice from the same seed: 2 rounds, the first honest in both;
in the second, the attackers (the last device of 2 or 3, the last 2 of 5, colluding) replace the
adapters they upload. A cell is

    shift = ||W_attacked - W_honest|| / ||W_honest - W_start||

over every device-held adapted module (Frobenius, all modules together): W the global model's
effective weight (frozen weight, merges and global adapter) after round 2, W_start before it. So
1.0 means the attackers moved the global model by as much as the whole honest round did. In
brackets: how many (holder, module) updates the robust policy clipped or clamped in round 2.

Attacks, on each attacked module's factor updates dA = A - A0, dB = B - B0 (A0, B0: what the holder
was given), coordinate-wise; mu and sigma are the mean and standard deviation over the round's
benign updates of that module (every device's honest training, the attackers' own included: the
attackers are omniscient, the strongest setting):

- x100: the attacker's own update x 100;
- x3.9: 3.9 mu, every attacker the same (issue 21 finding 11: a colluding minority just under the
  default clip of 4 x the median, all in one direction);
- sign-flip: minus its own update;
- ALIE ("a little is enough", Baruch et al. 2019): mu - z sigma, z = Phi^-1((n - s) / n) with
  s = floor(n / 2 + 1) - f (f attackers of n), at least 1;
- IPM (inner-product manipulation, Xie et al. 2020): -eps mu, eps = 2.

With Kill and Revive (active_fraction 0.25, kills from step 1) the honest devices keep the modules
they killed at home, and the attackers upload every module: on those the attacker's copy is alone.

Columns: fedavg and noise_free alone (robust.clip=none), then behind the default robust policy
(robust.clip=median: the AdamW trust region, then c = 4 x the median of 3 or more copies or the
module's history), and fedavg's coordinate-wise median, trimmed mean and centered clipping
(Karimireddy et al. 2021, around each module's last aggregate update) behind it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from statistics import NormalDist

import torch

from splitpeft.aggregation.base import AdapterCopy
from splitpeft.config import load_config
from splitpeft.federation.simulation import Simulation
from splitpeft.model import adapters as lora
from splitpeft.model.adapters import LoraWeights
from splitpeft.transport.messages import Kind, Message, Meta

COLUMNS = {  # name -> config overrides
    "fedavg": ["federation.aggregator=fedavg", "robust.clip=none"],
    "fedavg+clip": ["federation.aggregator=fedavg"],
    "fedavg+clip+median": ["federation.aggregator=fedavg", "robust.combine=median"],
    "fedavg+clip+trimmed": ["federation.aggregator=fedavg", "robust.combine=trimmed_mean"],
    "fedavg+clip+cc": ["federation.aggregator=fedavg", "robust.combine=centered_clip"],
    "noise_free": ["federation.aggregator=noise_free", "robust.clip=none"],
    "noise_free+clip": ["federation.aggregator=noise_free"],
}
DEFAULT_COLUMNS = ("fedavg+clip", "noise_free+clip")
FLEETS = {2: 1, 3: 1, 5: 2}  # devices -> attackers among them
KILL_REVIVE = ["kill_revive.enabled=true", "kill_revive.warmup=0", "kill_revive.interval=1",
               "kill_revive.active_fraction=0.25"]
IPM_EPS = 2.0

Attack = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]  # (own delta, benign deltas (k, ...), n, f) -> delta


def alie_z(n: int, f: int) -> float:
    s = math.floor(n / 2 + 1) - f
    return max(1.0, NormalDist().inv_cdf((n - s) / n)) if 0 < (n - s) / n < 1 else 1.0


ATTACKS: dict[str, Attack] = {
    "x100": lambda own, benign, n, f: 100 * own,
    "x3.9": lambda own, benign, n, f: 3.9 * benign.mean(0),  # finding 11: colluders just under 4 x, one direction
    "sign-flip": lambda own, benign, n, f: -own,
    "ALIE": lambda own, benign, n, f: benign.mean(0) - alie_z(n, f) * (benign.std(0, unbiased=False)),
    "IPM": lambda own, benign, n, f: -IPM_EPS * benign.mean(0),
}


def config(args: argparse.Namespace, devices: int, kill_revive: bool, column: list[str]):
    return load_config(preset="tiny", overrides=[
        f"model.name={args.model}", f"federation.num_devices={devices}", "federation.rounds=2",
        f"federation.local_steps={args.local_steps}", f"federation.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", f"data.limit={args.examples}", "count_flops=false",
        *(KILL_REVIVE if kill_revive else []), *column])


def effective_weights(sim: Simulation, modules: list[str]) -> dict[str, torch.Tensor]:
    """W + merged updates + the global adapter's s B A, per module (d_out, d_in as stored)."""
    model = sim.global_model()
    out = {}
    for name in modules:
        module = model.get_submodule(name)
        if hasattr(module, "get_base_layer"):
            weight = module.get_base_layer().weight + module.get_delta_weight(lora.ADAPTER_NAME)
        else:
            weight = module.weight
        out[name] = weight.detach().double().clone()
    return out


def upload_everything(device) -> None:
    """The attacker uploads every module it holds, killed ones too."""
    def upload_message() -> Message:
        return Message(Kind.ADAPTERS, lora.to_tensors(device.adapters()), meta={Meta.DEVICE: device.device_id})
    device.upload_message = upload_message


def poison(sim: Simulation, attackers: list[str], attack: Attack) -> None:
    """Wrap the round's aggregation: the attackers' device copies become `attack` of the benign updates."""
    original = sim.state.aggregate
    n = len(sim.devices)

    def aggregate(copies):
        changed = {}
        for module, module_copies in copies.items():
            devices = [c for c in module_copies if not c.holder.startswith("server/")]
            starts = {c.holder: sim.state.given[c.holder][module] for c in devices}
            new = []
            for copy in module_copies:
                if copy.holder not in attackers:
                    new.append(copy)
                    continue
                weights = {}
                for key in ("A", "B"):
                    deltas = torch.stack([getattr(c.weights, key).float() - getattr(starts[c.holder], key).float()
                                          for c in devices])
                    own = getattr(copy.weights, key).float() - getattr(starts[copy.holder], key).float()
                    weights[key] = getattr(starts[copy.holder], key).float() + attack(own, deltas, n, len(attackers))
                new.append(AdapterCopy(copy.holder, LoraWeights(weights["A"], weights["B"]), copy.tokens, copy.scale))
            changed[module] = new
        return original(changed)

    sim.state.aggregate = aggregate


def run(args: argparse.Namespace, devices: int, kill_revive: bool, column: list[str],
        attack: Attack | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
    """(weights before round 2, after it, updates clipped in round 2, updates clipped in both rounds)."""
    sim = Simulation(config(args, devices, kill_revive, column))
    modules = sorted({name for device in sim.devices for name in device.ranks})
    first = sim.run_round()
    before = effective_weights(sim, modules)
    if attack is not None:
        attackers = [d.device_id for d in sim.devices[-FLEETS[devices]:]]
        for device in sim.devices[-FLEETS[devices]:]:
            upload_everything(device)
        poison(sim, attackers, attack)
    record = sim.run_round()
    return before, effective_weights(sim, modules), len(record.clipped), len(first.clipped) + len(record.clipped)


def shift(honest_before, honest_after, attacked_after) -> float:
    num = sum(float((attacked_after[n] - honest_after[n]).norm()) ** 2 for n in honest_after)
    den = sum(float((honest_after[n] - honest_before[n]).norm()) ** 2 for n in honest_after)
    return math.sqrt(num / den) if den > 0 else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--examples", type=int, default=200, help="data.limit: builtin examples used")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"{args.model}, 2 rounds x {args.local_steps} local steps, batch {args.batch_size}; attack in round 2; "
          "cell = shift of the global update in units of the honest round's update [updates clipped]")
    print()
    print("| devices (attackers) | Kill and Revive | attack | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---:|" * len(COLUMNS))
    worst_default = []
    honest_clipped: dict[str, int] = dict.fromkeys(COLUMNS, 0)
    for devices, attackers in FLEETS.items():
        for kill_revive in (False, True):
            honest = {name: run(args, devices, kill_revive, overrides, None) for name, overrides in COLUMNS.items()}
            for name, (_, _, _, clipped_both) in honest.items():
                honest_clipped[name] += clipped_both
            for attack_name, attack in ATTACKS.items():
                cells = []
                for name, overrides in COLUMNS.items():
                    _, attacked_after, clipped, _ = run(args, devices, kill_revive, overrides, attack)
                    value = shift(honest[name][0], honest[name][1], attacked_after)
                    if name in DEFAULT_COLUMNS:
                        worst_default.append((value, f"{devices} devices, KR {kill_revive}, {attack_name}, {name}"))
                    cells.append(f"{value:.2f} [{clipped}]" if value < 1e4 else f"{value:.1e} [{clipped}]")
                print(f"| {devices} ({attackers}) | {'yes' if kill_revive else 'no'} | {attack_name} | "
                      + " | ".join(cells) + " |", flush=True)
    print()
    value, where = max(worst_default)
    over = [w for v, w in worst_default if v > 2]
    print(f"default combiners (robust.clip=median): largest shift {value:.2f} ({where}); "
          f"median {statistics.median(v for v, _ in worst_default):.2f}; rows over 2x: {len(over)}")
    for row in over:
        print(f"  over 2x: {row}")
    print("honest runs (no attacker, both rounds, all fleets): updates clipped per column: "
          + ", ".join(f"{name} {count}" for name, count in honest_clipped.items()))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

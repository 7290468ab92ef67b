"""splitpeft deployed across real hosts: a cloud and 2-3 devices, each its own Linux network
namespace with its own address, device links limited by `tc tbf`; the real SuperLink, SuperNodes,
`flwr run` and split server of docs/how-to/deploy.md ("Deploying on real machines"), on those addresses.

    .venv/bin/python bench/netns_deploy.py [--devices 2|3] [--rates 100,20] [--compression none,int8]
        [--rounds 2] [--steps 12] [--batch-size 16] [--quick] [--keep DIR]      # as root

Topology (namespaces `spx-<run id>-cloud`, `spx-<run id>-dev<N>`, removed at the end, also on
Ctrl-C; nothing else on the machine is touched):

    cloud 10.77.0.1 (bridge br0) --d<N>--[veth, tbf both ways]--eth0-- device N 10.77.0.1N

tbf shapes the egress of both ends of each device's veth (upload: the device's eth0; download:
the cloud's bridge port d<N>); netem is not needed (the veth adds no delay worth modelling).

Per link rate and `transport.compression` (first an unshaped run of each compression, whose
measured device compute calibrates the simulator), one federation of `tiny-llama` on the tiny
preset; from its report.json, per device and round (means): the local phase's wall time (steps
over the split stream), tokens/s of the fleet (sum over devices of tokens / local phase time),
bytes up and down, the pure-link time (split bytes up + down) / (rate / 8), and the simulator's
time `simulated_s` = FLOPs / fleet.flops_per_s + bytes / fleet.bandwidth_bytes_per_s (as
`Simulation.finish_round` records it), with bandwidth = rate / 8 and flops_per_s = the device's
FLOPs / local-phase seconds measured on the unshaped run (so its compute term is what this machine
does, and the comparison is about the link); and what the link added, as measured: the local phase
less that of the unshaped run. Each round of a deployment also starts a fresh ClientApp process on
every device (Flower), which the round time shows and the local phase does not.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from flower_deployment import Deployment  # noqa: E402  (the tests' real SuperLink/SuperNode driver)

PREFIX = "spx"  # every namespace this script makes is named spx-<run id>-...
SUBNET = "10.77.0"
CLOUD_ADDRESS = f"{SUBNET}.1"
TBF_LATENCY_MS = 100  # longest a packet may wait in the tbf queue (sets its size)


class NamespaceError(RuntimeError):
    """Network namespaces, veths or tbf cannot be made here (not root, no `ip`/`tc`, EPERM)."""


def ip(*args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NamespaceError(f"ip {' '.join(args)}: {error}") from None
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")


def tc(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["tc", "-n", namespace, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NamespaceError(f"tc {' '.join(args)}: {error}") from None


def tbf_burst_bytes(rate_mbit: float) -> int:
    """The bucket: 2 ms of the rate, at least two full frames (tbf drops a packet larger than it)."""
    return max(int(rate_mbit * 1e6 / 8 * 0.002), 2 * 1514)


class Testbed:
    """A cloud namespace (bridge br0 at 10.77.0.1/24) and `num_devices` device namespaces (eth0 at
    10.77.0.1N/24), device N joined to the bridge by a veth pair (d<N> on the cloud's side) whose
    two ends are rate-limited by tbf. Use as a context manager: the namespaces, and with them the
    links, are deleted on exit, after every process still inside them is killed."""

    def __init__(self, num_devices: int) -> None:
        if not 1 <= num_devices <= 9:
            raise ValueError(f"1 to 9 devices, got {num_devices}")
        self.num_devices = num_devices
        self.tag = secrets.token_hex(3)
        self.cloud = f"{PREFIX}-{self.tag}-cloud"
        self.devices = [f"{PREFIX}-{self.tag}-dev{i}" for i in range(num_devices)]
        self.created: list[str] = []
        self.rate_mbit: float | None = None

    @staticmethod
    def device_address(index: int) -> str:
        return f"{SUBNET}.{10 + index}"

    @staticmethod
    def prefix(namespace: str) -> list[str]:
        """Run a command on that host: `ip netns exec` enters the namespace and execs it (same pid)."""
        return ["ip", "netns", "exec", namespace]

    def __enter__(self) -> Testbed:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        for namespace in [self.cloud, *self.devices]:
            ip("netns", "add", namespace)
            self.created.append(namespace)
            ip("-n", namespace, "link", "set", "lo", "up")  # Flower's app processes talk to their node on loopback
        ip("-n", self.cloud, "link", "add", "name", "br0", "type", "bridge")
        ip("-n", self.cloud, "addr", "add", f"{CLOUD_ADDRESS}/24", "dev", "br0")
        ip("-n", self.cloud, "link", "set", "br0", "up")
        for index, namespace in enumerate(self.devices):
            port = f"d{index}"
            ip("-n", self.cloud, "link", "add", "name", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("-n", self.cloud, "link", "set", port, "master", "br0")
            ip("-n", self.cloud, "link", "set", port, "up")
            ip("-n", namespace, "addr", "add", f"{self.device_address(index)}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")

    def links(self) -> list[tuple[str, str]]:
        """(namespace, interface) of both ends of every device link."""
        return [end for i, device in enumerate(self.devices) for end in ((device, "eth0"), (self.cloud, f"d{i}"))]

    def set_rate(self, rate_mbit: float | None) -> None:
        """Limit every device link to `rate_mbit` each way (None: unshaped)."""
        for namespace, interface in self.links():
            if rate_mbit is None:
                tc(namespace, "qdisc", "del", "dev", interface, "root")  # fails harmlessly if there is none
                continue
            done = tc(namespace, "qdisc", "replace", "dev", interface, "root", "tbf", "rate", f"{rate_mbit}mbit",
                      "burst", str(tbf_burst_bytes(rate_mbit)), "latency", f"{TBF_LATENCY_MS}ms")
            if done.returncode != 0:
                raise NamespaceError(f"tc tbf on {interface}: {done.stderr.strip()}")
        self.rate_mbit = rate_mbit

    def pids(self, namespace: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []

    def destroy(self) -> None:
        """Kill what is still running inside our namespaces (by pid), then delete them."""
        for namespace in reversed(self.created):
            for pid in self.pids(namespace):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for namespace in reversed(self.created):
            deadline = time.monotonic() + 10
            while self.pids(namespace) and time.monotonic() < deadline:
                time.sleep(0.1)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self.created.clear()


def check_namespaces() -> None:
    """Raise NamespaceError (saying why) unless this machine lets us make namespaces, veths and tbf."""
    if os.geteuid() != 0:
        raise NamespaceError("network namespaces need root")
    with Testbed(1) as bed:
        bed.set_rate(10)


# ------------------------------------------------------------------------------------ measurement


@dataclass
class Measurement:
    """Means per device and round of one run's report (times in s, bytes per device per round)."""

    rate_mbit: float | None
    compression: str
    devices: int
    local_s: float          # a device's local phase (its steps over the split stream)
    round_s: float          # the round on the cloud: adapters down, local phases, adapters up, aggregation
    tokens_per_s: float     # the fleet's: sum over devices of tokens / local phase time
    bytes_up: float
    bytes_down: float
    split_bytes: float      # split traffic up + down (the local phase's share of bytes_up + bytes_down)
    flops: float
    simulated_s: float | None

    @property
    def link_s(self) -> float | None:
        """Pure-link time of the local phase: its bytes at the link rate, nothing else."""
        return None if self.rate_mbit is None else self.split_bytes / (self.rate_mbit * 1e6 / 8)


def measure(report: dict[str, Any], rate_mbit: float | None, compression: str) -> Measurement:
    rounds = report["rounds"]
    stats = [s for r in rounds for s in r["devices"].values()]
    if not stats:
        raise RuntimeError("no device finished a round")

    def mean(key: str) -> float:
        return statistics.fmean(float(s[key]) for s in stats)

    fleet = statistics.fmean(sum(s["tokens"] / s["wall_s"] for s in r["devices"].values()) for r in rounds)
    simulated = [s["simulated_s"] for s in stats if s.get("simulated_s") is not None]
    split = statistics.fmean(s["bytes_up"] - s["adapter_bytes_up"] + s["bytes_down"] - s["adapter_bytes_down"] for s in stats)
    return Measurement(rate_mbit, compression, len(rounds[0]["devices"]), mean("wall_s"),
                       statistics.fmean(r["wall_s"] for r in rounds), fleet, mean("bytes_up"), mean("bytes_down"),
                       split, mean("flops"), statistics.fmean(simulated) if simulated else None)


def run_overrides(devices: int, rounds: int, steps: int, batch_size: int, compression: str = "none",
                  rate_mbit: float | None = None, flops_per_s: float = 5e10) -> list[str]:
    """The experiment on top of the tiny preset (tiny-llama): every device every round, no
    evaluation; the simulator's clock on at `rate_mbit` (None: a link too fast to count)."""
    bandwidth = 1e15 if rate_mbit is None else rate_mbit * 1e6 / 8
    return [f"federation.num_devices={devices}", f"federation.rounds={rounds}",
            f"federation.local_steps={steps}", f"federation.batch_size={batch_size}",
            f"transport.compression={compression}", "eval.perplexity=false", "eval.every_round=false",
            "eval.generation=false", "eval.baseline=false",
            "fleet.memory_range=[1000000000000,1000000000000]",  # budgets only switch the simulator's clock on
            f"fleet.bandwidth_bytes_per_s={bandwidth!r}", f"fleet.flops_per_s={flops_per_s!r}"]


def federate(deployment: Deployment, out: Path, overrides: list[str], timeout_s: float) -> dict[str, Any]:
    """Submit one run to the running SuperLink and wait for its report."""
    run = deployment.submit(out, overrides)
    try:
        code = run.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the run did not finish within {timeout_s:.0f} s\n{deployment.log('superlink')}") from None
    report = out / "report.json"
    if code != 0 or not report.is_file():
        raise RuntimeError(f"the run failed (flwr run exit {code})\n{deployment.log('superlink')}")
    return json.loads(report.read_text())


def start_deployment(bed: Testbed, root: Path) -> Deployment:
    """SuperLink (and through it the ServerApp and split server) on the cloud, a SuperNode per device."""
    deployment = Deployment(root, bed.num_devices, host=CLOUD_ADDRESS, cloud_prefix=bed.prefix(bed.cloud),
                            device_prefix=lambda index: bed.prefix(bed.devices[index]))
    deployment.start_superlink()
    for index in range(bed.num_devices):
        deployment.start_device(index)
    return deployment


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Measurement]) -> str:
    """One line per run; `added by the link` = local phase - that of the unshaped run of the same
    compression (what the link cost, as measured), beside what the models predict."""
    head = ("| link | compression | local phase s | added by the link s | link-only s | simulator s | measured / simulator "
            "| round s | tokens/s | MB up/dev | MB down/dev |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    unshaped = {m.compression: m.local_s for m in rows if m.rate_mbit is None}
    for m in rows:
        shaped = m.rate_mbit is not None
        added = m.local_s - unshaped[m.compression] if shaped and m.compression in unshaped else None
        simulated = m.simulated_s if shaped else None
        ratio = None if simulated is None else m.local_s / simulated
        lines.append(f"| {f'{m.rate_mbit:g} Mbit/s' if shaped else 'unshaped'} | {m.compression} | {m.local_s:.2f} "
                     f"| {fmt(added, '+.2f')} | {fmt(m.link_s, '.2f')} | {fmt(simulated, '.2f')} | {fmt(ratio, '.2f')} "
                     f"| {m.round_s:.1f} | {m.tokens_per_s:.0f} | {m.bytes_up / 1e6:.3f} | {m.bytes_down / 1e6:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, choices=[2, 3])
    parser.add_argument("--rates", default="100,20", help="link rates in Mbit/s, comma-separated")
    parser.add_argument("--compression", default="none,int8", help="transport.compression modes, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (the tiny preset pads to 160 tokens)")
    parser.add_argument("--quick", action="store_true", help="20 Mbit/s only, 1 round of 2 steps at batch 8")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' folders and logs here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.rounds, args.steps, args.batch_size = "20", 1, 2, 8
    rates = [float(r) for r in args.rates.split(",")]
    modes = [m.strip() for m in args.compression.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per process is fastest on a shared box
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C unwinds through the finally blocks below,
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # and so does kill, even when started in the background

    root = args.keep or Path(tempfile.mkdtemp(prefix="netns-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Measurement] = []
    calibrated: dict[str, float] = {}  # compression -> the devices' FLOP/s measured unshaped
    try:
        with Testbed(args.devices) as bed:
            deployment = start_deployment(bed, root)
            try:
                for mode in modes:
                    for rate in [None, *rates]:
                        bed.set_rate(rate)
                        name = f"{mode}-{'unshaped' if rate is None else f'{rate:g}mbit'}"
                        started = time.perf_counter()
                        overrides = run_overrides(args.devices, args.rounds, args.steps, args.batch_size, mode, rate,
                                                  calibrated.get(mode, 5e10))
                        report = federate(deployment, root / name, overrides, args.timeout)
                        rows.append(measure(report, rate, mode))
                        if rate is None:  # calibrate the simulator's compute on this machine
                            calibrated[mode] = rows[-1].flops / rows[-1].local_s
                        print(f"{name}: {time.perf_counter() - started:.0f} s, {rows[-1]}", file=sys.stderr, flush=True)
            finally:
                deployment.stop()
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{args.devices} devices x {args.rounds} rounds x {args.steps} steps, batch {args.batch_size}, tiny-llama "
          f"(tiny preset), split at block 2; tbf burst 2 ms of the rate, latency {TBF_LATENCY_MS} ms; means per device "
          f"and round")
    print("simulator's device compute (FLOPs / local phase s, unshaped): "
          + ", ".join(f"{mode} {flops / 1e9:.2f} GFLOP/s" for mode, flops in calibrated.items()))
    print(table(rows))


if __name__ == "__main__":
    main()

"""A real Flower deployment on loopback for tests: a SuperLink, SuperNodes (one per device) and
`flwr run` of deploy/flower, each its own process, as on real machines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parents[1] / "deploy" / "flower"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


class Deployment:
    """`tls`: keys from `splitpeft deploy-keys` secure the SuperLink (Flower's side) and the split
    stream, as the README's deployment does; otherwise both run in plaintext. `node_auth` (with
    tls): the SuperLink admits only SuperNodes whose public key was registered with `flwr`.

    Across hosts (bench/netns_deploy.py): `host` is the cloud's address, where the SuperLink and
    the split server listen and devices reach them; `cloud_prefix` and `device_prefix(index)` start
    each process on its host (e.g. `ip netns exec NAME`). The defaults keep everything on loopback."""

    def __init__(self, root: Path, num_devices: int, *, tls: bool = False, node_auth: bool = False, simulation: bool = False,
                 cpus_per_client: int = 1,
                 host: str = "127.0.0.1", cloud_prefix: Sequence[str] = (),
                 device_prefix: Callable[[int], Sequence[str]] = lambda index: ()) -> None:
        self.node_auth = node_auth and tls
        self.simulation = simulation  # the SuperLink runs virtual SuperNodes on Flower's simulation engine (Ray)
        self.cpus_per_client = cpus_per_client
        self.host = host
        self.cloud_prefix, self.device_prefix = list(cloud_prefix), device_prefix
        self.num_devices = num_devices
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.link_port = free_port()
        self.split_port = free_port()
        self.keys: Path | None = None
        if tls:
            self.keys = root / "keys"
            subprocess.run([str(Path(sys.executable).parent / "splitpeft"), "deploy-keys", "--devices", str(num_devices),
                            "--hosts", ",".join(dict.fromkeys(["localhost", "127.0.0.1", host])), "--out", str(self.keys)],
                           check=True, capture_output=True)
            security = f'root-certificates = "{self.keys / "server-cert.pem"}"'
            self.tokens = {f"device-{i}": (self.keys / f"device-{i}.token").read_text() for i in range(num_devices)}
            self.tokens_file = self.keys / "tokens.json"
        else:
            security = "insecure = true"
            self.tokens = {f"device-{i}": f"secret-{i}" for i in range(num_devices)}
            self.tokens_file = root / "tokens.json"
            self.tokens_file.write_text(json.dumps(self.tokens))
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "{host}:{self.link_port}"\n{security}\n')
        self.env = dict(os.environ, FLWR_HOME=str(self.home),
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env.pop("PYTEST_CURRENT_TEST", None)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ray_temp: list[Path] = []  # the Ray clusters' temporary folders this deployment made

    def _start(self, name: str, command: list[str], prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen([*prefix, *command], stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                   start_new_session=True)  # its own process group: kill() takes its children
        self.processes[name] = process
        return process

    def start_ray(self, attempts: int = 3, timeout: float = 120.0) -> None:
        """Start a one-machine Ray cluster of this deployment's own (`ray start --head --block`, as
        the README's cluster recipe does) and point the simulation engine at it (RAY_ADDRESS).

        Ray's own start-up gives the raylet a fixed 30 s to register and fails the whole run when a
        loaded machine misses that; a cluster started here can be tried again, and when every try
        fails the error carries the raylet's and the GCS's logs. Its temporary folder is a short
        one of its own (Unix socket paths are limited to 107 bytes), removed at stop()."""
        failures = []
        for attempt in range(attempts):
            temp = Path(tempfile.mkdtemp(prefix="ray-"))
            port = free_port()
            name = f"ray-{attempt}"
            process = self._start(name, [
                "ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(max(1, os.cpu_count() or 1)), "--include-dashboard=false",
                "--disable-usage-stats", "--temp-dir", str(temp)])
            self.ray_temp.append(temp)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if "will now block" in self.log(name):
                    self.env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
                    return
                time.sleep(0.5)
            failures.append(f"--- try {attempt + 1}: {self.log(name)}\n{ray_logs(temp)}")
            self.kill(name)
        raise RuntimeError(f"Ray did not start in {attempts} tries:\n" + "\n".join(failures))

    def start_superlink(self) -> None:
        if self.simulation and "RAY_ADDRESS" not in self.env:
            self.start_ray()
        auth = ["--enable-supernode-auth"] if self.node_auth else []
        auth += ["--simulation"] if self.simulation else []
        self._start("superlink", ["flower-superlink", *self._link_security(server=True), *auth, "--host", self.host,
                                  "--port", str(self.link_port), "--database", str(self.root / "superlink.db")],
                    self.cloud_prefix)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._listening(self.link_port):
                return
            if self.processes["superlink"].poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"SuperLink did not start: {self.log('superlink')}")

    def _listening(self, port: int) -> bool:
        """Whether the cloud accepts connections on `port` (asked on the cloud's host)."""
        if self.cloud_prefix:
            probe = f"import socket; socket.create_connection(({self.host!r}, {port}), timeout=1).close()"
            return subprocess.run([*self.cloud_prefix, sys.executable, "-c", probe], capture_output=True).returncode == 0
        with socket.socket() as sock:
            return sock.connect_ex((self.host, port)) == 0

    def register_devices(self) -> None:
        """`flwr supernode register` each device's public key from deploy-keys (node_auth)."""
        for index in range(self.num_devices):
            key = self.keys / f"device-{index}.node-key.pub"
            subprocess.run([*self.cloud_prefix, "flwr", "supernode", "register", str(key), "local"],
                           check=True, capture_output=True, env=self.env, cwd=self.root, timeout=60)

    def _link_security(self, *, server: bool) -> list[str]:
        if self.keys is None:
            return ["--insecure"]
        cert, key = str(self.keys / "server-cert.pem"), str(self.keys / "server-key.pem")
        if server:
            return ["--ssl-ca-certfile", cert, "--ssl-certfile", cert, "--ssl-keyfile", key]
        return ["--root-certificates", cert]

    def start_device(self, index: int, token: str | None = None, *, name: str | None = None,
                     node_key: Path | None = None, **extra: Any) -> subprocess.Popen[bytes]:
        """A SuperNode for device `index` (`name`: its process name, default device-N; `node_key`:
        its SuperNode private key, default deploy-keys' device-N.node-key under node_auth)."""
        config = {"device": index, "split-server": f"{self.host}:{self.split_port}",
                  "state-dir": str(self.root / f"state-{index}"), **extra}
        if self.keys is not None:
            config["root-cert"] = str(self.keys / "server-cert.pem")
        if token is not None:
            config["token"] = token
        elif self.keys is not None:
            config["token-file"] = str(self.keys / f"device-{index}.token")
        else:
            config["token"] = self.tokens[f"device-{index}"]
        if node_key is None and self.node_auth:
            node_key = self.keys / f"device-{index}.node-key"
        auth = ["--auth-supernode-private-key", str(node_key)] if node_key is not None else []
        return self._start(name or f"device-{index}", [
            "flower-supernode", *self._link_security(server=False), *auth, "--superlink", f"{self.host}:{self.link_port}",
            "--port", str(free_port()), "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())],
            self.device_prefix(index))

    def restart_device(self, index: int, timeout: float = 240.0) -> None:
        """Start device `index` again after a crash, as a supervisor would (systemd Restart=): under
        node authentication the SuperLink refuses the key (exit 305) until it has seen the old
        instance miss its heartbeats, so retry until one stays up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.start_device(index)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                return  # admitted and running
            self.processes.pop(f"device-{index}")
            time.sleep(5)
        raise RuntimeError(f"device-{index} was not admitted again within {timeout:.0f} s: {self.log(f'device-{index}')}")

    def run_config(self, out: Path, overrides: list[str], **extra: Any) -> str:
        config = {"preset": "tiny", "overrides": " ".join(overrides), "out": str(out), "tokens-file": str(self.tokens_file),
                  "split-address": f"{self.host}:{self.split_port}", "join-timeout": 90.0, "round-timeout": 120.0, **extra}
        if self.keys is not None:
            config.update({"tls-cert": str(self.keys / "server-cert.pem"), "tls-key": str(self.keys / "server-key.pem")})
        return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())

    def submit(self, out: Path, overrides: list[str], **extra: Any) -> subprocess.Popen[bytes]:
        """`flwr run deploy/flower --stream`: returns while it runs; it exits when the run ends. On
        the simulation engine, with one virtual SuperNode per device, `cpus_per_client` CPUs each."""
        federation = (["--federation-config", f"num-supernodes={self.num_devices} client-resources-num-cpus={self.cpus_per_client}"]
                      if self.simulation else [])
        return self._start(f"flwr-run-{len(self.processes)}", [
            "flwr", "run", str(APP), "local", "--stream", *federation,
            "--run-config", self.run_config(out, overrides, **extra)], self.cloud_prefix)

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started, at once (a machine losing power, as far as
        the others see). Flower starts app processes in sessions of their own, so walk the tree."""
        process = self.processes.pop(name)
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)
        for temp in self.ray_temp:
            shutil.rmtree(temp, ignore_errors=True)
        self.ray_temp.clear()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def ray_logs(temp: Path) -> str:
    """The tails of the raylet's and the GCS's logs of the Ray cluster under `temp`."""
    parts = []
    for path in sorted(temp.glob("session_*/logs/*")):
        if path.name.startswith(("raylet.", "gcs_server.")) and path.is_file():
            parts.append(f"[{path.name}] {path.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts) or f"(no raylet or GCS log under {temp})"


def wait_for(condition: Any, timeout: float, what: str, deployment: Deployment) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    logs = "\n".join(f"--- {name}\n{deployment.log(name)}" for name in ("superlink", "device-0", "device-1"))
    raise AssertionError(f"timed out waiting for {what}\n{logs}")

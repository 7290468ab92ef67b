"""Settings of a Flower deployment: the ServerApp's run config and a SuperNode's node config,
each parsed and checked into a typed object (a bad key is one DeploymentError naming it)."""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitpeft.config import ConfigError, ExperimentConfig, load_config
from splitpeft.deploy.keys import DeploymentError, read_secret, read_tokens

# ------------------------------------------------------------------------------------ settings

# Run config keys only the virtual SuperNodes of Flower's simulation engine read (`NodeSettings.of_simulated`)
SIMULATED_NODE_KEYS = ("split-connect", "device-state-dir")


def _text(config: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = config.get(key, default)
    if value is None:
        raise DeploymentError(f"missing setting {key!r}")
    if not isinstance(value, str):
        raise DeploymentError(f"setting {key!r} must be a string, not {type(value).__name__}")
    return value


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DeploymentError(f"setting {key!r} must be a non-negative number, not {value!r}")
    return float(value)


@dataclass
class ServerSettings:
    """The ServerApp's run config ([tool.flwr.app.config] of deploy/flower, `flwr run --run-config`)."""

    config: ExperimentConfig
    out: Path
    checkpoint: Path
    resume: bool
    overwrite: bool
    split_address: str
    tokens: dict[str, str]
    tls: tuple[bytes, bytes] | None
    join_timeout_s: float
    round_timeout_s: float
    rejoin_timeout_s: float

    KEYS = ("preset", "config-file", "overrides", "out", "checkpoint", "resume", "overwrite", "split-address",
            "tokens-file", "tls-cert", "tls-key", "join-timeout", "round-timeout", "rejoin-timeout",
            *SIMULATED_NODE_KEYS)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        unknown = sorted(set(run_config) - set(cls.KEYS))
        if unknown:
            raise DeploymentError(f"unknown run config keys {unknown}; known: {', '.join(cls.KEYS)}")
        config_file = _text(run_config, "config-file", "")
        overrides = shlex.split(_text(run_config, "overrides", ""))
        try:
            if config_file:
                config = load_config(config_file, overrides)
            else:
                config = load_config(overrides=overrides, preset=_text(run_config, "preset", "default"))
        except ConfigError as error:
            raise DeploymentError(f"experiment config: {error}") from None
        out = Path(_text(run_config, "out", "runs/flower")).expanduser().resolve()
        checkpoint = _text(run_config, "checkpoint", "")
        resume, overwrite = run_config.get("resume", False), run_config.get("overwrite", False)
        for key, value in (("resume", resume), ("overwrite", overwrite)):
            if not isinstance(value, bool):
                raise DeploymentError(f"setting '{key}' must be true or false, not {value!r}")
        cert, key = _text(run_config, "tls-cert", ""), _text(run_config, "tls-key", "")
        if bool(cert) != bool(key):
            raise DeploymentError("TLS needs both tls-cert and tls-key")
        tokens = read_tokens(_text(run_config, "tokens-file"))
        return cls(
            config=config, out=out,
            checkpoint=Path(checkpoint).expanduser().resolve() if checkpoint else out.with_name(out.name + ".checkpoint"),
            resume=resume, overwrite=overwrite, split_address=_text(run_config, "split-address", "0.0.0.0:9300"), tokens=tokens,
            tls=(read_secret(cert, "TLS certificate"), read_secret(key, "TLS key")) if cert else None,
            join_timeout_s=_number(run_config, "join-timeout", 120.0),
            round_timeout_s=_number(run_config, "round-timeout", 3600.0),
            rejoin_timeout_s=_number(run_config, "rejoin-timeout", 0.0),
        )


@dataclass
class NodeSettings:
    """A device's node config (`flower-supernode --node-config "device=0 split-server=..."`)."""

    device: int
    split_server: str
    token: str
    root_cert: bytes | None
    data_path: str | None
    state_dir: Path
    status_file: Path | None

    KEYS = ("device", "split-server", "token", "token-file", "root-cert", "data-path", "state-dir", "status-file")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        unknown = sorted(set(node_config) - set(cls.KEYS))
        if unknown:
            raise DeploymentError(f"unknown node config keys {unknown}; known: {', '.join(cls.KEYS)}")
        device = node_config.get("device")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise DeploymentError(f"node config 'device' must be the device's index (0, 1, ...), not {device!r}")
        token = _text(node_config, "token", "")
        if not token:
            token = read_secret(_text(node_config, "token-file"), "token file").decode().strip()
        if not token:
            raise DeploymentError("the device's token is empty")
        cert = _text(node_config, "root-cert", "")
        status = _text(node_config, "status-file", "")
        return cls(
            device=device, split_server=_text(node_config, "split-server"), token=token,
            root_cert=read_secret(cert, "root certificate") if cert else None,
            data_path=_text(node_config, "data-path", "") or None,
            state_dir=Path(_text(node_config, "state-dir", "~/.cache/splitpeft/device-state")).expanduser(),
            status_file=Path(status).expanduser() if status else None,
        )

    @classmethod
    def of_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> NodeSettings:
        """A real SuperNode's settings from its node config; a virtual one's (Flower's simulation
        engine gives it only `partition-id` and `num-partitions`) from the run config."""
        if "partition-id" in node_config:
            return cls.of_simulated(node_config, run_config)
        return cls.from_node_config(node_config)

    @classmethod
    def of_simulated(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> NodeSettings:
        """Virtual SuperNode `partition-id` of Flower's simulation engine is device `partition-id`.
        It dials the split server at the run config's `split-connect` (default: `split-address`, a
        wildcard host read as loopback), proves itself with that device's token from `tokens-file`
        and trusts `tls-cert` as the root certificate: every virtual node runs in the operator's
        own processes (on a Ray cluster, on its machines, where those paths must exist), so the
        simulation engine is not a boundary between untrusted devices; a deployment is."""
        unknown = sorted(set(node_config) - {"partition-id", "num-partitions"})
        if unknown:
            raise DeploymentError(f"unknown node config keys {unknown} for a virtual SuperNode (partition-id, num-partitions)")
        device = node_config.get("partition-id")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise DeploymentError(f"node config 'partition-id' must be the device's index (0, 1, ...), not {device!r}")
        device_id = f"device-{device}"
        tokens = read_tokens(_text(run_config, "tokens-file"))
        if device_id not in tokens:
            raise DeploymentError(f"virtual SuperNode {device} is {device_id}, which the tokens file has no token for "
                                  "(num-supernodes beyond federation.num_devices?)")
        connect = _text(run_config, "split-connect", "") or _text(run_config, "split-address", "0.0.0.0:9300")
        host, _, port = connect.rpartition(":")
        if host in ("0.0.0.0", "[::]", "::", ""):
            connect = f"127.0.0.1:{port}"
        cert = _text(run_config, "tls-cert", "")
        return cls(
            device=device, split_server=connect, token=tokens[device_id],
            root_cert=read_secret(cert, "TLS certificate") if cert else None, data_path=None,
            state_dir=Path(_text(run_config, "device-state-dir", "~/.cache/splitpeft/device-state")).expanduser(),
            status_file=None,
        )

"""Secrets of a deployment: device tokens for the split stream, a self-signed TLS certificate,
an EC key pair per SuperNode for Flower's node authentication (`splitpeft deploy-keys`)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from splitpeft.storage import atomic_folder


def identity_proof(token: str, challenge: str, node_id: int, device_id: str) -> str:
    """A node's answer to "which device are you": HMAC-SHA256, keyed by that device's split-stream
    token, over the server's fresh challenge, the node's Flower id and the device id. It proves
    the node holds the device's token without sending it, and cannot be replayed by another node
    or for another challenge."""
    message = f"{challenge}:{node_id}:{device_id}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def proof_matches(token: str, challenge: str, node_id: int, device_id: str, proof: str) -> bool:
    return hmac.compare_digest(identity_proof(token, challenge, node_id, device_id), proof)


def read_secret(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise DeploymentError(f"cannot read the {what} {path!r}: {error.strerror}") from None


def read_tokens(path: str) -> dict[str, str]:
    """A tokens file: JSON {"device-0": "<secret>", ...} (`splitpeft deploy-keys` writes one)."""
    try:
        tokens = json.loads(read_secret(path, "tokens file"))
    except json.JSONDecodeError as error:
        raise DeploymentError(f"tokens file {path!r} is not JSON: {error}") from None
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in tokens.items()):
        raise DeploymentError(f"tokens file {path!r} must map device ids to non-empty token strings")
    return tokens


def write_deployment_keys(folder: Path, num_devices: int, hosts: tuple[str, ...]) -> list[Path]:
    """A new folder with what a deployment needs: tokens.json (server), device-N.token (one per
    device), server-cert.pem / server-key.pem (self-signed for `hosts`; TLS of the split stream
    and of the SuperLink), device-N.node-key / .node-key.pub (an EC key pair per device for
    Flower's SuperNode authentication, OpenSSH format). Secrets are readable by their owner only.
    Returns the files written."""
    import secrets

    from splitpeft.transport.grpc import self_signed_certificate

    if num_devices < 1:
        raise DeploymentError("--devices must be at least 1")
    if not hosts:
        raise DeploymentError("--hosts needs at least one name or IP")
    folder = Path(folder)
    if folder.exists():
        raise DeploymentError(f"{folder} exists; deploy-keys never overwrites keys")
    tokens = {f"device-{i}": secrets.token_urlsafe(32) for i in range(num_devices)}
    cert, key = self_signed_certificate(hosts, valid_days=365)
    files = {"tokens.json": json.dumps(tokens, indent=2).encode(), "server-cert.pem": cert, "server-key.pem": key,
             **{f"{device}.token": token.encode() for device, token in tokens.items()}}
    for device in tokens:
        files[f"{device}.node-key"], files[f"{device}.node-key.pub"] = node_key_pair()
    with atomic_folder(folder) as staging:
        for name, content in files.items():
            path = staging / name
            path.write_bytes(content)
            path.chmod(0o644 if name.endswith((".pub", "-cert.pem")) else 0o600)
    return [folder / name for name in files]


def node_key_pair() -> tuple[bytes, bytes]:
    """(private, public) P-384 key in OpenSSH format: `flower-supernode --auth-supernode-private-key`
    takes the first, `flwr supernode register` the second."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


class DeploymentError(ValueError):
    """A run or node configuration that cannot work: missing keys, unreadable files, bad values."""

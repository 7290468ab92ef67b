"""Finding 4 of issue 12: a Flower node is the device it proves to be (an HMAC of the server's
challenge keyed by that device's split-stream token), never the device it says it is; a node is
one device; a device's reply must come from the split session it trained on."""

from types import SimpleNamespace

import pytest
from conftest import tiny_config
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from splitpeft.deploy.keys import identity_proof
from splitpeft.deploy.records import FRAME, frame_array
from splitpeft.deploy.server_app import FlowerEngine
from splitpeft.federation.simulation import Simulation
from splitpeft.transport.messages import MessageError, encode

TOKENS = {"device-0": "token-zero", "device-1": "token-one"}


def _engine(challenges: dict[int, str]) -> FlowerEngine:
    engine = FlowerEngine(grid=None, settings=SimpleNamespace(tokens=TOKENS))
    engine._challenges = dict(challenges)
    return engine


def _answer(device_id: str, proof: str | None) -> RecordDict:
    record = {"device": device_id} if proof is None else {"device": device_id, "proof": proof}
    return RecordDict({"device": ConfigRecord(record)})


def test_a_node_cannot_take_a_device_by_naming_it():
    engine = _engine({7: "c7"})
    assert engine._claim_device(7, _answer("device-1", None)) == set()  # its word alone
    forged = identity_proof("token-zero", "c7", 7, "device-1")  # device-0's token, device-1's name
    assert engine._claim_device(7, _answer("device-1", forged)) == set()
    assert engine.nodes == {}
    honest = identity_proof("token-one", "c7", 7, "device-1")
    assert engine._claim_device(7, _answer("device-1", honest)) == {"device-1"}
    assert engine.nodes == {"device-1": 7}


def test_a_proof_does_not_replay_on_another_node_or_challenge():
    engine = _engine({7: "c7", 8: "c8"})
    proof_for_7 = identity_proof("token-zero", "c7", 7, "device-0")
    assert engine._claim_device(8, _answer("device-0", proof_for_7)) == set()
    assert engine._claim_device(9, _answer("device-0", proof_for_7)) == set()  # never asked: no challenge
    assert engine.nodes == {}


def test_one_node_holds_at_most_one_device():
    engine = _engine({7: "c7"})
    assert engine._claim_device(7, _answer("device-0", identity_proof("token-zero", "c7", 7, "device-0"))) == {"device-0"}
    assert engine._claim_device(7, _answer("device-1", identity_proof("token-one", "c7", 7, "device-1"))) == set()
    assert engine.nodes == {"device-0": 7}


def test_a_reply_without_its_split_session_is_refused():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=2"))
    engine = _engine({})
    device = sim.devices[1]
    sim.begin_round()  # no split session of device-1 has trained this round
    upload = encode(device.upload_message())
    content = RecordDict({"upload": ArrayRecord({FRAME: frame_array(upload)}),
                          "stats": ConfigRecord({"stats": "{}"})})
    with pytest.raises(MessageError, match="no split session authenticated as device-1 trained this round"):
        engine._result(sim, "device-1", content)

"""Session snapshots (protocol.md §2.3): what one engine writes, another rebuilds, exactly."""

from decimal import Decimal

import msgspec

from farmesh_ws.core.types import SamplingOverrides
from farmesh_ws.engine.history import rewind
from farmesh_ws.engine.snapshot import (
    SessionSnapshot,
    decode_snapshot,
    encode_snapshot,
    snapshot_of,
)
from farmesh_ws.mesh.fake import FakeBackend
from tests.engine.support import Harness, harness
from tests.engine.test_history import replies, turn


async def _conversation() -> Harness:
    h = harness(FakeBackend(reply=replies))
    await h.send(
        {
            "type": "open",
            "system_prompt": "Be brief.",
            "max_cost_far": "0.5",
            "sampling": {"temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n\n"]},
        }
    )
    await turn(h, "a", "one")
    await turn(h, "b", "two")
    return h


def _snapshot(h: Harness) -> SessionSnapshot:
    conversation = h.session.conversation
    assert conversation is not None
    snapshot = snapshot_of(
        conversation, owner="gw-a", token_hash="ab" * 32, last_seq=9, running=None
    )
    assert snapshot is not None
    return snapshot


async def test_a_snapshot_survives_its_encoding_exactly() -> None:
    snapshot = _snapshot(await _conversation())
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot
    assert snapshot.spent_far > 0
    assert isinstance(snapshot.spent_far, Decimal)
    assert '"spent_far":"' in encode_snapshot(snapshot)  # money as a decimal string


def test_unreadable_or_other_version_snapshots_are_none() -> None:
    assert decode_snapshot("{not json") is None
    assert decode_snapshot('{"session_id": "s"}') is None
    other = msgspec.json.decode(
        encode_snapshot(
            SessionSnapshot(
                session_id="s",
                owner=None,
                token_hash="",
                principal_id="open",
                wallet=None,
                model_id="m",
                max_length=64,
                system_prompt=None,
                sampling=SamplingOverrides(),
                budget_far=None,
                spent_far=Decimal(0),
                transcript=[],
                pending=None,
                history=[],
                last_seq=0,
            )
        )
    )
    other["version"] = 2
    assert decode_snapshot(msgspec.json.encode(other).decode()) is None


async def test_another_engine_rebuilds_the_conversation_and_its_turns() -> None:
    original = await _conversation()
    snapshot = decode_snapshot(encode_snapshot(_snapshot(original)))
    assert snapshot is not None
    elsewhere = harness(FakeBackend(reply=replies))
    principal = elsewhere.session.identity.principal
    assert principal is not None
    rebuilt = await elsewhere.engine.sessions.restore(snapshot, principal)
    before = original.session.conversation
    assert before is not None
    assert rebuilt.session_id == before.session_id
    assert rebuilt.system_prompt == before.system_prompt
    assert rebuilt.sampling == before.sampling
    assert (rebuilt.budget_far, rebuilt.spent_far) == (before.budget_far, before.spent_far)
    assert rebuilt.history == before.history
    assert list(rebuilt.mesh.transcript) == list(before.mesh.transcript)
    assert rebuilt.mesh.mark() == before.mesh.mark()
    # the turns came along: a rewind there lands where it lands here
    await rewind(rebuilt, 1)
    await rewind(before, 1)
    assert list(rebuilt.mesh.transcript) == list(before.mesh.transcript)
    assert rebuilt.mesh.mark() == before.mesh.mark()
    await elsewhere.engine.sessions.close(rebuilt)

"""Wire rules that need no mesh: error codes, frame defaults, hostile frames, import weight."""

import re
import subprocess
import sys
from pathlib import Path

from farmesh_ws.errors import error_classes
from tests.engine.support import harness

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "protocol.md"


def _documented_codes() -> dict[str, str]:
    """protocol.md §5: code → its "retryable" cell."""
    section = PROTOCOL_MD.read_text().split("## 5. Error codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|[^|]*\| ([^|]+) \|", section, flags=re.M)
    return {code: retryable.strip() for code, retryable in rows}


def test_protocol_md_and_errors_py_list_the_same_codes_and_flags() -> None:
    documented = _documented_codes()
    classes = error_classes()
    assert set(documented) == set(classes)
    for code, cls in classes.items():
        assert ("yes" in documented[code]) == cls.retryable, code


async def test_frames_always_carry_their_defaults() -> None:
    h = harness()
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "x", "text": ""})
    opened, error = h.frames
    assert opened["protocol_version"] == 1
    assert error["retryable"] is False


async def test_deeply_nested_json_is_an_invalid_json_error_and_the_session_lives_on() -> None:
    h = harness()
    deep = '{"x":' + "[" * 1000 + "]" * 1000 + ',"type":"ping"}'
    assert not await h.session.handle_frame(deep)
    assert h.frames[-1]["code"] == "invalid_json"
    assert await h.send({"type": "ping", "data": "still here"})
    assert h.frames[-1] == {"type": "pong", "data": "still here"}


async def test_a_wallet_ending_in_a_newline_is_refused() -> None:
    h = harness()
    await h.send({"type": "open", "user_wallet": "w\n"})
    (error,) = h.frames
    assert error["code"] == "invalid_message"
    assert "user_wallet" in error["message"]
    assert h.engine.sessions.count == 0


def test_the_engine_and_the_v1_adapter_import_without_the_ml_stack() -> None:
    code = (
        "import sys\n"
        "import farmesh_ws.api.v1, farmesh_ws.engine.engine, farmesh_ws.mesh.fake\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'petals', 'hivemind') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""

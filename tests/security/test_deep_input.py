"""Input nested thousands deep makes msgspec raise RecursionError, not a DecodeError (found by
the fuzzing). Every decode of bytes from the network must treat it as undecodable input: the
agent's control handler answers with an error, central's `status` reports the agent as not
answering sensibly, and neither crashes."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from agent.control import Control
from agent.outbox import Outbox
from central.broker import EmbeddedBroker
from central.control import ask_one
from protocol.subjects import control_subject
from protocol.wire import AgentStatus, ControlError

DEEP_MAPS = b"\x81\xa1a" * 1000 + b"\xc0"  # {"a": {"a": ... nil}}: 3 KB of msgpack


def test_deep_input_really_is_recursion_for_msgspec() -> None:
    """The premise: without our handling this input escapes as RecursionError."""
    from protocol.wire import decode_control_request

    with pytest.raises(RecursionError):
        decode_control_request(DEEP_MAPS)


async def test_agent_control_answers_an_error_for_a_deep_request(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "data", store_id="S1", max_buffer_bytes=1 << 20, retention_days=1)
    await outbox.open()
    try:
        control = Control(outbox, store_id="S1", status=_no_status)
        reply = await control.handle(DEEP_MAPS)
        assert isinstance(reply, ControlError) and reply.error.startswith("bad control request")
        assert 1 == control.errors
    finally:
        await outbox.close()


def _no_status() -> AgentStatus:
    raise AssertionError("a refused request must not reach the handler")


async def test_central_survives_a_deep_reply(nats_server: EmbeddedBroker) -> None:
    """A rogue responder on a store's control subject answers 3 KB nested 1000 deep: asking it
    gives 'not reachable' with the reason, not a crash of `storelink-central status`."""
    nc = await nats.connect(nats_server.url)
    try:

        async def rogue(msg: Msg) -> None:
            await msg.respond(DEEP_MAPS)

        await nc.subscribe(control_subject("S1"), cb=rogue)
        reach = await ask_one(nc, "S1", timeout=2)
        assert (False, True) == (reach.reachable, "does not decode" in (reach.error or ""))
    finally:
        await nc.close()

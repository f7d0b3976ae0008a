"""POST /v1/poslog through the real agent with the real NCR sample and the real parser."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from agent.config import config_from_dict
from agent.errors import ConfigError
from agent.service import AgentService
from central.broker import free_port
from protocol.wire import decode_record
from tests.agent.conftest import STORE

SAMPLE = Path(__file__).parents[3] / "shared" / "poslog" / "ncr-acs-small.xml"


@pytest.fixture
def poslog_settings() -> dict[str, str]:
    return {}


@pytest.fixture
async def agent(tmp_path: Path, poslog_settings: dict[str, str]) -> AsyncIterator[AgentService]:
    cfg = config_from_dict(
        {
            "store_id": STORE,
            "data_dir": str(tmp_path / "agent"),
            "ingest": {"listen": f"127.0.0.1:{free_port()}"},
            "nats": {"urls": [f"nats://127.0.0.1:{free_port()}"]},
            "poslog": poslog_settings,
        }
    )
    service = AgentService(cfg)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
def xml() -> bytes:
    return SAMPLE.read_bytes()


async def test_real_poslog_sample_is_stored_once(agent: AgentService, xml: bytes) -> None:
    """The NCR sample is converted and stored; posting it again stores nothing new (its
    event_ids are stable) and answers 200 with the original seqs."""
    url = agent.ingest.url + "/v1/poslog"
    headers = {"Content-Type": "application/xml"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=xml, headers=headers) as resp:
            first = (resp.status, await resp.json())
        async with http.post(url, data=xml, headers=headers) as resp:
            again = (resp.status, await resp.json())
        async with http.post(url, data=b"<POSLog><Transaction>", headers=headers) as resp:
            broken = (resp.status, await resp.json())
    assert 202 == first[0]
    assert first[1]["accepted"] >= 1
    assert list(range(1, first[1]["accepted"] + 1)) == sorted(set(first[1]["seqs"]))
    assert (200, 0, first[1]["seqs"]) == (again[0], again[1]["accepted"], again[1]["seqs"])
    assert (400, "unparsable") == (broken[0], broken[1]["error"])
    assert first[1]["accepted"] == agent.outbox.statistics().last_seq


@pytest.mark.parametrize(
    ("poslog_settings", "occurred_at"),
    [
        ({}, "2017-10-01T02:02:54+00:00"),
        ({"timezone": "America/New_York"}, "2017-10-01T06:02:54+00:00"),  # EDT, UTC-4
    ],
)
async def test_naive_poslog_times_are_read_in_the_stores_timezone(
    agent: AgentService, xml: bytes, occurred_at: str
) -> None:
    """The sample's times carry no offset: they are read in poslog.timezone (UTC unless set)."""
    async with aiohttp.ClientSession() as http:
        url = agent.ingest.url + "/v1/poslog"
        async with http.post(url, data=xml, headers={"Content-Type": "application/xml"}) as r:
            assert 202 == r.status
    run = await agent.outbox.read_unsent(1, 1 << 20)
    assert run is not None
    event = decode_record(run.payloads[0]).event
    assert occurred_at == event.occurred_at.astimezone(dt.UTC).isoformat()


def test_an_unknown_timezone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown timezone 'Mars/Olympus'"):
        config_from_dict({"store_id": STORE, "poslog": {"timezone": "Mars/Olympus"}})

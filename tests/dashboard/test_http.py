"""The dashboard over real HTTP from a running central: pages and their JSON siblings, the
state of each store worst first, the filter, and actions that need the operator token."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from agent.simulator import Till
from central.broker import free_port
from central.config import DashboardSettings
from central.dashboard import Dashboard
from tests.central.conftest import Harness, make_records
from tests.dashboard.conftest import TOKEN


def base(central: Harness) -> str:
    return f"http://{central.service.cfg.http}"


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert 200 == resp.status
        return await resp.json()


async def two_stores_one_with_a_gap(central: Harness) -> None:
    """S1 delivers seqs 1..3; S2 delivers 1..2 and then 5..6 (3..4 missing: a gap)."""
    s1 = list(Till(store_id="S1", seed=1).events(3))
    s2 = list(Till(store_id="S2", seed=2).events(6))
    await central.publish("S1", make_records(s1))
    await central.publish("S2", make_records(s2[:2]))
    await central.publish("S2", make_records(s2[4:], first_seq=5))
    await central.wait_for(lambda: len(central.delivered()) >= 5)
    for _ in range(400):  # S2's later batch processed: held behind the gap 3..4
        status = await central.service.status()
        if [s["gap"] for s in status["stores"] if s["store_id"] == "S2"] not in ([], [None]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("S2's gap never showed in status")


async def test_the_index_shows_every_store_worst_first_with_a_word_beside_the_colour(
    central_unpolled: Harness, http: aiohttp.ClientSession
) -> None:
    """A store behind a gap is amber with ▲ WARN and GAP, and comes before the one that is
    well; the page's JSON sibling says the same."""
    central = central_unpolled
    await two_stores_one_with_a_gap(central)
    await central.wait_for(lambda: central.service.watch is not None)
    doc = await get_json(http, f"{base(central)}/.json")
    assert ["S2", "S1"] == [s["store_id"] for s in doc["stores"]]
    assert [("warn", ["gap"])] == [(s["state"], s["problems"]) for s in doc["stores"][:1]]
    assert 2 == doc["totals"]["stores"]
    async with http.get(f"{base(central)}/") as resp:
        html = await resp.text()
    row = html.split('data-store="S2"', 1)[1].split("</tr>", 1)[0]
    assert ["▲ WARN", "GAP", "3..4"] == [w for w in ("▲ WARN", "GAP", "3..4") if w in row]
    assert html.index('data-store="S2"') < html.index('data-store="S1"')


async def test_stores_whose_agents_do_not_answer_are_red(
    central: Harness, http: aiohttp.ClientSession
) -> None:
    """No agent answers for S1 (only its batches came): once asked, it is ✕ ALERT,
    UNREACHABLE."""
    await central.publish("S1", make_records(list(Till(store_id="S1").events(2))))
    await central.wait_for(lambda: len(central.delivered()) >= 2)
    watch = central.service.watch
    assert watch is not None
    await watch.polled.wait()
    polls = watch.polls
    await central.wait_for(lambda: watch.polls > polls)
    [store] = (await get_json(http, f"{base(central)}/.json"))["stores"]
    assert ("alert", ["unreachable"]) == (store["state"], store["problems"])
    async with http.get(f"{base(central)}/") as resp:
        assert "✕ ALERT" in await resp.text()


async def test_the_filter_narrows_the_list(
    central_unpolled: Harness, http: aiohttp.ClientSession
) -> None:
    """?q= matches store ids, ?state=problems keeps what needs a look; both on the page and
    its JSON."""
    central = central_unpolled
    await two_stores_one_with_a_gap(central)
    by_id = await get_json(http, f"{base(central)}/.json?q=s1")
    assert ["S1"] == [s["store_id"] for s in by_id["stores"]]
    warn = await get_json(http, f"{base(central)}/.json?state=warn")
    assert ["S2"] == [s["store_id"] for s in warn["stores"]]
    async with http.get(f"{base(central)}/?q=S2") as resp:
        html = await resp.text()
    assert ('data-store="S2"' in html, 'data-store="S1"' in html) == (True, False)


async def test_a_store_page_and_its_json(central: Harness, http: aiohttp.ClientSession) -> None:
    """/stores/S2 shows its gap, its dead letters (none) and its business days by
    reconciliation state; /stores/S2.json has the same; an unknown store is 404."""
    await two_stores_one_with_a_gap(central)
    doc = await get_json(http, f"{base(central)}/stores/S2.json")
    assert [(3, 4)] == [(g["from_seq"], g["to_seq"]) for g in doc["store"]["gaps"]]
    assert [] == doc["dead_letters"]
    assert {"reconciled", "pending", "missing", "skipped", "mismatch"} <= set(
        doc["reconciliation"]["days"]
    )
    async with http.get(f"{base(central)}/stores/S2") as resp:
        html = await resp.text()
    assert all(w in html for w in ("3..4", "Dead letters", "Reconciliation", "reconciled"))
    async with http.get(f"{base(central)}/stores/NOPE") as resp:
        assert 404 == resp.status


async def test_resync_needs_the_operator_token(
    central: Harness, http: aiohttp.ClientSession
) -> None:
    """Without the token, or with a wrong one, a resync is refused (401) and nothing is asked;
    with it, central asks the store (here no agent answers: 502, saying so)."""
    await two_stores_one_with_a_gap(central)
    url = f"{base(central)}/stores/S2/resync"
    outcomes = []
    for token in ("", "wrong", TOKEN):
        async with http.post(url, data={"from_seq": "3", "token": token}) as resp:
            html = await resp.text()
            outcome = html.split('id="outcome"', 1)[1].split("</p>", 1)[0]
            outcomes.append((resp.status, "refused" in outcome, "did not answer" in outcome))
    assert [(401, True, False), (401, True, False), (502, False, True)] == outcomes


async def test_events_per_second_come_from_the_delivered_counter(
    central: Harness, http: aiohttp.ClientSession
) -> None:
    """Once events flow between two polls, the last minute's rate is above zero."""
    watch = central.service.watch
    assert watch is not None
    await watch.polled.wait()
    await two_stores_one_with_a_gap(central)
    polls = watch.polls
    await central.wait_for(lambda: watch.polls > polls + 1)
    rates = (await get_json(http, f"{base(central)}/.json"))["rates"]
    assert True is (rates["last_minute"] > 0)


async def test_without_an_operator_token_the_actions_are_off(
    central: Harness, http: aiohttp.ClientSession
) -> None:
    """A dashboard whose central has no operator token says its actions are off and refuses
    any (403), whatever token is given."""
    dashboard = Dashboard(central.service, DashboardSettings())
    app = web.Application()
    dashboard.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await two_stores_one_with_a_gap(central)
        async with http.get(f"http://127.0.0.1:{port}/stores/S1") as resp:
            assert True is ("actions are off" in await resp.text())
        async with http.post(
            f"http://127.0.0.1:{port}/stores/S1/resync", data={"from_seq": "1", "token": "x"}
        ) as resp:
            assert 403 == resp.status
    finally:
        await runner.cleanup()

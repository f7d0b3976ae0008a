"""The dashboard in a real headless Chromium, against central and agents running as real
processes: what a person sees, what a click changes. Screenshots are kept under each test's
tmp_path."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from central.demo import Pipeline
from central.state import open_db
from tests.dashboard.conftest import TOKEN

pytestmark = pytest.mark.asyncio(loop_scope="session")

POLL = 0.5  # central asks the agents this often
REFRESH = 1.0  # the page refreshes this often
# Generous bounds for what should take one poll and one refresh (a loaded CI machine).
SEEN_WITHIN_MS = 20_000


def dashboard_config(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "central.toml"
    path.write_text(
        f"[dashboard]\nagent_poll_seconds = {POLL}\nrefresh_seconds = {REFRESH}\n"
        f'operator_token = "{TOKEN}"\n'
    )
    return path


async def running(root: Path, store_ids: tuple[str, ...]) -> AsyncIterator[Pipeline]:
    pipeline = Pipeline(
        root=root, store_ids=store_ids, central_args=["--config", str(dashboard_config(root))]
    )
    try:
        await pipeline.start()
        yield pipeline
    finally:
        await pipeline.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def three_stores(tmp_path: Path) -> AsyncIterator[Pipeline]:
    """Central and three stores' agents, as processes."""
    async for pipeline in running(tmp_path / "p", ("S1", "S2", "S3")):
        yield pipeline


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Browser, tmp_path: Path) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1100, "height": 480})
    try:
        yield await context.new_page()
    finally:
        await context.close()


def url(pipeline: Pipeline, path: str = "/") -> str:
    return f"http://127.0.0.1:{pipeline.central_http_port}{path}"


async def test_the_page_shows_every_store_and_a_cut_off_one_turns_red(
    three_stores: Pipeline, page: Page, tmp_path: Path
) -> None:
    """Three stores load as ✓ OK; S2's agent is killed (-9) and, without a reload, its row
    turns ✕ ALERT, UNREACHABLE, and moves to the top."""
    await page.goto(url(three_stores))
    rows = page.locator("#stores tbody tr")
    await expect(rows).to_have_count(3)
    for store_id in ("S1", "S2", "S3"):
        badge = page.locator(f'tr[data-store="{store_id}"] .badge')
        await expect(badge).to_have_text("✓ OK", timeout=SEEN_WITHIN_MS)
    await page.screenshot(path=tmp_path / "all-ok.png")
    three_stores.agents["S2"].kill()
    row = page.locator('tr[data-store="S2"]')
    await expect(row.locator(".badge")).to_have_text("✕ ALERT", timeout=SEEN_WITHIN_MS)
    await expect(row).to_contain_text("UNREACHABLE")
    await expect(rows.first).to_have_attribute("data-store", "S2")
    await page.screenshot(path=tmp_path / "one-cut-off.png")


async def test_a_store_page_opens_and_resync_needs_the_token(
    three_stores: Pipeline, page: Page, tmp_path: Path
) -> None:
    """A click on S1 opens its page; resync without the token is refused and nothing is
    asked; with the token the store answers how many events it re-sends."""
    await page.goto(url(three_stores))
    await page.click('tr[data-store="S1"] a')
    await expect(page.locator("h1")).to_contain_text("store S1")
    assert url(three_stores, "/stores/S1") == page.url
    await page.click('form[action="/stores/S1/resync"] button')
    await expect(page.locator("#outcome")).to_contain_text("needs the operator token")
    await page.screenshot(path=tmp_path / "resync-refused.png")
    await page.fill('form[action="/stores/S1/resync"] input[name="token"]', TOKEN)
    await page.fill('form[action="/stores/S1/resync"] input[name="from_seq"]', "1")
    await page.click('form[action="/stores/S1/resync"] button')
    await expect(page.locator("#outcome")).to_contain_text("events will be re-sent")
    # The answer's page refreshes (and reloads) from the store's address, not the POST's.
    assert url(three_stores, "/stores/S1") == page.url


def thousand_stores(data_dir: Path) -> None:
    """1,000 provisioned stores with marks written straight into central.db: every tenth
    behind a gap, every fiftieth with dead letters."""
    conn = open_db(data_dir)
    now = time.time()
    ids = [f"S{n:04d}" for n in range(1000)]
    with conn:
        conn.executemany(
            "INSERT INTO stores (store_id, added_at) VALUES (?, ?)", [(s, now) for s in ids]
        )
        conn.executemany(
            "INSERT INTO marks (store_id, epoch, hwm, delivered, duplicates, first_seen, "
            "last_seen) VALUES (?, 'e', ?, ?, 0, ?, ?)",
            [(s, n, n, now - 3600, now - n) for n, s in enumerate(ids)],
        )
        conn.executemany(
            "INSERT INTO gaps (store_id, epoch, from_seq, to_seq, since, requests) "
            "VALUES (?, 'e', ?, ?, ?, 0)",
            [(s, n + 1, n + 5, now - 60) for n, s in enumerate(ids) if n % 10 == 0],
        )
        conn.executemany(
            "INSERT INTO dlq_counts (store_id, count) VALUES (?, 2)", [(s,) for s in ids[::50]]
        )
    conn.close()


async def test_a_thousand_stores_load_and_the_filter_answers(
    browser: Browser, tmp_path: Path
) -> None:
    """With 1,000 stores in central's state (no agents: every one unreachable) the page lists
    them all, and typing in the filter narrows the list to one while it keeps refreshing."""
    thousand_stores(tmp_path / "p" / "central")
    async for pipeline in running(tmp_path / "p", ()):
        context = await browser.new_context(viewport={"width": 1100, "height": 480})
        page = await context.new_page()
        try:
            await page.goto(url(pipeline), timeout=60_000)
            rows = page.locator("#stores tbody tr")
            await expect(rows).to_have_count(1000)
            await expect(page.locator("p.totals").first).to_contain_text(
                "1,000 alert", timeout=SEEN_WITHIN_MS
            )
            await page.fill('input[name="q"]', "S0420")
            await expect(rows).to_have_count(1, timeout=SEEN_WITHIN_MS)
            await expect(rows.first).to_contain_text("GAP")
            assert url(pipeline, "/?q=S0420") == page.url
            await page.screenshot(path=tmp_path / "thousand.png")
        finally:
            await context.close()

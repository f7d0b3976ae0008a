"""The dashboard's pages as HTML, from the same documents their ``.json`` siblings serve.

Pure text: a document in, a page out, every value escaped. A store's state is a colour *and* a
symbol and a word (``✕ ALERT``, ``▲ WARN``, ``✓ OK``, ``? UNKNOWN``); a time is "3 min ago"
with the exact UTC time on hover. The script (``static/dashboard.js``) only refreshes what the
server rendered, so the pages read the same before it runs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from protocol.timefmt import duration

STATE_LABELS = {"alert": "✕ ALERT", "warn": "▲ WARN", "unknown": "? UNKNOWN", "ok": "✓ OK"}
FILTERS = {
    "": "every store",
    "problems": "needs a look (alert or warn)",
    "alert": "✕ alert",
    "warn": "▲ warn",
    "unknown": "? unknown",
    "ok": "✓ ok",
}

Doc = Mapping[str, Any]


def e(value: object) -> str:
    return escape(str(value), quote=True)


def ago(ts: float | None, now: float, *, never: str = "never") -> str:
    """``<time>`` saying how long ago ``ts`` was, the exact UTC time on hover."""
    if not ts:
        return f'<span class="muted">{e(never)}</span>'
    exact = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
    seconds = now - ts
    if abs(seconds) < 1:
        text = "just now"
    else:
        text = f"{duration(seconds)} ago" if seconds > 0 else f"in {duration(-seconds)}"
    return f'<time datetime="{exact}" title="{exact}">{e(text)}</time>'


def badge(state: str) -> str:
    return f'<span class="badge {e(state)}">{e(STATE_LABELS.get(state, state))}</span>'


def store_href(store_id: str) -> str:
    return f"/stores/{quote(store_id)}"


def _page(title: str, body: str, refresh: float, src: str) -> str:
    """A whole page; ``src`` is its own address to refresh from (an action's answer is the
    store's page, shown at the action's POST address)."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title>"
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script>'
        f'</head><body data-refresh="{refresh:g}" data-src="{e(src)}">'
        f'<p id="stale" class="banner alert" hidden>✕ central is not answering: these figures '
        f"are from the last refresh</p>{body}</body></html>\n"
    )


def _table(head: Iterable[str], rows: Iterable[str], table_id: str = "") -> str:
    ident = f' id="{e(table_id)}"' if table_id else ""
    cells = "".join(f"<th>{h}</th>" for h in head)
    return f"<table{ident}><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}/s"


def _lag(store: Doc) -> str:
    if store["lag_events"] is None:
        return '<span class="muted">?</span>'
    seconds = store["lag_seconds"]
    behind = "?" if seconds is None else duration(seconds)
    eta = store.get("delivery_eta_seconds")
    due = "" if eta is None else f" · delivered in ~{e(duration(eta))}"
    return f"{store['lag_events']:,} ev · {e(behind)}{due}"


def _pending(store: Doc, now: float) -> str:
    """Events committed at the store and not yet acknowledged, as its agent last reported
    (with when, once that report is not the current one)."""
    reported = store.get("reported")
    if reported is None:
        return '<span class="muted">?</span>'
    stale = store["agent"]["status"] is None
    return f"{reported['pending']:,}" + (f" (as of {ago(reported['at'], now)})" if stale else "")


def _offline(store: Doc, now: float) -> str:
    """Since when the store's agent has not answered: the last time it did (or its last batch,
    if it never answered this central)."""
    if store["agent"]["reachable"] is not False:
        return ""
    return ago(store.get("last_heard") or store["last_seen"], now, never="never heard")


def _gaps(store: Doc) -> str:
    parts = []
    for g in store["gaps"]:
        text = f"{g['from_seq']}..{g['to_seq']}"
        if g["unrecoverable"]:
            text += " UNRECOVERABLE"
        parts.append(e(text))
    return ", ".join(parts)


def _held(store: Doc) -> str:
    held = store.get("held") or {}
    parts = []
    if held.get("blocked"):
        parts.append(f"BLOCKED at {e(held['blocked']['key'])}")
    if held.get("undecodable"):
        parts.append("UNDECODABLE")
    if held.get("expiring"):
        parts.append("EXPIRING")
    if held.get("held_batches"):
        parts.append(f"{held['held_batches']} held")
    return ", ".join(parts)


def index_row(store: Doc, now: float) -> str:
    flags = " ".join(p.upper() for p in store["problems"])
    cells = [
        badge(store["state"]),
        f'<a href="{store_href(store["store_id"])}">{e(store["store_id"])}</a>',
        e(flags),
        _offline(store, now),
        _pending(store, now),
        _lag(store),
        _gaps(store),
        str(store["dlq"] or ""),
        _held(store),
        ago(store["last_seen"], now),
    ]
    tds = "".join(f"<td>{c}</td>" for c in cells)
    return f'<tr class="{e(store["state"])}" data-store="{e(store["store_id"])}">{tds}</tr>'


def _central_line(doc: Doc) -> str:
    central = doc["central"]
    parts = []
    if not central["healthy"]:
        parts.append('<p class="banner alert">✕ central is not consuming (see its log)</p>')
    if not central["nats_connected"]:
        parts.append('<p class="banner alert">✕ central is not connected to NATS</p>')
    for sink in central["sinks"]:
        if sink.get("breaker") not in (None, "closed"):
            parts.append(
                f'<p class="banner alert">✕ OMS sink {e(sink["sink"])}: circuit breaker '
                f"{e(str(sink['breaker']).upper())}</p>"
            )
        if sink.get("misconfigured"):
            parts.append(
                f'<p class="banner alert">✕ OMS sink {e(sink["sink"])} answers as '
                f"misconfigured: {e(sink['misconfigured'])}</p>"
            )
    return "".join(parts)


def render_index(doc: Doc) -> str:
    """``/``: totals, then every store that passes the filter, worst first."""
    now = doc["generated_at"]
    totals = doc["totals"]
    states = totals["states"]
    counts = " · ".join(
        f'<a class="count {s}" href="/?{urlencode({"state": s})}">'
        f"{e(STATE_LABELS[s].split()[0])} {states[s]:,} {e(s)}</a>"
        for s in ("alert", "warn", "unknown", "ok")
    )
    rates = doc["rates"] or {}
    max_lag = totals["max_lag_seconds"]
    summary = (
        f'<p class="totals">{totals["stores"]:,} stores: {counts}</p>'
        f'<p class="totals">delivered {totals["delivered"]:,} · events/s last minute '
        f"{_rate(rates.get('last_minute'))}, last hour {_rate(rates.get('last_hour'))} · "
        f"agents answering {totals['agents_reachable']:,} of {totals['agents_asked']:,} · "
        f"lag {totals['lag_events']:,} events"
        + (f", worst {e(duration(max_lag))}" if max_lag is not None else "")
        + f" · {totals['gaps']:,} open gaps · {totals['dlq']:,} in DLQ</p>"
    )
    flt = doc["filter"]
    options = "".join(
        f'<option value="{e(k)}"{" selected" if k == flt["state"] else ""}>{e(v)}</option>'
        for k, v in FILTERS.items()
    )
    form = (
        '<form id="filter" method="get" action="/">'
        f'<label>store <input type="search" name="q" value="{e(flt["q"])}" '
        'placeholder="id contains" autocomplete="off"></label> '
        f'<label>state <select name="state">{options}</select></label> '
        '<button type="submit">filter</button> <a href="/.json" class="muted">JSON</a></form>'
    )
    rows = [index_row(s, now) for s in doc["stores"]]
    shown = f'<p class="muted">showing {len(rows):,} of {totals["stores"]:,}, worst first</p>'
    head = ("state", "store", "problems", "offline since", "pending at store", "lag", "gaps",
            "DLQ", "held", "last batch")  # fmt: skip
    live = (
        f'<div id="live">{_central_line(doc)}{summary}{shown}'
        f"{_table(head, rows, 'stores') if rows else '<p>no store matches</p>'}"
        f'<p class="muted">updated {ago(now, now)}</p></div>'
    )
    body = f"<header><h1>storelink HQ</h1></header>{form}<main>{live}</main>"
    return _page("storelink HQ", body, doc["refresh_seconds"], "/")


def _facts(rows: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _agent_text(store: Doc) -> str:
    agent = store["agent"]
    if agent["reachable"] is None:
        return f'<span class="muted">not asked: {e(agent["error"] or "")}</span>'
    if not agent["reachable"]:
        return f"✕ does not answer: {e(agent['error'] or '')}"
    if agent["status"] is None:
        return f"▲ answers with an error: {e(agent['error'] or '')}"
    status = agent["status"]
    link = "connected to NATS" if status["connected"] else "NOT CONNECTED to NATS"
    return f"✓ answers ({e(link)}, version {e(status.get('version') or '?')})"


def render_store(doc: Doc, message: tuple[str, str] | None = None) -> str:
    """``/stores/<id>``: everything HQ knows of one store, what went wrong, and the actions."""
    now = doc["generated_at"]
    s = doc["store"]
    sid = s["store_id"]
    status = s.get("reported") or {}
    facts = _facts(
        [
            ("state", badge(s["state"]) + " " + e(" ".join(p.upper() for p in s["problems"]))),
            ("agent", _agent_text(s)),
            ("last heard from its agent", ago(s.get("last_heard"), now)),
            ("offline since", _offline(s, now) or "—"),
            ("pending at the store", _pending(s, now)),
            ("last seq at the store", e(status.get("last_seq", "?"))),
            ("lag", _lag(s)),
            ("last batch", ago(s["last_seen"], now)),
            ("epoch", f"{e(s['epoch'] or '—')} ({s['epochs']} seen)"),
            ("high-water mark", f"{s['hwm']:,}"),
            ("delivered", f"{s['delivered']:,}"),
            ("duplicates dropped", f"{s['duplicates']:,} (re-sent event_ids: {s['resent']:,})"),
            ("provisioned", "yes" if s["provisioned"] else "NO (seen, not provisioned)"),
        ]
    )
    gaps = [_gap_row(g, now) for g in s["gaps"]]
    held = s.get("held") or {}
    held_rows = []
    if held.get("blocked"):
        b = held["blocked"]
        held_rows.append(
            f"<li>✕ BLOCKED at {e(b['key'])} since {ago(b['since'], now)}: {e(b['reason'])} "
            f"({b['failures']} failed tries, next {ago(b['next_try_at'], now)})</li>"
        )
    if held.get("undecodable"):
        u = held["undecodable"]
        held_rows.append(
            f"<li>✕ UNDECODABLE batch seqs {u['first_seq']}..{u['last_seq']} held since "
            f"{ago(u['since'], now)}: {e(u['error'])}</li>"
        )
    if held.get("held_batches") or held.get("released_batches"):
        expiring = " ✕ EXPIRING" if held.get("expiring") else ""
        held_rows.append(
            f"<li>{held['held_batches']} batches held, {held['released_batches']} released to "
            f"be asked for again; the oldest expires {ago(held.get('expires_at'), now)}"
            f"{expiring}</li>"
        )
    skips = [
        f"<li>#{k['id']} epoch {e(k['epoch'])} through {k['through_seq']} by "
        f"{e(k['operator'])} {ago(k['recorded_at'], now)}: {e(k['reason'])}</li>"
        for k in s["skips"][:10]
    ]
    dead = doc["dead_letters"]
    if isinstance(dead, str):
        dlq = f'<p class="banner warn">▲ cannot read the DLQ: {e(dead)}</p>'
    elif dead:
        dlq = _table(
            ("id", "kind", "reason", "filed", "replay"),
            (_dead_letter_row(sid, d) for d in dead),
            "dead-letters",
        )
    else:
        dlq = "<p>none</p>"
    resync_from = s["gap"]["from_seq"] if s["gap"] else s["hwm"] + 1
    resync = _action_form(
        sid,
        "resync",
        "resync",
        f'<label>from seq <input name="from_seq" type="number" min="1" value="{resync_from}">'
        '</label> <label>to seq <input name="to_seq" type="number" min="1" '
        'placeholder="the last it has"></label> ',
    )
    note = ""
    if message is not None:
        kind, text = message
        note = f'<p id="outcome" class="banner {e(kind)}">{e(text)}</p>'
    checkpoint = doc["reconciliation"]
    live = (
        f'<div id="live">{facts}<h2>Gaps</h2>'
        + (_table(("epoch", "missing seqs", "open since", "asked", "can it close?"), gaps)
           if gaps else "<p>none</p>")
        + "<h2>Held back</h2>"
        + (f"<ul>{''.join(held_rows)}</ul>" if held_rows else "<p>nothing</p>")
        + f"<h2>Dead letters</h2>{dlq}"
        + (f"<h2>Gap skips (operators' decisions)</h2><ul>{''.join(skips)}</ul>" if skips else "")
        + "<h2>Reconciliation (business days by state)</h2>"
        + _table(
            ("state", "days"),
            [f"<tr><td>{e(k)}</td><td>{int(v)}</td></tr>" for k, v in checkpoint["days"].items()],
        )
        + f'<p class="muted">till holes reported: {checkpoint["till_holes"]}; each day: '
        f"<code>storelink-central reconcile status --store {e(sid)}</code></p>"
        f'<p class="muted">updated {ago(now, now)}</p></div>'
    )  # fmt: skip
    body = (
        f'<header><p><a href="/">← all stores</a></p><h1>store {e(sid)} {badge(s["state"])}</h1>'
        f'<p><a href="{store_href(sid)}.json" class="muted">JSON</a></p></header>{note}'
        f"<main>{live}<h2>Actions</h2>{_token_note(doc)}{resync}</main>"
    )
    return _page(f"storelink HQ: {sid}", body, doc["refresh_seconds"], store_href(sid))


def _gap_row(gap: Doc, now: float) -> str:
    closes = (
        f"✕ UNRECOVERABLE through {e(gap['lost_through'])}: {e(gap['lost_reason'])}"
        if gap["unrecoverable"]
        else "the store is asked to re-send it"
    )
    return (
        f"<tr><td>{e(gap['epoch'])}</td><td>{gap['from_seq']}..{gap['to_seq']}</td>"
        f"<td>{ago(gap['since'], now)}</td><td>{gap['requests']}</td><td>{closes}</td></tr>"
    )


def _dead_letter_row(store_id: str, dead: Doc) -> str:
    replay = _action_form(store_id, f"dlq/{dead['id']}/replay", "replay")
    return (
        f"<tr><td>{dead['id']}</td><td>{e(dead['kind'])}</td><td>{e(dead['reason'])}</td>"
        f"<td>{e(dead['time'] or '')}</td><td>{replay}</td></tr>"
    )


def _token_note(doc: Doc) -> str:
    if doc["actions"]:
        return '<p class="muted">each action needs the operator token</p>'
    return (
        '<p class="banner warn">▲ actions are off: central has no operator token '
        "(set STORELINK_OPERATOR_TOKEN, or dashboard.operator_token, and restart it)</p>"
    )


def _action_form(store_id: str, action: str, label: str, fields: str = "") -> str:
    return (
        f'<form class="action" method="post" action="{store_href(store_id)}/{e(action)}">'
        f'{fields}<label>token <input name="token" type="password" autocomplete="off" '
        f'></label> <button type="submit">{e(label)}</button></form>'
    )

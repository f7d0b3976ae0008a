"""Decoding events: what the agent does to every POS body, and central to every batch.

    .venv/bin/python -m tests.bench.bench_decode [--quick] [--json results.jsonl]

In this process, no I/O. Bodies are built before the clock starts from the simulated till
(``agent.simulator.Till``: sales, returns, post-voids, adjustments, counts): 100 bodies of 100
events, JSON and msgpack, decoded with ``protocol.events.decode_to_store`` as the agent's
ingest does (plain decimal texts kept as text; ``decode_pos_events``, which parses them to
Decimals, is what it falls back to); 20 batches of 500 records, decoded with
``protocol.wire.decode_batch`` as central does.

Baseline, measured in the same run: the same decodes with ``tests/bench/events_v0.py``, a
frozen copy of protocol/events.py from before the rules were checked once per event (each line,
tender and event checked itself in ``__post_init__``; identifier patterns checked by msgspec).
Ceiling: msgspec alone on the same fields (no constraints, no ``__post_init__``), i.e. what
the protocol's rules still cost on top of decoding.

Every figure is the best of several rounds; rounds of the variants alternate, so other load on
the machine hits them alike. Before timing, every variant must decode every body to the same
events (compared by their encoding).
"""

from __future__ import annotations

import time
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Union

import msgspec

from agent.simulator import Till
from protocol import events, wire
from tests.bench import events_v0
from tests.bench.harness import Options, Row, Table, bench_main, size

JSON_RATE = "decode POS bodies, JSON"
MSGPACK_RATE = "decode POS bodies, msgpack"
BATCH_RATE = "decode batches (central)"
V0 = " (v0: rules per Struct)"
CEILING = " (msgspec alone, no rules)"

# --- the ceiling: the same Structs without constraints or __post_init__ ----------------------


_LIST: Any = list  # subscripted with types built at run time (mypy cannot follow)


def _bare(tp: Any, memo: dict[type, type]) -> Any:
    """``tp`` without Meta constraints, Structs replaced by bare copies."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _bare(args[0], memo)
    if origin is Union or origin is types.UnionType:
        return Union[tuple(_bare(a, memo) for a in args)]  # noqa: UP007 (built at runtime)
    if origin is list:
        return _LIST[_bare(args[0], memo)]
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _bare_struct(tp, memo)
    return tp


def _bare_struct(cls: type[msgspec.Struct], memo: dict[type, type]) -> type:
    if cls not in memo:
        fields: list[Any] = []
        for f in msgspec.structs.fields(cls):
            tp = _bare(f.type, memo)
            if f.default is not msgspec.NODEFAULT:
                fields.append((f.name, tp, f.default))
            elif f.default_factory is not msgspec.NODEFAULT:
                fields.append((f.name, tp, msgspec.field(default_factory=f.default_factory)))
            else:
                fields.append((f.name, tp))
        config = cls.__struct_config__
        memo[cls] = msgspec.defstruct(
            cls.__name__,
            fields,
            kw_only=True,
            frozen=True,
            forbid_unknown_fields=config.forbid_unknown_fields,
            omit_defaults=config.omit_defaults,
            tag=config.tag,
            tag_field=config.tag_field,
        )
    return memo[cls]


def bare_decoders() -> tuple[Callable[[bytes], Any], Callable[[bytes], Any], Any]:
    """JSON and msgpack decoders of a list of bare events, and a bare batch decoder."""
    memo: dict[type, type] = {}
    event = _bare(events.Event, memo)
    batch = _bare(wire.Batch, memo)
    return (
        msgspec.json.Decoder(_LIST[event]).decode,
        msgspec.msgpack.Decoder(_LIST[event]).decode,
        msgspec.msgpack.Decoder(batch).decode,
    )


# --- measuring -------------------------------------------------------------------------------


def make_bodies(
    bodies: int, per_body: int, batches: int, per_batch: int
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """POS bodies (JSON, msgpack) and central batches, from the simulated till."""
    till = Till("B1", seed=7, run_id="decode")
    lists = [list(till.events(per_body)) for _ in range(bodies)]
    json_bodies = [wire.encode_json(body) for body in lists]
    msgpack_bodies = [wire.encode(body) for body in lists]
    batch_bodies = []
    seq = 1
    for _ in range(batches):
        records = []
        for event in till.events(per_batch):
            record = wire.Record(seq=seq, received_at=event.occurred_at, event=event)
            records.append(wire.encode_record(record))
            seq += 1
        batch_bodies.append(
            wire.encode_raw_batch("B1", "5f0c2a9e1d3b4c77", seq - per_batch, seq - 1, records)
        )
    return json_bodies, msgpack_bodies, batch_bodies


def best_rates(
    variants: dict[str, tuple[Callable[[bytes], Any], list[bytes]]], count: int, rounds: int
) -> dict[str, float]:
    """Events per second of each variant (decode every body once per round), best round."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, (decode, bodies) in variants.items():
            started = time.perf_counter()
            for body in bodies:
                decode(body)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: count / seconds for name, seconds in best.items()}


def same_events(
    variants: dict[str, tuple[Callable[[bytes], Any], list[bytes]]], reference: str
) -> None:
    """Every variant decodes every body to what ``reference`` decodes it to (else the figures
    would compare different work)."""
    want_decode, bodies = variants[reference]
    want = [_comparable(want_decode(body)) for body in bodies]
    for name, (decode, _) in variants.items():
        if [_comparable(decode(body)) for body in bodies] != want:
            raise RuntimeError(f"{name} does not decode the bodies as {reference} does")


def _comparable(decoded: Any) -> bytes:
    """What a decode gave, as bytes to compare: events as they encode; a batch as the fields
    every version of it has (the frozen v0 ``Batch`` predates the packed batch's ``codec`` and
    ``packed``, which a plain batch leaves at their defaults)."""
    if isinstance(decoded, list):
        return wire.encode(decoded)
    fields = ("store_id", "epoch", "first_seq", "last_seq", "records", "v")
    return wire.encode([getattr(decoded, field) for field in fields])


async def run(opts: Options) -> Table:
    table = Table("decoding events", opts)
    bodies, per_body = size(opts, 100, 5), size(opts, 100, 20)
    batches, per_batch = size(opts, 20, 2), size(opts, 500, 50)
    rounds = size(opts, 15, 2)
    json_bodies, msgpack_bodies, batch_bodies = make_bodies(bodies, per_body, batches, per_batch)
    bare_json, bare_msgpack, bare_batch = bare_decoders()
    groups = [
        (
            JSON_RATE,
            bodies * per_body,
            {
                JSON_RATE: (events.decode_to_store, json_bodies),
                JSON_RATE + V0: (events_v0.decode_pos_events, json_bodies),
                JSON_RATE + CEILING: (bare_json, json_bodies),
            },
        ),
        (
            MSGPACK_RATE,
            bodies * per_body,
            {
                MSGPACK_RATE: (lambda b: events.decode_to_store(b, msgpack=True), msgpack_bodies),
                MSGPACK_RATE + V0: (
                    lambda b: events_v0.decode_pos_events(b, msgpack=True),
                    msgpack_bodies,
                ),
                MSGPACK_RATE + CEILING: (bare_msgpack, msgpack_bodies),
            },
        ),
        (
            BATCH_RATE,
            batches * per_batch,
            {
                BATCH_RATE: (wire.decode_batch, batch_bodies),
                BATCH_RATE + V0: (events_v0.decode_batch, batch_bodies),
                BATCH_RATE + CEILING: (bare_batch, batch_bodies),
            },
        ),
    ]
    for figure, count, variants in groups:
        same_events(variants, figure)
        rates = best_rates(variants, count, rounds)
        what = f"{per_body} events/body" if figure != BATCH_RATE else f"{per_batch} records/batch"
        v0 = table.add(Row(figure + V0, rates[figure + V0], "events/s", note=what))
        table.add(
            Row(
                figure,
                rates[figure],
                "events/s",
                baseline=figure + V0,
                baseline_value=v0.value,
                note=what,
            )
        )
        table.add(
            Row(
                figure + CEILING,
                rates[figure + CEILING],
                "events/s",
                baseline=figure,
                baseline_value=rates[figure],
                note="the ratio is what the rules still cost",
            )
        )
    table.note(
        f"best of {rounds} rounds; v0 = tests/bench/events_v0.py (protocol/events.py before the "
        "rules were checked once per event)"
    )
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))

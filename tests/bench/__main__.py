"""Run every benchmark in one process, baselines first, so each figure's baseline comes from
the same run:

    .venv/bin/python -m tests.bench [--quick] [--json results.jsonl] [--markdown PATH]

``--markdown`` also writes every table as Markdown (what docs/benchmarks.md shows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from tests.bench import (
    bench_baselines,
    bench_central,
    bench_checkpoint,
    bench_decode,
    bench_drain,
    bench_e2e,
    bench_fleet,
    bench_gap,
    bench_ingest,
    bench_rss,
    bench_snapshots,
    bench_wan,
    bench_webhook,
    bench_workers,
)
from tests.bench.harness import Options, Table, machine, run_loop

BENCHES = (
    bench_baselines,
    bench_decode,
    bench_ingest,
    bench_drain,
    bench_central,
    bench_e2e,
    bench_gap,
    bench_webhook,
    bench_checkpoint,
    bench_workers,
    bench_snapshots,
    bench_rss,
    bench_wan,
    bench_fleet,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", type=Path, help="append results as JSON lines to this file")
    parser.add_argument("--workdir", type=Path, help="keep temporary files under this directory")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    parser.add_argument(
        "--only", action="append", help="run only this bench (e.g. bench_drain); repeatable"
    )
    ns = parser.parse_args(argv)
    opts = Options(quick=ns.quick, json=ns.json, workdir=ns.workdir)
    tables: list[Table] = []
    for bench in BENCHES:
        name = bench.__name__.rsplit(".", 1)[-1]
        if ns.only and name not in ns.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        table: Table = run_loop(bench.run(opts))
        table.print()
        tables.append(table)
    if ns.markdown is not None:
        info = machine()
        lines = [
            f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {info.get('nproc')} CPUs "
            f"({info.get('cpu', '?')}), {info.get('mem_total_kib', 0) // 1024} MiB RAM, "
            f"Python {info['python']}{' (--quick)' if ns.quick else ''}.",
            "",
        ]
        for table in tables:
            lines += [f"### {table.title}", "", table.render(markdown=True), ""]
            lines += [f"- {text}" for text in table.notes]
            if table.notes:
                lines.append("")
        ns.markdown.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

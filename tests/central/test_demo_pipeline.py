"""The demo pipeline's reading of the file sink (central/demo.py), which the e2e tests poll
while central is still appending to it."""

from __future__ import annotations

from pathlib import Path

from central.demo import Pipeline


def test_delivered_skips_a_line_still_being_written(tmp_path: Path) -> None:
    """A poll that lands while the sink is half-way through a line reads the whole lines
    before it; the next poll, after the line's end, reads it too (CI once failed on it)."""
    pipeline = Pipeline(root=tmp_path, store_ids=("S1",))
    pipeline.sink_path.parent.mkdir(parents=True, exist_ok=True)
    pipeline.sink_path.write_bytes(b'{"seq":1}\n\n{"seq":2}\n{"seq":3,"event":{"sku":"00')
    assert [{"seq": 1}, {"seq": 2}] == pipeline.delivered()
    with open(pipeline.sink_path, "ab") as f:
        f.write(b'07"}}\n')
    assert [1, 2, 3] == [r["seq"] for r in pipeline.delivered()]

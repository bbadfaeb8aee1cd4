"""A storage directory written by an earlier laminardb opens and continues.

`data/checkpoint-v1/` was written by the engine before streams became DAGs of operators
(session 14's build: its stream state files are `stream-*.bin`): two shards; a source of
trades with a 1-second tumbling aggregate (two windows closed, one open), a changelog count
per symbol, a join with a reference source, and a filter. Reopened here, every stream goes
on from its saved state: the open window closes with the rows from before and after, the
counts continue, old reference rows join new trades. The expected rows are what the
earlier build itself produced for the same continuation (`checkpoint-v1.expected.json`).
"""

import json
import os
import shutil

import laminardb

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_checkpoint_of_the_pre_dag_format_opens_and_every_stream_continues(tmp_path):
    path = tmp_path / "db"
    shutil.copytree(os.path.join(HERE, "data", "checkpoint-v1"), path)
    db = laminardb.open(str(path), config=laminardb.LaminarConfig(shards=2))
    db.insert("trades", [{"ts": 3500 + 100 * i, "sym": "ABCD"[i % 4], "price": 1000 + i} for i in range(12)])
    db.insert("refs", [{"sym": "E", "name": "e"}])
    db.insert("trades", [{"ts": 4700, "sym": "E", "price": 5}, {"ts": 5000, "sym": "A", "price": 7}])
    got = {}
    for stream in ["bars", "counts", "named", "big"]:
        frame = db.query(f"SELECT * FROM {stream}").to_pandas()
        got[stream] = sorted([str(v) for v in row] for row in frame.itertuples(index=False))
    db.close()
    with open(os.path.join(HERE, "data", "checkpoint-v1.expected.json")) as f:
        expected = json.load(f)
    assert got == expected

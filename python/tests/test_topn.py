"""Issue 24, Top-N per window: ROW_NUMBER() OVER (PARTITION BY window_end … ORDER BY …)
filtered by rn <= N over a windowed stream, emitted once per window when the watermark
passes its end. Checked against DuckDB over the same trades, on 1 and 2 shards."""

from __future__ import annotations

import random

import duckdb
import pyarrow as pa
import pytest

import laminardb

from conftest import poll_rows

VOLUMES = "CREATE STREAM vol_1s AS SELECT sym, SUM(vol) AS vol FROM trades GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)"
TOP3 = (
    "CREATE STREAM top3 AS SELECT window_end, sym, vol, rn FROM (SELECT window_end, sym, vol, "
    "ROW_NUMBER() OVER (PARTITION BY window_end ORDER BY vol DESC) AS rn FROM vol_1s) WHERE rn <= 3"
)


def setup(conn):
    conn.execute("CREATE SOURCE trades (ts BIGINT, sym VARCHAR, vol DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '200' MILLISECOND)")
    conn.execute(VOLUMES)
    conn.execute(TOP3)


def random_trades(seed, n=5_000, span_ms=30_000):
    rng = random.Random(seed)
    rows = [{"ts": rng.randrange(span_ms), "sym": f"S{rng.randrange(40)}", "vol": round(rng.uniform(1, 1_000), 3)} for _ in range(n)]
    # Out of order by up to 100 ms, within the watermark's delay.
    return sorted(rows, key=lambda r: r["ts"] + rng.randrange(100))


def duckdb_top3(rows):
    con = duckdb.connect()
    con.register("trades", pa.Table.from_pylist(rows))
    return sorted(
        con.execute(
            "SELECT window_end, sym, vol, rn FROM (SELECT window_end, sym, vol, ROW_NUMBER() OVER "
            "(PARTITION BY window_end ORDER BY vol DESC) AS rn FROM (SELECT (ts // 1000 + 1) * 1000 AS window_end, sym, "
            "SUM(vol) AS vol FROM trades GROUP BY ALL)) WHERE rn <= 3"
        ).fetchall()
    )


def rounded(rows):
    return sorted((w, s, round(v, 6), rn) for w, s, v, rn in rows)


def test_the_top_three_per_second_equal_duckdb(sharded_db):
    setup(sharded_db)
    sub = sharded_db.subscribe_stream("top3")
    rows = random_trades(4)
    for k in range(0, len(rows), 250):
        sharded_db.insert("trades", rows[k : k + 250])
    sharded_db.writer("trades").watermark(60_000)
    want = duckdb_top3(rows)
    got = poll_rows(sub, ("window_end", "sym", "vol", "rn"), len(want))
    assert len(want) == 90
    assert rounded(got) == rounded(want)
    assert sharded_db.stream_metrics("top3").late_events == 0


def test_open_windows_survive_a_reopen(tmp_path):
    path = str(tmp_path / "db")
    rows = random_trades(8, n=600, span_ms=3_000)
    conn = laminardb.open(path)
    setup(conn)
    conn.insert("trades", rows[:300])
    conn.close()
    conn = laminardb.open(path)
    try:
        sub = conn.subscribe_stream("top3")
        conn.insert("trades", rows[300:])
        conn.writer("trades").watermark(60_000)
        want = duckdb_top3(rows)
        # Windows the watermark closed before the reopen went out then; the rest come now.
        watermark_before = max(r["ts"] for r in rows[:300]) - 200
        want_now = [w for w in want if w[0] > watermark_before]
        assert 0 < len(want_now) < len(want)
        got = poll_rows(sub, ("window_end", "sym", "vol", "rn"), len(want_now))
        assert rounded(got) == rounded(want_now)
        assert conn.query("SELECT COUNT(*) AS n FROM top3").to_arrow().to_pylist() == [{"n": len(want)}]
    finally:
        conn.close()


def test_other_window_functions_are_refused_by_name(db):
    setup(db)
    with pytest.raises(laminardb.LaminarError, match=r"window functions \(OVER …\) other than a Top-N"):
        db.execute("CREATE STREAM s AS SELECT sym, SUM(vol) OVER (PARTITION BY sym) AS running FROM trades")

"""The LEFT join bounded by state_ttl, as a changelog (issue 24): N orders and N/2 fills over
N/2 order ids (half the orders are never filled), `SELECT o.oid, f.px FROM orders o LEFT JOIN
fills f ON o.oid = f.oid` in a stream `WITH (state_ttl = '1 hour')`, both sources fed in
alternating batches. An order goes out padded at once when its fill has not come; it is
retracted (-D) and paired when the fill comes (`changelog_rows` counts what to expect).

* laminardb stream, LEFT (changelog) and INNER (the same join without padding) side by
  side, input rows/s until the subscriber has every change;
* DuckDB's LEFT JOIN over the same rows, as the batch baseline.

    python perf/outer_join.py [--rows 1000000] [--rounds 3] [--shards 2]
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

import laminardb

from join_bench import BATCH, options, rounds, run_duckdb, wait_for

DDL = ["CREATE SOURCE orders (oid BIGINT, sym VARCHAR)", "CREATE SOURCE fills (oid BIGINT, px DOUBLE)"]


def data(n: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(4)
    orders = pa.table({"oid": pa.array(np.arange(n)), "sym": pa.array([f"S{i % 500:03d}" for i in range(n)])})
    filled = rng.permutation(n)[: n // 2]
    fills = pa.table({"oid": pa.array(np.sort(filled)), "px": pa.array(rng.uniform(10, 20, n // 2))})
    return orders, fills


def run_stream(shards: int, kind: str, orders: pa.Table, fills: pa.Table, expect: int) -> tuple[float, int]:
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    for statement in DDL:
        db.execute(statement)
    db.execute(
        f"CREATE STREAM joined WITH (state_ttl = '1 hour') AS SELECT o.oid, f.px FROM orders o {kind} JOIN fills f "
        "ON o.oid = f.oid"
    )
    sub = db.subscribe_stream("joined")
    got = 0
    start = time.perf_counter()
    fill_batches = fills.to_batches(BATCH // 2)
    for i, batch in enumerate(orders.to_batches(BATCH)):
        db.insert("orders", batch)
        if i < len(fill_batches):
            db.insert("fills", fill_batches[i])
        while (b := sub.try_next()) is not None:
            got += b.num_rows
    got = wait_for(sub, got, expect)
    seconds = time.perf_counter() - start
    db.close()
    return seconds, got


def changelog_rows(orders: pa.Table, fills: pa.Table) -> int:
    """The LEFT changelog's rows as `run_stream` feeds them: an order that arrives before its
    fill goes out padded, then is retracted and paired (3 rows); one whose fill came first
    is paired at once (1); an order never filled stays padded (1)."""
    order_batches = orders.to_batches(BATCH)
    seen = 0
    rows = orders.num_rows - fills.num_rows  # never filled
    for i, batch in enumerate(fills.to_batches(BATCH // 2)):
        if i < len(order_batches):
            seen += order_batches[i].num_rows
        oids = batch.column(0).to_numpy()
        after = int((oids < seen).sum())
        rows += 3 * after + (len(oids) - after)
    return rows


def main() -> None:
    opts = options()
    orders, fills = data(opts.rows)
    n = opts.rows
    inputs = n + n // 2
    left = changelog_rows(orders, fills)
    runners = {
        "laminardb stream LEFT (changelog rows)": lambda: run_stream(opts.shards, "LEFT", orders, fills, left),
        "laminardb stream INNER": lambda: run_stream(opts.shards, "INNER", orders, fills, n // 2),
        "duckdb LEFT": lambda: run_duckdb(
            "SELECT o.oid, f.px FROM orders o LEFT JOIN fills f ON o.oid = f.oid", [("orders", orders), ("fills", fills)]
        ),
    }
    expect = {"laminardb stream LEFT (changelog rows)": left, "laminardb stream INNER": n // 2, "duckdb LEFT": n}
    rounds(runners, opts.rounds, n + n // 2, expect=expect)


if __name__ == "__main__":
    main()

"""Many Python threads inserting and querying at once through tiny queues: everything
arrives and nothing deadlocks."""

import threading

import pyarrow as pa

import laminardb


def test_concurrent_inserts_through_full_queues_all_arrive() -> None:
    config = laminardb.LaminarConfig(buffer_size=16, shards=2)
    with laminardb.open(":memory:", config=config) as db:
        db.execute("CREATE SOURCE t (k BIGINT, v BIGINT)")
        threads_n, per_thread = 8, 300
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                w = db.writer("t")
                for i in range(per_thread):
                    if i % 3 == 0:
                        db.insert("t", {"k": t, "v": i})
                    elif i % 3 == 1:
                        w.insert({"k": [t, t], "v": [i, i]})
                    else:
                        db.insert("t", pa.record_batch({"k": [t], "v": [i]}))
                    if i % 50 == 0:
                        db.query("SELECT COUNT(*) FROM t")
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "an insert deadlocked"
        assert errors == []
        rows_per_thread = per_thread + per_thread // 3  # the columnar inserts carry two rows
        got = db.query("SELECT k, COUNT(*) AS n, SUM(v) AS s FROM t GROUP BY k ORDER BY k").fetchall()
        expected_sum = sum(i * (2 if i % 3 == 1 else 1) for i in range(per_thread))
        assert got == [(t, rows_per_thread, expected_sum) for t in range(threads_n)]


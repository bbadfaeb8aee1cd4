"""What keeps a long-running database from growing without bound: orphaned temporary
directories of killed processes are removed, and sources keep only their retained rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap


# A child that opens an in-memory database spilling to the temporary directory, prints
# its pid once rows are spilled, then waits to be killed.
SPILLER = textwrap.dedent(
    """
    import sys, time, laminardb
    cfg = laminardb.LaminarConfig(shards=1, table_spill_threshold=10_000)
    db = laminardb.open(":memory:", config=cfg)
    db.execute("CREATE SOURCE t (v BIGINT)")
    for i in range(4):
        db.insert("t", [{"v": v} for v in range(i * 8_000, (i + 1) * 8_000)])
    deadline = time.time() + 20
    while db.stats("t")["spilled_rows"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    print("spilled", db.stats("t")["spilled_rows"], flush=True)
    time.sleep(600)
    """
)


def ours(tmp):
    return sorted(n for n in os.listdir(tmp) if n.startswith("laminardb-spill-"))


def test_a_killed_process_spill_directory_is_removed_at_the_next_open(tmp_path):
    # Before: `laminardb-spill-<pid>-<n>` of a killed process stayed in /tmp for good.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    children = [subprocess.Popen([sys.executable, "-c", SPILLER], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            line = child.stdout.readline().split()
            assert line[0] == "spilled" and int(line[1]) > 0, line
        dirs = {c.pid: [n for n in ours(tmp_path) if n.startswith(f"laminardb-spill-{c.pid}-")] for c in children}
        assert all(len(d) == 1 for d in dirs.values()), dirs
        killed, alive = children
        spill_files = [f for _, _, fs in os.walk(tmp_path / dirs[killed.pid][0]) for f in fs if f.endswith(".arrow")]
        assert spill_files, "the child spilled to its directory"
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert dirs[killed.pid][0] in ours(tmp_path), "a killed process leaves its directory"

        opener = subprocess.run(
            [sys.executable, "-c", "import laminardb; laminardb.open(':memory:').close()"],
            env=env,
            timeout=60,
            capture_output=True,
            text=True,
        )
        assert opener.returncode == 0, opener.stderr
        assert ours(tmp_path) == dirs[alive.pid], "the orphan is gone, the live database's directory stays"
    finally:
        for child in children:
            child.kill()
            child.wait(10)
    opener = subprocess.run(
        [sys.executable, "-c", "import laminardb; laminardb.open(':memory:').close()"], env=env, timeout=60
    )
    assert opener.returncode == 0
    assert ours(tmp_path) == []

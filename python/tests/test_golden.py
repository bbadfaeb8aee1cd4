"""Golden SQL files: every `golden/**/*.slt`, run with one shard and with the default (all).

The format is described in `golden/runner.py`. Files under `golden_pending/` describe streaming
features still being built: they are only parsed here, unless LAMINARDB_GOLDEN_PENDING=1 is set,
which runs them too. Move a file into `golden/` once its feature lands.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from golden.runner import GoldenFailure, GoldenSyntaxError, parse_file, run_file

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
PENDING = HERE / "golden_pending"

GOLDEN_FILES = sorted(GOLDEN.rglob("*.slt"))
PENDING_FILES = sorted(PENDING.rglob("*.slt"))
RUN_FILES = GOLDEN_FILES + (PENDING_FILES if os.environ.get("LAMINARDB_GOLDEN_PENDING") == "1" else [])


def _id(path: Path) -> str:
    return path.relative_to(HERE).as_posix()


@pytest.mark.parametrize("shards", [1, None], ids=["shards=1", "shards=all"])
@pytest.mark.parametrize("path", RUN_FILES, ids=_id)
def test_golden(path: Path, shards):
    failure = None
    try:
        run_file(path, shards=shards)
    except (GoldenFailure, GoldenSyntaxError) as e:
        failure = str(e)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("path", PENDING_FILES, ids=_id)
def test_pending_golden_file_parses(path: Path):
    failure = None
    try:
        parse_file(path)
    except GoldenSyntaxError as e:
        failure = str(e)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_golden_files_exist():
    assert GOLDEN_FILES, f"no .slt files under {GOLDEN}"

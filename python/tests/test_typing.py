"""The stubs: a sample user script passes `mypy --strict` and also runs."""

import pathlib
import runpy
import subprocess
import sys

SAMPLE = pathlib.Path(__file__).parent / "typecheck" / "sample_user.py"


def test_sample_script_passes_mypy_strict() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(SAMPLE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sample_script_runs() -> None:
    runpy.run_path(str(SAMPLE), run_name="__main__")

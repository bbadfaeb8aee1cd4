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


def test_every_public_attribute_is_in_the_stubs() -> None:
    """What the extension exposes is declared in `_laminardb.pyi` (so `mypy --strict`
    users can reach it); names inherited from a stub base class or from Exception count."""
    import ast

    import laminardb._laminardb as ext

    stub = ast.parse((pathlib.Path(ext.__file__).parent / "_laminardb.pyi").read_text())
    classes = {n.name: n for n in stub.body if isinstance(n, ast.ClassDef)}

    def declared(name: str) -> set[str]:
        node = classes[name]
        names = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        names |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                names |= declared(base.id)
        return names

    missing = {}
    for name in classes:
        runtime = getattr(ext, name, None)
        if runtime is None:
            continue
        public = {a for a in dir(runtime) if not a.startswith("_")} - set(dir(Exception))
        if public - declared(name):
            missing[name] = sorted(public - declared(name))
    assert missing == {}

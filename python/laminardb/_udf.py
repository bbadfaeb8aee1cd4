"""Python functions for SQL: the `udf` and `udaf` decorators; the calls the engine makes
(`_invoke` for each batch of a scalar function, turning what it returns into one Arrow
array; `_udaf_*` for an aggregate's state, merge and result); and the `FUNCTIONS` record
of a database with storage, from which `open()` imports its functions again."""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import pickle
import sys
from typing import Any, Callable, List, Optional

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - functions written as `pa.compute.…` (the specification's examples) find it

_MARK = "__laminardb_udf__"


def udf(
    return_type: pa.DataType,
    *,
    arg_types: Optional[List[pa.DataType]] = None,
    vectorized: bool = True,
) -> Callable[[Callable], Callable]:
    """Marks a function for `Connection.register_udf` (the function itself is returned,
    still callable from Python).

    Vectorized (the default), the function is called once per batch with a `pyarrow.Array`
    per column argument and a `pyarrow.Scalar` per literal argument, and returns an array
    of the batch's length (a `pyarrow.Array`, `ChunkedArray`, NumPy array or list), or one
    scalar for the whole batch. With `vectorized=False` it is called once per row with
    plain Python values and returns one value: simpler, and much slower. With `arg_types`,
    planning checks the arguments against them (casting where SQL would) and refuses a
    call that does not fit; without, any arguments are passed as they are.
    """
    if not isinstance(return_type, pa.DataType):
        raise TypeError(f"udf: return_type must be a pyarrow.DataType, not {type(return_type).__name__}")

    def mark(func: Callable) -> Callable:
        if not callable(func):
            raise TypeError("udf: decorates a function")
        setattr(func, _MARK, {"return_type": return_type, "arg_types": arg_types, "vectorized": vectorized})
        return func

    return mark


def _spec(func: Any) -> dict:
    return getattr(func, _MARK, None) or {}


def _invoke(func: Callable, args: list, scalars: list, rows: int, return_type: pa.DataType, vectorized: bool) -> pa.Array:
    if vectorized:
        out = func(*[a[0] if s else a for a, s in zip(args, scalars)])
        if isinstance(out, pa.ChunkedArray):
            out = out.combine_chunks()
        elif isinstance(out, pa.Scalar):
            out = pa.repeat(out, rows)
        elif not isinstance(out, pa.Array):
            out = pa.array(out, type=return_type)
        return out
    columns = [[a[0].as_py()] * rows if s else a.to_pylist() for a, s in zip(args, scalars)]
    values = [func(*row) for row in zip(*columns)] if columns else [func() for _ in range(rows)]
    return pa.array(values, type=return_type)


_UDAF_MARK = "__laminardb_udaf__"


def udaf(
    return_type: pa.DataType,
    accumulator_type: pa.DataType,
    *,
    arg_types: Optional[List[pa.DataType]] = None,
) -> Callable[[type], type]:
    """Marks a class for `Connection.register_udaf` (the class itself is returned).

    The class is made with no arguments, once per group (and window, in a stream). Each
    batch's rows of the group come to `accumulate(*arrays)`, one `pyarrow.Array` per
    argument, in arrival order; `evaluate()` returns the group's result (a Python value or
    a `pyarrow.Scalar`, of `return_type`); `merge(other)` folds in another instance of the
    class (partial results of a parallel query, merging session windows).
    `accumulator_type` is a `pyarrow.struct` whose fields name the instance attributes
    that hold its state: they are what is merged between partial results and saved in
    checkpoints, so everything `evaluate()` needs must be in them.
    """
    if not isinstance(return_type, pa.DataType):
        raise TypeError(f"udaf: return_type must be a pyarrow.DataType, not {type(return_type).__name__}")
    if not isinstance(accumulator_type, pa.StructType):
        raise TypeError("udaf: accumulator_type must be a pyarrow.struct naming the state's attributes")

    def mark(cls: type) -> type:
        _check_udaf_class("udaf", cls)
        setattr(cls, _UDAF_MARK, {"return_type": return_type, "accumulator_type": accumulator_type, "arg_types": arg_types})
        return cls

    return mark


def _check_udaf_class(who: str, cls: Any) -> None:
    if not isinstance(cls, type):
        raise TypeError(f"{who}: takes a class (with accumulate, merge and evaluate)")
    missing = [m for m in ("accumulate", "merge", "evaluate") if not callable(getattr(cls, m, None))]
    if missing:
        raise TypeError(f"{who}: {cls.__name__} lacks {', '.join(missing)}")


def _udaf_spec(cls: Any) -> dict:
    _check_udaf_class("register_udaf", cls)
    return getattr(cls, _UDAF_MARK, None) or {}


def _udaf_evaluate(acc: Any, return_type: pa.DataType) -> pa.Array:
    value = acc.evaluate()
    if isinstance(value, pa.Scalar):
        value = value.as_py()
    return pa.array([value], type=return_type)


def _udaf_state(acc: Any, state_type: pa.StructType) -> list:
    out = []
    for field in state_type:
        if not hasattr(acc, field.name):
            raise AttributeError(
                f"{type(acc).__name__} has no attribute '{field.name}', which its accumulator_type names"
            )
        out.append(pa.array([getattr(acc, field.name)], type=field.type))
    return out


def _udaf_set(acc: Any, arrays: list, row: int, state_type: pa.StructType) -> Any:
    for field, array in zip(state_type, arrays):
        setattr(acc, field.name, array[row].as_py())
    return acc


def _udaf_merge(cls: type, acc: Any, arrays: list, state_type: pa.StructType) -> None:
    for row in range(len(arrays[0]) if arrays else 0):
        acc.merge(_udaf_set(cls(), arrays, row, state_type))


def _udaf_restore(cls: type, arrays: list, row: int, state_type: pa.StructType) -> Any:
    return _udaf_set(cls(), arrays, row, state_type)


# ---- functions a database with storage imports again --------------------------------
#
# `<storage_dir>/FUNCTIONS` (JSON) names each function registered on the database that
# can be imported again: its module and qualified name, and its declared types (pickled
# pyarrow types, base64). `open()` imports them before recovery plans the streams.

_FUNCTIONS = "FUNCTIONS"


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _reference(obj: Any) -> Optional[tuple]:
    """(module, qualified name) that import `obj` again, or None (a lambda, a local
    function or class, one its module does not name)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    try:
        return (module, qualname) if _resolve(module, qualname) is obj else None
    except Exception:
        return None


def _read_functions(directory: str) -> dict:
    try:
        with open(os.path.join(directory, _FUNCTIONS), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _store_function(directory: str, name: str, kind: str, obj: Any, spec: dict) -> bool:
    """Records `obj` as `name`; True when recorded. A function that cannot be imported
    again is not, and leaves an earlier record of the name alone: the streams stored with
    that one open with it again."""
    ref = _reference(obj)
    if ref is None:
        return False
    entries = _read_functions(directory)
    blob = base64.b64encode(pickle.dumps(spec)).decode("ascii")
    entries[name] = {"kind": kind, "module": ref[0], "qualname": ref[1], "spec": blob}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, _FUNCTIONS)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _load_functions(directory: str) -> list:
    """(name, kind, object, spec) of every recorded function that imports; the others are
    logged and left out."""
    out = []
    for name, entry in sorted(_read_functions(directory).items()):
        try:
            obj = _resolve(entry["module"], entry["qualname"])
            spec = pickle.loads(base64.b64decode(entry["spec"]))
        except Exception as e:  # noqa: BLE001 - reported, and the database still opens
            logging.getLogger("laminardb").warning(
                "function '%s' (%s:%s) could not be imported again (%s: %s); streams calling it cannot open",
                name,
                entry.get("module"),
                entry.get("qualname"),
                type(e).__name__,
                e,
            )
            continue
        out.append((name, entry["kind"], obj, spec))
    return out


def _invoke_group(func: Callable, args: list, return_type: pa.DataType) -> pa.Array:
    """A vectorized function called over a whole group: its one value, as a 1-array."""
    out = func(*args)
    if isinstance(out, pa.ChunkedArray):
        out = out.combine_chunks()
    if isinstance(out, pa.Array):
        if len(out) != 1:
            raise ValueError(f"returned {len(out)} values for one group (over a group, return one value)")
        out = out[0]
    if isinstance(out, pa.Scalar):
        out = out.as_py()
    return pa.array([out], type=return_type)

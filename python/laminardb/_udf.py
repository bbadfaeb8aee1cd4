"""Python scalar functions for SQL: the `udf` decorator, and the call the engine makes for
each batch (`_invoke`), which turns what the function returns into one Arrow array."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import pyarrow as pa

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

"""Golden SQL tests: `.slt` files run by `runner.py` (see its docstring for the format)."""

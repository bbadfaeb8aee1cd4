"""The benchmark workloads. Each module has a `run(ctx)` that measures its cases under
whichever laminardb the interpreter imports and checks their results. perf/harness.py runs
each one in a fresh subprocess (`python -m workloads NAME`, from perf/) and reads the
cases it prints, one JSON object per line."""

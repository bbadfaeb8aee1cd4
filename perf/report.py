"""Turns the harness's runs into medians, perf/RESULTS.md and the plots (matplotlib, Agg).

A case's median is taken over the runs whose checks passed; every other outcome (wrong,
no output, error, timeout, unsupported, pending) is listed with its detail instead.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from hdrh.histogram import HdrHistogram  # noqa: E402

OURS = "laminardb"
UPSTREAM = "upstream"
BASELINE = "baseline"  # another build of ours (tools/perf run --baseline PYTHON)
IMPLS = [OURS, BASELINE, UPSTREAM]
COLORS = {OURS: "tab:blue", BASELINE: "tab:green", UPSTREAM: "tab:orange"}
STYLES = ["-", "--", ":", "-."]
PERCENTILE_TICKS = [(50, "50%"), (90, "90%"), (99, "99%"), (99.9, "99.9%"), (99.99, "99.99%")]
# Statuses whose detail says it all ("no output in 5 s"); others show the status, detail in the notes.
SELF_EXPLAINED = {"no output", "pending", "unsupported", "timeout"}

Summary = dict[str, Any]


def outcome(run: dict[str, Any], case: str) -> dict[str, Any]:
    """The run's record of `case`, or a failure if the run died before reporting it."""
    for c in run["cases"]:
        if c["name"] == case:
            return c
    killed = (run["error"] or "").startswith("killed")
    return {"status": "timeout" if killed else "error", "detail": run["error"] or "case missing from the output", "metrics": {}}


def summarise(doc: dict[str, Any]) -> list[Summary]:
    """One entry per (workload, variant, case), in the order first seen, with each
    implementation's run count, passing count, metric medians and failures."""
    runs_of: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    keys: dict[tuple[str, str, str], None] = {}
    for run in doc["runs"]:
        runs_of[(run["workload"], run["variant"], run["impl"])].append(run)
        for case in run["cases"]:
            keys[(run["workload"], run["variant"], case["name"])] = None
    summaries = []
    for workload, variant, case in keys:
        metrics: dict[str, dict[str, Any]] = {}
        impls: dict[str, Any] = {}
        for impl in IMPLS:
            runs = runs_of.get((workload, variant, impl))
            if not runs:
                continue
            outcomes = [outcome(run, case) for run in runs]
            passed = [c for c in outcomes if c["status"] == "ok"]
            values: dict[str, list[float]] = defaultdict(list)
            for c in passed:
                for name, m in c["metrics"].items():
                    metrics.setdefault(name, {"name": name, "unit": m["unit"], "better": m["better"]})
                    values[name].append(m["value"])
            failures = Counter((c["status"], c["detail"]) for c in outcomes if c["status"] != "ok")
            impls[impl] = {
                "runs": len(runs),
                "ok": len(passed),
                "medians": {name: statistics.median(v) for name, v in values.items()},
                "failures": [{"status": s, "detail": d, "count": n} for (s, d), n in failures.most_common()],
            }
        summaries.append(
            {"workload": workload, "variant": variant, "case": case, "metrics": list(metrics.values()), "impls": impls}
        )
    return summaries


def fmt(value: float, unit: str) -> str:
    if unit in ("rows/s", "events/s"):
        return f"{value / 1e6:,.2f} M {unit}" if value >= 1e6 else f"{value:,.0f} {unit}"
    if unit == "s":
        return f"{value:,.2f} s"
    if unit == "µs":
        return f"{value:,.0f} µs" if value >= 1000 else f"{value:,.1f} µs"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "×":
        return f"{value:,.2f}×"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{value:,.0f}"


def cell(impl: Optional[dict[str, Any]], metric: dict[str, Any]) -> str:
    if impl is None:
        return "not run"
    if impl["ok"] == 0:
        first = impl["failures"][0]
        # An unsupported case's reason can be long: it is listed once below the table.
        short = first["status"] == "unsupported" or first["status"] not in SELF_EXPLAINED
        return first["status"] if short else first["detail"]
    value = impl["medians"].get(metric["name"])
    if value is None:
        return "—"
    text = fmt(value, metric["unit"])
    return text if impl["ok"] == impl["runs"] else f"{text} ({impl['ok']} of {impl['runs']} ok)"


def ratio(summary: Summary, metric: dict[str, Any], other: str = UPSTREAM) -> str:
    ours, theirs = [summary["impls"].get(i, {}).get("medians", {}).get(metric["name"]) for i in (OURS, other)]
    if metric["better"] is None or not ours or not theirs:
        return ""
    speedup = theirs / ours if metric["better"] == "lower" else ours / theirs
    digits = 2 if other == BASELINE else 1  # two builds of ours differ by percents
    return f"{speedup:,.{digits}f}× faster" if speedup >= 1 else f"{1 / speedup:,.{digits}f}× slower"


def version(doc: dict[str, Any], impl: str) -> str:
    for run in doc["runs"]:
        if run["impl"] == impl and run["info"]:
            return run["info"]["version"]
    return "?"


def header(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    options = doc["options"]
    ours_python = doc["pythons"][OURS]
    baseline = BASELINE in doc["pythons"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{doc['command']}`. Do not edit: rerun it (see perf/README.md).",
        "",
    ]
    if options["quick"]:
        lines += ["**Quick run (`--quick`): smaller data and fewer samples.**", ""]
    if not ours_python.startswith(".venv-perf/"):
        lines += [f"**laminardb ran from `{ours_python}`, not the release build in `.venv-perf`: its speeds mean nothing.**", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| machine | {m['nproc']} cores (nproc), {m['cpu']}, {m['memory']}, Linux {m['kernel']} |",
        f"| git | {m['git']} |",
        f"| laminardb | {version(doc, OURS)}, `{ours_python}` |",
    ]
    if baseline:
        lines.append(f"| baseline | laminardb {version(doc, BASELINE)}, `{doc['pythons'][BASELINE]}` |")
    lines += [
        f"| upstream | laminardb {version(doc, UPSTREAM)}, `{doc['pythons'][UPSTREAM]}` |",
        f"| method | {options['rounds']} round{'s' if options['rounds'] != 1 else ''}, alternating laminardb / "
        f"{'baseline / ' if baseline else ''}upstream, each workload run in a fresh "
        "process; medians over the runs whose checks passed |",
        f"| environment | {' '.join(f'`{k}={v}`' for k, v in options.get('env', {}).items()) or 'inherited'} "
        f"({'every implementation' if baseline else 'both implementations'}) |",
        f"| time bounds | a workload run may take {options['budget_s'][OURS]:g} s (laminardb{' and baseline' if baseline else ''}), "
        f"{options['budget_s'][UPSTREAM]:g} s (upstream) |",
        "",
    ]
    return lines


def workload_section(doc: dict[str, Any], name: str, pending: Optional[str], plots: list[str]) -> list[str]:
    lines = [f"## {name}", ""]
    if pending:
        return lines + [f"{pending} — no numbers.", ""]
    summaries = [s for s in doc["summary"] if s["workload"] == name]
    about = next((r["info"]["about"] for r in doc["runs"] if r["workload"] == name and r["info"]), "")
    lines += [about, ""] if about else []
    if not summaries:
        failed = [f"- {r['impl']}, round {r['round']}: {r['error']}" for r in doc["runs"] if r["workload"] == name]
        return lines + ["No run reported a case:", "", *failed, ""]
    statuses = {f["detail"] for s in summaries for i in s["impls"].values() for f in i["failures"] if f["status"] == "pending"}
    if summaries and all(i["ok"] == 0 for s in summaries for i in s["impls"].values()) and len(statuses) == 1:
        return lines + [f"{statuses.pop()} — no numbers.", ""]
    # The baseline's columns only when it ran (tools/perf run --baseline).
    impls = IMPLS if BASELINE in doc["pythons"] else [OURS, UPSTREAM]
    others = [i for i in impls if i != OURS]
    titles = {OURS: "laminardb", BASELINE: "baseline", UPSTREAM: f"upstream {version(doc, UPSTREAM)}"}
    lines += [
        f"| case | metric | {' | '.join(titles[i] for i in impls)} | {' | '.join(f'laminardb vs {i}' for i in others)} |",
        "|---|---|" + "--:|" * (len(impls) + len(others)),
    ]
    notes = []
    for s in summaries:
        label = s["case"] + (f" ({s['variant']})" if s["variant"] else "")
        for metric in s["metrics"] or [{"name": "", "unit": "", "better": None}]:
            cells = [cell(s["impls"].get(i), metric) for i in impls] + [ratio(s, metric, i) for i in others]
            lines.append(f"| {label} | {metric['name']} | {' | '.join(cells)} |")
        for impl, result in s["impls"].items():
            for f in result["failures"]:
                notes.append(f"- {impl}, {label}: **{f['status']}** in {f['count']} of {result['runs']} runs: {f['detail']}")
    lines.append("")
    if notes:
        lines += ["Runs that did not count:", "", *notes, ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return lines + ([""] if plots else [])


def markdown(doc: dict[str, Any], plots: dict[str, list[str]]) -> str:
    lines = header(doc)
    for w in doc["workloads"]:
        lines += workload_section(doc, w["name"], w["pending"], plots.get(w["name"], []))
    return "\n".join(lines)


def merged_histograms(doc: dict[str, Any], workload: str) -> dict[tuple[str, str], HdrHistogram]:
    """(impl, case) → the histogram of every passing default-config run, merged."""
    merged: dict[tuple[str, str], HdrHistogram] = {}
    for run in doc["runs"]:
        if run["workload"] != workload or run["variant"]:
            continue
        for case in run["cases"]:
            if case["status"] != "ok" or not case.get("hist"):
                continue
            key = (run["impl"], case["name"])
            if key in merged:
                merged[key].decode_and_add(case["hist"])
            else:
                merged[key] = HdrHistogram.decode(case["hist"])
    return merged


def plot_latency(workload: str, hists: dict[tuple[str, str], HdrHistogram], path: Path) -> None:
    fig, (dist, hist_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    cases = sorted({case for _, case in hists})
    all_values = [it.value_iterated_to for h in hists.values() for it in h.get_recorded_iterator()]
    bins = np.logspace(np.log10(max(1, min(all_values)) / 1000), np.log10(max(all_values) / 1000), 80)
    for (impl, case), h in sorted(hists.items()):
        style = dict(color=COLORS[impl], linestyle=STYLES[cases.index(case) % len(STYLES)])
        label = f"{impl} · {case} (n={h.get_total_count():,})"
        points = [(it.percentile_level_iterated_to, it.value_iterated_to) for it in h.get_percentile_iterator(5)]
        points = [(p, v) for p, v in points if p < 100]
        dist.plot([100 / (100 - p) for p, _ in points], [v / 1000 for _, v in points], label=label, **style)
        recorded = [(it.value_iterated_to, it.count_added_in_this_iter_step) for it in h.get_recorded_iterator()]
        values = np.array([v for v, _ in recorded]) / 1000
        weights = np.array([c for _, c in recorded]) / h.get_total_count()
        hist_ax.hist(values, bins=bins, weights=weights, histtype="step", label=label, **style)
    dist.set_xscale("log")
    dist.set_yscale("log")
    dist.set_xticks([100 / (100 - p) for p, _ in PERCENTILE_TICKS], [t for _, t in PERCENTILE_TICKS])
    dist.set_xlabel("percentile")
    dist.set_ylabel("latency (µs)")
    dist.set_title(f"{workload}: percentile distribution")
    dist.grid(True, which="both", alpha=0.3)
    dist.legend(fontsize=8)
    hist_ax.set_xscale("log")
    hist_ax.set_xlabel("latency (µs, log scale)")
    hist_ax.set_ylabel("share of samples")
    hist_ax.set_title(f"{workload}: histogram")
    hist_ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Workload → (the case whose throughput is plotted against the shard count, its unit).
SHARD_PLOTS = {"market": ("bulk", "rows/s"), "nexmark": ("q1", "events/s")}


def plot_shards(doc: dict[str, Any], workload: str, path: Path) -> bool:
    """Throughput of this build (and dashed, the baseline's) against its shard count, from
    every passing run of the workload's plotted case (SHARD_PLOTS); False if there is nothing
    to compare."""
    if workload not in SHARD_PLOTS:
        return False
    case_name, unit = SHARD_PLOTS[workload]
    series = (unit, f"{unit} per core")
    points: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in doc["runs"]:
        if run["workload"] != workload or run["impl"] not in (OURS, BASELINE):
            continue
        for case in run["cases"]:
            m = case["metrics"]
            if case["status"] == "ok" and case["name"] == case_name and unit in m and "shards" in m:
                shards = int(m["shards"]["value"])
                for name in series:
                    points[(run["impl"], name)][shards].append(m[name]["value"] / 1e6)
    if len(points[(OURS, unit)]) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for impl, linestyle in ((OURS, "-"), (BASELINE, "--")):
        for color, name, marker in zip(("C0", "C1"), series, ("o", "s")):
            runs = points.get((impl, name), {})
            counts = sorted(runs)
            if not counts:
                continue
            label = f"{name} (median)" if impl == OURS else f"baseline {name} (median)"
            medians = [statistics.median(runs[k]) for k in counts]
            ax.plot(counts, medians, color=color, linestyle=linestyle, marker=marker, label=label)
            for k in counts:
                ax.scatter([k] * len(runs[k]), runs[k], color="gray", s=10, alpha=0.6)
    ax.set_xticks(sorted(points[(OURS, unit)]))
    ax.set_xlabel("shards (LaminarConfig(shards=N))")
    ax.set_ylabel(f"M {unit}")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{workload} {case_name}: laminardb throughput vs shards")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plots(doc: dict[str, Any], out_dir: Path) -> dict[str, list[str]]:
    """Writes every plot the runs allow; workload → paths relative to perf/."""
    out_dir.mkdir(exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    made: dict[str, list[str]] = defaultdict(list)
    for w in doc["workloads"]:
        name = w["name"]
        hists = merged_histograms(doc, name)
        if hists:
            plot_latency(name, hists, out_dir / f"{name}-latency.png")
            made[name].append(f"{out_dir.name}/{name}-latency.png")
        if plot_shards(doc, name, out_dir / f"{name}-shards.png"):
            made[name].append(f"{out_dir.name}/{name}-shards.png")
    return made

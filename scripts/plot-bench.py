#!/usr/bin/env python3
"""Turns the load tool's CSVs into the PNGs BENCHMARKS.md shows (docs/bench/).

    scripts/plot-bench.py [--in DIR]... [--out docs/bench]

Reads, from each input directory (default: target/load and target/bench), whichever of
these exist:
  fanin.csv      `cargo bench --bench load -- fanin ... --csv target/load/fanin.csv`:
                 one row per measurement -> fanin.png, msg/s (median of the runs, bars
                 from min to max) against idle connections, embedded vs Mosquitto, QoS 0 and 1
  outage.csv     `cargo bench --bench load -- outage ...`: one row per second
                 -> outage.png, mqbridge's RSS and the spool's size over time
  latency*.csv   `pg-latency ... --csv target/bench`: latency.csv (rate,spool,run,p50_ms,
                 p99_ms,max_ms) -> latency.png, p50/p99/max (median of the runs) against
                 the rate, spool and no spool; latency-timeline-*.csv (second,p50_ms,...)
                 -> the same name .png, against the time of sending

Needs python3 (standard library only) and gnuplot (Debian: apt-get install gnuplot-nox).
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def gnuplot(script, data):
    """Runs a gnuplot script; `data` maps a name used in the script to rows to plot."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in data.items():
            with open(os.path.join(tmp, name), "w") as f:
                for row in rows:
                    f.write(" ".join(str(v) for v in row) + "\n")
        subprocess.run(["gnuplot"], input=script, text=True, cwd=tmp, check=True)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fanin(path, out):
    by_cell = {}
    for r in rows(path):
        key = (r["broker"], int(r["qos"]), int(r["idle"]))
        by_cell.setdefault(key, []).append(float(r["msg_per_s"]))
    series = {}
    for (broker, qos, idle), v in sorted(by_cell.items()):
        series.setdefault(f"{broker}-qos{qos}", []).append(
            (idle, statistics.median(v), min(v), max(v))
        )
    plots = ", ".join(
        f"'{name}.dat' using 1:2:3:4 with yerrorlines title '{name.replace('-qos', ', QoS ')}'"
        for name in series
    )
    gnuplot(
        f"""set terminal pngcairo size 900,560 font ',11'
set output '{os.path.abspath(out)}'
set title 'Fan-in, 4 publishers -> 1 subscriber: median of the runs, bars min-max'
set xlabel 'idle connections'
set ylabel 'messages/s delivered'
set key outside right
set grid
set yrange [0:*]
set xtics (0, 5000, 18000)
set offsets graph 0.03, graph 0.03, 0, 0
plot {plots}
""",
        {f"{name}.dat": pts for name, pts in series.items()},
    )


def outage(path, out):
    data = rows(path)
    pts = [
        (float(r["seconds"]), int(r["rss_kib"]) / 1024, int(r["spool_bytes"]) / 2**20)
        for r in data
    ]
    drain = next((float(r["seconds"]) for r in data if r["phase"] != "outage"), None)
    marker = (
        f"set arrow from {drain}, graph 0 to {drain}, graph 1 nohead dt 2\n"
        f"set label 'receiver back' at {drain}, graph 0.95 offset 0.5,0\n"
        if drain is not None
        else ""
    )
    gnuplot(
        f"""set terminal pngcairo size 900,560 font ',11'
set output '{os.path.abspath(out)}'
set title 'mqbridge through a webhook outage with the spool'
set xlabel 'seconds since the first publish'
set ylabel 'RSS (MiB)'
set y2label 'spool on disk (MiB)'
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set grid
set key top left
{marker}plot 'o.dat' using 1:2 with lines lw 2 title 'mqbridge RSS', \\
     'o.dat' using 1:3 axes x1y2 with lines lw 2 title 'spool size'
""",
        {"o.dat": pts},
    )


def latency(path, out):
    """A `pg-latency` CSV: `latency.csv` (rate,spool,run,p50_ms,p99_ms,max_ms: medians of
    the runs against the rate, per spool setting) or a `latency-timeline-*.csv`
    (second,p50_ms,p99_ms,max_ms: against the send time)."""
    data = rows(path)
    name = os.path.basename(path)[: -len(".csv")]
    if data and "second" in data[0]:
        x, xlabel, title = "second", "seconds since the first publish", "latency over the run"
        series = {"": [(float(r["second"]), float(r["p50_ms"]), float(r["p99_ms"]), float(r["max_ms"])) for r in data]}
    else:
        x, xlabel, title = "rate", "messages/s offered", "latency against offered rate (median of the runs)"
        cells = {}
        for r in data:
            spool = {"true": "spool", "false": "no spool"}.get(r.get("spool", ""), r.get("spool", ""))
            key = (spool, float(r["rate"]))
            cells.setdefault(key, []).append((float(r["p50_ms"]), float(r["p99_ms"]), float(r["max_ms"])))
        series = {}
        for (spool, rate), v in sorted(cells.items()):
            series.setdefault(spool, []).append(
                (rate,) + tuple(statistics.median(c[i] for c in v) for i in range(3))
            )
    plots = []
    for i, label in enumerate(series):
        prefix = f"{label}, " if label else ""
        for col, q in ((2, "p50"), (3, "p99"), (4, "max")):
            plots.append(f"'s{i}.dat' using 1:{col} with linespoints title '{prefix}{q}'")
    gnuplot(
        f"""set terminal pngcairo size 900,560 font ',11'
set output '{os.path.abspath(out)}'
set title '{name}: {title}'
set xlabel '{xlabel}'
set ylabel 'publish -> stored (ms)'
set logscale y
set grid
set key outside right
plot {", ".join(plots)}
""",
        {f"s{i}.dat": pts for i, pts in enumerate(series.values())},
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--in", dest="src", action="append",
        help="a directory of CSVs (repeatable; default: target/load and target/bench)",
    )
    ap.add_argument("--out", default="docs/bench", help="directory for the PNGs")
    args = ap.parse_args()
    if shutil.which("gnuplot") is None:
        sys.exit("plot-bench: gnuplot is not installed; on Debian: apt-get install gnuplot-nox")
    os.makedirs(args.out, exist_ok=True)
    made = 0
    for src in args.src or ["target/load", "target/bench"]:
        listing = sorted(os.listdir(src)) if os.path.isdir(src) else []
        jobs = [("fanin.csv", fanin), ("outage.csv", outage)]
        jobs += [(f, latency) for f in listing if f.startswith("latency") and f.endswith(".csv")]
        for name, plot in jobs:
            path = os.path.join(src, name)
            if not os.path.exists(path):
                continue
            png = os.path.join(args.out, name[: -len(".csv")] + ".png")
            plot(path, png)
            print(f"plot-bench: {path} -> {png}")
            made += 1
    if made == 0:
        sys.exit("plot-bench: no fanin.csv, outage.csv or latency*.csv found")


if __name__ == "__main__":
    main()

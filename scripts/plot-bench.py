#!/usr/bin/env python3
"""Turns the load tool's CSVs into the PNGs BENCHMARKS.md shows (docs/bench/).

    scripts/plot-bench.py [--in target/load] [--out docs/bench]

Reads, from the input directory, whichever of these exist:
  fanin.csv      `cargo bench --bench load -- fanin ... --csv target/load/fanin.csv`:
                 one row per measurement -> fanin.png, msg/s (median of the runs, bars
                 from min to max) against idle connections, embedded vs Mosquitto, QoS 0 and 1
  outage.csv     `cargo bench --bench load -- outage ...`: one row per second
                 -> outage.png, mqbridge's RSS and the spool's size over time
  latency-*.csv  columns rate,p50_ms,p99_ms,max_ms -> latency-*.png, latency against rate

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
    pts = sorted(
        (float(r["rate"]), float(r["p50_ms"]), float(r["p99_ms"]), float(r["max_ms"]))
        for r in rows(path)
    )
    name = os.path.basename(path)[: -len(".csv")]
    gnuplot(
        f"""set terminal pngcairo size 900,560 font ',11'
set output '{os.path.abspath(out)}'
set title '{name}: latency against offered rate'
set xlabel 'messages/s offered'
set ylabel 'latency (ms)'
set logscale y
set grid
set key top left
plot 'l.dat' using 1:2 with linespoints title 'p50', \\
     'l.dat' using 1:3 with linespoints title 'p99', \\
     'l.dat' using 1:4 with linespoints title 'max'
""",
        {"l.dat": pts},
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="src", default="target/load", help="directory of the CSVs")
    ap.add_argument("--out", default="docs/bench", help="directory for the PNGs")
    args = ap.parse_args()
    if shutil.which("gnuplot") is None:
        sys.exit("plot-bench: gnuplot is not installed; on Debian: apt-get install gnuplot-nox")
    os.makedirs(args.out, exist_ok=True)
    jobs = [("fanin.csv", fanin, "fanin.png"), ("outage.csv", outage, "outage.png")]
    listing = sorted(os.listdir(args.src)) if os.path.isdir(args.src) else []
    jobs += [
        (f, latency, f[: -len(".csv")] + ".png")
        for f in listing
        if f.startswith("latency-") and f.endswith(".csv")
    ]
    made = 0
    for src, plot, png in jobs:
        path = os.path.join(args.src, src)
        if not os.path.exists(path):
            print(f"plot-bench: no {path}, skipped")
            continue
        plot(path, os.path.join(args.out, png))
        print(f"plot-bench: {path} -> {os.path.join(args.out, png)}")
        made += 1
    if made == 0:
        sys.exit(f"plot-bench: no CSV in {args.src}")


if __name__ == "__main__":
    main()

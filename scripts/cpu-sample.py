#!/usr/bin/env python3
"""CPU seconds (utime + stime) of every process named COMM, sampled from /proc every
50 ms until the file STOP exists; prints the last figure seen for each process id.

Used beside `cargo bench --bench load` to get mqbridge's CPU per row (BENCHMARKS.md,
"Batches end to end"): the load tool kills mqbridge at the end of each run, so its
rusage cannot be read afterwards.

    scripts/cpu-sample.py mqbridge /tmp/stop & ...run...; touch /tmp/stop; wait
"""
import os
import sys
import time

comm, stop = sys.argv[1], sys.argv[2]
tick = os.sysconf("SC_CLK_TCK")
last = {}
while not os.path.exists(stop):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != comm:
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            last[pid] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    time.sleep(0.05)
for pid, seconds in sorted(last.items(), key=lambda p: int(p[0])):
    print(pid, seconds)

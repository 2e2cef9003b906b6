#!/usr/bin/env python3
"""Start-up cost of seccomp: the trivial boot with and without filters,
interleaved; median times from the spawn to ringvm's exit line on stderr,
from that line to the reap, and ringvm's own start-to-guest-exit.

    cargo build --release && benches/seccomp_cost.py
"""
import subprocess, time, statistics, sys
import os
N=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target/x86_64-unknown-linux-gnu/release", "ringvm")
import tempfile
G=os.path.join(tempfile.mkdtemp(), "guest.elf")
subprocess.run([N, "builtin-guest", "--output", G], check=True, stderr=subprocess.DEVNULL)
res={}
for r in range(25):
    for s in ("true","false"):
        t0=time.perf_counter()
        p=subprocess.Popen([N,"run","--kernel",G,"--memory","64M","--cmdline","exit=0","--serial","file=/dev/null","--seccomp",s],stdin=subprocess.DEVNULL,stdout=subprocess.DEVNULL,stderr=subprocess.PIPE)
        line=p.stderr.readline(); t1=time.perf_counter()
        p.stderr.read(); p.wait(); t2=time.perf_counter()
        res.setdefault(s,[]).append(((t1-t0)*1e3,(t2-t1)*1e3, float(line.decode().rsplit("; ",1)[1][:-4])))
for s,v in res.items():
    print(s, "spawn->line %.2f  line->reaped %.2f  inner %.2f" % tuple(statistics.median(x[i] for x in v) for i in range(3)))

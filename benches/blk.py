#!/usr/bin/env python3
"""virtio-blk benchmark: the built-in guest's randread/randwrite at QD1 and
QD32 on a memory-backed file, on ringvm and on QEMU (virtio-blk-pci,
aio=io_uring, one iothread), both on this host's KVM.

Reports guest-side ops/s and the iothread's CPU time per request: ringvm's
from its own thread clock (--iothread-stats), QEMU's by sampling its
iothread's /proc schedstat while it runs.

    cargo build --release && benches/blk.py [SECONDS] [ROUNDS]

ROUNDS (default 1) repeats every row, the VMMs innermost so that the
VMMs of a row run next to each other in time, and prints per-row medians
and the median of the per-round ratios. RINGVM_EXTRA=NAME=PATH[,...]
adds other ringvm binaries (an older build, for an A/B) as more VMMs.
RINGVM_ARGS adds arguments to every ringvm run (e.g. polling options).
"""
import os, re, statistics, subprocess, sys, tempfile, threading, time

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
EXTRA = [tuple(kv.split("=", 1)) for kv in os.environ.get("RINGVM_EXTRA", "").split(",") if kv]
RINGVM_ARGS = os.environ.get("RINGVM_ARGS", "").split()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ringvm = os.path.join(root, "target", "x86_64-unknown-linux-gnu", "release", "ringvm")
qemu = "/usr/bin/qemu-system-x86_64"
disk = "/dev/shm/ringvm-bench.img"

def result(text):
    line = next((l for l in text.splitlines() if l.startswith("RINGVM-RESULT")), None)
    if line is None:
        raise SystemExit("no RINGVM-RESULT line:\n" + text[-2000:])
    return dict(kv.split("=", 1) for kv in line.split()[1:])

def cmdline(mode, qd):
    return f"blk.mode={mode} blk.qd={qd} blk.bs=4096 blk.secs={SECS} blk.len=256M blk.seed=3"

def run_ringvm(mode, qd, binary=None):
    errf = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen([binary or ringvm, "run", *RINGVM_ARGS, "--kernel", "builtin", "--memory", "256M", "--disk", f"path={disk}",
                          "--iothread-stats", "--cmdline", cmdline(mode, qd)], stdout=subprocess.PIPE, stderr=errf, text=True)
    out, sampled_us = sampled(p, "iothread0")
    errf.seek(0)
    err = errf.read()
    own_us = int(re.search(r"cpu_us=(\d+)", err).group(1))
    turns = int(re.search(r"turns=(\d+)", err).group(1))
    ops = int(result(out)["ops"])
    # The thread's own clock is exact; io_uring workers come from sampling.
    total = max(own_us, sampled_us)
    print(f"         (ringvm iothread alone {own_us / ops:.2f} us/req, io_uring workers "
          f"{(total - own_us) / ops:.2f} us/req, {ops / max(turns, 1):.1f} req per executor turn)")
    return ops, total

def thread_cpu_us(pid, name):
    """CPU of the thread called `name` plus the process's io_uring workers
    (iou-wrk-*), which do the iothread's blocking I/O."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total, found = 0, False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            # Nanoseconds on the CPU (stat's utime and stime count 10 ms ticks).
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if comm == name or comm.startswith("iou-wrk"):
            total += ns // 1000
            found |= comm == name
    return total if found else None

def sampled(p, name):
    """Runs until `p` exits, sampling the thread's CPU; returns stdout and
    the last sample."""
    last = [0]
    def sample():
        while p.poll() is None:
            v = thread_cpu_us(p.pid, name)
            if v is not None:
                last[0] = max(last[0], v)
            time.sleep(0.01)
    t = threading.Thread(target=sample)
    t.start()
    out = p.stdout.read()
    p.wait()
    t.join()
    return out, last[0]

def run_qemu(mode, qd, guest):
    p = subprocess.Popen([qemu, "-M", "pc", "-accel", "kvm", "-m", "256M", "-name", "bench,debug-threads=on", "-smp", "1", "-nodefaults", "-no-user-config",
                          "-nographic", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                          "-object", "iothread,id=io0",
                          "-drive", f"if=none,id=d0,file={disk},format=raw,aio=io_uring,cache.direct=off",
                          "-device", "virtio-blk-pci,drive=d0,iothread=io0",
                          "-kernel", guest, "-append", cmdline(mode, qd)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, cpu_us = sampled(p, "IO io0")
    return int(result(out)["ops"]), cpu_us

def main():
    if not os.path.exists(ringvm):
        sys.exit("build first: cargo build --release")
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    guest = os.path.join(tempfile.mkdtemp(), "guest.elf")
    subprocess.run([ringvm, "builtin-guest", "--output", guest], check=True, stderr=subprocess.DEVNULL)
    print(f"{'vmm':<8} {'mode':<10} {'qd':>3} {'ops/s':>9} {'iothread CPU/req':>17}   ({SECS} s each, 4 KiB, {disk})")
    vmms = [("ringvm", lambda m, q: run_ringvm(m, q))]
    vmms += [(n, (lambda path: lambda m, q: run_ringvm(m, q, path))(p)) for n, p in EXTRA]
    if os.path.exists(qemu):
        vmms.append(("qemu", lambda m, q: run_qemu(m, q, guest)))
    rows = {}
    for r in range(ROUNDS):
        for mode in ("randread", "randwrite"):
            for qd in (1, 32):
                for name, fn in vmms:
                    ops, cpu_us = fn(mode, qd)
                    per = cpu_us / ops if ops else float("nan")
                    rows.setdefault((mode, qd, name), []).append((ops / SECS, per))
                    print(f"{name:<8} {mode:<10} {qd:>3} {ops / SECS:9.0f} {per:14.2f} us   (round {r + 1})")
    os.unlink(disk)
    print(f"\nmedians over {ROUNDS} round(s):")
    for mode in ("randread", "randwrite"):
        for qd in (1, 32):
            q = rows.get((mode, qd, "qemu"))
            for name, _ in vmms:
                runs = rows[(mode, qd, name)]
                ops = statistics.median(o for o, _ in runs)
                per = statistics.median(c for _, c in runs)
                line = f"{name:<8} {mode:<10} {qd:>3} {ops:9.0f} {per:14.2f} us"
                if q and name != "qemu":
                    ratios = [c / qc for (_, c), (_, qc) in zip(runs, q) if qc > 0]
                    line += f"   {name}/qemu {statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
                print(line)

main()

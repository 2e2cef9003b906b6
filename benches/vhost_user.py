#!/usr/bin/env python3
"""vhost-user front-end benchmark: the built-in guest's randread/randwrite
at QD1 and QD32 (4 KiB) on a memory-backed file (/dev/shm) through
  (a) ringvm's in-VMM virtio-blk (io_uring iothread),
  (b) ringvm's vhost-user front-end to ringvm-blk,
  (c) ringvm's vhost-user front-end to qemu-storage-daemon.

Reports guest-side IOPS and host CPU per request, summed over ringvm and
the backend process: "total" is everything (ringvm's vCPU thread included:
on this host KVM emulates every guest instruction, so it dominates and is
the same work in every row), "device" leaves the vCPU thread out (ringvm's
iothread and io_uring workers, or the backend process). Rounds are
interleaved (every configuration once per round) and medians are printed.

    cargo build --release -p ringvm -p ringvm-blk && benches/vhost_user.py [SECONDS] [ROUNDS]
"""
import os, statistics, subprocess, sys, tempfile, threading, time

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rel = os.path.join(root, "target", "x86_64-unknown-linux-gnu", "release")
ringvm, ringvm_blk = os.path.join(rel, "ringvm"), os.path.join(rel, "ringvm-blk")
qsd = "/usr/bin/qemu-storage-daemon"
disk = "/dev/shm/ringvm-vhu-bench.img"
TICK = os.sysconf("SC_CLK_TCK")
wall = [0.0]  # wall time of the last ringvm run

def result(text):
    line = next((l for l in text.splitlines() if l.startswith("RINGVM-RESULT")), None)
    if line is None:
        raise SystemExit("no RINGVM-RESULT line:\n" + text[-2000:])
    return dict(kv.split("=", 1) for kv in line.split()[1:])

def threads_cpu_us(pid):
    """CPU of each thread of `pid`, by name and tid, in microseconds."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        comm = st[st.index("(") + 1:st.rindex(")")]
        fields = st[st.rindex(")") + 2:].split()
        out[tid] = (comm, (int(fields[11]) + int(fields[12])) * 1_000_000 // TICK)
    return out

def process_cpu_us(pid):
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000 // TICK

def run_vm(disk_arg, mode, qd):
    """Runs one guest; returns (ops, vcpu_us, other_us) of ringvm."""
    cmd = f"blk.mode={mode} blk.qd={qd} blk.bs=4096 blk.secs={SECS} blk.len=256M blk.seed=3"
    t0 = time.monotonic()
    p = subprocess.Popen([ringvm, "run", "--kernel", "builtin", "--memory", "256M", "--disk", disk_arg,
                          "--cmdline", cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen, done = {}, [False]
    def sample():
        while not done[0]:
            for tid, v in threads_cpu_us(p.pid).items():
                seen[tid] = v
            time.sleep(0.01)
    t = threading.Thread(target=sample)
    t.start()
    out = p.stdout.read()
    # Reaped here (not by Popen) for the exact CPU time of every thread.
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    done[0] = True
    t.join()
    vcpu = sum(v for comm, v in seen.values() if comm.startswith("vcpu"))
    total = int((ru.ru_utime + ru.ru_stime) * 1e6)
    wall[0] = time.monotonic() - t0
    return int(result(out)["ops"]), vcpu, max(total - vcpu, 0)

def backend(kind, sock):
    if os.path.exists(sock):
        os.unlink(sock)
    if kind.startswith("ringvm-blk"):
        fixed = "off" if kind.endswith("nofixed") else "on"
        argv = [ringvm_blk, "--socket", sock, "--disk", f"path={disk},fixed_buffers={fixed}"]
    else:
        argv = [qsd, "--blockdev", f"driver=file,node-name=f,filename={disk},aio=io_uring",
                "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(sock):
        time.sleep(0.01)
    return p

def one(config, mode, qd, sock):
    if config == "in-VMM":
        ops, vcpu, other = run_vm(f"path={disk}", mode, qd)
        return ops, vcpu + other, other
    b = backend(config, sock)
    before = process_cpu_us(b.pid)
    ops, vcpu, other = run_vm(f"vhost_user=on,socket={sock}", mode, qd)
    be = process_cpu_us(b.pid) - before
    b.terminate()
    b.wait()
    return ops, vcpu + other + be, other + be

def main():
    for p in (ringvm, ringvm_blk):
        if not os.path.exists(p):
            sys.exit("build first: cargo build --release -p ringvm -p ringvm-blk")
    # ringvm-blk registers the front-end's RAM as fixed buffers at connect
    # (pinning it: a per-connection cost); -nofixed shows it without.
    configs = ["in-VMM", "ringvm-blk", "ringvm-blk-nofixed"] + (["qsd"] if os.path.exists(qsd) else [])
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    sock = os.path.join(tempfile.mkdtemp(), "bench.sock")
    rows = {}
    for r in range(ROUNDS):
        for mode in ("randread", "randwrite"):
            for qd in (1, 32):
                for c in configs:
                    ops, total, device = one(c, mode, qd, sock)
                    rows.setdefault((mode, qd, c), []).append((ops / SECS, total / ops, device / ops))
                    print(f"round {r}: {c:<18} {mode:<9} qd{qd:<3} {ops / SECS:8.0f} IOPS "
                          f"{total / ops:8.1f} us/req total {device / ops:6.2f} us/req device "
                          f"({ops} ops, run {wall[0]:.1f} s wall)", flush=True)
    os.unlink(disk)
    print(f"\nmedians of {ROUNDS} interleaved rounds, {SECS} s each, 4 KiB, {disk}")
    print(f"{'mode':<9} {'qd':>3} {'config':<18} {'IOPS':>8} {'CPU/req total':>14} {'CPU/req device':>15}")
    for (mode, qd, c), v in rows.items():
        med = [statistics.median(x[i] for x in v) for i in range(3)]
        print(f"{mode:<9} {qd:>3} {c:<18} {med[0]:8.0f} {med[1]:11.1f} us {med[2]:12.2f} us")

main()

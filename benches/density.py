#!/usr/bin/env python3
"""Density and soak of ringvm with the built-in guest (issue 15, point 4).

A test-only bench, not part of `cargo test` (root, /dev/kvm, /dev/shm and
`ip` needed). Two phases:

1. Density: starts VMS (default 50) VMs at once, each with 64 MiB and a
   disk on tmpfs (/dev/shm). Each guest writes 16 blocks, prints its result
   and then lingers idle (`blk.linger`). Reports the creation rate (VMs
   whose guest printed its result, per second since the first spawn), and
   per VM: PSS, the PSS of guest RAM and the rest (the VMM's overhead), from
   /proc/PID/smaps. Every VM must exit 0, and a verify pass over every
   disk must find what the guest wrote.

2. Soak: 4 VMs for SOAK seconds (default 600), each with a disk and a NIC
   (a TAP in a network namespace): two run the guest's disk form
   (random writes of a known pattern over 8 MiB for SOAK seconds, after a
   sequential pass; then a verify pass), two its net form (`net.secs`:
   answering UDP echoes for SOAK seconds, from a host client that checks
   every echo). VmRSS and open file descriptors of each ringvm process are
   sampled every 15 s; the report gives the first sample after a minute's
   warm-up, the last and the largest.

Usage:
    nice -n 10 benches/density.py [--vms N] [--soak SECONDS] [--binary PATH]

The built-in guest runs under KVM's instruction emulator on this machine:
the workloads are CPU-bound and the figures depend on the machine's load,
which the report prints (load averages at each phase's start and end).
"""
import argparse, ctypes, os, re, select, shutil, socket, statistics, struct
import subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release", "ringvm")
GUEST_RAM_KIB = 64 * 1024
CLONE_NEWNET = 0x40000000


def load():
    return "%.1f/%.1f/%.1f" % os.getloadavg()


def result(text):
    for line in text.splitlines():
        if line.startswith("RINGVM-RESULT "):
            return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    return None


def pss_kib(pid):
    """(total PSS, PSS of guest RAM) in KiB from /proc/PID/smaps: guest RAM
    is the anonymous or memfd mapping of the guest's size."""
    total = guest = 0
    size = None
    is_guest = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                size = (end - start) // 1024
                path = fields[5] if len(fields) > 5 else ""
                is_guest = size == GUEST_RAM_KIB and (path == "" or path.startswith("/memfd:"))
            elif fields[0] == "Pss:":
                total += int(fields[1])
                if is_guest:
                    guest += int(fields[1])
    return total, guest


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def run(binary, args, out, err):
    return subprocess.Popen([binary] + args, stdin=subprocess.DEVNULL,
                            stdout=open(out, "w"), stderr=open(err, "w"))


def must_pass(binary, args, what, work):
    out, err = os.path.join(work, "p.out"), os.path.join(work, "p.err")
    p = run(binary, args, out, err)
    code = p.wait(timeout=600)
    text = open(out).read()
    r = result(text)
    if code != 0 or r is None or r.get("errors") != "0":
        sys.exit(f"{what}: exit {code}\n{text}\n{open(err).read()}")
    return r


def density(binary, n, work):
    print(f"== density: {n} VMs at once, 64 MiB each, disk on tmpfs (load {load()})")
    disks, outs = [], []
    for i in range(n):
        d = os.path.join(work, f"d{i}.img")
        with open(d, "wb") as f:
            f.truncate(1 << 20)
        disks.append(d)
    cmd = "blk.mode=write blk.count=16 blk.qd=4 blk.seed={} blk.linger=120"
    # posix_spawn (vfork semantics): a spawn costs the child's exec, not a
    # copy of this Python process.
    pids, spawned_at, ready = [], [], [None] * n

    def poll_ready():
        for i, (out, err) in enumerate(outs):
            if ready[i] is None and "RINGVM-RESULT" in open(out).read():
                ready[i] = time.monotonic() - t0
            if ready[i] is None and os.waitpid(pids[i], os.WNOHANG)[0]:
                sys.exit(f"VM {i} ended early: {open(out).read()}{open(err).read()}")

    t0 = time.monotonic()
    for i in range(n):
        out, err = os.path.join(work, f"v{i}.out"), os.path.join(work, f"v{i}.err")
        outs.append((out, err))
        acts = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
        argv = [binary, "run", "--kernel", "builtin", "--memory", "64M",
                "--disk", f"path={disks[i]}", "--cmdline", cmd.format(i + 1)]
        pids.append(os.posix_spawn(binary, argv, os.environ, file_actions=acts))
        spawned_at.append(time.monotonic() - t0)
        poll_ready()
    spawned = time.monotonic() - t0
    while None in ready:
        poll_ready()
        if time.monotonic() - t0 > 600:
            sys.exit("VMs not ready after 600 s")
        time.sleep(0.02)
    latency = [r - s for r, s in zip(ready, spawned_at)]
    all_ready = max(ready)
    mem = []
    for pid in pids:
        total, guest = pss_kib(pid)
        mem.append((total, guest, total - guest, status(pid)))
    print(f"spawned {n} in {spawned:.2f} s; all {n} guests had booted and written their "
          f"disks {all_ready:.2f} s after the first spawn: {n / all_ready:.1f} VMs/s; "
          f"spawn to result per VM: median {statistics.median(latency) * 1e3:.0f} ms, "
          f"max {max(latency) * 1e3:.0f} ms")
    over = [m[2] for m in mem]
    print(f"PSS per VM: median {statistics.median(m[0] for m in mem) / 1024:.2f} MiB, of which "
          f"guest RAM {statistics.median(m[1] for m in mem) / 1024:.2f} MiB (touched pages); "
          f"overhead beyond guest RAM median {statistics.median(over) / 1024:.2f} MiB "
          f"(min {min(over) / 1024:.2f}, max {max(over) / 1024:.2f}); "
          f"sum of overheads {sum(over) / 1024:.1f} MiB for {n} VMs")
    print(f"per VM: VmRSS median {statistics.median(m[3]['VmRSS'] for m in mem) / 1024:.2f} MiB, "
          f"threads {statistics.median(m[3]['Threads'] for m in mem)}, "
          f"fds {statistics.median(m[3]['fds'] for m in mem)}")
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    bad = [i for i, c in enumerate(codes) if c != 0]
    if bad:
        sys.exit(f"VMs {bad} exited with {[codes[i] for i in bad]}")
    for i in range(n):
        must_pass(binary, ["run", "--kernel", "builtin", "--memory", "64M",
                           "--disk", f"path={disks[i]}", "--cmdline",
                           f"blk.mode=verify blk.count=16 blk.seed={i + 1}"], f"verify {i}", work)
    print(f"all {n} exited 0; all {n} disks verified (load {load()})")


class Netns:
    def __init__(self, name):
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args):
        subprocess.run(["ip", "-n", self.name] + list(args), check=True)

    def join(self):
        """Moves the calling thread into the namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name])


def echo_client(ns, guest, stop, stats):
    """Numbered UDP datagrams to the guest's echo port, at most 8 in
    flight, every echo checked against what was sent."""
    ns.join()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((guest, 7))
    s.setblocking(False)
    seq, inflight = 0, {}
    while not stop.is_set():
        while len(inflight) < 8:
            payload = struct.pack("<Q", seq) + bytes((seq + i) & 0xFF for i in range(56 + seq % 400))
            try:
                s.send(payload)
            except BlockingIOError:
                break
            inflight[seq] = (payload, time.monotonic())
            stats["sent"] += 1
            seq += 1
        r, _, _ = select.select([s], [], [], 0.5)
        if r:
            try:
                data = s.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else None
            if n in inflight and inflight[n][0] == data:
                del inflight[n]
                stats["received"] += 1
            else:
                stats["wrong"] += 1
        now = time.monotonic()
        for k in [k for k, (_, t) in inflight.items() if now - t > 30]:
            del inflight[k]
            stats["lost"] += 1
    stats["in_flight_at_stop"] = len(inflight)


def soak(binary, secs, work):
    print(f"== soak: 4 VMs (disk + NIC each) for {secs} s (load {load()})")
    ns = Netns(f"rvdensity-{os.getpid()}")
    try:
        return soak_in(binary, secs, work, ns)
    finally:
        ns.close()


def soak_in(binary, secs, work, ns):
    vms = []
    for i in range(4):
        tap = f"dtap{i}"
        ns.ip("tuntap", "add", "dev", tap, "mode", "tap")
        ns.ip("addr", "add", f"10.78.{i}.1/24", "dev", tap)
        ns.ip("link", "set", tap, "up")
        d = os.path.join(work, f"s{i}.img")
        with open(d, "wb") as f:
            f.truncate(16 << 20)
        if i < 2:
            must_pass(binary, ["run", "--kernel", "builtin", "--memory", "64M", "--disk",
                               f"path={d}", "--cmdline",
                               f"blk.mode=write blk.len=8M blk.bs=64K blk.qd=4 blk.seed={100 + i}"],
                      f"pre-write {i}", work)
            cmd = f"blk.mode=randwrite blk.len=8M blk.qd=8 blk.seed={100 + i} blk.secs={secs}"
        else:
            cmd = f"net.ip=10.78.{i}.2/24 net.secs={secs}"
        vms.append((d, tap, cmd))
    procs, outs = [], []
    for i, (d, tap, cmd) in enumerate(vms):
        out, err = os.path.join(work, f"s{i}.out"), os.path.join(work, f"s{i}.err")
        outs.append((out, err))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns.name, binary, "run", "--kernel", "builtin",
             "--memory", "64M", "--disk", f"path={d}", "--net", f"tap={tap}",
             "--cmdline", cmd], stdin=subprocess.DEVNULL,
            stdout=open(out, "w"), stderr=open(err, "w")))
    stop = threading.Event()
    clients = []
    for i in (2, 3):
        while "net: up" not in open(outs[i][0]).read():
            if procs[i].poll() is not None:
                sys.exit(f"net VM {i} ended: {open(outs[i][0]).read()}{open(outs[i][1]).read()}")
            time.sleep(0.1)
        st = {"sent": 0, "received": 0, "wrong": 0, "lost": 0}
        t = threading.Thread(target=echo_client, args=(ns, f"10.78.{i}.2", stop, st), daemon=True)
        t.start()
        clients.append((i, st, t))
    t0 = time.monotonic()
    samples = [[] for _ in procs]
    while any(p.poll() is None for p in procs):
        at = time.monotonic() - t0
        for i, p in enumerate(procs):
            if p.poll() is None:
                try:
                    samples[i].append((at, status(p.pid)))
                except FileNotFoundError:
                    pass
        # The guests end by themselves after `secs`; the clients stop
        # shortly before, so that the last echoes can come back.
        if at > secs - 5:
            stop.set()
        if at > secs + 600:
            sys.exit("soak VMs still running 10 minutes after their time")
        time.sleep(15)
    stop.set()
    for _, _, t in clients:
        t.join()
    ok = True
    for i, p in enumerate(procs):
        text, err = open(outs[i][0]).read(), open(outs[i][1]).read()
        r = result(text)
        warm = [s for s in samples[i] if s[0] >= 60] or samples[i]
        first, last = warm[0][1], warm[-1][1]
        rss_max = max(s[1]["VmRSS"] for s in warm)
        fds = [s[1]["fds"] for s in warm]
        kind = "disk" if i < 2 else "net"
        print(f"VM {i} ({kind}): exit {p.returncode}; VmRSS {first['VmRSS'] / 1024:.2f} -> "
              f"{last['VmRSS'] / 1024:.2f} MiB (max {rss_max / 1024:.2f}) over "
              f"{warm[-1][0] - warm[0][0]:.0f} s, {len(warm)} samples; fds {fds[0]} -> {fds[-1]} "
              f"(min {min(fds)}, max {max(fds)}); threads {last['Threads']}")
        if p.returncode != 0 or r is None:
            print(f"  FAILED:\n{text}\n{err}")
            ok = False
            continue
        if kind == "disk":
            print(f"  guest: {r.get('ops')} random 4 KiB writes, errors={r.get('errors')}")
            v = must_pass(binary, ["run", "--kernel", "builtin", "--memory", "64M", "--disk",
                                   f"path={vms[i][0]}", "--cmdline",
                                   f"blk.mode=verify blk.len=8M blk.bs=64K blk.qd=4 blk.seed={100 + i}"],
                          f"verify {i}", work)
            print(f"  verify pass: {v.get('ops')} reads of 64 KiB, errors={v.get('errors')}")
            ok &= r.get("errors") == "0"
        else:
            st = next(c[1] for c in clients if c[0] == i)
            print(f"  guest: udp={r.get('udp')} answered; client: sent {st['sent']}, echoes "
                  f"checked {st['received']}, wrong {st['wrong']}, lost {st['lost']}, "
                  f"in flight at stop {st['in_flight_at_stop']}")
            ok &= st["wrong"] == 0 and st["received"] > 0
    print(f"soak {'passed' if ok else 'FAILED'} (load {load()})")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=50)
    ap.add_argument("--soak", type=int, default=600, help="soak seconds (0: skip)")
    ap.add_argument("--binary", default=RELEASE)
    a = ap.parse_args()
    if not os.path.exists(a.binary):
        sys.exit("build first: cargo build --release (or pass --binary)")
    work = tempfile.mkdtemp(prefix="ringvm-density-", dir="/dev/shm")
    try:
        print(f"ringvm {a.binary}; nice {os.nice(0)}; {os.cpu_count()} CPUs; work dir {work} (tmpfs)")
        if a.vms:
            density(a.binary, a.vms, work)
        if a.soak and not soak(a.binary, a.soak, work):
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

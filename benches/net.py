#!/usr/bin/env python3
"""virtio-net benchmark: UDP echo through the built-in guest.

ringvm creates a TAP (--net ip=...) in a private network namespace; the
guest answers UDP on port 7 (net.mode=respond) and stops after COUNT
echoes. A client in the namespace keeps WINDOW datagrams in flight and
times COUNT round trips. Reported: echoes/s, UDP payload Mbit/s (both
directions), and the iothread's CPU time per packet (each echo is one RX
and one TX frame) from ringvm's own thread clock (--iothread-stats).

    cargo build --release && sudo benches/net.py [COUNT] [SIZES] [ROUNDS]

With QEMU installed the same guest also runs on QEMU 7.2 (`-M pc`,
`virtio-net-pci` on `-netdev tap,vhost=off`: QEMU's userspace virtio-net,
whose RX and TX run in its main-loop thread) and, where /dev/vhost-net
exists, with `vhost=on` (the kernel's vhost worker thread does the work).
QEMU's CPU per packet is that of its main thread (plus its vhost-* worker
threads) from each thread's /proc schedstat (ns), sampled every 10 ms
while it runs. ROUNDS (default 1) interleaves the VMMs per size and
prints medians.
"""
import os, re, statistics, subprocess, sys, tempfile, threading, time

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
SIZES = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "64,1400").split(",")]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 1
QEMU = "/usr/bin/qemu-system-x86_64"
RINGVM_ARGS = os.environ.get("RINGVM_ARGS", "").split()
WINDOW = 64
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ringvm = os.path.join(root, "target", "x86_64-unknown-linux-gnu", "release", "ringvm")
NS = f"rvbench{os.getpid()}"

CLIENT = r"""
import socket, sys, time
count, size, window = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect(("10.77.0.2", 7))
payload = bytearray(size)
sent = got = 0
start = time.perf_counter()
while got < count:
    while sent < count and sent - got < window:
        payload[0:4] = sent.to_bytes(4, "little")
        s.send(payload)
        sent += 1
    s.recv(65536)
    got += 1
print(time.perf_counter() - start)
"""


def client(size):
    return float(subprocess.run(["ip", "netns", "exec", NS, "python3", "-c", CLIENT, str(COUNT),
                                 str(size), str(WINDOW)], check=True, capture_output=True,
                                text=True).stdout)


def wait_up(p):
    while True:
        line = p.stdout.readline()
        if not line:
            raise SystemExit("the VMM ended before the guest's network came up")
        if line.startswith("net: up"):
            return


def run_ringvm(size, queues=1):
    cmd = ["ip", "netns", "exec", NS, ringvm, "run", *RINGVM_ARGS, "--kernel", "builtin", "--memory", "64M",
           "--net", f"ip=10.77.0.1,mask=255.255.255.0,queues={queues}", "--iothread-stats",
           "--cmdline", f"net.ip=10.77.0.2/24 net.mode=respond net.count={COUNT} net.queues={queues}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_up(p)
    secs = client(size)
    out, err = p.communicate(timeout=120)
    cpu_us = sum(int(v) for v in re.findall(r"cpu_us=(\d+)", err))
    return COUNT / secs, cpu_us / (2 * COUNT)


def qemu_cpu_us(pid):
    """CPU of QEMU's main thread and its vhost workers, in µs, from each
    thread's schedstat (nanoseconds on the CPU; /proc's utime and stime
    count 10 ms ticks, 0.25 µs a packet at 20,000 echoes)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if tid == str(pid) or comm.startswith("vhost-"):
            total += ns // 1000
    return total


def run_qemu(size, guest, vhost):
    tap = "rvq0"
    subprocess.run(["ip", "netns", "exec", NS, "ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"], check=True)
    subprocess.run(["ip", "netns", "exec", NS, "ip", "addr", "add", "10.77.0.1/24", "dev", tap], check=True)
    subprocess.run(["ip", "netns", "exec", NS, "ip", "link", "set", tap, "up"], check=True)
    try:
        p = subprocess.Popen(["ip", "netns", "exec", NS, QEMU, "-M", "pc", "-accel", "kvm", "-m", "64M", "-smp", "1",
                              "-name", "bench,debug-threads=on", "-nodefaults", "-no-user-config", "-nographic",
                              "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                              "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost={'on' if vhost else 'off'}",
                              "-device", "virtio-net-pci,netdev=n0",
                              "-kernel", guest, "-append",
                              f"net.ip=10.77.0.2/24 net.mode=respond net.count={COUNT} net.queues=1"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        wait_up(p)
        # `ip netns exec` execs QEMU: the same pid.
        before = qemu_cpu_us(p.pid) or 0
        last = [before]
        done = threading.Event()
        def sample():
            while not done.is_set():
                v = qemu_cpu_us(p.pid)
                if v is not None:
                    last[0] = max(last[0], v)
                time.sleep(0.01)
        t = threading.Thread(target=sample)
        t.start()
        secs = client(size)
        done.set()
        t.join()
        p.stdout.read()
        p.wait(timeout=120)
        return COUNT / secs, (last[0] - before) / (2 * COUNT)
    finally:
        subprocess.run(["ip", "netns", "exec", NS, "ip", "link", "del", tap])


def main():
    vmms = [("ringvm", lambda size: run_ringvm(size))]
    if os.path.exists(QEMU):
        guest = os.path.join(tempfile.mkdtemp(), "guest.elf")
        subprocess.run([ringvm, "builtin-guest", "--output", guest], check=True, stderr=subprocess.DEVNULL)
        vmms.append(("qemu", lambda size: run_qemu(size, guest, False)))
        if os.path.exists("/dev/vhost-net"):
            vmms.append(("qemu-vhost", lambda size: run_qemu(size, guest, True)))
        else:
            print("(no /dev/vhost-net on this host: the vhost=on reference is left out)")
    print(f"UDP echo through the built-in guest, {COUNT} datagrams, window {WINDOW}, {ROUNDS} round(s)")
    rows = {}
    for r in range(ROUNDS):
        for size in SIZES:
            for name, fn in vmms:
                rate, per = fn(size)
                rows.setdefault((size, name), []).append((rate, per))
                print(f"{name:<10} {size:6} B {rate:9.0f} echoes/s  {per:6.2f} us CPU/packet  (round {r + 1})")
    print("\nmedians:")
    for size in SIZES:
        q = rows.get((size, "qemu"))
        for name, _ in vmms:
            runs = rows[(size, name)]
            line = (f"{name:<10} {size:6} B {statistics.median(a for a, _ in runs):9.0f} echoes/s  "
                    f"{statistics.median(b for _, b in runs):6.2f} us CPU/packet")
            if q and name != "qemu":
                ratios = [b / qb for (_, b), (_, qb) in zip(runs, q) if qb > 0]
                line += f"   /qemu {statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
            print(line)


subprocess.run(["ip", "netns", "add", NS], check=True)
try:
    main()
finally:
    subprocess.run(["ip", "netns", "del", NS])

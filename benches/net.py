#!/usr/bin/env python3
"""virtio-net benchmark: UDP echo through the built-in guest.

ringvm creates a TAP (--net ip=...) in a private network namespace; the
guest answers UDP on port 7 (net.mode=respond) and stops after COUNT
echoes. A client in the namespace keeps WINDOW datagrams in flight and
times COUNT round trips. Reported: echoes/s, UDP payload Mbit/s (both
directions), and the iothread's CPU time per packet (each echo is one RX
and one TX frame) from ringvm's own thread clock (--iothread-stats).

    cargo build --release && sudo benches/net.py [COUNT] [SIZES]
"""
import os, re, subprocess, sys, time

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
SIZES = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "64,1400").split(",")]
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


def run(size, queues):
    cmd = ["ip", "netns", "exec", NS, ringvm, "run", "--kernel", "builtin", "--memory", "64M",
           "--net", f"ip=10.77.0.1,mask=255.255.255.0,queues={queues}", "--iothread-stats",
           "--cmdline", f"net.ip=10.77.0.2/24 net.mode=respond net.count={COUNT} net.queues={queues}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while True:
        line = p.stdout.readline()
        if not line:
            raise SystemExit("ringvm ended before the guest's network came up: " + p.stderr.read())
        if line.startswith("net: up"):
            break
    secs = float(subprocess.run(["ip", "netns", "exec", NS, "python3", "-c", CLIENT, str(COUNT),
                                 str(size), str(WINDOW)], check=True, capture_output=True,
                                text=True).stdout)
    out, err = p.communicate(timeout=120)
    cpu_us = sum(int(v) for v in re.findall(r"cpu_us=(\d+)", err))
    rate = COUNT / secs
    mbit = rate * size * 8 * 2 / 1e6
    print(f"{size:6} B  {queues} pair(s)  {rate:9.0f} echoes/s  {mbit:8.1f} Mbit/s  "
          f"iothread {cpu_us / (2 * COUNT):6.2f} us/packet")


subprocess.run(["ip", "netns", "add", NS], check=True)
try:
    print(f"UDP echo through the built-in guest, {COUNT} datagrams, window {WINDOW}")
    for size in SIZES:
        run(size, 1)
finally:
    subprocess.run(["ip", "netns", "del", NS])

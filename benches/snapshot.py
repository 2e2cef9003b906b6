#!/usr/bin/env python3
"""Snapshot and restore times of the built-in guest (release build).

For each guest size (64 MiB, 512 MiB, 2 GiB; 2 vCPUs, one virtio-blk
disk) the guest runs a sequential write workload; near its end the VM is
paused and snapshotted (`ringvm remote snapshot`), and the process is
SIGKILLed. The snapshot is then restored N times (default 3) per memory
mode (`ondemand`, `copy`), each against a fresh copy of the disk, with
`resume=on`. Printed, as medians:

- snapshot_ms: the `vm` `snapshotting` to `snapshotted` events (capture
  of every section, config.json, memory files through io_uring, state);
  data_mib: guest memory actually written (the rest are holes);
- resumed_ms: from spawning `ringvm run --restore` to its `resumed` event
  (the vCPUs are released: the next guest instruction runs);
- result_ms: from spawning it to the guest's RINGVM-RESULT line (the few
  requests left of the workload, then the line).

    cargo build --release --bin ringvm && benches/snapshot.py [N]
"""
import json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ringvm = os.path.join(root, "target", "x86_64-unknown-linux-gnu", "release", "ringvm")
LEN = 8 << 20


def events(path):
    out = {}
    for line in open(path):
        e = json.loads(line)
        t = e["timestamp"]["secs"] + e["timestamp"]["nanos"] / 1e9
        out.setdefault(e["event"], t)
    return out


def wait_for(pred, what, limit=600):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > limit:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.001)


def written(disk, off):
    with open(disk, "rb") as f:
        f.seek(off)
        return any(f.read(4096))


def remote(sock, *args):
    subprocess.run([ringvm, "remote", "--api-socket", sock, *args], check=True,
                   stdout=subprocess.DEVNULL)


def snapshot(tmp, mem):
    """Snapshots the workload near its end; (snapshot dir, disk, ms, MiB)."""
    for attempt in range(5):
        d = os.path.join(tmp, f"{mem}-{attempt}")
        os.makedirs(d)
        disk, sock, ev, serial = (os.path.join(d, n) for n in ("d.img", "api.sock", "ev", "serial"))
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        p = subprocess.Popen([ringvm, "run", "--kernel", "builtin", "--memory", mem, "--cpus", "2",
                              "--disk", f"path={disk}", "--serial", f"file={serial}",
                              "--api-socket", sock, "--event-monitor", f"path={ev}",
                              "--cmdline", f"blk.mode=write blk.qd=4 blk.len={LEN} blk.seed=5"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_for(lambda: written(disk, LEN - (256 << 10)), "the workload")
        remote(sock, "pause")
        done = os.path.exists(serial) and "RINGVM-RESULT" in open(serial).read()
        if done:
            p.kill(); p.wait()
            continue
        snap = os.path.join(d, "snap")
        remote(sock, "snapshot", f"file://{snap}")
        p.send_signal(signal.SIGKILL); p.wait()
        e = events(ev)
        ms = (e["snapshotted"] - e["snapshotting"]) * 1e3
        data = sum(os.stat(os.path.join(snap, f)).st_blocks * 512
                   for f in os.listdir(snap) if f.startswith("memory"))
        return snap, disk, ms, data / (1 << 20)
    raise SystemExit("the workload always finished before the pause")


def restore(tmp, snap, disk, mode, i):
    copy = os.path.join(tmp, f"copy-{mode}-{i}.img")
    shutil.copyfile(disk, copy)
    ev, serial = copy + ".ev", copy + ".serial"
    t0 = time.time()
    p = subprocess.Popen([ringvm, "run", "--restore",
                          f"source={snap},resume=on,memory_restore_mode={mode}",
                          "--disk-path", f"virtio-blk0={copy}", "--serial", f"file={serial}",
                          "--event-monitor", f"path={ev}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(serial) and "RINGVM-RESULT" in open(serial).read(), "the result")
    t_result = time.time()
    if p.wait() != 0:
        raise SystemExit(f"restore exited with {p.returncode}")
    e = events(ev)
    os.remove(copy)
    return (e["resumed"] - t0) * 1e3, (t_result - t0) * 1e3


def main():
    print(f"{'memory':>6} {'snapshot_ms':>11} {'data_mib':>8} {'mode':>9} {'resumed_ms':>10} {'result_ms':>9}")
    for mem in ["64M", "512M", "2G"]:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            snap, disk, ms, data = snapshot(tmp, mem)
            for mode in ["ondemand", "copy"]:
                runs = [restore(tmp, snap, disk, mode, i) for i in range(N)]
                r = statistics.median(a for a, _ in runs)
                g = statistics.median(b for _, b in runs)
                print(f"{mem:>6} {ms:>11.1f} {data:>8.1f} {mode:>9} {r:>10.1f} {g:>9.1f}")


main()

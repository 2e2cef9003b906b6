#!/usr/bin/env python3
"""Start-to-exit wall time and peak RSS of a trivial PVH guest.

Runs each command N times (default 20; the commands in turn, round by
round, so that a busy machine's drift hits each alike) and prints the
median and minimum wall time and the median peak RSS (from wait4's rusage, so it covers the
whole process). Usage:

    benches/startup.py [N]            # ringvm, and QEMU microvm if installed
    RINGVM_BASE=/path/to/other/ringvm benches/startup.py [N]
                                      # adds rows for another build (A/B)
    RINGVM_SECCOMP_OFF=1 benches/startup.py [N]
                                      # adds a --seccomp false row

The guest is ringvm's built-in guest with `exit=0`, 64 MiB of RAM, 1 vCPU,
serial to /dev/null. The `--api-socket` row serves the HTTP API on a Unix
socket while the guest runs (ringvm removes the socket when it exits).
"""
import os, statistics, subprocess, sys, tempfile, time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ringvm = os.path.join(root, "target", "x86_64-unknown-linux-gnu", "release", "ringvm")

def measure_once(argv, ok_codes, errfile):
    """One run: (wall ms, peak RSS MiB, ringvm's own start-to-exit ms or None)."""
    # posix_spawn (vfork semantics): the child never holds a copy of
    # this Python process.
    devnull = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1)]
    devnull.append((os.POSIX_SPAWN_OPEN, 2, errfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=devnull)
    _, status, _ = os.wait4(pid, 0)
    wall = (time.perf_counter() - t0) * 1e3
    code = os.waitstatus_to_exitcode(status)
    err = open(errfile).read()
    inner = None
    if "; " in err and err.rstrip().endswith(" ms)"):
        inner = float(err.rstrip()[:-4].rsplit("; ", 1)[1])
    if code not in ok_codes:
        raise SystemExit(f"{argv[0]} exited with {code}")
    # Peak RSS through GNU time: a small C parent, so the figure is the
    # VMM's own (rusage keeps the pre-exec peak of a spawning Python).
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + argv, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
    return wall, int(out.strip().splitlines()[-1]) / 1024, inner

def measure_all(rows):
    """Runs the rows in turn, N rounds, so that a busy machine's drift hits
    every row alike; per row (median wall, min wall, median RSS, median
    inner) or the failure."""
    errfile = tempfile.mktemp()
    got = {name: ([], [], []) for name, _, _ in rows}
    failed = {}
    for _ in range(N):
        for name, argv, ok in rows:
            if name in failed:
                continue
            try:
                wall, rss, inner = measure_once(argv, ok, errfile)
            except SystemExit as e:
                failed[name] = str(e)
                continue
            got[name][0].append(wall)
            got[name][1].append(rss)
            if inner is not None:
                got[name][2].append(inner)
    out = {}
    for name, _, _ in rows:
        if name in failed:
            out[name] = failed[name]
            continue
        walls, rss, inner = got[name]
        out[name] = (statistics.median(walls), min(walls), statistics.median(rss),
                     statistics.median(inner) if inner else None)
    return out

def main():
    if not os.path.exists(ringvm):
        sys.exit("build first: cargo build --release")
    guest = os.path.join(tempfile.mkdtemp(), "guest.elf")
    subprocess.run([ringvm, "builtin-guest", "--output", guest], check=True, stderr=subprocess.DEVNULL)
    base = [ringvm, "run", "--kernel", guest, "--memory", "64M", "--cmdline", "exit=0", "--serial", "file=/dev/null"]
    sock = os.path.join(tempfile.mkdtemp(), "api.sock")
    rows = [("ringvm (default: split)", base, {0}), ("ringvm --irqchip kernel", base + ["--irqchip", "kernel"], {0}),
            ("ringvm --api-socket", base + ["--api-socket", sock], {0})]
    other = os.environ.get("RINGVM_BASE")
    if other:
        rows.insert(1, ("other build (default)", [other] + base[1:], {0}))
    if os.environ.get("RINGVM_SECCOMP_OFF"):
        rows.insert(1, ("ringvm --seccomp false", base + ["--seccomp", "false"], {0}))
    qemu = "/usr/bin/qemu-system-x86_64"
    if os.path.exists(qemu) and not os.environ.get("NO_QEMU"):
        rows.append(("qemu microvm (kvm)", [qemu, "-M", "microvm", "-accel", "kvm", "-m", "64M", "-smp", "1", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "file:/dev/null", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", guest, "-append", "exit=0"], {1}))
    floor = subprocess.run(["/usr/bin/time", "-f", "%M", "/bin/true"], stderr=subprocess.PIPE, text=True).stderr
    print(f"(GNU time's own floor: /bin/true peaks at {int(floor.strip()) / 1024:.2f} MiB)")
    # The ordering file names mangled symbols, whose hashes change with
    # the code: a file that has gone stale shows up here (and in the RSS).
    order = os.path.join(root, "bins", "ringvm", "startup.order")
    nm = subprocess.run(["nm", "--defined-only", ringvm], stdout=subprocess.PIPE, text=True)
    if nm.returncode == 0 and os.path.exists(order):
        syms = {l.split()[-1] for l in nm.stdout.splitlines() if l.strip()}
        names = {l.strip() for l in open(order) if l.strip()}
        print(f"(startup.order: {len(names & syms)} of its {len(names)} names are symbols of the binary;"
              " benches/order-symbols.sh regenerates it)")
    print(f"{'vmm':<24} {'median ms':>10} {'min ms':>8} {'peak RSS MiB':>13} {'to guest exit ms':>17}  (N={N})")
    results = measure_all(rows)
    for name, _, _ in rows:
        r = results[name]
        if isinstance(r, str):
            print(f"{name:<24} failed: {r}")
            continue
        med, lo, rss, inner = r
        inner_s = f"{inner:17.1f}" if inner is not None else f"{'-':>17}"
        print(f"{name:<24} {med:10.1f} {lo:8.1f} {rss:13.2f} {inner_s}")

main()

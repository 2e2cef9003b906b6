#!/usr/bin/env bash
# Regenerates bins/ringvm/startup.order, the list of functions the
# release binary runs on its common paths, which bins/ringvm/build.rs hands
# to the linker (lld's --symbol-ordering-file) so that they sit together
# at the start of .text. The kernel maps an executable's page cache in
# large folios (up to 1 MiB seen on this host) at each first touch, so
# start-up code spread over the whole 2.3 MB .text made most of it
# resident; grouped, it is a few folios (docs/benchmarks.md, "Start-up").
#
# Usage: cargo build --release && benches/order-symbols.sh
# Needs valgrind (callgrind counts which functions ran; no timing).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/x86_64-unknown-linux-gnu/release/ringvm
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" builtin-guest --output "$work/guest.elf" 2>/dev/null
truncate -s 16M "$work/disk.img"

# Each path in the order it should be laid out: the trivial boot first
# (the start-up benchmark), then what a disk adds, then the CLI's --help.
# Seccomp is off: valgrind's own system calls are not on the lists. A
# profile that hangs is cut off after 5 minutes: in session 7 the disk VM
# never finished under valgrind 3.19 (with either disk engine; it ignored
# SIGTERM). Its iothread sat in io_uring_enter (wchan io_cqring_wait) and
# the main thread in a pipe read, no vCPU thread yet: valgrind runs one
# thread at a time and seems not to release its lock around
# io_uring_enter. That session's file is the boot and --help profiles
# followed by the names of the previous file that they lack.
profile() {
    local name=$1; shift
    timeout -s KILL 300 valgrind --tool=callgrind --demangle=no \
        --callgrind-out-file="$work/$name.cg" "$bin" "$@" >/dev/null 2>&1 || true
}
profile boot run --kernel "$work/guest.elf" --memory 64M --cmdline exit=0 \
    --serial file=/dev/null --seccomp false
profile disk run --kernel "$work/guest.elf" --memory 64M --serial file=/dev/null \
    --seccomp false --disk "path=$work/disk.img" \
    --cmdline "blk.mode=write blk.bs=4096 blk.qd=8 blk.len=1M blk.seed=1"
profile help run --help

# Every function named in a profile (callers and callees), first
# appearance first; callgrind's anonymous addresses are dropped.
# A profile that was cut off leaves no file (or a partial one): the
# previous file's names that are still symbols of the binary follow the
# new ones, so the paths a lost profile covered keep their place.
for name in boot disk help; do
    if [ ! -s "$work/$name.cg" ]; then
        echo "no $name profile: the previous file's names fill in" >&2
        continue
    fi
    grep -oE '^c?fn=\([0-9]+\) .*' "$work/$name.cg" | sed -E 's/^c?fn=\([0-9]+\) //' || true
done | grep -v '^0x' > "$work/new.order" || true
nm "$bin" | awk '{print $NF}' | sort -u > "$work/symbols"
grep -Fxf "$work/symbols" bins/ringvm/startup.order > "$work/kept.order" || true
cat "$work/new.order" "$work/kept.order" | awk '!seen[$0]++' > bins/ringvm/startup.order
echo "bins/ringvm/startup.order: $(wc -l < bins/ringvm/startup.order) functions" >&2

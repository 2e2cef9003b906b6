#!/usr/bin/env bash
# The snapshot's guest-memory write rate against fio writing the same size
# to the same filesystem, interleaved rounds, medians.
#
#     benches/snapshot_write.sh [ROUNDS] [DIR]
#
# Each round runs, for 512 MiB and 2 GiB: the snapshot_memory_bench
# example (guest RAM filled with non-zero data, then
# vmm::snapshot::memory::save_memory: io_uring, 1 MiB writes, 32 in
# flight, fdatasync) and `fio --rw=write --bs=1M --iodepth=32
# --ioengine=io_uring --end_fsync=1` of the same size; both into DIR
# (default /var/tmp/ringvm-snapbench, on the root filesystem), emptied
# between runs. fio's time is its whole job including the final fsync.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
dir="${2:-/var/tmp/ringvm-snapbench}"
cargo build --release -q -p vmm --example snapshot_memory_bench
bench=target/x86_64-unknown-linux-gnu/release/examples/snapshot_memory_bench
mkdir -p "$dir"
out=$(mktemp)
for r in $(seq "$rounds"); do
    for mib in 512 2048; do
        rm -rf "${dir:?}"/*
        sync
        "$bench" "$mib" "$dir" | sed -n "s/.*save_mib_s=\([0-9]*\).*/ringvm $mib \1/p" >>"$out"
        rm -rf "${dir:?}"/*
        sync
        start=$(date +%s.%N)
        fio --name=w --rw=write --bs=1M --iodepth=32 --ioengine=io_uring --size="${mib}m" \
            --end_fsync=1 --filename="$dir/fio.dat" --output=/dev/null
        end=$(date +%s.%N)
        echo "fio $mib $(echo "$mib / ($end - $start)" | bc -l | cut -d. -f1)" >>"$out"
    done
done
rm -rf "${dir:?}"
python3 - "$out" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, mib, rate = line.split()
    rows.setdefault((int(mib), who), []).append(int(rate))
print(f"{'MiB':>5} {'ringvm MiB/s':>12} {'fio MiB/s':>10} {'ratio':>6}   (per round: ringvm / fio)")
for mib in sorted({m for m, _ in rows}):
    a, b = rows[(mib, "ringvm")], rows[(mib, "fio")]
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{mib:>5} {ma:>12.0f} {mb:>10.0f} {ma / mb:>6.2f}   {a} / {b}")
PY
rm -f "$out"

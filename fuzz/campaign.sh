#!/usr/bin/env bash
# Runs fuzz campaigns one target at a time under nice -n 19: each for
# 10 million executions or MAX_TIME seconds of running (default 1800;
# time it spends stopped does not count), whichever comes first, on fuzz/corpus/TARGET/, then minimises that corpus in place
# (libFuzzer -merge=1 into a fresh directory, which is what `cargo fuzz
# cmin` does). Per-target logs go to fuzz/campaign/TARGET.log and one line
# per target (date, executions, coverage, features, corpus, wall time) to
# fuzz/campaign/summary.tsv. Build first: `cargo +nightly fuzz build -O`.
#   fuzz/campaign.sh [-t SECONDS] TARGET...
set -uo pipefail
cd "$(dirname "$0")"
max_time=1800
if [ "${1:-}" = "-t" ]; then max_time=$2; shift 2; fi
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p campaign
export ASAN_OPTIONS="detect_odr_violation=0"
for t in "$@"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    start=$(date -u +%s)
    day=$(date -u +%Y-%m-%dT%H:%MZ)
    # See smoke.sh: glibc's thread-exit bookkeeping in the per-input server
    # thread shows up as a leak that is not ringvm's.
    extra=()
    [ "$t" = vfio_user_replies ] && extra=(-detect_leaks=0)
    # The budget is the time the fuzzer ran, not the wall time: seconds
    # in which it was stopped (SIGSTOP, paused for a benchmark) do not
    # count. A watcher samples its state every 5 s and interrupts it
    # (SIGINT: libFuzzer prints its final stats and exits with 72) at the
    # budget; -max_total_time is only a backstop. The fuzzer's CPU time is
    # reported beside it (targets that wait in the kernel, KVM ioctls or
    # socket round trips, use less CPU than they run).
    nice -n 19 "$bin/$t" "corpus/$t" -runs=10000000 -max_total_time=$((max_time * 6)) \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 "${extra[@]}" >"campaign/$t.log" 2>&1 &
    pid=$!
    tick=$(getconf CLK_TCK)
    cpu=0
    ran=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        # State (field 3) and utime, stime (fields 14, 15) of
        # /proc/PID/stat, after the command name in parentheses.
        read -r state ut st < <(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $1, $12, $13}') || break
        [ -n "${ut:-}" ] || break
        cpu=$(( (ut + st) / tick ))
        [ "$state" != T ] && ran=$((ran + 5))
        if [ "$ran" -ge "$max_time" ]; then kill -INT "$pid"; break; fi
    done
    wait "$pid"
    rc=$?
    [ "$rc" = 72 ] && rc=0 # interrupted at the budget
    wall=$(( $(date -u +%s) - start ))
    runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "campaign/$t.log" | tail -1 | grep -o '[0-9]*$')
    last=$(grep -E '^#[0-9]+.*(DONE|cov:)' "campaign/$t.log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    crash=$(ls "artifacts/$t" | head -1)
    # Minimise: keep the inputs that give the full coverage.
    rm -rf "corpus-min/$t" && mkdir -p "corpus-min/$t"
    nice -n 19 "$bin/$t" -merge=1 "corpus-min/$t" "corpus/$t" >"campaign/$t.cmin.log" 2>&1 \
        && rm -rf "corpus/$t" && mv "corpus-min/$t" "corpus/$t"
    n=$(ls "corpus/$t" | wc -l)
    size=$(du -sk "corpus/$t" | cut -f1)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%ss running, %ss wall, %ss CPU\t%s\t%s KiB\t%s\n' "$t" "$day" "$rc" "$runs" "$cov" "$ft" "$ran" "$wall" "$cpu" "$n" "$size" "${crash:-clean}" \
        | tee -a campaign/summary.tsv
done

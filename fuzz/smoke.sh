#!/usr/bin/env bash
# Fuzz smoke test (run by .ci/run after the test suite): builds every
# target once with the nightly toolchain, then runs each for 20 s on its
# committed corpus fuzz/corpus/TARGET/. New inputs and any crash go to a
# scratch directory, not the checkout; a crash fails the run and prints
# the input's path. cargo-fuzz is installed into ~/.cargo/bin the first
# time only. SMOKE_SECONDS overrides the 20 s.
set -euo pipefail
cd "$(dirname "$0")"
secs="${SMOKE_SECONDS:-20}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal >/dev/null
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
start=$(date +%s)
cargo +nightly fuzz build -O
built=$(date +%s)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo +nightly fuzz list); do
    mkdir -p "$scratch/$target/new" "$scratch/$target/artifacts" "corpus/$target"
    # vfio_user_replies spawns a server thread per input; glibc's
    # thread-exit bookkeeping (__cxa_thread_atexit_impl) and a thread
    # still exiting show up as a LeakSanitizer report that is not
    # ringvm's. libFuzzer's -detect_leaks=0 only stops the check after each
    # input; LeakSanitizer's own check at exit (which failed session 10's
    # CI once) needs ASAN_OPTIONS too.
    extra=()
    asan=detect_odr_violation=0
    if [ "$target" = vfio_user_replies ]; then
        extra=(-detect_leaks=0)
        asan=$asan:detect_leaks=0
    fi
    if ! ASAN_OPTIONS=$asan \
        "target/x86_64-unknown-linux-gnu/release/$target" \
        "$scratch/$target/new" "corpus/$target" -max_total_time="$secs" "${extra[@]}" \
        -artifact_prefix="$scratch/$target/artifacts/" >"$scratch/$target.log" 2>&1; then
        tail -n 40 "$scratch/$target.log"
        mkdir -p artifacts/"$target"
        cp "$scratch/$target/artifacts/"* artifacts/"$target"/ 2>/dev/null || true
        echo "fuzz smoke: $target failed; its input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    echo "fuzz smoke: $target: $(grep -E '^Done [0-9]+ runs' "$scratch/$target.log")"
done
echo "fuzz smoke: build $((built - start)) s, runs $(($(date +%s) - built)) s"

#!/usr/bin/env bash
# Seeds fuzz/corpus/TARGET/ for every target from the tests' inputs:
# fuzz/seed.py writes each target's format from the unit and integration
# tests' requests, register sequences, command lines, the vfio-user test
# device's config space and the built-in guest's ELF (found under target/
# after a `cargo build`, or named by RINGVM_GUEST_ELF); the vhost-user
# session comes from ringvm-blk's own replay test.
# Existing corpus files are kept; seeds with the same name are rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 fuzz/seed.py
nice cargo test -q -p ringvm-blk --test replay -- --ignored write_fuzz_seed
for d in fuzz/corpus/*/; do
    printf '%-28s %3d seeds\n' "$(basename "$d")" "$(ls "$d" | wc -l)"
done

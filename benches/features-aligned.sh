#!/usr/bin/env bash
# Checks that the ringvm binary's dependencies resolve with the same
# features whether it is built alone (`cargo run --release --bin ringvm`,
# the README's command) or with the whole workspace (`cargo build
# --release`). Other features mean other symbol hashes, and
# bins/ringvm/startup.order, which names symbols exactly, then matches only
# one of the two builds (peak RSS at start-up grows by about 0.6 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
tree() {
    cargo tree --target x86_64-unknown-linux-gnu -e normal,build \
        --prefix none -f '{p} [{f}]' "$@" | sed 's/ (\*)$//' | sort -u
}
alone=$(tree -p ringvm)
# The workspace's view of the same packages.
names=$(printf '%s\n' "$alone" | awk '{print $1" "$2}' | sort -u)
whole=$(tree --workspace | grep -F -f <(printf '%s\n' "$names") || true)
if ! diff <(printf '%s\n' "$alone") <(printf '%s\n' "$whole") >/tmp/ringvm-features.diff; then
    echo "ringvm's dependencies have other features when built alone (<) than in the workspace (>):" >&2
    grep '^[<>]' /tmp/ringvm-features.diff >&2
    echo "name the missing features in bins/ringvm/Cargo.toml" >&2
    exit 1
fi
echo "ringvm's dependency features: the same alone and in the workspace ($(printf '%s\n' "$alone" | wc -l) packages)"

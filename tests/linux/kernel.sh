#!/usr/bin/env bash
# Builds ringvm's test kernel into DIR: Debian's linux-source-6.1, the
# patches in patches/, `make tinyconfig` plus the fragment in config, then
# `make vmlinux`. Leaves DIR/vmlinux (booted through its PVH note),
# DIR/config (the final .config) and DIR/gen_init_cpio (the kernel's own
# initramfs packer); the source and object trees are removed afterwards.
#
#   tests/linux/kernel.sh DIR      (JOBS=N to override make's -j)
#
# The tests call this through tests/common/linux.rs, which picks DIR as
# ${XDG_CACHE_HOME:-~/.cache}/ringvm/linux-<hash of config, patches and this
# script> and holds a lock so that concurrent tests build it once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
src_tar=${RINGVM_LINUX_SOURCE:-/usr/src/linux-source-6.1.tar.xz}
[ -r "$src_tar" ] || { echo "kernel.sh: $src_tar missing (apt-get install linux-source-6.1)" >&2; exit 1; }

mkdir -p "$out"
cd "$out"
rm -rf src build
mkdir src
tar -xJf "$src_tar" -C src --strip-components=1
for p in "$here"/patches/*.patch; do
    patch -d src -p1 --forward --quiet < "$p"
done

make -s -C src O="$out/build" tinyconfig
src/scripts/kconfig/merge_config.sh -m -O build build/.config "$here/config" >/dev/null
make -s -C src O="$out/build" olddefconfig
# Every line of the fragment must have survived Kconfig's dependency checks
# ("is not set" also holds when the option does not exist at all).
bad=0
while read -r line; do
    case "$line" in
    CONFIG_*=*)
        grep -qxF "$line" build/.config || { echo "kernel.sh: config lacks $line" >&2; bad=1; } ;;
    "# CONFIG_"*" is not set")
        name=${line#\# }
        name=${name%% *}
        ! grep -q "^$name=" build/.config || { echo "kernel.sh: config has $(grep "^$name=" build/.config)" >&2; bad=1; } ;;
    esac
done < "$here/config"
[ "$bad" = 0 ]

make -s -C src O="$out/build" -j"${JOBS:-$(nproc)}" vmlinux
cp build/.config config
cp build/usr/gen_init_cpio gen_init_cpio
cp build/vmlinux vmlinux.tmp
rm -rf src build
mv vmlinux.tmp vmlinux

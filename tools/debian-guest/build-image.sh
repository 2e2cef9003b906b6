#!/usr/bin/env bash
# Builds what tools/debian-guest/run.sh boots: a stock Debian cloud kernel,
# a small initramfs that loads its virtio modules, and an ext4 root file
# system, made from Debian packages, holding fio and /sbin/ringvm-fio-init.
#
#   tools/debian-guest/build-image.sh [--out DIR] [--suite SUITE]
#       [--mirror URL] [--size SIZE] [--rebuild]
#
# Output in DIR (default ${XDG_CACHE_HOME:-~/.cache}/ringvm/debian-guest):
#   vmlinuz      the bzImage of linux-image-cloud-amd64's current dependency
#   initrd.img   busybox (static) + virtio, virtio_pci, virtio_blk modules
#   root.img     ext4, mmdebstrap's "essential" set + fio, init script
#   build.stamp  what the outputs were built from
# Downloaded packages are kept in ${XDG_CACHE_HOME:-~/.cache}/ringvm/debs.
# Running it again with the same inputs (this script, the two init scripts,
# the options, the kernel and busybox package versions in apt's lists) does
# nothing; --rebuild builds anew (e.g. for the mirror's package updates).
#
# Needs: a Debian (or derivative) host whose apt lists carry Debian's main
# component (apt-get update), mmdebstrap, e2fsprogs, cpio, gzip, kmod
# (modinfo); root, or mmdebstrap's unshare mode (subuids) for a normal user.
#
# Exit codes: 0 done (or already up to date), 1 a step failed, 2 bad usage or
# a missing tool, 3 the Debian mirror (or the apt proxy) cannot be reached.

set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ringvm
out=$cache/debian-guest
suite=bookworm
mirror=http://deb.debian.org/debian
size=1G
rebuild=0

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
die() {
    echo "build-image.sh: $*" >&2
    exit 1
}
bad() {
    echo "build-image.sh: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --suite) suite=${2:?--suite needs a name}; shift 2 ;;
        --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
        --size) size=${2:?--size needs a size such as 1G}; shift 2 ;;
        --rebuild) rebuild=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) bad "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $size =~ ^[0-9]+[KMGT]?$ ]] || bad "--size '$size': give a size such as 800M or 2G"
# mmdebstrap's special hooks split their arguments at spaces.
[[ "$cache$here" != *[[:space:]]* ]] || bad "paths with spaces are not supported: $cache, $here"

for tool in apt-get apt-cache dpkg-deb mmdebstrap mkfs.ext4 cpio gzip modinfo sha256sum flock; do
    command -v "$tool" >/dev/null ||
        bad "'$tool' not found: apt-get install mmdebstrap e2fsprogs cpio gzip kmod util-linux"
done

# --- What the outputs depend on --------------------------------------------
# The kernel is whatever linux-image-cloud-amd64 depends on in this host's
# apt lists (no network needed to find out).
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n 1) || true
[ -n "$kpkg" ] || die "apt knows no linux-image-cloud-amd64: this needs a Debian host with the main component in its apt sources; run 'apt-get update'"
kver=$(apt-cache show --no-all-versions "$kpkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
bbver=$(apt-cache show --no-all-versions busybox-static 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
[ -n "$bbver" ] || die "apt knows no busybox-static; run 'apt-get update'"

key=$(
    cat "${BASH_SOURCE[0]}" "$here/initramfs-init" "$here/ringvm-fio-init"
    echo "suite=$suite mirror=$mirror size=$size kernel=$kpkg=$kver busybox=$bbver"
)
key=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)

# One build at a time per output directory (tests of several checkouts may
# share one).
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

if [ "$rebuild" = 0 ] && [ -f "$out/build.stamp" ] &&
    [ "$(sed -n 's/^key=//p' "$out/build.stamp")" = "$key" ] &&
    [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/root.img" ]; then
    echo "build-image.sh: up to date in $out ($kpkg $kver)"
    exit 0
fi

# root: mmdebstrap's root mode; otherwise its unshare mode.
helper=()
mode=root
if [ "$(id -u)" != 0 ]; then
    grep -q "^$(id -un):" /etc/subuid 2>/dev/null ||
        bad "as a normal user this needs subordinate ids for mmdebstrap's unshare mode (an entry for $(id -un) in /etc/subuid and /etc/subgid); or run it as root"
    # The chroot's files belong to subuids; only a namespace with the same
    # mapping sees them as root's, so mkfs and clean-up run in one.
    mode=unshare
    helper=(mmdebstrap --unshare-helper)
fi

# --- Can the packages be fetched? ------------------------------------------
# A plain TCP connect to the mirror (or to apt's HTTP proxy, if one is set),
# so that "no network" is told apart from a failing build.
reach() { # URL
    local hostport=${1#*://}
    hostport=${hostport%%/*}
    hostport=${hostport##*@}
    local host=${hostport%:*} port=80
    [ "$host" != "$hostport" ] && port=${hostport##*:}
    [ "$host" = "$hostport" ] && [[ $1 == https://* ]] && port=443
    timeout 15 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}
proxy=$(apt-config dump Acquire::http::Proxy 2>/dev/null | sed -n 's/^Acquire::http::Proxy "\(.*\)";$/\1/p')
proxy=${proxy:-${http_proxy:-}}
case "$mirror" in
    file:* | copy:*) ;;
    *)
        probe=${proxy:-$mirror}
        reach "$probe" || {
            echo "build-image.sh: cannot reach $probe (network or mirror down?)" >&2
            exit 3
        }
        ;;
esac

mkdir -p "$cache/debs/archives"
work=$(mktemp -d "$out/.build.XXXXXX")
cleanup() {
    [ -d "$work/rootfs" ] && "${helper[@]}" rm -rf "$work/rootfs"
    rm -rf "$work"
}
trap cleanup EXIT
start=$(date +%s)

# --- The kernel ------------------------------------------------------------
fetch_deb() { # PACKAGE VERSION -> path of the cached .deb
    local deb
    deb=$(ls "$cache/debs/$1_"*.deb 2>/dev/null | grep -F "_${2//:/%3a}_" | head -n 1) || true
    if [ -z "$deb" ]; then
        (cd "$cache/debs" && apt-get download -q "$1=$2" >&2) ||
            die "apt-get download $1=$2 failed"
        deb=$(ls "$cache/debs/$1_"*.deb 2>/dev/null | grep -F "_${2//:/%3a}_" | head -n 1) ||
            die "apt-get download $1=$2 left no .deb in $cache/debs"
    fi
    echo "$deb"
}
echo "build-image.sh: kernel $kpkg $kver"
kdeb=$(fetch_deb "$kpkg" "$kver")
dpkg-deb -x "$kdeb" "$work/kernel"
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* 2>/dev/null | head -n 1) || true
[ -n "$vmlinuz" ] || die "$kdeb holds no boot/vmlinuz-*"
# A bzImage has "HdrS" at 0x202 (the boot protocol's setup header).
[ "$(dd if="$vmlinuz" bs=1 skip=514 count=4 2>/dev/null)" = HdrS ] ||
    die "$vmlinuz is not a bzImage"

# --- The initramfs ---------------------------------------------------------
echo "build-image.sh: initramfs (busybox-static $bbver, virtio modules)"
bbdeb=$(fetch_deb busybox-static "$bbver")
dpkg-deb -x "$bbdeb" "$work/bb"
ird=$work/initramfs
mkdir -p "$ird"/{bin,dev,etc,proc,sys,newroot,lib/modules}
cp "$work/bb/bin/busybox" "$ird/bin/busybox"
install -m 0755 "$here/initramfs-init" "$ird/init"
[ "$(id -u)" = 0 ] && mknod "$ird/dev/console" c 5 1
# virtio_blk and what it needs, dependencies first (modinfo's depends=).
moddir=$(ls -d "$work"/kernel/lib/modules/*/kernel 2>/dev/null | head -n 1) ||
    die "$kdeb holds no lib/modules/*/kernel"
declare -A seen=()
order=()
add_module() { # NAME
    local name=${1//-/_} file dep
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    file=$(find "$moddir" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n 1)
    [ -n "$file" ] || die "module $name not in $kpkg"
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
    cp "$file" "$ird/lib/modules/"
    order+=("$(basename "$file")")
}
add_module virtio_pci
add_module virtio_blk
printf '%s\n' "${order[@]}" >"$ird/etc/modules.order"
(cd "$ird" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9n) >"$work/initrd.img"

# --- The root file system --------------------------------------------------
# mmdebstrap's "essential" set is the smallest system dpkg can run; mount
# (for the init script) and fio come on top. Documentation and locales are
# left out (copyright files kept). Downloaded .debs are synced with the
# cache, so a rebuild fetches only what changed.
echo "build-image.sh: root file system ($suite, $mirror, mode $mode)"
mmdebstrap --mode="$mode" --variant=essential --include=mount,fio \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives' \
    --setup-hook="sync-in $cache/debs/archives /var/cache/apt/archives" \
    --customize-hook="sync-out /var/cache/apt/archives $cache/debs/archives" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
    --customize-hook="upload $here/ringvm-fio-init /sbin/ringvm-fio-init" \
    --customize-hook='chmod 0755 "$1"/sbin/ringvm-fio-init' \
    --customize-hook='echo ringvm-guest >"$1"/etc/hostname' \
    "$suite" "$work/rootfs" "$mirror" ||
    die "mmdebstrap failed (see above)"
"${helper[@]}" mkfs.ext4 -q -F -L ringvm-root -d "$work/rootfs" "$work/root.img" "$size" >/dev/null ||
    die "mkfs.ext4 -d failed: is --size $size large enough for $(du -sh "$work/rootfs" 2>/dev/null | cut -f1)?"

# --- Done: move the outputs in place, stamp last ---------------------------
rm -f "$out/build.stamp"
cp "$vmlinuz" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
mv "$work/root.img" "$out/root.img"
cat >"$out/build.stamp" <<STAMP
key=$key
kernel=$kpkg $kver
busybox-static=$bbver
suite=$suite
mirror=$mirror
size=$size
modules=${order[*]}
built=$(date -u +%Y-%m-%dT%H:%M:%SZ) in $(($(date +%s) - start)) s
STAMP
echo "build-image.sh: done in $(($(date +%s) - start)) s: $out/{vmlinuz,initrd.img,root.img}"

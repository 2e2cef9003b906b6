#!/usr/bin/env bash
# Boots the Debian guest made by build-image.sh on ringvm, runs one fio job
# inside it on a second virtio disk, and prints fio's result.
#
#   tools/debian-guest/run.sh [--image-dir DIR] [--ringvm PATH]
#       [--data PATH] [--data-size SIZE] [--data-opts OPTS]
#       [--rw RW] [--bs BS] [--iodepth N] [--jobs N] [--runtime SECS]
#       [--engine ENGINE] [--cpus N] [--memory SIZE] [--force]
#       [-- EXTRA RINGVM RUN ARGUMENTS]
#
# Defaults: the image in ${XDG_CACHE_HOME:-~/.cache}/ringvm/debian-guest;
# ringvm from $RINGVM, PATH, or this repository's target/ (release first);
# data disk DIR/data.img, 1G, filled with random bytes when first made;
# fio randread, bs 4k, iodepth 32, 1 job, 10 s, io_uring; 2 vCPUs, 1G RAM.
# --data-opts adds options to the data disk (e.g. direct=on,queues=2).
#
# The guest's console goes to stdout; the last line printed is fio's
#   RINGVM-RESULT mode=fio rw=randread ... read_iops=... errors=0 fio_exit=0
# Exit code 0 when fio ran without errors, 1 when not, 2 for bad usage or a
# host without hardware KVM.
#
# A stock Debian kernel needs hardware KVM (Intel VT-x or AMD-V): under a
# software KVM such as PVM, where KVM emulates every guest instruction, it
# stops in early boot on an instruction the emulator lacks. run.sh refuses
# such a host unless --force is given.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
image_dir=${XDG_CACHE_HOME:-$HOME/.cache}/ringvm/debian-guest
ringvm=${RINGVM:-}
data= data_size=1G data_opts=
rw=randread bs=4k iodepth=32 jobs=1 runtime=10 engine=io_uring
cpus=2 memory=1G force=0
extra=()

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
bad() {
    echo "run.sh: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --image-dir) image_dir=${2:?}; shift 2 ;;
        --ringvm) ringvm=${2:?}; shift 2 ;;
        --data) data=${2:?}; shift 2 ;;
        --data-size) data_size=${2:?}; shift 2 ;;
        --data-opts) data_opts=${2:?}; shift 2 ;;
        --rw) rw=${2:?}; shift 2 ;;
        --bs) bs=${2:?}; shift 2 ;;
        --iodepth) iodepth=${2:?}; shift 2 ;;
        --jobs) jobs=${2:?}; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        --engine) engine=${2:?}; shift 2 ;;
        --cpus) cpus=${2:?}; shift 2 ;;
        --memory) memory=${2:?}; shift 2 ;;
        --force) force=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) usage; exit 0 ;;
        *) bad "unknown argument '$1' (see --help)" ;;
    esac
done
# These end up on the kernel command line, split at spaces.
for v in "$rw" "$bs" "$iodepth" "$jobs" "$runtime" "$engine"; do
    [[ $v =~ ^[A-Za-z0-9_.-]+$ ]] || bad "'$v' is not a valid fio option value"
done
[[ $data_size =~ ^[0-9]+[KMGT]?$ ]] || bad "--data-size '$data_size': give a size such as 1G"

# --- Hardware KVM? ---------------------------------------------------------
why=
if [ ! -e /dev/kvm ]; then
    why="there is no /dev/kvm"
elif [ -d /sys/module/kvm_pvm ]; then
    why="/dev/kvm is PVM (kvm_pvm), a software KVM that emulates every guest instruction"
elif ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
    why="the CPU has no vmx or svm flag (no VT-x or AMD-V)"
fi
if [ -n "$why" ]; then
    if [ "$force" = 0 ]; then
        bad "this needs hardware KVM (Intel VT-x or AMD-V), and $why. A stock Debian kernel does not boot to userspace without it (it stops in early boot on an instruction KVM cannot emulate). --force tries anyway."
    fi
    echo "run.sh: warning: $why; going on because of --force" >&2
fi

# --- Inputs ----------------------------------------------------------------
for f in vmlinuz initrd.img root.img; do
    [ -f "$image_dir/$f" ] || bad "$image_dir/$f is missing: run tools/debian-guest/build-image.sh first"
done
if [ -z "$ringvm" ]; then
    for c in "$(command -v ringvm || true)" \
        "$repo/target/x86_64-unknown-linux-gnu/release/ringvm" "$repo/target/release/ringvm" \
        "$repo/target/x86_64-unknown-linux-gnu/debug/ringvm" "$repo/target/debug/ringvm"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            ringvm=$c
            break
        fi
    done
fi
[ -n "$ringvm" ] && [ -x "$ringvm" ] ||
    bad "no ringvm binary: cargo build --release, or give --ringvm PATH (or RINGVM=PATH)"

data=${data:-$image_dir/data.img}
if [ ! -e "$data" ]; then
    # Random bytes, so that reads are real reads rather than holes.
    echo "run.sh: making $data ($data_size of random bytes)" >&2
    count=$(numfmt --from=iec "$data_size")
    head -c "$count" /dev/urandom >"$data.tmp"
    mv "$data.tmp" "$data"
fi

# --- Boot ------------------------------------------------------------------
# The root file system is read-only (disk and mount): runs leave the built
# image as it was. fio's target is the second disk, /dev/vdb.
cmdline="console=ttyS0 root=/dev/vda ro init=/sbin/ringvm-fio-init panic=-1 reboot=k"
cmdline+=" ringvm.fio.rw=$rw ringvm.fio.bs=$bs ringvm.fio.iodepth=$iodepth"
cmdline+=" ringvm.fio.jobs=$jobs ringvm.fio.runtime=$runtime ringvm.fio.engine=$engine"
log=$(mktemp "${TMPDIR:-/tmp}/ringvm-debian-guest.XXXXXX")
trap 'rm -f "$log"' EXIT

set +e
"$ringvm" run --kernel "$image_dir/vmlinuz" --initrd "$image_dir/initrd.img" \
    --cmdline "$cmdline" --cpus "$cpus" --memory "$memory" \
    --disk "path=$image_dir/root.img,readonly=on" \
    --disk "path=$data${data_opts:+,$data_opts}" \
    "${extra[@]}" | tee "$log"
code=${PIPESTATUS[0]}
set -e

result=$(grep -a '^RINGVM-RESULT ' "$log" | tail -n 1 | tr -d '\r' || true)
echo
if [ -z "$result" ]; then
    echo "run.sh: the guest printed no RINGVM-RESULT line (ringvm exit code $code; see its last line above)" >&2
    exit 1
fi
echo "fio in the guest: $result"
# ringvm ends with 101 (ACPI power-off) or, with no ACPI power-off to use,
# 107 (the guest halted for good); either is a normal end here.
case " $result " in
    *" errors=0 fio_exit=0 "*) exit 0 ;;
    *)
        echo "run.sh: fio reported errors (ringvm exit code $code)" >&2
        exit 1
        ;;
esac

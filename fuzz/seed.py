#!/usr/bin/env python3
"""Writes initial inputs for every fuzz target into fuzz/corpus/TARGET/,
in each target's input format, from what the tests use: the requests,
register sequences and command lines of the unit and integration tests,
the vfio-user test device's configuration space, the built-in guest's
ELF. Called by fuzz/seed.sh (which also runs the Rust seed writers)."""

import os
import re
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


# ---- descriptor chains (blk_request, net_tx) --------------------------------
NEXT, WRITE = 1, 2


def chain_input(first, descs, data=b"", window=None):
    """`descs` are (offset into the data window, len, flags); next is the
    following index. Even addresses map into the window (addr >> 1)."""
    out = bytes([first | (len(descs) - 1)])
    for i, (off, ln, fl) in enumerate(descs):
        if window == "tx":
            ln = ln << 1  # even lengths are taken modulo 0x4000
        out += struct.pack("<QIHH", off << 1, ln, fl, i + 1)
    return out + data


def blk_seeds():
    # The request shapes of crates/virtio/src/blk/request_tests.rs: header
    # (type, reserved, sector), data buffers, a status byte.
    def req(kind, sector, data_descs, payload=b""):
        hdr = struct.pack("<IIQ", kind, 0, sector)
        descs = [(0, 16, NEXT)]
        off = 0x100
        for ln, fl in data_descs:
            descs.append((off, ln, fl | NEXT))
            off += ln
        descs.append((0xff0, 1, WRITE))
        return chain_input(0, descs, hdr + b"\0" * (0x100 - 16) + payload)

    put("blk_request", "read", req(0, 8, [(512, WRITE)]))
    put("blk_request", "write", req(1, 8, [(512, 0)], b"\xa5" * 512))
    put("blk_request", "write_two_buffers", req(1, 0, [(512, 0), (1024, 0)], b"\x5a" * 1536))
    put("blk_request", "flush", req(4, 0, []))
    put("blk_request", "get_id", req(8, 0, [(20, WRITE)]))
    seg = struct.pack("<QII", 16, 8, 0)
    put("blk_request", "discard", req(11, 0, [(16, 0)], seg))
    put("blk_request", "write_zeroes", req(13, 0, [(16, 0)], struct.pack("<QII", 16, 8, 1)))
    put("blk_request", "read_past_end", req(0, 4095, [(1024, WRITE)]))


def net_tx_seeds():
    eth = bytes.fromhex("ffffffffffff525400123456" "0806") + b"\0" * 46
    put("net_tx", "header_and_frame", chain_input(0, [(0, 12, NEXT), (0x100, 60, 0)], window="tx"))
    put("net_tx", "one_buffer", chain_input(0, [(0, 72, 0)], window="tx"))
    put("net_tx", "jumbo_with_tso", chain_input(0x80, [(0, 12, NEXT), (0x100, 9000, 0)], window="tx"))
    put("net_tx", "write_only", chain_input(0, [(0, 72, WRITE)], window="tx"))
    put("net_tx", "frame_bytes", chain_input(0, [(0, 12 + len(eth), 0)], window="tx") + eth)


def net_ctrl_seeds():
    # The commands of crates/virtio/src/net/ctrl.rs's tests (class, cmd,
    # data), behind a features byte (rx | mac_addr | mq, 4 pairs).
    mac = bytes([0x52, 0x54, 0, 1, 2, 3])
    mcast = bytes([0x01, 0x00, 0x5e, 0, 0, 1])
    cmds = [
        bytes([0, 0, 1]),  # RX promisc on
        bytes([0, 1, 1]),  # RX allmulti on
        bytes([1, 0]) + struct.pack("<I", 1) + mac + struct.pack("<I", 1) + mcast,
        bytes([1, 1]) + bytes([0x52, 0x54, 0, 9, 9, 9]),
        bytes([4, 0]) + struct.pack("<H", 2),
    ]
    flags = 0x37  # rx, mac_addr, mq; max_pairs 4
    body = b"".join(bytes([len(c)]) + c for c in cmds)
    put("net_ctrl", "every_class", bytes([flags]) + body)
    for i, c in enumerate(cmds):
        put("net_ctrl", f"cmd{i}", bytes([flags, len(c)]) + c)


# ---- virtio-pci (virtio_pci_common, virtio_pci_transport) -------------------
# The test driver's initialisation (crates/virtio/tests/driver/mod.rs):
# reset, ACK, DRIVER, features, FEATURES_OK, per-queue size/addresses/
# vector/enable, config vector, MSI-X table, DRIVER_OK.
def driver_init(queues=2, features=(1 << 32) | (1 << 29)):
    ops = []  # (bar0 offset, bytes)

    def w(off, v, n):
        ops.append((off, v.to_bytes(n, "little")))

    w(0x14, 0, 1)
    w(0x14, 1, 1)
    w(0x14, 3, 1)
    w(0x08, 0, 4)
    w(0x0C, features & 0xFFFFFFFF, 4)
    w(0x08, 1, 4)
    w(0x0C, features >> 32, 4)
    w(0x14, 11, 1)
    for q in range(queues):
        base = 0x1000 + q * 0x4000
        w(0x16, q, 2)
        w(0x18, 16, 2)
        w(0x20, base, 8)
        w(0x28, base + 0x1000, 8)
        w(0x30, base + 0x2000, 8)
        w(0x1A, q + 1, 2)
        w(0x1C, 1, 2)
    w(0x10, 0, 2)
    return ops, [(0x14, bytes([15]))]


def common_op(off, data, read=False):
    code = {1: 0, 2: 1, 4: 2, 8: 3}[len(data)] | (0x80 if read else 0)
    return bytes([off, code]) + data.ljust(8, b"\0")


def transport_op(kind, off, data):
    code = {1: 0, 2: 1, 4: 2, 8: 3}[len(data)]
    return bytes([kind]) + off.to_bytes(3, "little") + bytes([code]) + data.ljust(8, b"\0")


def virtio_pci_seeds():
    ops, ok = driver_init()
    put("virtio_pci_common", "driver_init", b"".join(common_op(o, d) for o, d in ops + ok))
    reads = [common_op(o, bytes(n), True) for o, n in [(0x04, 4), (0x12, 2), (0x14, 1), (0x18, 2)]]
    put("virtio_pci_common", "init_then_reset",
        b"".join(common_op(o, d) for o, d in ops + ok) + b"".join(reads) + common_op(0x14, b"\0"))

    # The transport: the same through BAR0, MSI-X vectors programmed and
    # enabled through message control (a dword write at the capability, as
    # the built-in guest does), then DRIVER_OK.
    msix = []
    for v in range(3):
        msix.append(transport_op(4, v * 16, struct.pack("<I", 0xFEE00000)))
        msix.append(transport_op(4, v * 16 + 8, struct.pack("<I", 0x40 + v)))
        msix.append(transport_op(4, v * 16 + 12, struct.pack("<I", 0)))
    enable = transport_op(0, 0x40, struct.pack("<I", 0x8000 << 16 | 0x11))
    init = b"".join(transport_op(2, o, d) for o, d in ops)
    okw = b"".join(transport_op(2, o, d) for o, d in ok)
    put("virtio_pci_transport", "driver_init", b"\0" + init + b"".join(msix) + enable + okw)
    put("virtio_pci_transport", "init_pba_and_reset",
        b"\0" + init + b"".join(msix) + enable + okw + transport_op(4, 0x2000 | 0x80000, bytes(8))
        + transport_op(3, 0x6000, bytes(8)) + transport_op(2, 0x14, b"\0"))
    # Bus mastering off under a running device, then on again.
    put("virtio_pci_transport", "bus_master_toggle",
        b"\0" + init + okw + transport_op(0, 0x04, struct.pack("<H", 2)) + transport_op(0, 0x04, struct.pack("<H", 6)))
    # The firmware's job done by the input: BAR0 sized and placed, then
    # memory decoding on; and the PCI_CFG access window.
    bar = [transport_op(0, 0x10, struct.pack("<I", 0xFFFFFFFF)), transport_op(1, 0x10, bytes(4)),
           transport_op(0, 0x10, struct.pack("<I", 0xC0000000)), transport_op(0, 0x14, bytes(4)),
           transport_op(0, 0x04, struct.pack("<H", 6))]
    put("virtio_pci_transport", "firmware_then_init", b"\x02" + b"".join(bar) + init + okw)
    put("virtio_pci_transport", "activation_fails", b"\x01" + init + okw)


def platform_seeds():
    # A PCI function sized and placed as firmware does, MSI-X enabled, the
    # IOAPIC programmed as the built-in guest does, ACPI sleep written.
    def cfg(off, v, n, read=False):
        code = {1: 0, 2: 1, 4: 2}[n] | (0x80 if read else 0)
        return bytes([0]) + struct.pack("<H", off) + bytes([code]) + struct.pack("<I", v)

    seq = [cfg(0x10, 0xFFFFFFFF, 4), cfg(0x10, 0, 4, True), cfg(0x10, 0xC0000000, 4), cfg(0x14, 0, 4),
           cfg(0x18, 0xFFFFFFFF, 4), cfg(0x18, 0xC0004000, 4), cfg(0x04, 6, 2), cfg(0x40, 0x80000011, 4),
           cfg(0x34, 0, 1, True)]
    io = []
    for pin in (0, 4):
        io.append(bytes([1, 0, 0, 0]) + struct.pack("<I", 0x10 + 2 * pin))
        io.append(bytes([1, 0x10, 0, 0]) + struct.pack("<I", 0x30 + pin))
        io.append(bytes([1, 0, 0, 0]) + struct.pack("<I", 0x11 + 2 * pin))
        io.append(bytes([1, 0x10, 0, 0]) + struct.pack("<I", 0))
    pm = [bytes([2, 5, 0, 0, 0x20 | 0x14, 0, 0, 0]), bytes([3, 1, 0, 0, 0, 0, 0, 0])]
    put("platform_registers", "pci_bars_msix", b"".join(seq))
    put("platform_registers", "ioapic_entries", b"".join(io))
    put("platform_registers", "acpi_sleep_and_ged", b"".join(pm))
    put("platform_registers", "all", b"".join(seq + io + pm))


# ---- vfio-user (passthrough_device_data, vfio_user_replies) -----------------
def test_device_config():
    """tests/devices/src/vfio_user_dev/config.rs's configuration space:
    BAR0 (32-bit), BAR2/3 (64-bit), MSI-X (0x40) -> MSI (0x50) -> PCIe
    (0x70) -> vendor (0x60)."""
    c = bytearray(256)
    struct.pack_into("<HH", c, 0, 0x1234, 0x11E8)
    struct.pack_into("<HH", c, 4, 0, 0x10)  # status: capability list
    struct.pack_into("<I", c, 8, 0xFF000001)
    c[0x0E] = 0
    struct.pack_into("<I", c, 0x10, 0)
    struct.pack_into("<I", c, 0x18, 0x4)
    struct.pack_into("<HH", c, 0x2C, 0x1234, 1)
    c[0x34] = 0x40
    c[0x3D] = 1
    c[0x40:0x42] = bytes([0x11, 0x50])
    struct.pack_into("<HII", c, 0x42, 3, 0x1000 | 2, 0x1800 | 2)
    c[0x50:0x52] = bytes([0x05, 0x70])
    struct.pack_into("<H", c, 0x52, 0x0080)
    c[0x70:0x72] = bytes([0x10, 0x60])
    struct.pack_into("<H", c, 0x72, 0x0002)
    c[0x60:0x63] = bytes([0x09, 0x00, 8])
    return bytes(c)


def region_info(index, size, flags=0, caps=b""):
    argsz = 32 + len(caps)
    cap_off = 32 if caps else 0
    if caps:
        flags |= 8  # VFIO_REGION_INFO_FLAG_CAPS
    return struct.pack("<IIIIQQ", argsz, flags, index, cap_off, size, 0) + caps


def sparse_cap(areas):
    # id 1 (SPARSE_MMAP), version 1, next 0, nr_areas, reserved, areas.
    return struct.pack("<HHIII", 1, 1, 0, len(areas), 0) + b"".join(struct.pack("<QQ", o, s) for o, s in areas)


def vfio_seeds():
    cfg = test_device_config()
    sizes = struct.pack("<6Q", 0x1000, 0, 0x4000, 0, 0, 0)
    put("passthrough_device_data", "test_device", cfg + sizes + region_info(0, 0x1000, 7))
    put("passthrough_device_data", "sparse_bar", cfg + sizes + region_info(2, 0x4000, 7, sparse_cap([(0, 0x1000), (0x2000, 0x2000)])))
    put("passthrough_device_data", "region_info_only", region_info(7, 256, 3))

    # vfio_user_replies: what the test device answers to attach's calls.
    version = struct.pack("<HH", 0, 1) + b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}\0'
    dev_info = struct.pack("<IIII", 16, 3, 9, 5)  # PCI | RESET, 9 regions, 5 irq indexes

    def reply(payload, mode=0):
        return bytes([mode]) + struct.pack("<H", len(payload)) + payload

    def ops(*pairs):
        return bytes([len(pairs)]) + b"".join(bytes(p) for p in pairs)

    read_cfg = struct.pack("<QII", 0, 7, 4) + cfg[:4]
    put("vfio_user_replies", "attach",
        ops((0, 0), (1, 0), (1, 7), (2, 4), (3, 4), (5, 1), (0xFF, 0))
        + reply(version) + reply(dev_info) + reply(region_info(0, 0x1000, 7), 32)
        + reply(region_info(7, 256, 3)) + reply(struct.pack("<IIII", 16, 9, 4, 3))
        + reply(read_cfg) + reply(b"") + reply(b""))
    put("vfio_user_replies", "sparse_region",
        ops((1, 2)) + reply(version) + reply(region_info(2, 0x4000, 7, sparse_cap([(0, 0x1000)])), 32))
    put("vfio_user_replies", "error_reply", ops((9, 0), (9, 0)) + reply(version) + reply(b"", 16) + reply(b""))
    put("vfio_user_replies", "dma", ops((8, 0), (8, 2)) + reply(version) + reply(b"") + reply(b""))


def vhost_user_config_seeds():
    # What the vhost-user-blk backends of the tests report (ringvm-blk and
    # qemu-storage-daemon): features, then GET_CONFIG's virtio-blk space.
    def space(capacity, blk_size, queues):
        c = bytearray(60)
        struct.pack_into("<QII", c, 0, capacity, 0, 128 - 2)  # capacity, size_max, seg_max
        struct.pack_into("<I", c, 20, blk_size)
        struct.pack_into("<H", c, 34, queues)
        struct.pack_into("<III", c, 36, 0xFFFFFFFF >> 9, 0x3FFFFF, 1)  # discard limits
        struct.pack_into("<III", c, 48, 0xFFFFFFFF >> 9, 1, 0)  # write zeroes limits
        return bytes(c)

    base = (1 << 32) | (1 << 30) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 12)
    put("vhost_user_backend_config", "ringvm_blk_4q", struct.pack("<Q", base | (1 << 13) | (1 << 14)) + bytes([4]) + space(2048, 512, 4))
    put("vhost_user_backend_config", "qsd_1q", struct.pack("<Q", base | (1 << 5)) + bytes([1]) + space(1 << 21, 4096, 1))
    put("vhost_user_backend_config", "readonly", struct.pack("<Q", base | (1 << 5)) + bytes([2]) + space(8, 512, 2)[:36])


# ---- text inputs (cli_specs, api_request) -----------------------------------
def cli_seeds():
    # Every literal the unit tests hand to the parsers.
    specs = set()
    for path in ["crates/virtio/src/blk/config.rs", "crates/virtio/src/net/config.rs",
                 "crates/vmm/src/lib.rs", "crates/vmm/src/arch/cpuid.rs", "crates/vmm/src/seccomp.rs",
                 "bins/ringvm/src/main.rs"]:
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            continue
        for m in re.finditer(r'(?:parse\w*|parse_mac|parse_size)\(\s*"([^"\\]*)"', read(path)):
            specs.add(m.group(1))
        for m in re.finditer(r'"((?:path|tap|vhost_user|ip|mac)=[^"\\{}]*)"', read(path)):
            specs.add(m.group(1))
    for m in re.finditer(r'"--(?:disk|net)",\s*"([^"\\{}]+)"', read("tests/cli.rs") if os.path.exists(os.path.join(ROOT, "tests/cli.rs")) else ""):
        specs.add(m.group(1))
    for i, s in enumerate(sorted(specs)):
        put("cli_specs", f"spec{i:03}", s.encode())


def api_seeds():
    # The requests `ringvm remote` sends (bins/ringvm/src/api/client.rs)
    # and the README's vm.create body.
    readme = read("README.md")
    m = re.search(r'(\{"cpus".*?\n)\s*```', readme, re.S)
    body = m.group(1).strip().encode() if m else b'{"cpus":{"boot_vcpus":1}}'
    body = body.replace(b"Off|Tty|File", b"Off")

    def req(method, path, body=b""):
        h = f"{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body:
            h += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return h.encode() + b"\r\n" + body

    put("api_request", "create", req("PUT", "vm.create", body))
    put("api_request", "lifecycle", req("PUT", "vm.create", body) + req("PUT", "vm.boot") + req("PUT", "vm.pause")
        + req("PUT", "vm.resume") + req("GET", "vm.info") + req("GET", "vm.counters") + req("PUT", "vm.shutdown"))
    put("api_request", "ping", req("GET", "vmm.ping"))
    put("api_request", "power", req("PUT", "vm.power-button") + req("PUT", "vm.reboot") + req("PUT", "vmm.shutdown"))
    put("api_request", "body_only", body)


# ---- images (kernel_image, boot_params) -------------------------------------
def image_seeds():
    elf = None
    if os.environ.get("RINGVM_GUEST_ELF"):
        elf = open(os.environ["RINGVM_GUEST_ELF"], "rb").read()
    for base in [] if elf else [os.path.join(ROOT, "target"), os.path.join(ROOT, "fuzz", "target")]:
        for dirpath, _, files in os.walk(base):
            if "ringvm-guest.elf" in files:
                p = os.path.join(dirpath, "ringvm-guest.elf")
                if os.path.getsize(p) > 0:
                    elf = open(p, "rb").read()
                    break
        if elf:
            break
    # A minimal bzImage: the setup header of boot protocol 2.15 with a
    # 64-bit entry, one setup sector and a small payload.
    bz = bytearray(0x400 + 0x200)
    bz[0x1F1] = 1  # setup_sects
    struct.pack_into("<H", bz, 0x1FE, 0xAA55)
    struct.pack_into("<I", bz, 0x1F4, len(bz) // 16)  # syssize
    struct.pack_into("<I", bz, 0x202, 0x53726448)  # "HdrS"
    struct.pack_into("<H", bz, 0x206, 0x20F)
    bz[0x211] = 1  # loadflags: LOADED_HIGH
    struct.pack_into("<I", bz, 0x214, 0x100000)
    struct.pack_into("<I", bz, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", bz, 0x230, 0x200000)  # kernel_alignment
    struct.pack_into("<H", bz, 0x236, 1)  # xloadflags: KERNEL_64
    struct.pack_into("<I", bz, 0x238, 2048)  # cmdline_size
    struct.pack_into("<I", bz, 0x260, 0x100000)  # init_size
    images = {"bzimage_header": bytes(bz)}
    if elf is not None:
        images["builtin_guest_elf"] = elf
    else:
        print("seed.py: no built-in guest ELF under target/ (build ringvm first); skipped", file=sys.stderr)
    for name, img in images.items():
        put("kernel_image", name, img)
        cmd = b"console=ttyS0 blk.mode=write"
        for flags, size in [(1, 0x1800), (3, 0x200000), (0, 0)]:
            put("boot_params", f"{name}_{flags}_{size:x}",
                bytes([flags]) + size.to_bytes(3, "little") + bytes([len(cmd)]) + cmd + img)


def main():
    blk_seeds()
    net_tx_seeds()
    net_ctrl_seeds()
    virtio_pci_seeds()
    platform_seeds()
    vfio_seeds()
    vhost_user_config_seeds()
    cli_seeds()
    api_seeds()
    image_seeds()


if __name__ == "__main__":
    main()

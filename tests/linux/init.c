// SPDX-License-Identifier: Apache-2.0
//
// /init of ringvm's Linux test guest (tests/linux/README.md).
//
// Freestanding: no libc, raw system calls, built with
//   gcc -static -ffreestanding -nostdlib -mgeneral-regs-only -O2
// because the host's instruction emulator has no SSE (a libc would use it
// in memcpy and friends). Parameters come from the kernel command line:
// the kernel hands unknown `key=value` tokens to init's environment (keys
// must not contain a dot, which the kernel takes for a module parameter).
//
//   rv_mode=info|blk|net   what to do (default info)
//   rv_exit=auto|port|poweroff
//                          how to end the VM: ringvm's debug-exit port
//                          0xf4 (status 0 = pass, 1 = a check failed,
//                          2 = bad parameters), or reboot(POWER_OFF)
//                          (needs ACPI); auto = poweroff when the kernel
//                          found ACPI tables, else the port
//
// Every mode ends with one line
//   RINGVM-RESULT mode=... ok=0|1 errors=N key=value ...
// on the console, written with a single write(2).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

// ---- system calls -------------------------------------------------------

enum {
	SYS_read = 0, SYS_write = 1, SYS_open = 2, SYS_close = 3,
	SYS_ioctl = 16, SYS_pread64 = 17, SYS_pwrite64 = 18,
	SYS_nanosleep = 35, SYS_socket = 41, SYS_sendto = 44,
	SYS_recvfrom = 45, SYS_bind = 49, SYS_setsockopt = 54, SYS_exit = 60,
	SYS_fsync = 74, SYS_mkdir = 83, SYS_mount = 165, SYS_reboot = 169,
	SYS_syslog = 103, SYS_ioperm = 173, SYS_sched_setaffinity = 203, SYS_getdents64 = 217,
};

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
	i64 ret;
	register i64 r10 __asm__("r10") = d;
	register i64 r8 __asm__("r8") = e;
	register i64 r9 __asm__("r9") = f;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
#define SC1(n, a) sys6(n, (i64)(a), 0, 0, 0, 0, 0)
#define SC2(n, a, b) sys6(n, (i64)(a), (i64)(b), 0, 0, 0, 0)
#define SC3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)
#define SC4(n, a, b, c, d) sys6(n, (i64)(a), (i64)(b), (i64)(c), (i64)(d), 0, 0)
#define SC5(n, a, b, c, d, e) sys6(n, (i64)(a), (i64)(b), (i64)(c), (i64)(d), (i64)(e), 0)
#define SC6(n, a, b, c, d, e, f) sys6(n, (i64)(a), (i64)(b), (i64)(c), (i64)(d), (i64)(e), (i64)(f))

#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECTORY 0200000
#define O_DIRECT 040000

// gcc may emit calls to these for struct copies and zeroing.
void *memset(void *d, int c, u64 n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, u64 n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

static u64 slen(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static int seq(const char *a, const char *b)
{
	return prefix(a, b) && a[slen(b)] == 0;
}

// ---- output -------------------------------------------------------------

// The result line, built up and written at the end in one write(2).
static char result[4096];
static u64 result_len;
static int errors;

static void out(const char *s)
{
	SC3(SYS_write, 1, s, slen(s));
}

static void cat(char *buf, u64 *len, u64 cap, const char *s)
{
	while (*s && *len + 1 < cap)
		buf[(*len)++] = *s++;
	buf[*len] = 0;
}

static void fmt_u(char *tmp, u64 v, int base)
{
	char r[24];
	int n = 0;
	do {
		r[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	int i = 0;
	while (n)
		tmp[i++] = r[--n];
	tmp[i] = 0;
}

static void field(const char *key, const char *val)
{
	cat(result, &result_len, sizeof result, " ");
	cat(result, &result_len, sizeof result, key);
	cat(result, &result_len, sizeof result, "=");
	cat(result, &result_len, sizeof result, val);
}

static void field_u(const char *key, u64 v)
{
	char t[24];
	fmt_u(t, v, 10);
	field(key, t);
}

static void field_x32(const char *key, u32 v)
{
	char t[9];
	for (int i = 0; i < 8; i++)
		t[i] = "0123456789abcdef"[(v >> (28 - 4 * i)) & 15];
	t[8] = 0;
	field(key, t);
}

// One console line: "rvinit: <a><b> (<errno>)".
static void fail(const char *what, const char *arg, i64 err)
{
	char line[256];
	u64 n = 0;
	char t[24];
	cat(line, &n, sizeof line, "rvinit: error: ");
	cat(line, &n, sizeof line, what);
	cat(line, &n, sizeof line, arg);
	cat(line, &n, sizeof line, " (");
	fmt_u(t, (u64)(err < 0 ? -err : err), 10);
	cat(line, &n, sizeof line, err < 0 ? "errno " : "");
	cat(line, &n, sizeof line, t);
	cat(line, &n, sizeof line, ")\n");
	out(line);
	errors++;
}

// ---- parameters ---------------------------------------------------------

static char **envp;

static const char *param(const char *key)
{
	u64 k = slen(key);
	for (char **e = envp; *e; e++)
		if (prefix(*e, key) && (*e)[k] == '=')
			return *e + k + 1;
	return 0;
}

static int bad_params;

// Decimal or 0x hex, optional K/M/G suffix.
static u64 param_u(const char *key, u64 dflt)
{
	const char *s = param(key);
	if (!s)
		return dflt;
	u64 v = 0;
	int base = 10, digits = 0;
	if (s[0] == '0' && s[1] == 'x') {
		base = 16;
		s += 2;
	}
	for (;; s++, digits++) {
		int d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else
			break;
		v = v * base + d;
	}
	if (*s == 'K')
		v <<= 10, s++;
	else if (*s == 'M')
		v <<= 20, s++;
	else if (*s == 'G')
		v <<= 30, s++;
	if (!digits || *s) {
		fail("bad parameter ", key, 0);
		bad_params = 1;
	}
	return v;
}

// Dotted quad to a network-order address.
static u32 param_ip(const char *key)
{
	const char *s = param(key);
	u32 a = 0;
	int parts = 0;
	if (s) {
		while (parts < 4) {
			u32 p = 0;
			int d = 0;
			while (*s >= '0' && *s <= '9' && d < 4)
				p = p * 10 + (*s++ - '0'), d++;
			if (!d || p > 255)
				break;
			a |= p << (8 * parts++);
			if (parts < 4 && *s++ != '.')
				break;
		}
	}
	if (parts != 4 || (s && *s)) {
		fail("bad or missing address ", key, 0);
		bad_params = 1;
	}
	return a;
}

// ---- helpers ------------------------------------------------------------

static u32 crc_table[256];

static void crc_init(void)
{
	for (u32 i = 0; i < 256; i++) {
		u32 c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320 ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static u32 crc_update(u32 crc, const u8 *p, u64 n)
{
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

// The data pattern shared with the host test (tests/linux_guest.rs): the
// 8-byte word at disk offset 8*i is mix((seed << 32) ^ i), little-endian.
static u64 mix(u64 x)
{
	x += 0x9e3779b97f4a7c15UL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
	return x ^ (x >> 31);
}

static void pattern(u8 *buf, u64 off, u64 len, u64 seed)
{
	for (u64 i = 0; i < len; i++) {
		u64 o = off + i;
		buf[i] = (u8)(mix((seed << 32) ^ (o >> 3)) >> (8 * (o & 7)));
	}
}

static int ncpus = 1;

static void pin(int cpu)
{
	u64 mask = 1UL << cpu;
	i64 r = SC3(SYS_sched_setaffinity, 0, sizeof mask, &mask);
	if (r < 0)
		fail("sched_setaffinity", "", r);
}

// Reads a small file into buf (NUL-terminated); returns its length or <0.
static i64 read_file(const char *path, char *buf, u64 cap)
{
	i64 fd = SC2(SYS_open, path, O_RDONLY);
	if (fd < 0)
		return fd;
	u64 n = 0;
	for (;;) {
		i64 r = SC3(SYS_read, fd, buf + n, cap - 1 - n);
		if (r <= 0)
			break;
		n += r;
	}
	SC1(SYS_close, fd);
	buf[n] = 0;
	return n;
}

static char big[16384];

// Number of entries in a directory (only regular files if files_only),
// and their names joined by commas (sorted), into names.
static int list_dir(const char *path, char *names, u64 cap, int files_only)
{
	char *ents[64];
	int count = 0;
	i64 fd = SC2(SYS_open, path, O_RDONLY | O_DIRECTORY);
	if (names)
		names[0] = 0;
	if (fd < 0)
		return -1;
	u64 used = 0;
	for (;;) {
		i64 n = SC3(SYS_getdents64, fd, big + used, sizeof big - used);
		if (n <= 0)
			break;
		for (i64 o = 0; o < n;) {
			char *d = big + used + o;
			u16 reclen = *(u16 *)(d + 16);
			char *name = d + 19;
			int is_file = d[18] == 8; // DT_REG
			if (!seq(name, ".") && !seq(name, "..") && count < 64 &&
			    (is_file || !files_only))
				ents[count++] = name;
			o += reclen;
		}
		used += n;
	}
	SC1(SYS_close, fd);
	for (int i = 1; i < count; i++)
		for (int j = i; j > 0; j--) {
			const char *a = ents[j - 1], *b = ents[j];
			while (*a && *a == *b)
				a++, b++;
			if ((u8)*a <= (u8)*b)
				break;
			char *t = ents[j];
			ents[j] = ents[j - 1];
			ents[j - 1] = t;
		}
	if (names) {
		u64 len = 0;
		for (int i = 0; i < count; i++) {
			if (i)
				cat(names, &len, cap, ",");
			cat(names, &len, cap, ents[i]);
		}
	}
	return count;
}

// irq_<name>=<sum over CPUs> for every virtio line of /proc/interrupts.
static void irq_fields(void)
{
	static char buf[16384];
	if (read_file("/proc/interrupts", buf, sizeof buf) < 0) {
		fail("reading /proc/interrupts", "", 0);
		return;
	}
	for (char *l = buf; *l;) {
		char *end = l;
		while (*end && *end != '\n')
			end++;
		char *name = end;
		while (name > l && name[-1] != ' ')
			name--;
		char *p = l;
		while (*p == ' ')
			p++;
		while (*p && *p != ':' && p < end)
			p++;
		if (prefix(name, "virtio") && *p == ':') {
			u64 sum = 0;
			p++;
			for (;;) {
				while (*p == ' ')
					p++;
				if (!(*p >= '0' && *p <= '9'))
					break;
				u64 v = 0;
				while (*p >= '0' && *p <= '9')
					v = v * 10 + (*p++ - '0');
				sum += v;
			}
			char key[64];
			u64 kl = 0;
			char save = *end;
			*end = 0;
			cat(key, &kl, sizeof key, "irq_");
			cat(key, &kl, sizeof key, name);
			*end = save;
			field_u(key, sum);
		}
		l = *end ? end + 1 : end;
	}
}

static void trim(char *s)
{
	u64 n = slen(s);
	while (n && (s[n - 1] == '\n' || s[n - 1] == ' '))
		s[--n] = 0;
}

// What every mode reports: CPUs, ACPI tables, the PCI functions.
static void info_fields(void)
{
	char t[256];
	if (read_file("/sys/devices/system/cpu/online", t, sizeof t) > 0) {
		trim(t);
		field("cpus_online", t);
	} else {
		fail("reading cpu/online", "", 0);
	}
	int n = list_dir("/sys/firmware/acpi/tables", t, sizeof t, 1);
	field("acpi_tables", n > 0 ? t : "none");
	n = list_dir("/sys/bus/pci/devices", 0, 0, 0);
	field_u("pci_devices", n < 0 ? 0 : n);
}

// ---- virtio-blk ---------------------------------------------------------

#define BLKGETSIZE64 0x80081272UL
#define BLKDISCARD 0x1277UL
#define CHUNK 65536

static u8 iobuf[CHUNK] __attribute__((aligned(4096)));

// Writes the pattern to [off, off+len) in pieces of `piece` bytes, spread
// over the CPUs (so multi-queue I/O uses every queue).
static void write_pattern(i64 fd, u64 off, u64 len, u64 seed, u64 piece)
{
	for (u64 done = 0, i = 0; done < len; i++) {
		u64 n = len - done < piece ? len - done : piece;
		pin(i % ncpus);
		pattern(iobuf, off + done, n, seed);
		i64 r = SC4(SYS_pwrite64, fd, iobuf, n, off + done);
		if (r != (i64)n) {
			fail("pwrite", "", r);
			return;
		}
		done += n;
	}
}

static u32 crc_range(i64 fd, u64 off, u64 len)
{
	u32 crc = 0;
	for (u64 done = 0, i = 0; done < len; i++) {
		u64 n = len - done < CHUNK ? len - done : CHUNK;
		pin(i % ncpus);
		i64 r = SC4(SYS_pread64, fd, iobuf, n, off + done);
		if (r != (i64)n) {
			fail("pread", "", r);
			return 0;
		}
		crc = crc_update(crc, iobuf, n);
		done += n;
	}
	return crc;
}

static void mode_blk(void)
{
	const char *dev = param("rv_disk");
	u64 seed = param_u("rv_seed", 1);
	u64 dw_off = param_u("rv_dw_off", 0), dw_len = param_u("rv_dw_len", 0);
	u64 cw_off = param_u("rv_cw_off", 0), cw_len = param_u("rv_cw_len", 0);
	u64 r_off = param_u("rv_r_off", 0), r_len = param_u("rv_r_len", 0);
	u64 d_off = param_u("rv_discard_off", 0), d_len = param_u("rv_discard_len", 0);
	if (!dev)
		dev = "/dev/vda";
	if (bad_params)
		return;

	i64 direct = SC2(SYS_open, dev, O_RDWR | O_DIRECT);
	i64 cached = SC2(SYS_open, dev, O_RDWR);
	if (direct < 0 || cached < 0) {
		fail("open ", dev, direct < 0 ? direct : cached);
		return;
	}
	u64 size = 0;
	i64 r = SC3(SYS_ioctl, direct, BLKGETSIZE64, &size);
	if (r < 0)
		fail("BLKGETSIZE64", "", r);
	field_u("size", size);
	// /sys/block/<name>/mq and .../queue/discard_max_bytes
	const char *name = dev;
	for (const char *p = dev; *p; p++)
		if (*p == '/')
			name = p + 1;
	char path[128], t[64];
	u64 pl = 0;
	cat(path, &pl, sizeof path, "/sys/block/");
	cat(path, &pl, sizeof path, name);
	u64 base = pl;
	cat(path, &pl, sizeof path, "/mq");
	field_u("mq", list_dir(path, 0, 0, 0));
	path[pl = base] = 0;
	cat(path, &pl, sizeof path, "/queue/discard_max_bytes");
	if (read_file(path, t, sizeof t) > 0) {
		trim(t);
		field("discard_max", t);
	}

	// O_DIRECT write, flushed, read back from the device.
	if (dw_len) {
		write_pattern(direct, dw_off, dw_len, seed, CHUNK);
		if ((r = SC1(SYS_fsync, direct)) < 0)
			fail("fsync", "", r);
		field_x32("dw_crc", crc_range(direct, dw_off, dw_len));
	}
	// Through the page cache in pieces that are not page multiples,
	// fsync'd, then read back with O_DIRECT (from the device, not the
	// cache).
	if (cw_len) {
		write_pattern(cached, cw_off, cw_len, seed + 1, 3000);
		if ((r = SC1(SYS_fsync, cached)) < 0)
			fail("fsync", "", r);
		field_x32("cw_crc", crc_range(direct, cw_off, cw_len));
	}
	// What the host wrote, through the page cache and with O_DIRECT.
	if (r_len) {
		field_x32("rc_crc", crc_range(cached, r_off, r_len));
		field_x32("rd_crc", crc_range(direct, r_off, r_len));
	}
	if (d_len) {
		u64 range[2] = { d_off, d_len };
		r = SC3(SYS_ioctl, direct, BLKDISCARD, range);
		field_u("discard_errno", r < 0 ? -r : 0);
		if (r < 0)
			fail("BLKDISCARD", "", r);
		if ((r = SC1(SYS_fsync, direct)) < 0)
			fail("fsync", "", r);
	}
	SC1(SYS_close, direct);
	SC1(SYS_close, cached);
	irq_fields();
}

// ---- virtio-net ---------------------------------------------------------

#define AF_INET 2
#define SOCK_DGRAM 2
#define SOL_SOCKET 1
#define SO_RCVTIMEO 20
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define SIOCETHTOOL 0x8946
#define IFF_UP 1

struct sockaddr_in {
	u16 family;
	u16 port;
	u32 addr;
	u8 zero[8];
};

struct ifreq {
	char name[16];
	union {
		struct sockaddr_in addr;
		u16 flags;
		void *data;
		u8 pad[24];
	};
};

static u16 be16(u16 v)
{
	return (u16)(v << 8 | v >> 8);
}

static struct sockaddr_in sin(u32 addr, u16 port)
{
	struct sockaddr_in s = { .family = AF_INET, .port = be16(port), .addr = addr };
	return s;
}

static i64 udp_socket(u32 addr, u16 port)
{
	i64 s = SC3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (s < 0) {
		fail("socket", "", s);
		return s;
	}
	struct sockaddr_in a = sin(addr, port);
	i64 r = SC3(SYS_bind, s, &a, sizeof a);
	if (r < 0) {
		fail("bind", "", r);
		return r;
	}
	struct { i64 sec, usec; } tv = { 120, 0 };
	SC5(SYS_setsockopt, s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	return s;
}

static int if_ioctl(i64 s, u64 req, struct ifreq *ifr, const char *what)
{
	i64 r = SC3(SYS_ioctl, s, req, ifr);
	if (r < 0)
		fail(what, "", r);
	return r < 0 ? -1 : 0;
}

// The device's per-queue counters (virtio_net's ethtool statistics):
// rxq<N>=packets txq<N>=packets.
static void queue_fields(i64 s)
{
	static u8 buf[16384] __attribute__((aligned(8)));
	struct ifreq ifr = { .name = "eth0" };
	u32 *sset = (u32 *)buf;
	sset[0] = 0x37; // ETHTOOL_GSSET_INFO
	sset[1] = 0;
	*(u64 *)(buf + 8) = 1UL << 1; // ETH_SS_STATS
	ifr.data = buf;
	if (if_ioctl(s, SIOCETHTOOL, &ifr, "ETHTOOL_GSSET_INFO"))
		return;
	u32 n = *(u32 *)(buf + 16);
	if (n > 200 || n * 32 + 16 > sizeof buf / 2) {
		fail("too many ethtool stats", "", n);
		return;
	}
	u8 *strings = buf, *stats = buf + sizeof buf / 2;
	*(u32 *)strings = 0x1b; // ETHTOOL_GSTRINGS
	*(u32 *)(strings + 4) = 1;
	*(u32 *)(strings + 8) = n;
	ifr.data = strings;
	if (if_ioctl(s, SIOCETHTOOL, &ifr, "ETHTOOL_GSTRINGS"))
		return;
	*(u32 *)stats = 0x1d; // ETHTOOL_GSTATS
	*(u32 *)(stats + 4) = n;
	ifr.data = stats;
	if (if_ioctl(s, SIOCETHTOOL, &ifr, "ETHTOOL_GSTATS"))
		return;
	for (u32 i = 0; i < n; i++) {
		char *name = (char *)strings + 12 + 32 * i;
		name[31] = 0;
		// "rx_queue_0_packets" -> rxq0
		if (!(prefix(name, "rx_queue_") || prefix(name, "tx_queue_")))
			continue;
		char *num = name + 9, *rest = num;
		while (*rest >= '0' && *rest <= '9')
			rest++;
		if (!seq(rest, "_packets"))
			continue;
		char key[16];
		u64 kl = 0;
		cat(key, &kl, sizeof key, name[0] == 'r' ? "rxq" : "txq");
		*rest = 0;
		cat(key, &kl, sizeof key, num);
		field_u(key, ((u64 *)(stats + 8))[i]);
	}
}

static u8 pkt[2048], reply[2048];

static void mode_net(void)
{
	u32 ip = param_ip("rv_ip"), mask = param_ip("rv_mask"), peer = param_ip("rv_peer");
	u64 port = param_u("rv_port", 0), lport = param_u("rv_lport", 7000);
	u64 count = param_u("rv_count", 8), size = param_u("rv_size", 512);
	if (bad_params || !port || size > sizeof pkt || size < 8)
		return;
	i64 ctl = SC3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (ctl < 0) {
		fail("socket", "", ctl);
		return;
	}
	struct ifreq ifr = { .name = "eth0" };
	ifr.addr = sin(ip, 0);
	if (if_ioctl(ctl, SIOCSIFADDR, &ifr, "SIOCSIFADDR"))
		return;
	ifr.addr = sin(mask, 0);
	if (if_ioctl(ctl, SIOCSIFNETMASK, &ifr, "SIOCSIFNETMASK"))
		return;
	if (if_ioctl(ctl, SIOCGIFFLAGS, &ifr, "SIOCGIFFLAGS"))
		return;
	ifr.flags |= IFF_UP;
	if (if_ioctl(ctl, SIOCSIFFLAGS, &ifr, "SIOCSIFFLAGS"))
		return;

	// One socket per CPU, each used only from its CPU, so each flow
	// leaves through that CPU's transmit queue.
	i64 socks[8];
	int nsocks = ncpus < 8 ? ncpus : 8;
	for (int c = 0; c < nsocks; c++)
		if ((socks[c] = udp_socket(ip, lport + c)) < 0)
			return;
	out("rvinit: net up\n");

	// The host pings us, then sends "go" to the first socket: echo it
	// back (the host checks it), then the exchange.
	pin(0);
	struct sockaddr_in from;
	u32 fromlen = sizeof from;
	i64 r = SC6(SYS_recvfrom, socks[0], reply, sizeof reply, 0, &from, &fromlen);
	if (r < 0) {
		fail("waiting for the host's go", "", r);
		return;
	}
	SC6(SYS_sendto, socks[0], reply, r, 0, &from, sizeof from);

	struct sockaddr_in to = sin(peer, port);
	u64 ok = 0;
	u32 crc = 0;
	for (u64 i = 0; i < count; i++) {
		int c = i % nsocks;
		pin(c);
		pattern(pkt, i * size, size, 3);
		pkt[0] = (u8)i;
		crc = crc_update(crc, pkt, size);
		r = SC6(SYS_sendto, socks[c], pkt, size, 0, &to, sizeof to);
		if (r != (i64)size) {
			fail("sendto", "", r);
			continue;
		}
		r = SC6(SYS_recvfrom, socks[c], reply, sizeof reply, 0, 0, 0);
		if (r < 0)
			fail("recvfrom", "", r);
		else if (r == (i64)size && !memcmp(reply, pkt, size))
			ok++;
		else
			fail("echo differs, datagram ", "", i);
	}
	field_u("udp_sent", count);
	field_u("udp_ok", ok);
	field_x32("udp_crc", crc);
	queue_fields(ctl);
	irq_fields();
}

// ---- main ---------------------------------------------------------------

static void mount(const char *type, const char *dir)
{
	SC2(SYS_mkdir, dir, 0755);
	i64 r = SC5(SYS_mount, type, dir, type, 0, 0);
	if (r < 0 && r != -16 /* EBUSY: already mounted */)
		fail("mount ", dir, r);
}

static void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static void __attribute__((noreturn)) finish(int status)
{
	// The console write returned once the bytes were in the tty's
	// buffer; wait until the UART has sent them (tcdrain) before the VM
	// goes away, or the end of the result line is lost.
	SC3(SYS_ioctl, 1, 0x5409 /* TCSBRK */, 1);
	const char *how = param("rv_exit");
	int acpi = list_dir("/sys/firmware/acpi/tables", 0, 0, 1) > 0;
	if (!how || seq(how, "auto"))
		how = acpi ? "poweroff" : "port";
	if (seq(how, "poweroff")) {
		// LINUX_REBOOT_MAGIC1, MAGIC2, LINUX_REBOOT_CMD_POWER_OFF
		i64 r = SC4(SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc, 0);
		fail("reboot(POWER_OFF)", "", r);
	}
	i64 r = SC3(SYS_ioperm, 0xf4, 1, 1);
	if (r < 0)
		fail("ioperm", "", r);
	else
		outb(0xf4, (u8)status);
	out("rvinit: the VM did not stop\n");
	struct { i64 s, ns; } ts = { 1000, 0 };
	for (;;)
		SC2(SYS_nanosleep, &ts, 0);
}

void __attribute__((noreturn, used)) rvinit_main(u64 *sp)
{
	u64 argc = sp[0];
	envp = (char **)(sp + 1 + argc + 1);
	crc_init();
	// Kernel messages from now on stay in the log buffer, off the
	// console, so that none lands inside the result line
	// (SYSLOG_ACTION_CONSOLE_LEVEL 1: emergencies only).
	SC3(SYS_syslog, 8, 0, 1);
	out("rvinit: started\n");
	mount("devtmpfs", "/dev");
	mount("proc", "/proc");
	mount("sysfs", "/sys");

	char t[64];
	if (read_file("/sys/devices/system/cpu/online", t, sizeof t) > 0) {
		// "0" or "0-N"
		const char *p = t;
		while (*p && *p != '-')
			p++;
		if (*p == '-') {
			int n = 0;
			for (p++; *p >= '0' && *p <= '9'; p++)
				n = n * 10 + (*p - '0');
			ncpus = n + 1 > 64 ? 64 : n + 1;
		}
	}

	const char *mode = param("rv_mode");
	if (!mode)
		mode = "info";
	cat(result, &result_len, sizeof result, "RINGVM-RESULT mode=");
	cat(result, &result_len, sizeof result, mode);
	info_fields();
	if (seq(mode, "blk"))
		mode_blk();
	else if (seq(mode, "net"))
		mode_net();
	else if (!seq(mode, "info")) {
		fail("unknown rv_mode ", mode, 0);
		bad_params = 1;
	}
	if (read_file("/proc/uptime", t, sizeof t) > 0) {
		char *sp2 = t;
		while (*sp2 && *sp2 != ' ')
			sp2++;
		*sp2 = 0;
		field("uptime", t);
	}
	field_u("errors", errors);
	field("ok", errors ? "0" : "1");
	cat(result, &result_len, sizeof result, "\n");
	out(result);
	finish(bad_params ? 2 : errors ? 1 : 0);
}

// The process entry: the stack holds argc, argv[], NULL, envp[], NULL.
__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call rvinit_main\n"
	"	ud2\n");

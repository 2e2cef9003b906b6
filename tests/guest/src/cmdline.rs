//! Command line options.
//!
//! The command line is a list of tokens separated by ASCII whitespace.
//! A token of the form `key=value` is an option; other tokens are flags or
//! noise. Unknown keys are ignored by callers. When a key is given more than
//! once, the last occurrence wins.

/// A parsed view of the command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a> {
    text: &'a str,
}

impl<'a> Cmdline<'a> {
    /// Wraps raw command line bytes. Only the leading valid UTF-8 part is
    /// used (a guest command line is ASCII in practice).
    pub fn new(bytes: &'a [u8]) -> Self {
        let text = match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        };
        Cmdline { text }
    }

    /// The whitespace-separated tokens.
    pub fn tokens(&self) -> impl Iterator<Item = &'a str> {
        self.text.split_ascii_whitespace()
    }

    /// The `(key, value)` pairs of all `key=value` tokens, in order.
    pub fn options(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.tokens().filter_map(|t| t.split_once('='))
    }

    /// What the guest's entry point looks up, in one pass over the
    /// tokens (the last occurrence of a key wins, as with [`Cmdline::get`]).
    pub fn boot(&self) -> Boot<'a> {
        let mut b = Boot::default();
        for (k, v) in self.options() {
            match k {
                "cpuid" => b.cpuid = Some(v),
                "acpi" => b.acpi = Some(v),
                "exit" => b.exit = Some(v),
                _ => match k.split_once('.') {
                    Some(("blk", _)) => b.blk = true,
                    Some(("net", _)) => b.net = true,
                    Some(("pt", _)) => b.pt = true,
                    _ => {}
                },
            }
        }
        b
    }

    /// The value of the last `key=value` token for `key` (the guest reads
    /// its options through [`Cmdline::boot`] and the forms' parsers).
    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.options()
            .filter(|(k, _)| *k == key)
            .last()
            .map(|(_, v)| v)
    }
}

/// The options the entry point acts on, and which of the guest's forms
/// the command line asks for (any `blk.*`, `net.*` or `pt.*` option).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boot<'a> {
    pub cpuid: Option<&'a str>,
    pub acpi: Option<&'a str>,
    pub exit: Option<&'a str>,
    pub blk: bool,
    pub net: bool,
    pub pt: bool,
}

/// Parses an unsigned number: decimal or `0x`/`0X` hexadecimal, optionally
/// followed by a binary size suffix `K`, `M` or `G` (either case; 2^10,
/// 2^20, 2^30). Returns `None` on syntax errors and on overflow.
pub fn parse_u64(s: &str) -> Option<u64> {
    let bytes = s.as_bytes();
    let (digits, scale): (&[u8], u64) = match bytes.last()? {
        b'k' | b'K' => (&bytes[..bytes.len() - 1], 1 << 10),
        b'm' | b'M' => (&bytes[..bytes.len() - 1], 1 << 20),
        b'g' | b'G' => (&bytes[..bytes.len() - 1], 1 << 30),
        _ => (bytes, 1),
    };
    let (digits, radix) = match digits {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (digits, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &c in digits {
        let d = char::from(c).to_digit(radix)?;
        value = value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(d))?;
    }
    value.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("255"), Some(255));
        assert_eq!(parse_u64("0x1f"), Some(31));
        assert_eq!(parse_u64("0XFF"), Some(255));
        assert_eq!(parse_u64("4k"), Some(4096));
        assert_eq!(parse_u64("4K"), Some(4096));
        assert_eq!(parse_u64("2M"), Some(2 << 20));
        assert_eq!(parse_u64("0x10M"), Some(16 << 20));
        assert_eq!(parse_u64("1G"), Some(1 << 30));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("17179869184G"), None);
        for bad in [
            "", "K", "0x", "0xK", "-1", "1.5", "12a", "0x1g2", " 1", "1KK",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lookup() {
        let c = Cmdline::new(b"  console=ttyS0 exit=5\tblk.dev=/dev/vda quiet exit=7 e= =x ");
        assert_eq!(c.get("exit"), Some("7"));
        assert_eq!(c.get("console"), Some("ttyS0"));
        assert_eq!(c.get("blk.dev"), Some("/dev/vda"));
        assert_eq!(c.get("e"), Some(""));
        assert_eq!(c.get(""), Some("x"));
        assert_eq!(c.get("quiet"), None);
        assert_eq!(c.get("missing"), None);
        assert_eq!(c.tokens().count(), 7);
    }

    #[test]
    fn one_pass_finds_what_the_entry_point_needs() {
        let c = Cmdline::new(b"console=ttyS0 exit=5 cpuid=0x1 exit=7 acpi=reset blk.qd=2 quiet");
        assert_eq!(
            c.boot(),
            Boot {
                cpuid: Some("0x1"),
                acpi: Some("reset"),
                exit: Some("7"),
                blk: true,
                net: false,
                pt: false,
            }
        );
        for (line, blk, net, pt) in [
            (
                &b"exit=3 blk=1 xblk.mode=read net=1 xnet.ip=1 pt=1 xpt.dma=0"[..],
                false,
                false,
                false,
            ),
            (b"exit=3 blk.qd=2", true, false, false),
            (b"exit=3 net.mode=respond", false, true, false),
            (b"pt.dma=0 net.ip=1", false, true, true),
        ] {
            let b = Cmdline::new(line).boot();
            assert_eq!((b.blk, b.net, b.pt), (blk, net, pt), "{line:?}");
            assert_eq!(b.exit, Cmdline::new(line).get("exit"));
        }
        assert_eq!(Cmdline::new(b"").boot(), Boot::default());
    }

    #[test]
    fn empty_and_invalid_utf8() {
        assert_eq!(Cmdline::new(b"").get("exit"), None);
        assert_eq!(Cmdline::new(b"exit=3 \xff exit=4").get("exit"), Some("3"));
    }
}

//! `pt.*` command line options.

use crate::cmdline::{parse_u64, Cmdline};

/// Most MSI-X vectors exercised: one IDT counter vector each.
pub const MAX_VECTORS: u32 = 8;
/// Largest DMA copy (the size of each static buffer).
pub const MAX_DMA: u32 = 256 << 10;
/// Most INTx assertions.
pub const MAX_INTX: u32 = 1000;

/// Parsed `pt.*` options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub vendor: u16,
    pub device: u16,
    /// MSI-X vectors to exercise, 1..=[`MAX_VECTORS`].
    pub vectors: u32,
    /// The vector for the mask test (below `vectors`); None skips it.
    pub mask: Option<u32>,
    /// Bytes of the DMA test; 0 skips it.
    pub dma: u32,
    /// INTx assertions (through the IOAPIC); 0 skips the INTx check.
    pub intx: u32,
    /// Watchdog ticks (about 1 s each) to wait for one interrupt; 0 waits
    /// forever.
    pub timeout: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            vendor: 0x1234,
            device: 0x7256,
            vectors: 4,
            mask: Some(1),
            dma: 4096,
            intx: 0,
            timeout: 5,
        }
    }
}

/// What is wrong with the options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptError<'a> {
    /// `pt.<key>` is not an option.
    Unknown(&'a str),
    /// `pt.<key>=<value>` has a bad value.
    Bad(&'a str, &'a str),
    /// pt.mask names a vector that is not exercised.
    MaskOutOfRange,
}

/// True when the command line has any `pt.*` option.
fn num(v: &str, min: u64, max: u64) -> Option<u64> {
    parse_u64(v).filter(|n| (min..=max).contains(n))
}

/// Parses every `pt.*` option (the last one of a key wins). Without
/// `pt.mask`, the mask test uses vector 1, or 0 when only one vector is
/// exercised.
pub fn parse<'a>(args: &Cmdline<'a>) -> Result<Options, OptError<'a>> {
    let mut o = Options::default();
    let mut mask = None;
    for (key, v) in args.options() {
        let Some(k) = key.strip_prefix("pt.") else {
            continue;
        };
        let bad = OptError::Bad(k, v);
        match k {
            "vendor" => o.vendor = num(v, 0, 0xfffe).ok_or(bad)? as u16,
            "device" => o.device = num(v, 0, 0xffff).ok_or(bad)? as u16,
            "vectors" => o.vectors = num(v, 1, MAX_VECTORS.into()).ok_or(bad)? as u32,
            "mask" if v == "none" => mask = Some(None),
            "mask" => mask = Some(Some(num(v, 0, 0xffff).ok_or(bad)? as u32)),
            "dma" => o.dma = num(v, 0, MAX_DMA.into()).ok_or(bad)? as u32,
            "intx" => o.intx = num(v, 0, MAX_INTX.into()).ok_or(bad)? as u32,
            "timeout" => o.timeout = num(v, 0, 1 << 20).ok_or(bad)?,
            _ => return Err(OptError::Unknown(k)),
        }
    }
    o.mask = mask.unwrap_or(Some(o.vectors.min(2) - 1));
    if o.mask.is_some_and(|m| m >= o.vectors) {
        return Err(OptError::MaskOutOfRange);
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<Options, OptError<'_>> {
        parse(&Cmdline::new(s.as_bytes()))
    }

    #[test]
    fn detection_and_defaults() {
        let o = opts("pt.timeout=5").unwrap();
        assert_eq!(o, Options::default());
        assert_eq!((o.vendor, o.device), (0x1234, 0x7256));
        assert_eq!((o.vectors, o.mask, o.dma), (4, Some(1), 4096));
    }

    #[test]
    fn values() {
        let o = opts(
            "pt.vendor=0x1af4 pt.device=4162 pt.vectors=8 pt.mask=7 pt.dma=64K \
             pt.timeout=0 pt.dma=0 pt.intx=3",
        )
        .unwrap();
        assert_eq!(o.intx, 3);
        assert_eq!(opts("pt.intx=1000").unwrap().intx, MAX_INTX);
        assert_eq!((o.vendor, o.device), (0x1af4, 4162));
        assert_eq!((o.vectors, o.mask, o.dma, o.timeout), (8, Some(7), 0, 0));
        assert_eq!(opts("pt.mask=none").unwrap().mask, None);
        assert_eq!(opts("pt.dma=256K").unwrap().dma, MAX_DMA);
        // The default mask follows the vector count.
        assert_eq!(opts("pt.vectors=1").unwrap().mask, Some(0));
        assert_eq!(opts("pt.vectors=2").unwrap().mask, Some(1));
    }

    #[test]
    fn errors() {
        assert_eq!(opts("pt.vector=2"), Err(OptError::Unknown("vector")));
        assert_eq!(opts("pt.mask=all"), Err(OptError::Bad("mask", "all")));
        for bad in [
            "pt.vendor=0xffff",
            "pt.vendor=0x10000",
            "pt.device=-1",
            "pt.vectors=0",
            "pt.vectors=9",
            "pt.dma=257K",
            "pt.dma=",
            "pt.timeout=x",
            "pt.intx=1001",
            "pt.intx=-1",
        ] {
            assert!(matches!(opts(bad), Err(OptError::Bad(..))), "{bad}");
        }
        assert_eq!(
            opts("pt.vectors=2 pt.mask=2"),
            Err(OptError::MaskOutOfRange)
        );
        assert_eq!(opts("pt.mask=4"), Err(OptError::MaskOutOfRange));
        assert!(opts("pt.vectors=1 pt.mask=none").is_ok());
    }
}

//! A kernel image held in memory (the built-in guest), readable the way the
//! loaders read files.

use std::io::{self, Read, Seek, SeekFrom};

use vm_memory::ReadVolatile;
use vm_memory::{VolatileMemoryError, VolatileSlice};

/// `Read + Seek + ReadVolatile` over a byte slice.
pub struct SliceReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> SliceReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        SliceReader { data, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        &self.data[self.pos.min(self.data.len())..]
    }
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.rest().read(buf)?;
        self.pos += n;
        Ok(n)
    }
}

impl ReadVolatile for SliceReader<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut rest = self.rest();
        let n = rest.read_volatile(buf)?;
        self.pos += n;
        Ok(n)
    }
}

impl Seek for SliceReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => (self.data.len() as u64).checked_add_signed(d),
            SeekFrom::Current(d) => (self.pos as u64).checked_add_signed(d),
        };
        let new =
            new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        self.pos = usize::try_from(new).unwrap_or(usize::MAX);
        Ok(new)
    }
}

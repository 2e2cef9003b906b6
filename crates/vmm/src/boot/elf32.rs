//! Loader for 32-bit ELF PVH kernels.
//!
//! linux-loader reads only ELF64, but the PVH protocol enters the kernel in
//! 32-bit protected mode, and QEMU boots 32-bit PVH ELF images. This loader
//! handles ELFCLASS32 little-endian i386 images that carry a PVH entry note;
//! every header field is treated as untrusted.

use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::HIMEM_START;

/// Errors from loading a 32-bit ELF.
#[derive(Debug, thiserror::Error)]
pub enum Elf32Error {
    #[error("reading the ELF file")]
    Io(#[source] std::io::Error),
    #[error("not a 32-bit little-endian x86 ELF executable")]
    NotElf32,
    #[error("program header table is malformed ({0})")]
    BadProgramHeaders(&'static str),
    #[error("segment {index} ({paddr:#x}+{memsz:#x}) is outside guest RAM or below 1 MiB")]
    SegmentOutsideRam {
        index: usize,
        paddr: u64,
        memsz: u64,
    },
    #[error("segment {index} lies outside the file")]
    SegmentOutsideFile { index: usize },
    #[error(
        "the 32-bit ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), so it cannot be booted"
    )]
    NoPvhNote,
    #[error("the PVH entry note is malformed")]
    BadPvhNote,
    #[error("writing segment {index} to guest memory")]
    GuestMemory {
        index: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const MAX_PHDRS: usize = 64;
const MAX_NOTE: usize = 64 * 1024;

/// What a loaded 32-bit PVH image gives the boot code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elf32Image {
    pub pvh_entry: u64,
    pub kernel_end: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Finds the PVH entry in a note segment's bytes.
fn pvh_entry_in_notes(notes: &[u8]) -> Result<Option<u64>, Elf32Error> {
    let align4 = |n: usize| {
        n.checked_add(3)
            .map(|v| v & !3)
            .ok_or(Elf32Error::BadPvhNote)
    };
    let mut off = 0usize;
    while off + 12 <= notes.len() {
        let namesz = u32_at(notes, off) as usize;
        let descsz = u32_at(notes, off + 4) as usize;
        let kind = u32_at(notes, off + 8);
        let name_start = off + 12;
        let desc_start = name_start
            .checked_add(align4(namesz)?)
            .ok_or(Elf32Error::BadPvhNote)?;
        let next = desc_start
            .checked_add(align4(descsz)?)
            .ok_or(Elf32Error::BadPvhNote)?;
        if desc_start
            .checked_add(descsz)
            .is_none_or(|end| end > notes.len())
        {
            return Err(Elf32Error::BadPvhNote);
        }
        let name = &notes[name_start..name_start + namesz];
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" {
            let desc = &notes[desc_start..desc_start + descsz];
            return match descsz {
                4 => Ok(Some(u64::from(u32_at(desc, 0)))),
                8 => Ok(Some(u64::from_le_bytes(desc.try_into().unwrap()))),
                _ => Err(Elf32Error::BadPvhNote),
            };
        }
        off = next;
    }
    Ok(None)
}

/// Whether `header` starts a 32-bit ELF.
pub fn is_elf32(header: &[u8]) -> bool {
    header.len() > 4 && header[..4] == *b"\x7fELF" && header[4] == 1
}

/// Loads a 32-bit PVH ELF into `mem`.
pub fn load<F: Read + Seek + vm_memory::ReadVolatile>(
    mem: &GuestMemoryMmap,
    file: &mut F,
) -> Result<Elf32Image, Elf32Error> {
    let mut ehdr = [0u8; 52];
    file.seek(SeekFrom::Start(0)).map_err(Elf32Error::Io)?;
    file.read_exact(&mut ehdr)
        .map_err(|_| Elf32Error::NotElf32)?;
    if !is_elf32(&ehdr) || ehdr[5] != 1 || u16_at(&ehdr, 18) != EM_386 {
        return Err(Elf32Error::NotElf32);
    }
    let phoff = u64::from(u32_at(&ehdr, 28));
    let phentsize = usize::from(u16_at(&ehdr, 42));
    let phnum = usize::from(u16_at(&ehdr, 44));
    if phentsize < 32 {
        return Err(Elf32Error::BadProgramHeaders("entry size below 32"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(Elf32Error::BadProgramHeaders("no or too many entries"));
    }
    let file_len = file.seek(SeekFrom::End(0)).map_err(Elf32Error::Io)?;
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).map_err(Elf32Error::Io)?;
    file.read_exact(&mut table)
        .map_err(|_| Elf32Error::BadProgramHeaders("table past the end of the file"))?;
    let phdrs: Vec<Phdr> = table
        .chunks_exact(phentsize)
        .map(|p| Phdr {
            kind: u32_at(p, 0),
            offset: u64::from(u32_at(p, 4)),
            paddr: u64::from(u32_at(p, 12)),
            filesz: u64::from(u32_at(p, 16)),
            memsz: u64::from(u32_at(p, 20)),
        })
        .collect();

    let mut entry = None;
    let mut kernel_end = 0u64;
    for (index, ph) in phdrs.iter().enumerate() {
        if ph
            .offset
            .checked_add(ph.filesz)
            .is_none_or(|e| e > file_len)
        {
            return Err(Elf32Error::SegmentOutsideFile { index });
        }
        match ph.kind {
            PT_LOAD => {
                let outside = Elf32Error::SegmentOutsideRam {
                    index,
                    paddr: ph.paddr,
                    memsz: ph.memsz,
                };
                if ph.filesz > ph.memsz || ph.paddr < HIMEM_START.0 {
                    return Err(outside);
                }
                let end = ph.paddr + ph.memsz; // both < 2^32: cannot overflow
                if ph.memsz > 0 && !mem.check_range(GuestAddress(ph.paddr), ph.memsz as usize) {
                    return Err(outside);
                }
                file.seek(SeekFrom::Start(ph.offset))
                    .map_err(Elf32Error::Io)?;
                mem.read_exact_volatile_from(GuestAddress(ph.paddr), file, ph.filesz as usize)
                    .map_err(|source| Elf32Error::GuestMemory { index, source })?;
                let zeros = vec![0u8; (ph.memsz - ph.filesz) as usize];
                mem.write_slice(&zeros, GuestAddress(ph.paddr + ph.filesz))
                    .map_err(|source| Elf32Error::GuestMemory { index, source })?;
                kernel_end = kernel_end.max(end);
            }
            PT_NOTE if entry.is_none() => {
                if ph.filesz as usize > MAX_NOTE {
                    return Err(Elf32Error::BadPvhNote);
                }
                let mut notes = vec![0u8; ph.filesz as usize];
                file.seek(SeekFrom::Start(ph.offset))
                    .map_err(Elf32Error::Io)?;
                file.read_exact(&mut notes).map_err(Elf32Error::Io)?;
                entry = pvh_entry_in_notes(&notes)?;
            }
            _ => {}
        }
    }
    let pvh_entry = entry.ok_or(Elf32Error::NoPvhNote)?;
    Ok(Elf32Image {
        pvh_entry,
        kernel_end,
    })
}

/// Builds a minimal 32-bit PVH ELF around `code`, loaded at `load_addr`,
/// with its entry at the start of the code. Used by tests.
pub fn build_test_image(code: &[u8], load_addr: u32) -> Vec<u8> {
    let note_off = 52 + 2 * 32;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&load_addr.to_le_bytes());
    let code_off = note_off + note.len();
    let mut f = vec![0u8; 52];
    f[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&EM_386.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&load_addr.to_le_bytes());
    f[28..32].copy_from_slice(&52u32.to_le_bytes());
    f[40..42].copy_from_slice(&52u16.to_le_bytes());
    f[42..44].copy_from_slice(&32u16.to_le_bytes());
    f[44..46].copy_from_slice(&2u16.to_le_bytes());
    let mut ph = |kind: u32, off: usize, addr: u32, len: usize, memsz: usize| {
        for v in [kind, off as u32, addr, addr, len as u32, memsz as u32, 5, 4] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    ph(PT_LOAD, code_off, load_addr, code.len(), code.len() + 64);
    ph(PT_NOTE, note_off, 0, note.len(), note.len());
    f.extend_from_slice(&note);
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn loads_segments_and_finds_the_pvh_entry() {
        let code = [0xb0, 0x2a, 0xe6, 0xf4, 0xf4];
        let img = build_test_image(&code, 0x100000);
        let m = mem();
        m.write_slice(&[0xff; 64], GuestAddress(0x100005)).unwrap();
        let r = load(&m, &mut Cursor::new(img)).unwrap();
        assert_eq!(r.pvh_entry, 0x100000);
        assert_eq!(r.kernel_end, 0x100000 + code.len() as u64 + 64);
        let mut back = [0u8; 5];
        m.read_slice(&mut back, GuestAddress(0x100000)).unwrap();
        assert_eq!(back, code);
        let bss: u8 = m.read_obj(GuestAddress(0x100006)).unwrap();
        assert_eq!(bss, 0, "memsz beyond filesz is zeroed");
    }

    #[test]
    fn rejects_segments_outside_ram_or_file_and_missing_notes() {
        let m = mem();
        let img = build_test_image(&[0x90], 0x80_0000);
        assert!(matches!(
            load(&m, &mut Cursor::new(img)),
            Err(Elf32Error::SegmentOutsideRam { .. })
        ));
        let img = build_test_image(&[0x90], 0x1000);
        assert!(matches!(
            load(&m, &mut Cursor::new(img)),
            Err(Elf32Error::SegmentOutsideRam { .. })
        ));
        let mut img = build_test_image(&[0x90], 0x100000);
        img.truncate(img.len() - 1);
        assert!(matches!(
            load(&m, &mut Cursor::new(img)),
            Err(Elf32Error::SegmentOutsideFile { .. })
        ));
        let mut img = build_test_image(&[0x90], 0x100000);
        img[52 + 32] = 0; // the note segment becomes PT_NULL
        assert!(matches!(
            load(&m, &mut Cursor::new(img)),
            Err(Elf32Error::NoPvhNote)
        ));
        let mut img = build_test_image(&[0x90], 0x100000);
        img[4] = 2;
        assert!(matches!(
            load(&m, &mut Cursor::new(img)),
            Err(Elf32Error::NotElf32)
        ));
    }

    #[test]
    fn survives_arbitrary_truncation_and_corruption() {
        let img = build_test_image(&[0x90; 16], 0x100000);
        for cut in 0..img.len() {
            let _ = load(&mem(), &mut Cursor::new(img[..cut].to_vec()));
        }
        for i in 0..img.len() {
            let mut bad = img.clone();
            bad[i] ^= 0xa5;
            let _ = load(&mem(), &mut Cursor::new(bad));
        }
    }

    #[test]
    fn bad_note_sizes_are_errors() {
        let mut notes = vec![];
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
        notes.extend_from_slice(&18u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0");
        assert!(pvh_entry_in_notes(&notes).is_err());
    }
}

//! The passthrough device model: one PCI function over any [`Transport`].
//!
//! * Configuration space is read through from the device, except what we
//!   emulate: the BARs (sized from the regions, placed and moved by the
//!   guest), the ROM BAR (hidden), the capability pointer and every kept
//!   capability's next pointer (unsupported capabilities are unlinked),
//!   the MSI and MSI-X capabilities, the interrupt line and pin, and the
//!   extended space (empty).
//! * BARs: mmappable parts become KVM memory slots (see [`crate::bars`]);
//!   the MSI-X table and PBA are emulated ([`vmm::pci::Msix`]); every
//!   other access is a region read or write.
//! * Interrupts: the device is given the eventfds of our `MsiVector`s (or
//!   of an INTx irqfd with its resample eventfd), so its interrupts go to
//!   KVM without passing through this process. Routes follow the guest's
//!   table writes, vector masks and the function mask.
//! * Lifecycle, as the classic KVM device assignment did: the function's
//!   configuration space is saved before first use and the device reset
//!   on attach; on detach it is reset again and the saved state restored,
//!   and every resource (slots, irqfds, routes, DMA maps) released.
//! * A device that goes away (a vfio-user server that disconnects or
//!   answers garbage) is logged once; from then on reads return all-ones
//!   and writes are dropped, and the VM keeps running.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::interrupts::{InterruptError, InterruptRouter, IntxIrqfd, MsiVector};
use vmm::memslots::MemorySlots;
use vmm::pci::config::{COMMAND_INTX_DISABLE, PCI_COMMAND};
use vmm::pci::{BarRange, Msix, PciConfigSpace, PciDevice, PciIdentity};

use crate::bars::{map_bar, Bar};
use crate::config::{
    self, ConfigError, Layout, MsiState, CAP_ID_MSI, CAP_ID_MSIX, CONFIG_REGION, CONFIG_SIZE,
    MSIX_CAP_LEN,
};
use crate::transport::{DmaRegion, IrqSet, RegionInfo, Transport, TransportError};

/// What a passthrough device needs from the VM.
#[derive(Clone)]
pub struct VmContext {
    pub router: Arc<InterruptRouter>,
    pub slots: Arc<MemorySlots>,
    pub memory: GuestMemoryMmap,
}

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{device}: {what}")]
    Transport {
        device: String,
        what: &'static str,
        #[source]
        source: TransportError,
    },
    #[error("{device} is not a PCI device")]
    NotPci { device: String },
    #[error("{device} has no PCI configuration space (region 7 is {size} bytes)")]
    NoConfigSpace { device: String, size: u64 },
    #[error("{device}: its configuration space is unusable")]
    Config {
        device: String,
        #[source]
        source: ConfigError,
    },
    #[error("{device} has an MSI-X table of {table} vectors but takes {irqs} MSI-X interrupts")]
    MsixCount {
        device: String,
        table: u16,
        irqs: u32,
    },
    #[error("{device}: allocating interrupt vectors")]
    Interrupts {
        device: String,
        #[source]
        source: InterruptError,
    },
    #[error(
        "{device}: guest memory at {iova:#x} is not in a file the device can map \
         (vfio-user devices need shared guest memory)"
    )]
    MemoryNotShared { device: String, iova: u64 },
    #[error("{device}: mapping guest memory [{iova:#x}, +{size:#x}) for DMA")]
    Dma {
        device: String,
        iova: u64,
        size: u64,
        #[source]
        source: TransportError,
    },
}

/// Which interrupt the device signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    None,
    Intx,
    Msi,
    Msix,
}

impl IrqMode {
    fn index(self) -> Option<u32> {
        match self {
            IrqMode::None => None,
            IrqMode::Intx => Some(VFIO_PCI_INTX_IRQ_INDEX),
            IrqMode::Msi => Some(VFIO_PCI_MSI_IRQ_INDEX),
            IrqMode::Msix => Some(VFIO_PCI_MSIX_IRQ_INDEX),
        }
    }
}

/// Where a configuration write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Device,
    Command,
    Shadow,
    MsixControl,
    Msi,
    Drop,
}

/// Reads the first 256 bytes of configuration space, a dword at a time.
fn read_config(t: &mut dyn Transport) -> Result<[u8; CONFIG_SIZE], TransportError> {
    let mut cfg = [0u8; CONFIG_SIZE];
    for off in (0..CONFIG_SIZE).step_by(4) {
        t.region_read(CONFIG_REGION, off as u64, &mut cfg[off..off + 4])?;
    }
    Ok(cfg)
}

/// One PCI function passed through to the guest.
pub struct PassthroughDevice {
    name: String,
    transport: Box<dyn Transport>,
    ctx: VmContext,
    /// The function's configuration space before we first used it.
    saved: [u8; CONFIG_SIZE],
    resettable: bool,
    layout: Layout,
    /// BAR registers, the command bits that decide decoding, and the
    /// interrupt line, as the guest programs them.
    shadow: PciConfigSpace,
    bars: Vec<Bar>,
    msix: Option<Msix>,
    msi: Option<(MsiState, MsiVector)>,
    /// The interrupt pin the device reports (0: none), and the INTx line
    /// once a GSI is given.
    intx_pin: u8,
    intx: Option<IntxIrqfd>,
    mode: IrqMode,
    /// DMA mappings held: (iova, size).
    dma: Vec<(u64, u64)>,
    gone: bool,
    detaching: bool,
    detached: bool,
    warnings: u64,
}

impl PassthroughDevice {
    /// Attaches the function behind `transport`: saves its configuration
    /// space, checks what it reports, resets it, maps its BARs and all of
    /// guest RAM for its DMA. A device refused by the checks is never
    /// reset; everything taken is given back if a later step fails.
    pub fn new(
        name: &str,
        mut transport: Box<dyn Transport>,
        ctx: VmContext,
    ) -> Result<PassthroughDevice, DeviceError> {
        let device = format!("{name} ({})", transport.describe());
        let terr = |what: &'static str| {
            let device = device.clone();
            move |source| DeviceError::Transport {
                device,
                what,
                source,
            }
        };
        // A device in another process can only reach guest RAM it can map.
        if transport.dma_needs_fd() {
            if let Some(r) = ctx.memory.iter().find(|r| r.file_offset().is_none()) {
                return Err(DeviceError::MemoryNotShared {
                    device,
                    iova: r.start_addr().0,
                });
            }
        }
        let info = transport
            .device_info()
            .map_err(terr("getting device info"))?;
        if !info.is_pci() {
            return Err(DeviceError::NotPci { device });
        }
        let config_size = if info.num_regions > CONFIG_REGION {
            transport
                .region_info(CONFIG_REGION)
                .map_err(terr("getting the configuration space region"))?
                .size
        } else {
            0
        };
        if config_size < CONFIG_SIZE as u64 {
            return Err(DeviceError::NoConfigSpace {
                device,
                size: config_size,
            });
        }
        let mut regions: Vec<Option<RegionInfo>> = Vec::new();
        for i in 0..6u32 {
            regions.push(if i < info.num_regions {
                Some(
                    transport
                        .region_info(i)
                        .map_err(terr("getting BAR region info"))?,
                )
            } else {
                None
            });
        }
        let saved = read_config(transport.as_mut()).map_err(terr("reading configuration space"))?;
        let sizes: [u64; 6] = std::array::from_fn(|i| regions[i].as_ref().map_or(0, |r| r.size));
        let layout = config::parse(&saved, &sizes).map_err(|source| DeviceError::Config {
            device: device.clone(),
            source,
        })?;
        for i in &layout.io_bars {
            log::warn!("{device}: BAR{i} is an I/O BAR, which is not passed through");
        }
        let irq_count = |t: &mut Box<dyn Transport>, index: u32| {
            if index < info.num_irqs {
                t.irq_info(index).map(|i| i.count)
            } else {
                Ok(0)
            }
        };
        let msix_irqs = irq_count(&mut transport, VFIO_PCI_MSIX_IRQ_INDEX)
            .map_err(terr("getting MSI-X interrupt info"))?;
        let intx_irqs = irq_count(&mut transport, VFIO_PCI_INTX_IRQ_INDEX)
            .map_err(terr("getting INTx interrupt info"))?;
        if let Some(m) = &layout.msix {
            if msix_irqs < u32::from(m.count) {
                return Err(DeviceError::MsixCount {
                    device,
                    table: m.count,
                    irqs: msix_irqs,
                });
            }
        }
        // Checked, and saved: now the device may be reset.
        let resettable = info.resettable();
        if resettable {
            transport.reset().map_err(terr("resetting the device"))?;
        }
        let irq_err = |source| DeviceError::Interrupts {
            device: device.clone(),
            source,
        };
        let msix = match &layout.msix {
            Some(m) => Some(Msix::new(&ctx.router, m.count).map_err(irq_err)?),
            None => None,
        };
        let msi = match layout.msi {
            Some(l) => Some((MsiState::new(l), ctx.router.msi_vector().map_err(irq_err)?)),
            None => None,
        };
        let mut shadow = PciConfigSpace::new(PciIdentity {
            vendor: u16::from_le_bytes([saved[0], saved[1]]),
            device: u16::from_le_bytes([saved[2], saved[3]]),
            subsystem_vendor: u16::from_le_bytes([saved[0x2c], saved[0x2d]]),
            subsystem: u16::from_le_bytes([saved[0x2e], saved[0x2f]]),
            class: saved[0x0b],
            subclass: saved[0x0a],
            prog_if: saved[0x09],
            revision: saved[0x08],
        });
        let mut bars = Vec::new();
        for b in &layout.bars {
            // `config::parse` checked the size is a power of two >= 16.
            shadow.add_bar(b.index, b.size, b.kind);
            let maps = match &regions[usize::from(b.index)] {
                Some(r) => map_bar(&device, b, r, layout.msix.as_ref()),
                None => Vec::new(),
            };
            bars.push(Bar {
                layout: *b,
                maps,
                slots: Vec::new(),
                addr: None,
            });
        }
        let intx_pin = if intx_irqs > 0 { saved[0x3d].min(4) } else { 0 };
        let mut dev = PassthroughDevice {
            name: device,
            transport,
            ctx,
            saved,
            resettable,
            layout,
            shadow,
            bars,
            msix,
            msi,
            intx_pin,
            intx: None,
            mode: IrqMode::None,
            dma: Vec::new(),
            gone: false,
            detaching: false,
            detached: false,
            warnings: 0,
        };
        // On failure `dev` drops, which unmaps, resets and restores (as far
        // as the device can still be reached).
        if let Err(e) = dev.map_dma() {
            if matches!(&e, DeviceError::Dma { source, .. } if source.is_fatal()) {
                dev.gone = true;
            }
            return Err(e);
        }
        Ok(dev)
    }

    /// Maps every guest RAM region for the device's DMA, at IOVA = guest
    /// physical address.
    fn map_dma(&mut self) -> Result<(), DeviceError> {
        let memory = self.ctx.memory.clone();
        for region in memory.iter() {
            let iova = region.start_addr().0;
            let size = region.len();
            let file: Option<(BorrowedFd<'_>, u64)> =
                region.file_offset().map(|f| (f.file().as_fd(), f.start()));
            let r = DmaRegion {
                iova,
                size,
                host_addr: region.as_ptr() as u64,
                file,
            };
            self.transport
                .dma_map(&r)
                .map_err(|source| DeviceError::Dma {
                    device: self.name.clone(),
                    iova,
                    size,
                    source,
                })?;
            self.dma.push((iova, size));
        }
        Ok(())
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device has an INTx pin to wire.
    pub fn wants_intx(&self) -> bool {
        self.intx_pin != 0
    }

    /// The interrupt pin the device reports: 1 = INTA# .. 4 = INTD#, 0
    /// for none.
    pub fn intx_pin(&self) -> u8 {
        self.intx_pin
    }

    /// Wires the device's INTx to IOAPIC pin `gsi` (an irqfd with a
    /// resample eventfd) and reports it in the interrupt line register.
    pub fn enable_intx(&mut self, gsi: u32) -> Result<(), InterruptError> {
        if !self.wants_intx() || self.detached {
            return Ok(());
        }
        self.intx = Some(self.ctx.router.intx_irqfd(gsi)?);
        self.shadow.write(0x3c, &[gsi as u8]);
        self.sync_irq_mode();
        Ok(())
    }

    /// The interrupt the device signals now.
    pub fn irq_mode(&self) -> IrqMode {
        self.mode
    }

    /// Whether the device was lost (disconnected or unintelligible).
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// The guest ranges of the device's BARs mapped through KVM memory
    /// slots now: (guest address, length).
    pub fn mapped_ranges(&self) -> Vec<(u64, u64)> {
        self.bars
            .iter()
            .flat_map(|b| b.slots.iter().map(|s| (s.guest_addr(), s.len())))
            .collect()
    }

    /// DMA mappings held now.
    pub fn dma_mappings(&self) -> &[(u64, u64)] {
        &self.dma
    }

    /// Handles a transport failure during operation: a fatal one makes
    /// the device gone (logged once), others are logged, rate-limited.
    fn fail(&mut self, op: &str, e: TransportError) {
        if e.is_fatal() {
            if !self.gone && self.detaching {
                self.gone = true;
                log::warn!("{}: {op} while detaching: {e}", self.name);
            } else if !self.gone {
                self.gone = true;
                log::error!(
                    "{}: {op}: {e}; the device is gone: reads return all-ones, writes are dropped",
                    self.name
                );
                for b in &mut self.bars {
                    b.slots.clear();
                }
            }
            return;
        }
        self.warnings += 1;
        if self.warnings <= 10 || self.warnings.is_power_of_two() {
            log::warn!(
                "{}: {op}: {e} ({} such errors so far)",
                self.name,
                self.warnings
            );
        }
    }

    fn live(&self) -> bool {
        !self.gone && !self.detached
    }

    /// Brings what the device signals in line with the guest's MSI-X,
    /// MSI and INTx-disable settings. vfio allows one kind at a time.
    fn sync_irq_mode(&mut self) {
        if !self.live() {
            return;
        }
        let command = self.shadow.u16_at(PCI_COMMAND);
        let want = if self.msix.as_ref().is_some_and(Msix::enabled) {
            IrqMode::Msix
        } else if self.msi.as_ref().is_some_and(|(s, _)| s.enabled()) {
            IrqMode::Msi
        } else if self.intx.is_some() && command & COMMAND_INTX_DISABLE == 0 {
            IrqMode::Intx
        } else {
            IrqMode::None
        };
        if want == self.mode {
            return;
        }
        if let Some(index) = self.mode.index() {
            if let Err(e) = self.transport.set_irqs(index, IrqSet::Disable) {
                self.fail("disabling interrupts", e);
            }
        }
        self.mode = IrqMode::None;
        let result = match want {
            IrqMode::None => return,
            IrqMode::Msix => {
                let fds: Vec<RawFd> = self
                    .msix
                    .iter()
                    .flat_map(|m| m.eventfds())
                    .map(AsRawFd::as_raw_fd)
                    .collect();
                self.transport
                    .set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, IrqSet::Trigger(&fds))
            }
            IrqMode::Msi => match &self.msi {
                Some((_, v)) => self.transport.set_irqs(
                    VFIO_PCI_MSI_IRQ_INDEX,
                    IrqSet::Trigger(&[v.eventfd().as_raw_fd()]),
                ),
                None => return,
            },
            IrqMode::Intx => self.enable_intx_irqs(),
        };
        match result {
            Ok(()) => self.mode = want,
            Err(e) => self.fail("enabling interrupts", e),
        }
    }

    /// Gives the device the INTx irqfd's eventfd, and its resample
    /// eventfd to unmask on (a device that cannot unmask on an eventfd
    /// still gets the trigger).
    fn enable_intx_irqs(&mut self) -> Result<(), TransportError> {
        let Some(l) = &self.intx else {
            return Ok(());
        };
        let (trigger, resample) = (l.trigger().as_raw_fd(), l.resample().as_raw_fd());
        self.transport
            .set_irqs(VFIO_PCI_INTX_IRQ_INDEX, IrqSet::Trigger(&[trigger]))?;
        match self
            .transport
            .set_irqs(VFIO_PCI_INTX_IRQ_INDEX, IrqSet::UnmaskOn(resample))
        {
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => {
                log::info!(
                    "{}: the device does not unmask INTx on the resample eventfd: {e}",
                    self.name
                );
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// The MSI vector follows the emulated capability.
    fn sync_msi(&mut self) {
        if let Some((s, v)) = &mut self.msi {
            let masked = !s.enabled() || s.masked();
            if let Err(e) = v.update(s.message(), masked) {
                log::error!("{}: MSI: {e}", self.name);
            }
        }
    }

    /// A configuration byte we answer ourselves, if it is one.
    fn fixed_byte(&self, o: u16) -> Option<u8> {
        let shadow = |o: u16| {
            let mut b = [0u8];
            self.shadow.read(o, &mut b);
            b[0]
        };
        match o {
            0x0e => Some(self.saved[0x0e] & 0x7f),
            0x10..=0x27 | 0x3c => Some(shadow(o)),
            0x30..=0x33 => Some(0),
            0x34 => Some(self.layout.head()),
            0x3d => Some(if self.intx.is_some() {
                self.intx_pin
            } else {
                0
            }),
            0x40..=0xff => self.cap_byte(o),
            _ => None,
        }
    }

    fn cap_byte(&self, o: u16) -> Option<u8> {
        let next = |cap: u8| self.layout.kept_at(cap).map_or(0, |(_, n)| n);
        if let (Some(m), Some(msix)) = (&self.layout.msix, &self.msix) {
            let c = u16::from(m.cap);
            if (c..c + MSIX_CAP_LEN).contains(&o) {
                let ctrl = msix.control().to_le_bytes();
                return Some(match o - c {
                    0 => CAP_ID_MSIX,
                    1 => next(m.cap),
                    2 => ctrl[0],
                    3 => ctrl[1],
                    _ => self.saved[usize::from(o)],
                });
            }
        }
        if let Some((s, _)) = &self.msi {
            let c = u16::from(s.layout.cap);
            if (c..c + s.layout.size()).contains(&o) {
                return Some(s.bytes(next(s.layout.cap))[usize::from(o - c)]);
            }
        }
        let c = self.layout.kept_containing(o)?;
        match o - u16::from(c.offset) {
            0 => Some(c.id),
            1 => Some(next(c.offset)),
            _ => None,
        }
    }

    fn write_target(&self, o: u16) -> Target {
        match o {
            0x04 | 0x05 => Target::Command,
            0x06 | 0x07 | 0x0c | 0x0d | 0x0f => Target::Device,
            0x3c => Target::Shadow,
            0x40..=0xff => {
                // The capability the byte belongs to: the last one, kept
                // or hidden, that starts at or before it.
                let Some(c) = self
                    .layout
                    .caps
                    .iter()
                    .filter(|c| u16::from(c.offset) <= o)
                    .max_by_key(|c| c.offset)
                else {
                    return Target::Drop;
                };
                let rel = o - u16::from(c.offset);
                let kept = self.layout.kept.contains(c);
                match c.id {
                    CAP_ID_MSIX if kept && self.msix.is_some() => match rel {
                        2 | 3 => Target::MsixControl,
                        _ => Target::Drop,
                    },
                    CAP_ID_MSI if kept && self.msi.is_some() => Target::Msi,
                    _ if kept && rel >= 2 => Target::Device,
                    _ => Target::Drop,
                }
            }
            _ => Target::Drop,
        }
    }

    fn apply_write(&mut self, target: Target, offset: u16, data: &[u8]) {
        match target {
            Target::Drop => {}
            Target::Device => {
                if let Err(e) = self
                    .transport
                    .region_write(CONFIG_REGION, u64::from(offset), data)
                {
                    self.fail("configuration write", e);
                }
            }
            Target::Command => {
                if let Err(e) = self
                    .transport
                    .region_write(CONFIG_REGION, u64::from(offset), data)
                {
                    self.fail("command register write", e);
                }
                self.shadow.write(offset, data);
                self.sync_irq_mode();
            }
            Target::Shadow => self.shadow.write(offset, data),
            Target::MsixControl => {
                let (Some(m), Some(msix)) = (&self.layout.msix, &mut self.msix) else {
                    return;
                };
                let ctrl = u16::from(m.cap) + 2;
                let mut v = msix.control().to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    v[usize::from(offset + i as u16 - ctrl)] = *b;
                }
                msix.write_control(u16::from_le_bytes(v));
                self.sync_irq_mode();
            }
            Target::Msi => {
                if let Some((s, _)) = &mut self.msi {
                    s.write(offset - u16::from(s.layout.cap), data);
                }
                self.sync_msi();
                self.sync_irq_mode();
            }
        }
    }

    /// The MSI-X structure at `offset` of BAR `bar`, if any: (is the
    /// table, offset in it).
    fn msix_at(&self, bar: u8, offset: u64) -> Option<(bool, u64)> {
        let m = self.layout.msix.as_ref()?;
        if bar == m.table_bir && (m.table_offset..m.table_offset + m.table_len()).contains(&offset)
        {
            return Some((true, offset - m.table_offset));
        }
        if bar == m.pba_bir && (m.pba_offset..m.pba_offset + m.pba_len()).contains(&offset) {
            return Some((false, offset - m.pba_offset));
        }
        None
    }

    /// Writes back the configuration saved before first use: the header's
    /// writable registers, then MSI/MSI-X control, then the command
    /// register last, so decoding resumes with the saved BARs.
    fn restore_config(&mut self) {
        let mut ranges: Vec<(usize, usize)> = vec![(0x0c, 2), (0x10, 24), (0x30, 4), (0x3c, 1)];
        if let Some(m) = &self.layout.msix {
            ranges.push((usize::from(m.cap) + 2, 2));
        }
        if let Some(m) = &self.layout.msi {
            ranges.push((usize::from(m.cap) + 2, 2));
        }
        ranges.push((0x04, 2));
        for (off, len) in ranges {
            let mut at = off;
            while at < off + len {
                // Dword-sized pieces, naturally aligned.
                let n = (4 - at % 4).min(off + len - at);
                let n = if n == 3 { 2 } else { n };
                let bytes = self.saved[at..at + n].to_vec();
                if let Err(e) = self
                    .transport
                    .region_write(CONFIG_REGION, at as u64, &bytes)
                {
                    self.fail("restoring configuration space", e);
                    return;
                }
                at += n;
            }
        }
    }

    /// Detaches the device: stops its interrupts, unmaps its BARs and
    /// DMA, resets it and restores the state saved on attach, and frees
    /// every vector and slot. Called again (or on drop), it does nothing.
    pub fn detach(&mut self) {
        if self.detached {
            return;
        }
        self.detaching = true;
        for b in &mut self.bars {
            b.slots.clear();
            b.maps.clear();
        }
        if !self.gone {
            if let Some(index) = self.mode.index() {
                if let Err(e) = self.transport.set_irqs(index, IrqSet::Disable) {
                    self.fail("disabling interrupts", e);
                }
            }
        }
        for (iova, size) in std::mem::take(&mut self.dma) {
            if self.gone {
                break;
            }
            if let Err(e) = self.transport.dma_unmap(iova, size) {
                self.fail("unmapping DMA", e);
            }
        }
        if !self.gone && self.resettable {
            if let Err(e) = self.transport.reset() {
                self.fail("resetting the device", e);
            }
        }
        if !self.gone {
            self.restore_config();
        }
        self.detached = true;
        self.mode = IrqMode::None;
        self.intx = None;
        self.msix = None;
        self.msi = None;
    }
}

impl Drop for PassthroughDevice {
    fn drop(&mut self) {
        self.detach();
    }
}

impl PciDevice for PassthroughDevice {
    fn save_state(&mut self) -> Result<Vec<u8>, vmm::snapshot::SnapshotError> {
        // The function's registers, DMA mappings and in-flight work live
        // in the host device (kernel VFIO) or another process (vfio-user),
        // which this VMM can neither read back nor load into a new one.
        Err(vmm::snapshot::SnapshotError::Unsupported {
            device: self.name.clone(),
            reason: "it is a passed-through PCI function, whose state lives outside ringvm".into(),
        })
    }
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if !self.live() {
            data.fill(0xff);
            return;
        }
        if usize::from(offset) + data.len() > CONFIG_SIZE {
            // No extended capabilities.
            data.fill(0);
            return;
        }
        let fixed: Vec<Option<u8>> = (0..data.len() as u16)
            .map(|i| self.fixed_byte(offset + i))
            .collect();
        let mut dev = vec![0xffu8; data.len()];
        if fixed.iter().any(Option::is_none) {
            if let Err(e) = self
                .transport
                .region_read(CONFIG_REGION, u64::from(offset), &mut dev)
            {
                self.fail("configuration read", e);
                dev.fill(0xff);
                if self.gone {
                    data.fill(0xff);
                    return;
                }
            }
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = fixed[i].unwrap_or(dev[i]);
            if offset + i as u16 == 0x06 {
                *b &= !0x10;
                if !self.layout.kept.is_empty() {
                    *b |= 0x10;
                }
            }
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        if !self.live() || usize::from(offset) + data.len() > CONFIG_SIZE {
            return;
        }
        if (0x10..0x28).contains(&offset) {
            if data.len() == 4 && offset % 4 == 0 {
                self.shadow.write(offset, data);
            }
            return;
        }
        let mut i = 0;
        while i < data.len() {
            let target = self.write_target(offset + i as u16);
            let mut j = i + 1;
            while j < data.len() && self.write_target(offset + j as u16) == target {
                j += 1;
            }
            self.apply_write(target, offset + i as u16, &data[i..j]);
            i = j;
        }
    }

    fn decoded_bars(&self) -> Vec<BarRange> {
        self.shadow.decoded_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if !self.live() {
            data.fill(0xff);
            return;
        }
        match (self.msix_at(bar, offset), &self.msix) {
            (Some((true, o)), Some(m)) => m.read_table(o, data),
            (Some((false, o)), Some(m)) => m.read_pba(o, data),
            _ => {
                if let Err(e) = self.transport.region_read(u32::from(bar), offset, data) {
                    self.fail("BAR read", e);
                    data.fill(0xff);
                }
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if !self.live() {
            return;
        }
        match (self.msix_at(bar, offset), &mut self.msix) {
            (Some((true, o)), Some(m)) => m.write_table(o, data),
            (Some((false, _)), _) => {}
            _ => {
                if let Err(e) = self.transport.region_write(u32::from(bar), offset, data) {
                    self.fail("BAR write", e);
                }
            }
        }
    }

    fn bars_changed(&mut self, _old: &[BarRange], new: &[BarRange]) {
        let slots = self.ctx.slots.clone();
        let live = self.live();
        for b in &mut self.bars {
            let addr = new
                .iter()
                .find(|r| r.index == b.layout.index)
                .map(|r| r.addr)
                .filter(|_| live);
            b.move_to(&self.name, &slots, addr);
        }
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) {
        self.shadow.set_bar_addr(index, addr);
    }

    fn bar_requests(&self) -> Vec<(u8, u64, bool)> {
        self.shadow.bar_requests()
    }
}

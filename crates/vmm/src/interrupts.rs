//! Interrupt routing: the one owner of KVM's GSI routing table.
//!
//! GSIs 0–23 keep the in-kernel irqchip's default wiring (PIC and IOAPIC
//! pins), or, with a split irqchip, are MSI routes that the userspace
//! IOAPIC sets from its redirection entries. Every other GSI is an MSI route handed out as an [`MsiVector`]:
//! an eventfd registered as a KVM irqfd on a GSI whose route carries the
//! MSI address and data the guest programmed. Routes are written before
//! irqfds are registered, a masked vector has no irqfd (so writes to its
//! eventfd stay pending and are delivered on unmask, when the irqfd is
//! registered again), and dropping a vector frees its GSI.
//!
//! Level-triggered lines (PCI INTx) are an irqfd on an IOAPIC pin plus a
//! "resample" eventfd that tells the source the guest has serviced the
//! interrupt, so that it may raise it again if still asserted. With the
//! in-kernel irqchip KVM signals it (a resample irqfd). With a split
//! irqchip KVM cannot (its resampler lives in the in-kernel IOAPIC):
//! instead the level bit in the pin's MSI route puts the vector in every
//! vCPU's EOI-exit bitmap, the guest's EOI of it becomes a
//! `KVM_EXIT_IOAPIC_EOI` that the vCPU thread hands to
//! [`InterruptRouter::end_of_interrupt`], and the router signals the
//! resample eventfd of every level source on a pin routed with that
//! vector. A pin whose route changes to deliverable (the guest unmasks or
//! reprograms it) is resampled too, so an assertion that found the pin
//! masked or unrouted (and was dropped by KVM) is raised again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs wired to the IOAPIC's pins.
pub const IOAPIC_PINS: u32 = 24;
/// Highest GSI we hand out (KVM allows 4096 routes here).
const MAX_GSI: u32 = 4095;

/// Errors from interrupt routing.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("all {} MSI GSIs are in use", MAX_GSI + 1 - IOAPIC_PINS)]
    NoFreeGsi,
    #[error("KVM_SET_GSI_ROUTING with {routes} routes failed")]
    SetRouting {
        routes: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{op} of the irqfd for GSI {gsi} failed")]
    Irqfd {
        op: &'static str,
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("creating an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("GSI {gsi} is not an IOAPIC pin (0-{})", IOAPIC_PINS - 1)]
    NotAnIoapicPin { gsi: u32 },
    #[error("the IOAPIC is in the kernel: its pins are not routed from userspace")]
    InKernelIoapic,
}

/// The level-trigger bit of an MSI message's data (as the IOAPIC sets it
/// for a level-triggered redirection entry).
pub const MSI_DATA_LEVEL: u32 = 1 << 15;

/// An MSI message as the guest programs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The routing table's owner.
pub struct InterruptRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
    /// Split irqchip: no in-kernel PIC or IOAPIC, so no default wiring;
    /// GSIs 0–23 are MSI routes set by the userspace IOAPIC.
    split: bool,
}

#[derive(Default)]
struct RouterState {
    next_gsi: u32,
    free: Vec<u32>,
    /// Programmed MSI routes by GSI.
    msi: BTreeMap<u32, MsiMessage>,
    /// Split irqchip: the level-triggered sources on IOAPIC pins.
    levels: Vec<LevelSource>,
    next_level_id: u64,
}

/// A level-triggered source on an IOAPIC pin (split irqchip): the router
/// signals its resample eventfd (a duplicate of the one the source holds).
struct LevelSource {
    id: u64,
    pin: u32,
    resample: EventFd,
}

impl LevelSource {
    fn resample(&self) {
        // An eventfd write only fails when the counter would overflow, and
        // then a resample is pending anyway.
        if let Err(e) = self.resample.write(1) {
            log::debug!("resampling IOAPIC pin {}: {e}", self.pin);
        }
    }
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The in-kernel irqchip's default wiring, which a routing update must keep:
/// GSI n on IOAPIC pin n, and GSIs 0–15 (but 2, the cascade) on the PICs.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity(40);
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 && gsi != 2 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            v.push(irqchip_entry(gsi, chip, pin));
        }
    }
    v
}

impl InterruptRouter {
    /// The router of a VM with the in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>) -> Arc<InterruptRouter> {
        Self::with_irqchip(vm, false)
    }

    /// The router of a VM with a split irqchip (userspace IOAPIC).
    pub fn new_split(vm: Arc<VmFd>) -> Arc<InterruptRouter> {
        Self::with_irqchip(vm, true)
    }

    fn with_irqchip(vm: Arc<VmFd>, split: bool) -> Arc<InterruptRouter> {
        Arc::new(InterruptRouter {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: IOAPIC_PINS,
                ..Default::default()
            }),
            split,
        })
    }

    /// Whether the VM has a split irqchip.
    pub fn is_split(&self) -> bool {
        self.split
    }

    /// Split irqchip only: routes IOAPIC pin `pin` (GSI = pin) as the MSI
    /// its redirection entry describes, or not at all (masked).
    pub fn set_pin_route(&self, pin: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        if pin >= IOAPIC_PINS {
            return Err(InterruptError::NotAnIoapicPin { gsi: pin });
        }
        if !self.split {
            return Err(InterruptError::InKernelIoapic);
        }
        let mut s = self.lock();
        let changed = self.set_route_locked(&mut s, pin, msg)?;
        if changed && msg.is_some() {
            // Newly deliverable: a level source whose assertion was lost
            // while the pin was masked or unrouted raises it again.
            s.levels
                .iter()
                .filter(|l| l.pin == pin)
                .for_each(LevelSource::resample);
        }
        Ok(())
    }

    /// Split irqchip: the guest ended the interrupt `vector` on a local
    /// APIC (`KVM_EXIT_IOAPIC_EOI`, taken only for vectors of level
    /// routes on IOAPIC pins). Every level source on a pin routed as a
    /// level interrupt with that vector is resampled; edge pins and
    /// MSI(-X) vectors ignore EOIs.
    pub fn end_of_interrupt(&self, vector: u8) {
        let s = self.lock();
        for l in &s.levels {
            let routed = s
                .msi
                .get(&l.pin)
                .is_some_and(|m| m.data & MSI_DATA_LEVEL != 0 && (m.data & 0xff) as u8 == vector);
            if routed {
                l.resample();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the whole table: default wiring plus every MSI route.
    fn commit(&self, state: &RouterState) -> Result<(), InterruptError> {
        let mut entries = if self.split {
            Vec::new()
        } else {
            default_routes()
        };
        entries.extend(state.msi.iter().map(|(&gsi, &msg)| msi_entry(gsi, msg)));
        let routes = entries.len();
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::SetRouting {
                routes,
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|source| InterruptError::SetRouting { routes, source })
    }

    fn allocate_gsi(&self) -> Result<u32, InterruptError> {
        let mut s = self.lock();
        if let Some(gsi) = s.free.pop() {
            return Ok(gsi);
        }
        if s.next_gsi > MAX_GSI {
            return Err(InterruptError::NoFreeGsi);
        }
        s.next_gsi += 1;
        Ok(s.next_gsi - 1)
    }

    /// A new, masked and unrouted MSI vector with its own GSI and eventfd.
    pub fn msi_vector(self: &Arc<Self>) -> Result<MsiVector, InterruptError> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        let gsi = self.allocate_gsi()?;
        Ok(MsiVector {
            router: self.clone(),
            gsi,
            eventfd,
            message: None,
            irqfd: false,
        })
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut s = self.lock();
        self.set_route_locked(&mut s, gsi, msg).map(|_| ())
    }

    /// Sets (or removes) the route of `gsi`; returns whether it changed.
    fn set_route_locked(
        &self,
        s: &mut RouterState,
        gsi: u32,
        msg: Option<MsiMessage>,
    ) -> Result<bool, InterruptError> {
        let old = match msg {
            Some(m) => s.msi.insert(gsi, m),
            None => s.msi.remove(&gsi),
        };
        if old == msg {
            return Ok(false);
        }
        let result = self.commit(s);
        if result.is_err() {
            // Keep our table equal to KVM's.
            match old {
                Some(m) => s.msi.insert(gsi, m),
                None => s.msi.remove(&gsi),
            };
        }
        result.map(|()| true)
    }

    fn free_gsi(&self, gsi: u32) {
        let mut s = self.lock();
        if s.msi.remove(&gsi).is_some() {
            if let Err(e) = self.commit(&s) {
                log::warn!("removing the route of GSI {gsi}: {e}");
            }
        }
        s.free.push(gsi);
    }

    /// Number of MSI routes currently programmed.
    pub fn msi_routes(&self) -> usize {
        self.lock().msi.len()
    }

    /// A level-triggered line on IOAPIC pin `gsi` (no route change: the
    /// in-kernel IOAPIC's default wiring, or the route the userspace
    /// IOAPIC sets from the guest's entry): an irqfd with a resample
    /// eventfd, signalled when the guest has serviced the interrupt so the
    /// source can unmask and raise it again if it is still asserted (PCI
    /// INTx). In-kernel irqchip: a KVM resample irqfd. Split: a plain
    /// irqfd; the router signals the resample eventfd on the guest's EOI
    /// of the pin's vector and when the pin becomes deliverable.
    pub fn intx_irqfd(self: &Arc<Self>, gsi: u32) -> Result<IntxIrqfd, InterruptError> {
        if gsi >= IOAPIC_PINS {
            return Err(InterruptError::NotAnIoapicPin { gsi });
        }
        let trigger = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        let irqfd_err = |source| InterruptError::Irqfd {
            op: "registering",
            gsi,
            source,
        };
        let level_id = if self.split {
            let dup = resample.try_clone().map_err(InterruptError::EventFd)?;
            self.vm.register_irqfd(&trigger, gsi).map_err(irqfd_err)?;
            let mut s = self.lock();
            let id = s.next_level_id;
            s.next_level_id += 1;
            s.levels.push(LevelSource {
                id,
                pin: gsi,
                resample: dup,
            });
            Some(id)
        } else {
            self.vm
                .register_irqfd_with_resample(&trigger, &resample, gsi)
                .map_err(irqfd_err)?;
            None
        };
        Ok(IntxIrqfd {
            router: self.clone(),
            gsi,
            trigger,
            resample,
            level_id,
        })
    }

    /// Number of level-triggered sources the router resamples (split
    /// irqchip).
    pub fn level_sources(&self) -> usize {
        self.lock().levels.len()
    }
}

/// An INTx line: an irqfd with a resample eventfd on an IOAPIC pin,
/// unregistered when dropped.
pub struct IntxIrqfd {
    router: Arc<InterruptRouter>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
    /// Split irqchip: the router's entry for the resample eventfd.
    level_id: Option<u64>,
}

impl IntxIrqfd {
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd that asserts the line.
    pub fn trigger(&self) -> &EventFd {
        &self.trigger
    }

    /// The eventfd signalled on the guest's end of interrupt (by KVM, or
    /// by the router with a split irqchip).
    pub fn resample(&self) -> &EventFd {
        &self.resample
    }
}

impl Drop for IntxIrqfd {
    fn drop(&mut self) {
        if let Err(e) = self.router.vm.unregister_irqfd(&self.trigger, self.gsi) {
            log::warn!("unregistering the INTx irqfd of GSI {}: {e}", self.gsi);
        }
        if let Some(id) = self.level_id {
            self.router.lock().levels.retain(|l| l.id != id);
        }
    }
}

/// One MSI(-X) vector: a GSI, its route and an irqfd eventfd.
pub struct MsiVector {
    router: Arc<InterruptRouter>,
    gsi: u32,
    eventfd: EventFd,
    message: Option<MsiMessage>,
    irqfd: bool,
}

impl MsiVector {
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd a device writes to raise this vector.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Follows the guest's table entry: `message` (None when the address
    /// is not a valid MSI target) and whether the vector is masked. The
    /// route is set before the irqfd is registered.
    pub fn update(
        &mut self,
        message: Option<MsiMessage>,
        masked: bool,
    ) -> Result<(), InterruptError> {
        let deliverable = message.filter(|_| !masked);
        if deliverable.is_none() && self.irqfd {
            self.router
                .vm
                .unregister_irqfd(&self.eventfd, self.gsi)
                .map_err(|source| InterruptError::Irqfd {
                    op: "unregistering",
                    gsi: self.gsi,
                    source,
                })?;
            self.irqfd = false;
        }
        if message != self.message {
            self.router.set_route(self.gsi, message)?;
            self.message = message;
        }
        if deliverable.is_some() && !self.irqfd {
            self.router
                .vm
                .register_irqfd(&self.eventfd, self.gsi)
                .map_err(|source| InterruptError::Irqfd {
                    op: "registering",
                    gsi: self.gsi,
                    source,
                })?;
            self.irqfd = true;
        }
        Ok(())
    }

    /// Whether an interrupt is pending: raised while the vector had no
    /// irqfd (masked). Used for the MSI-X PBA.
    pub fn pending(&self) -> bool {
        if self.irqfd {
            return false;
        }
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.eventfd),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: polling one valid fd without blocking.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) == 1 }
    }
}

impl Drop for MsiVector {
    fn drop(&mut self) {
        if self.irqfd {
            if let Err(e) = self.router.vm.unregister_irqfd(&self.eventfd, self.gsi) {
                log::warn!("unregistering the irqfd of GSI {}: {e}", self.gsi);
            }
        }
        self.router.free_gsi(self.gsi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_ioapic_and_pic_but_not_the_cascade() {
        let r = default_routes();
        let pins: Vec<(u32, u32, u32)> = r
            .iter()
            .map(|e| {
                // SAFETY: every default route is an irqchip route.
                unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) }
            })
            .collect();
        assert_eq!(
            pins.iter().filter(|p| p.1 == KVM_IRQCHIP_IOAPIC).count(),
            24
        );
        assert_eq!(
            pins.iter().filter(|p| p.1 != KVM_IRQCHIP_IOAPIC).count(),
            15
        );
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(!pins.iter().any(|p| p.0 == 2 && p.1 != KVM_IRQCHIP_IOAPIC));
    }
}

//! A slab with generation-tagged keys: a key names one occupant of a slot,
//! so a stale key (a late wake, a late completion) never reaches the next
//! occupant of the same slot.

/// Generations stay below 2^31, so no key is ever `u64::MAX`, which the
/// executor keeps for its own completions.
const GEN_MASK: u32 = 0x7fff_ffff;

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

fn split(key: u64) -> (usize, u32) {
    ((key & 0xffff_ffff) as usize, (key >> 32) as u32)
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value` and returns its key.
    pub(crate) fn insert(&mut self, value: T) -> u64 {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            return key(index, slot.generation);
        }
        let index = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        key(index, 0)
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let (index, generation) = split(key);
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Takes the value out; the slot's next occupant gets a new key.
    pub(crate) fn remove(&mut self, key: u64) -> Option<T> {
        let (index, generation) = split(key);
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GEN_MASK;
        self.free.push(index as u32);
        self.len -= 1;
        Some(value)
    }

    /// Keys of every occupied slot.
    pub(crate) fn keys(&self) -> Vec<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, s)| key(i as u32, s.generation))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_miss_the_next_occupant() {
        let mut slab = Slab::new();
        let a = slab.insert("a");
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        assert_ne!(a, b);
        assert!(slab.get_mut(a).is_none());
        assert!(slab.remove(a).is_none());
        assert_eq!(slab.get_mut(b).copied(), Some("b"));
        assert_eq!(slab.len(), 1);
        assert_eq!(slab.keys(), vec![b]);
    }

    #[test]
    fn keys_never_collide_with_the_reserved_value() {
        let mut slab: Slab<()> = Slab::new();
        for _ in 0..1000 {
            let k = slab.insert(());
            assert_ne!(k, u64::MAX);
            slab.remove(k);
        }
        assert!(slab.is_empty());
    }
}

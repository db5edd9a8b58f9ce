//! vcpu/memory reservations against the node's capacity.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::ResourceError;

/// What this node may give to VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Total vcpus.
    pub vcpus: u32,
    /// Total memory in MiB.
    pub memory_mib: u64,
}

/// Reserved so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// vcpus in use.
    pub vcpus: u32,
    /// MiB in use.
    pub memory_mib: u64,
}

/// A thread-safe reservation ledger.
#[derive(Debug)]
pub struct Ledger {
    capacity: Capacity,
    used: Mutex<Usage>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(capacity: Capacity) -> Ledger {
        Ledger {
            capacity,
            used: Mutex::new(Usage::default()),
        }
    }

    /// The capacity.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Current usage.
    pub fn usage(&self) -> Usage {
        self.used.lock().map(|u| *u).unwrap_or_default()
    }

    /// Reserve, or fail without changing anything.
    pub fn reserve(&self, vcpus: u32, memory_mib: u64) -> Result<(), ResourceError> {
        let mut u = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let free_v = self.capacity.vcpus.saturating_sub(u.vcpus);
        let free_m = self.capacity.memory_mib.saturating_sub(u.memory_mib);
        if vcpus > free_v || memory_mib > free_m {
            return Err(ResourceError::Insufficient {
                need_vcpus: vcpus,
                need_memory_mib: memory_mib,
                free_vcpus: free_v,
                free_memory_mib: free_m,
            });
        }
        u.vcpus += vcpus;
        u.memory_mib += memory_mib;
        Ok(())
    }

    /// Give back a reservation.
    pub fn release(&self, vcpus: u32, memory_mib: u64) {
        let mut u = self.used.lock().unwrap_or_else(|p| p.into_inner());
        u.vcpus = u.vcpus.saturating_sub(vcpus);
        u.memory_mib = u.memory_mib.saturating_sub(memory_mib);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_release() {
        let l = Ledger::new(Capacity {
            vcpus: 4,
            memory_mib: 1024,
        });
        l.reserve(2, 512).expect("fits");
        l.reserve(2, 512).expect("fits");
        assert!(matches!(
            l.reserve(1, 1),
            Err(ResourceError::Insufficient { .. })
        ));
        l.release(2, 512);
        l.reserve(1, 256).expect("fits again");
        assert_eq!(
            l.usage(),
            Usage {
                vcpus: 3,
                memory_mib: 768
            }
        );
    }
}

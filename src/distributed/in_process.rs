//! Collectives between threads of one process: the sharded loss without a network, for tests
//! and for splitting a batch over several devices of one process.

use std::sync::{Arc, Barrier, Mutex, PoisonError};

use super::Collectives;
use crate::error::Result;

/// One rank of a group of threads ([`InProcessGroup::new`] makes the whole group; hand one
/// rank to each thread). Its all-gather is a slot per rank between two barriers: every rank
/// writes its slot, waits for all, copies every slot, and waits again, so that no rank
/// overwrites its slot for the next operation while another still reads it.
#[derive(Debug, Clone)]
pub struct InProcessGroup {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    slots: Mutex<Vec<Vec<u8>>>,
    barrier: Barrier,
}

impl InProcessGroup {
    /// A group of `world` ranks (at least 1), in rank order.
    pub fn new(world: usize) -> Vec<InProcessGroup> {
        let world = world.max(1);
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| InProcessGroup {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }
}

impl Collectives for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let slots = || {
            self.shared
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        slots()[self.rank] = bytes.to_vec();
        self.shared.barrier.wait();
        let gathered = slots().clone();
        self.shared.barrier.wait();
        Ok(gathered)
    }
}

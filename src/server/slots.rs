//! Who gets a connection, as a pure state machine (no I/O): `[socket] max_connections` full connections,
//! `status_connections` more that answer only `status` (so that an operator can still ask what is going on
//! when every full one is taken), and at most `max_connections_per_process` of all of them for one client
//! process, told apart by the peer credentials (`SO_PEERCRED`).

use std::collections::HashMap;

/// A client process, from the socket's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub uid: u32,
    /// `None` when the kernel did not say (then all such peers of one uid count as one).
    pub pid: Option<i32>,
}

/// The limits, from `[socket]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    pub connections: usize,
    pub status_connections: usize,
    pub per_process: usize,
}

/// What a new connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Requests and control messages, up to `max_requests_per_connection` in flight.
    Full,
    /// Every full connection is taken: `status` (and `result`) only; requests get `busy`.
    StatusOnly,
}

/// Why a new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// This process already holds `limit` connections.
    PerProcess { limit: usize },
}

/// The connections open now. See the module documentation.
#[derive(Debug)]
pub struct Slots {
    limits: SlotLimits,
    full: usize,
    status_only: usize,
    by_peer: HashMap<Peer, usize>,
}

impl Slots {
    pub fn new(limits: SlotLimits) -> Slots {
        Slots {
            limits,
            full: 0,
            status_only: 0,
            by_peer: HashMap::new(),
        }
    }

    /// True while a new connection would get a slot (of either kind); when false the accept loop waits and
    /// clients wait in the listen backlog.
    pub fn has_room(&self) -> bool {
        self.full < self.limits.connections || self.status_only < self.limits.status_connections
    }

    /// Rules, in order: a process at its limit is refused; a full slot if one is free; else a status-only one.
    /// Call only while [`Slots::has_room`].
    pub fn take(&mut self, peer: Peer) -> Result<Slot, SlotRefusal> {
        let held = self.by_peer.get(&peer).copied().unwrap_or(0);
        if held >= self.limits.per_process {
            return Err(SlotRefusal::PerProcess {
                limit: self.limits.per_process,
            });
        }
        let slot = if self.full < self.limits.connections {
            self.full += 1;
            Slot::Full
        } else {
            debug_assert!(self.status_only < self.limits.status_connections);
            self.status_only += 1;
            Slot::StatusOnly
        };
        *self.by_peer.entry(peer).or_default() += 1;
        Ok(slot)
    }

    /// A connection of `peer` holding `slot` closed.
    pub fn release(&mut self, peer: Peer, slot: Slot) {
        match slot {
            Slot::Full => self.full -= 1,
            Slot::StatusOnly => self.status_only -= 1,
        }
        if let Some(n) = self.by_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.by_peer.remove(&peer);
            }
        }
    }

    /// Full and status-only connections open.
    pub fn open(&self) -> (usize, usize) {
        (self.full, self.status_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(pid: i32) -> Peer {
        Peer {
            uid: 1000,
            pid: Some(pid),
        }
    }

    fn slots(connections: usize, status_connections: usize, per_process: usize) -> Slots {
        Slots::new(SlotLimits {
            connections,
            status_connections,
            per_process,
        })
    }

    #[test]
    fn full_slots_come_first_then_status_only_ones_then_none() {
        let mut s = slots(2, 1, 10);
        assert_eq!(s.take(peer(1)), Ok(Slot::Full));
        assert_eq!(s.take(peer(2)), Ok(Slot::Full));
        assert!(s.has_room());
        assert_eq!(s.take(peer(3)), Ok(Slot::StatusOnly));
        assert!(!s.has_room());
        assert_eq!(s.open(), (2, 1));
    }

    #[test]
    fn a_released_full_slot_is_full_again_for_the_next_client() {
        let mut s = slots(1, 1, 10);
        assert_eq!(s.take(peer(1)), Ok(Slot::Full));
        assert_eq!(s.take(peer(2)), Ok(Slot::StatusOnly));
        s.release(peer(1), Slot::Full);
        assert_eq!(s.take(peer(3)), Ok(Slot::Full));
        assert_eq!(s.open(), (1, 1));
    }

    #[test]
    fn one_process_cannot_take_more_than_its_share() {
        let mut s = slots(8, 1, 2);
        assert_eq!(s.take(peer(1)), Ok(Slot::Full));
        assert_eq!(s.take(peer(1)), Ok(Slot::Full));
        assert_eq!(s.take(peer(1)), Err(SlotRefusal::PerProcess { limit: 2 }));
        assert_eq!(
            s.take(peer(2)),
            Ok(Slot::Full),
            "other processes still get in"
        );
        s.release(peer(1), Slot::Full);
        assert_eq!(
            s.take(peer(1)),
            Ok(Slot::Full),
            "a closed connection frees its share"
        );
    }

    #[test]
    fn the_share_counts_status_only_connections_too() {
        let mut s = slots(1, 2, 2);
        assert_eq!(s.take(peer(1)), Ok(Slot::Full));
        assert_eq!(s.take(peer(1)), Ok(Slot::StatusOnly));
        assert_eq!(s.take(peer(1)), Err(SlotRefusal::PerProcess { limit: 2 }));
        assert_eq!(
            s.take(peer(2)),
            Ok(Slot::StatusOnly),
            "the operator's status"
        );
    }
}

//! The bodies a VM's running requests hold in its memory, counted against
//! `max_in_flight_bytes`.
//!
//! A running request holds bodies in the VM across callbacks: a response
//! captured until its record is written, and in forwarding mode the request
//! until it is sent upstream and the upstream's answer until it is relayed.
//! Nothing else bounds how many requests run at once (that is the proxy's
//! connection limits), and a VM that runs out of memory traps: its running
//! claims then lapse unrenewed, and a retry could run again. So past the
//! limit the filter gives up what it can do without:
//!
//! * a response's copy for its record: the record keeps no body, as for a
//!   response over `max_response_body_bytes` (`bodies_omitted`);
//! * in forwarding mode, a new request (its body, or any request once the
//!   count is at the limit): `503` before its key is claimed, so nothing ran
//!   and its retry runs.
//!
//! A forwarded answer is in the VM already when it arrives, whole: it is
//! counted whatever the limit (others then see it), and recorded with its
//! body only if the count stays within the limit. Bytes count from when the
//! filter takes them until it lets them go: a request's body once sent, a
//! capture given up or written, an answer handed to the host. Each counted
//! byte is copied a few more times while a record is encoded and sent
//! (README, "Threat model").

use std::cell::Cell;
use std::rc::Rc;

thread_local! {
    /// A Wasm VM runs on one thread and has its own memory: one count per
    /// VM, shared by every filter configuration that VM runs (`vm_id`).
    static THIS_VM: Rc<InFlightBytes> = Rc::new(InFlightBytes::default());
}

/// The bytes of bodies this VM's running requests hold. Each filter
/// configuration checks it against its own `max_in_flight_bytes`.
#[derive(Debug, Default)]
pub struct InFlightBytes {
    held: Cell<u64>,
}

impl InFlightBytes {
    /// This VM's count.
    pub fn of_this_vm() -> Rc<InFlightBytes> {
        THIS_VM.with(Rc::clone)
    }

    /// Takes `n` more bytes if the count stays within `limit`.
    pub fn try_hold(&self, n: u64, limit: u64) -> bool {
        let held = self.held.get().saturating_add(n);
        if held > limit {
            return false;
        }
        self.held.set(held);
        true
    }

    /// Whether the count is below `limit`: a request that holds nothing yet
    /// may start.
    pub fn has_room(&self, limit: u64) -> bool {
        self.held.get() < limit
    }

    /// Counts `n` bytes already in the VM, whether they fit or not.
    pub fn hold(&self, n: u64) {
        self.held.set(self.held.get().saturating_add(n));
    }

    /// Gives back `n` bytes a request held.
    pub fn release(&self, n: u64) {
        debug_assert!(self.held.get() >= n, "released more than held");
        self.held.set(self.held.get().saturating_sub(n));
    }

    pub fn held(&self) -> u64 {
        self.held.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_up_to_the_limit_and_counts_what_is_already_there() {
        let b = InFlightBytes::default();
        assert!(b.try_hold(60, 100));
        assert!(!b.try_hold(41, 100), "101 is past the limit");
        assert!(b.try_hold(40, 100), "exactly the limit fits");
        assert!(!b.try_hold(1, 100));
        assert!(!b.has_room(100));
        assert!(b.try_hold(1, 200), "another configuration's limit");
        assert!(b.has_room(200));
        b.hold(49);
        assert_eq!(b.held(), 150);
        b.release(150);
        assert_eq!(b.held(), 0);
        assert!(b.try_hold(100, 100));
    }
}

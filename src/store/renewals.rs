//! Claims live as long as their request. Each VM keeps the claims its
//! requests hold and renews them from its tick (a third of the lock timeout
//! after their last renewal), so `lock_timeout_seconds` bounds only a gateway
//! that died, never a slow upstream. A claim leaves the list when its request
//! records or releases it, ends without knowing the outcome, or goes away.
//!
//! Platforms without a tick (APISIX) never register claims: there the lock
//! timeout must outlast `forward.timeout_ms`, which the configuration checks.

use super::Held;
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Renewals {
    /// By the claim's owner token (unique per request).
    held: RefCell<HashMap<u64, Renewing>>,
}

#[derive(Debug, Clone, Copy)]
struct Renewing {
    held: Held,
    /// When its lock deadline was last set (claimed or renewed).
    renewed_ms: u64,
}

impl Renewals {
    /// A request now holds `held`, claimed at `now_ms`.
    pub fn hold(&self, held: Held, now_ms: u64) {
        self.held.borrow_mut().insert(
            held.claim.token,
            Renewing {
                held,
                renewed_ms: now_ms,
            },
        );
    }

    /// The request no longer needs its claim renewed.
    pub fn forget(&self, token: u64) {
        self.held.borrow_mut().remove(&token);
    }

    /// The claims due for renewal: their deadline was set a third of the
    /// lock timeout ago or more, so two renewals can fail before one lapses.
    pub fn due(&self, now_ms: u64, lock_ms: u64) -> Vec<Held> {
        let every = (lock_ms / 3).max(1);
        self.held
            .borrow()
            .values()
            .filter(|r| now_ms.saturating_sub(r.renewed_ms) >= every)
            .map(|r| r.held)
            .collect()
    }

    /// The store renewed (`true`) or no longer holds (`false`) the claim.
    pub fn renewed(&self, token: u64, kept: bool, now_ms: u64) {
        let mut held = self.held.borrow_mut();
        if kept {
            if let Some(r) = held.get_mut(&token) {
                r.renewed_ms = now_ms;
            }
        } else {
            held.remove(&token);
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.held.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Claim;

    fn held(token: u64) -> Held {
        Held {
            claim: Claim {
                slot: 0,
                epoch: 0,
                token,
            },
            digest: [token as u8; 16],
            fingerprint: [0; 16],
        }
    }

    #[test]
    fn claims_are_due_a_third_of_the_lock_after_their_last_renewal() {
        let r = Renewals::default();
        r.hold(held(1), 0);
        r.hold(held(2), 5_000);
        assert!(r.due(9_999, 30_000).is_empty());
        assert_eq!(r.due(10_000, 30_000), vec![held(1)]);
        r.renewed(1, true, 10_000);
        assert_eq!(r.due(15_000, 30_000), vec![held(2)]);
        // A lost claim is no longer renewed; a finished request's leaves.
        r.renewed(2, false, 15_000);
        r.forget(1);
        assert!(r.is_empty());
        // Tiny locks are renewed on every tick, never spun on.
        r.hold(held(3), 0);
        assert_eq!(r.due(1, 2).len(), 1);
    }
}

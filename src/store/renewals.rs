//! Claims live as long as their request. Each VM keeps the claims its
//! requests hold and renews them from its tick, so `lock_timeout_seconds`
//! bounds only a gateway that died, never a slow upstream. A claim leaves
//! the list when its request's record or release has been answered, when
//! it ends without knowing the outcome, or when it goes away.
//!
//! When a claim is renewed follows from when a renewal can land: it is sent
//! at the first tick after it is due (up to [`TICK_MS`] later, plus
//! [`TICK_SLACK_MS`] for a tick that comes late on a busy worker), and on
//! Redis it goes first into the next batch ([`super::group_commit`]), so it
//! waits for the batch in flight (up to twice `store.timeout_ms` when Redis
//! has lost the script and it is sent again by source) and then for its own
//! answer: [`landing_ms`]. A claim is due a third of the lock after
//! its deadline was last set, so that two renewals can fail before one
//! lapses, or sooner where the lock is short, so that one renewal always
//! lands in time; the configuration refuses a lock too short for even that
//! ([`shortest_lock_ms`]). Deadlines are counted from when a claim or
//! renewal was sent, never from its answer: Redis sets the new deadline
//! after the send, so the store's deadline is never earlier than ours.
//!
//! Platforms without a tick (APISIX) never register claims: there the lock
//! timeout must outlast `forward.timeout_ms` plus three times
//! `store.timeout_ms` (the claim's answer, and the record, sent twice after
//! a `NOSCRIPT`), which the configuration checks.

use super::Held;
use std::cell::RefCell;
use std::collections::HashMap;

/// The root context's tick period (Envoy): how often claims can be renewed.
pub const TICK_MS: u64 = 1000;
/// Allowance for a tick that comes late on a busy worker.
pub const TICK_SLACK_MS: u64 = 500;

/// The longest a renewal takes to land once sent, with store calls that
/// take at most `call_ms` (0: the local store, which answers at once): the
/// batch in flight, sent a second time by source after a `NOSCRIPT`, then
/// its own.
pub fn landing_ms(call_ms: u64) -> u64 {
    3 * call_ms
}

/// A lock must be longer than this for its claims to be renewed in time.
/// The worst case is a claim due while its previous renewal is still out
/// (up to [`landing_ms`]), then a tick, then its own renewal (as long again).
pub fn shortest_lock_ms(call_ms: u64) -> u64 {
    TICK_MS + 2 * landing_ms(call_ms) + TICK_SLACK_MS
}

/// How long after its deadline was last set a claim is renewed: a third of
/// the lock, or sooner when that would leave too little time for a renewal
/// to land (see the module note).
pub fn renew_after_ms(lock_ms: u64, call_ms: u64) -> u64 {
    let due_before_end = TICK_MS + landing_ms(call_ms) + TICK_SLACK_MS;
    (lock_ms / 3)
        .min(lock_ms.saturating_sub(due_before_end))
        .max(1)
}

#[derive(Debug, Default)]
pub struct Renewals {
    /// By the claim's owner token (unique per request).
    held: RefCell<HashMap<u64, Renewing>>,
}

#[derive(Debug, Clone, Copy)]
struct Renewing {
    held: Held,
    /// When its deadline was last set (the claim or renewal was sent).
    set_ms: u64,
    /// A renewal of it is out (Redis): no second one until it is answered.
    out: bool,
}

impl Renewals {
    /// A request now holds `held`, whose claim was sent at `set_ms`.
    pub fn hold(&self, held: Held, set_ms: u64) {
        self.held.borrow_mut().insert(
            held.claim.token,
            Renewing {
                held,
                set_ms,
                out: false,
            },
        );
    }

    /// The request no longer needs its claim renewed.
    pub fn forget(&self, token: u64) {
        self.held.borrow_mut().remove(&token);
    }

    /// The claims due for renewal at `now_ms`: set `after_ms` ago or more
    /// ([`renew_after_ms`]), with no renewal out.
    pub fn due(&self, now_ms: u64, after_ms: u64) -> Vec<Held> {
        self.held
            .borrow()
            .values()
            .filter(|r| !r.out && now_ms.saturating_sub(r.set_ms) >= after_ms)
            .map(|r| r.held)
            .collect()
    }

    /// A renewal of the claim `token` was sent; its answer is awaited.
    pub fn sent(&self, token: u64) {
        if let Some(r) = self.held.borrow_mut().get_mut(&token) {
            r.out = true;
        }
    }

    /// The store renewed (`true`) or no longer holds (`false`) the claim,
    /// by a renewal sent at `sent_ms`. Whether a claim this VM still renews
    /// was renewed (not one its request has since recorded or released).
    pub fn renewed(&self, token: u64, kept: bool, sent_ms: u64) -> bool {
        let mut held = self.held.borrow_mut();
        if !kept {
            held.remove(&token);
            return false;
        }
        match held.get_mut(&token) {
            Some(r) => {
                r.set_ms = r.set_ms.max(sent_ms);
                r.out = false;
                true
            }
            None => false,
        }
    }

    /// A renewal got no verdict (the store failed): the next tick tries
    /// again.
    pub fn failed(&self, token: u64) {
        if let Some(r) = self.held.borrow_mut().get_mut(&token) {
            r.out = false;
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
    fn long_locks_are_renewed_a_third_of_the_lock_after_their_deadline_was_set() {
        let after = renew_after_ms(30_000, 500);
        assert_eq!(after, 10_000);
        let r = Renewals::default();
        r.hold(held(1), 0);
        r.hold(held(2), 5_000);
        assert!(r.due(9_999, after).is_empty());
        assert_eq!(r.due(10_000, after), vec![held(1)]);
        r.renewed(1, true, 10_000);
        assert_eq!(r.due(15_000, after), vec![held(2)]);
        // A lost claim is no longer renewed; a finished request's leaves.
        r.renewed(2, false, 15_000);
        r.forget(1);
        assert!(r.is_empty());
    }

    #[test]
    fn short_locks_are_renewed_early_enough_for_the_renewal_to_land() {
        // Local store, 2 s lock: due after 500 ms, so the first tick past
        // it (at most 1 s later, plus 0.5 s late) still renews in time.
        assert_eq!(renew_after_ms(2_000, 0), 500);
        assert_eq!(renew_after_ms(5_000, 500), 1_666);
        // The shortest lock each store allows (the configuration checks it).
        assert_eq!(shortest_lock_ms(0), 1_500);
        assert_eq!(shortest_lock_ms(500), 4_500);
        // Tiny locks are renewed on every tick, never spun on.
        assert_eq!(renew_after_ms(2, 0), 1);
    }

    /// Every lock the configuration accepts keeps its claim through the
    /// worst timing: every tick as late as the slack allows, each renewal
    /// answered at the last moment ([`landing_ms`]), the store's deadline
    /// counted from the send;
    /// for claims made at any moment between two ticks.
    #[test]
    fn an_accepted_lock_never_lapses_between_renewals() {
        let period = TICK_MS + TICK_SLACK_MS;
        for call_ms in [0, 100, 500, 2_000] {
            for lock_ms in (shortest_lock_ms(call_ms) + 1..=30_000).step_by(250) {
                for first_tick in (1..=period).step_by(100) {
                    let after = renew_after_ms(lock_ms, call_ms);
                    let r = Renewals::default();
                    r.hold(held(1), 0);
                    let mut deadline = lock_ms;
                    let mut out: Option<(u64, u64)> = None; // (sent, lands)
                    let mut tick = first_tick;
                    while tick < 120_000 {
                        if let Some((sent, lands)) = out.filter(|&(_, lands)| lands <= tick) {
                            assert!(
                                lands < deadline,
                                "lock {lock_ms} call {call_ms}: a renewal landed at {lands}, after the deadline {deadline}"
                            );
                            deadline = sent + lock_ms;
                            r.renewed(1, true, sent);
                            out = None;
                        }
                        assert!(
                            tick < deadline || out.is_some_and(|(_, lands)| lands < deadline),
                            "lock {lock_ms} call {call_ms}: lapsed at {deadline}"
                        );
                        for h in r.due(tick, after) {
                            r.sent(h.claim.token);
                            out = Some((tick, tick + landing_ms(call_ms)));
                        }
                        tick += period;
                    }
                }
            }
        }
    }

    #[test]
    fn a_claim_with_a_renewal_out_is_not_sent_again_until_it_is_answered() {
        let r = Renewals::default();
        r.hold(held(1), 0);
        assert_eq!(r.due(1_000, 500), vec![held(1)]);
        r.sent(1);
        assert!(r.due(2_000, 500).is_empty());
        // No verdict (the store failed): tried again at the next tick.
        r.failed(1);
        assert_eq!(r.due(2_000, 500), vec![held(1)]);
        r.sent(1);
        r.renewed(1, true, 2_000);
        assert!(r.due(2_499, 500).is_empty());
        assert_eq!(r.due(2_500, 500), vec![held(1)]);
    }
}

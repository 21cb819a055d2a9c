//! Time for deadlines: the wall clock's meaning, the monotonic clock's
//! steadiness.
//!
//! Lock deadlines and expiries in the local store are compared by every
//! worker of the process, and a forwarded call's wait is measured across
//! callbacks. The wall clock can be stepped (NTP at boot or after a large
//! drift, a VM resumed): stepped forward, every running claim would look
//! abandoned at once and its retry would run again; stepped back, a call
//! that timed out would look as if it never waited. So readings are the
//! monotonic clock plus one offset, the wall clock minus the monotonic one
//! as sampled once: they mean wall-clock milliseconds (records written
//! before this clock existed keep their meaning), and never jump.
//!
//! Every VM of one Envoy process must add the same offset, or their
//! deadlines would disagree by any step taken between their starts: the
//! first VM to configure (the main thread's, before the workers start)
//! keeps its offset in shared data, and every later VM takes it from
//! there. Without shared data (APISIX) each VM samples its own, which is
//! enough there: its deadlines live in Redis, as durations.

use crate::store::SharedData;

/// Where the process's offset is kept. One key, written once.
pub const OFFSET_KEY: &str = "idempotency/clock-offset/v1";

/// A reading: the monotonic clock plus the offset, in milliseconds.
pub fn reading(monotonic_ms: u64, offset_ms: i64) -> u64 {
    let ms = i128::from(monotonic_ms) + i128::from(offset_ms);
    u64::try_from(ms.max(0)).unwrap_or(u64::MAX)
}

/// The offset this VM samples: the wall clock minus the monotonic one.
pub fn sampled_offset(wall_ms: u64, monotonic_ms: u64) -> i64 {
    let offset = i128::from(wall_ms) - i128::from(monotonic_ms);
    i64::try_from(offset).unwrap_or(0)
}

/// The offset every VM of the process uses: the one in shared data, or
/// `own` put there first. Of two VMs starting at once only one creates the
/// key (a set that a key created meanwhile refuses); the other reads back
/// the first one's. Any failure: `own`.
pub fn shared_offset<S: SharedData>(shared: &S, own: i64) -> i64 {
    let stored = || -> Option<i64> {
        let (bytes, _) = shared.shared_get(OFFSET_KEY).ok()??;
        Some(i64::from_le_bytes(bytes.try_into().ok()?))
    };
    if let Some(offset) = stored() {
        return offset;
    }
    let _ = shared.set_if_unchanged(OFFSET_KEY, &own.to_le_bytes(), None);
    stored().unwrap_or(own)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::FakeHost;

    #[test]
    fn readings_mean_wall_clock_time_and_follow_the_monotonic_clock_only() {
        // Sampled at wall 1,700,000,000,000 ms, monotonic 5,000 ms.
        let offset = sampled_offset(1_700_000_000_000, 5_000);
        assert_eq!(reading(5_000, offset), 1_700_000_000_000);
        // 30 s later on the monotonic clock, whatever the wall clock did.
        assert_eq!(reading(35_000, offset), 1_700_000_030_000);
        assert_eq!(reading(0, -10), 0, "never below zero");
        assert_eq!(reading(u64::MAX, i64::MAX), u64::MAX, "never wraps");
    }

    #[test]
    fn every_vm_of_a_process_adds_the_first_ones_offset() {
        let host = FakeHost::default();
        assert_eq!(shared_offset(&host, 100), 100, "the first VM keeps its own");
        // A VM configured later, after the wall clock was stepped 60 s
        // forward, still reads the same time as the first.
        assert_eq!(shared_offset(&host, 60_100), 100);
        // Unreadable or foreign bytes: the VM's own, never a panic.
        let odd = FakeHost::default();
        odd.shared_set(OFFSET_KEY, b"x", None).unwrap();
        assert_eq!(shared_offset(&odd, 7), 7);
    }

    #[test]
    fn of_two_vms_starting_at_once_the_second_takes_the_first_ones_offset() {
        let host = FakeHost::default();
        // This VM found no offset; before its write lands, another VM,
        // sampled before a 60 s step, puts its own there.
        host.shared.before_next_set(Box::new(|shared| {
            shared
                .shared_set(OFFSET_KEY, &100i64.to_le_bytes(), None)
                .unwrap();
        }));
        assert_eq!(shared_offset(&host, 60_100), 100, "not its own");
        assert_eq!(
            host.shared.peek(OFFSET_KEY),
            Some(100i64.to_le_bytes().to_vec())
        );
    }
}

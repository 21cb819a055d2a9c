//! The local store's upkeep on the tick: each tick sweeps a share of the
//! table, so that a full pass takes [`SWEEP_TICKS_PER_PASS`] ticks, and the
//! entries gauge is reset once per pass.

use super::local::LocalTable;
use crate::host::{Host, Level};
use crate::metrics::Metric;
use std::cell::Cell;

/// Sweeping the whole table takes this many ticks; each VM sweeps its share.
pub const SWEEP_TICKS_PER_PASS: u32 = 30;

#[derive(Debug, Default)]
pub struct Sweep {
    cursor: Cell<u32>,
    /// Buckets swept and occupied slots seen in the current full pass.
    pass: Cell<(u32, u64)>,
}

impl Sweep {
    /// Creates the table in shared data and picks where this VM starts.
    pub fn start(&self, host: &impl Host, table: &LocalTable) -> Result<(), String> {
        match table.init(host) {
            Ok(created) => {
                if created > 0 {
                    host.log(
                        Level::Info,
                        &format!(
                            "local store ready, {} slots in {} buckets",
                            table.capacity(),
                            table.buckets()
                        ),
                    );
                }
            }
            Err(e) => return Err(format!("cannot create the local store in shared data: {e}")),
        }
        // Start each VM's sweep somewhere else so several VMs spread out.
        let start = (host.random_u64() % u64::from(table.buckets().max(1))) as u32;
        self.cursor.set(start);
        Ok(())
    }

    /// Sweeps this tick's share. Returns the entries gauge's value when a
    /// full pass has just ended.
    pub fn tick(&self, host: &impl Host, table: &LocalTable, now_ms: u64) -> Option<u64> {
        let buckets = table.buckets().max(1);
        let per_tick = buckets.div_ceil(SWEEP_TICKS_PER_PASS).max(1);
        let first = self.cursor.get();
        self.cursor.set(first.wrapping_add(per_tick) % buckets);
        let stats = table.sweep(host, first, per_tick, now_ms);
        if stats.freed > 0 {
            host.metric_add(Metric::Expired, i64::from(stats.freed));
            host.metric_add(Metric::Entries, -i64::from(stats.freed));
        }
        stats.space.report(host);
        if stats.errors > 0 {
            host.metric_add(Metric::StoreErrors, i64::from(stats.errors));
            host.log(
                Level::Warn,
                &format!("sweep: {} buckets could not be swept", stats.errors),
            );
        }
        // The entries gauge moves by +1/-1 steps as requests run; once per
        // full pass it is reset to the occupancy this pass saw, so lost
        // steps cannot accumulate. That count is gathered over the pass
        // (30 s), so it is approximate while the table changes.
        let (swept, occupied) = self.pass.get();
        let (swept, occupied) = (swept + per_tick, occupied + stats.occupied);
        if swept >= buckets {
            self.pass.set((0, 0));
            Some(occupied)
        } else {
            self.pass.set((swept, occupied));
            None
        }
    }
}

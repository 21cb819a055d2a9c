//! The filter's clock on the host: WASI's monotonic clock plus the offset
//! of [`crate::clock`], shared by every VM of an Envoy process.

use super::abi::host_log;
use crate::clock;
use crate::host::Level;
use crate::store::SharedData;
use std::cell::Cell;

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    /// WASI's clock (std imports it too): Envoy and APISIX's wasmtime both
    /// implement it, realtime and monotonic, unlike the proxy-wasm clock
    /// call that APISIX answers UNIMPLEMENTED.
    fn clock_time_get(clock_id: u32, precision: u64, time: *mut u64) -> u16;
}

const MONOTONIC: u32 = 1;

thread_local! {
    /// This VM's offset from the monotonic clock (see `crate::clock`).
    static CLOCK_OFFSET: Cell<Option<i64>> = const { Cell::new(None) };
    /// The missing monotonic clock was logged.
    static NO_MONOTONIC_LOGGED: Cell<bool> = const { Cell::new(false) };
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn monotonic_ms() -> Option<u64> {
    let mut ns: u64 = 0;
    (unsafe { clock_time_get(MONOTONIC, 1_000_000, &mut ns) } == 0).then_some(ns / 1_000_000)
}

/// Wall-clock milliseconds that never jump (`crate::clock`). A host
/// without a monotonic clock (none known) gets the wall clock, logged once:
/// the same scale, steps included.
pub(super) fn now_ms() -> u64 {
    let Some(monotonic) = monotonic_ms() else {
        if !NO_MONOTONIC_LOGGED.replace(true) {
            host_log(
                Level::Warn,
                "no monotonic clock: deadlines follow the wall clock, steps included",
            );
        }
        return wall_ms();
    };
    let offset = CLOCK_OFFSET.get().unwrap_or_else(|| {
        let own = clock::sampled_offset(wall_ms(), monotonic);
        CLOCK_OFFSET.set(Some(own));
        own
    });
    clock::reading(monotonic, offset)
}

/// Takes the process's clock offset from shared data (Envoy), so that
/// every VM of the process reads the same time.
pub(super) fn share_clock(shared: &impl SharedData) {
    if let Some(monotonic) = monotonic_ms() {
        let own = clock::sampled_offset(wall_ms(), monotonic);
        CLOCK_OFFSET.set(Some(clock::shared_offset(shared, own)));
    }
}

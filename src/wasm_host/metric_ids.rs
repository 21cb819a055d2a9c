//! The filter's metrics as the host knows them: ids defined once per VM.

use super::abi::{host_log, proxy_define_metric, proxy_increment_metric, proxy_record_metric, OK};
use crate::host::Level;
use crate::metrics::Metric;
use std::cell::RefCell;

/// Metric ids of this VM, indexed by [`Metric::index`].
#[derive(Default)]
pub(super) struct MetricIds {
    ids: RefCell<Vec<Option<u32>>>,
}

impl MetricIds {
    pub(super) fn define(&self) {
        let mut ids = self.ids.borrow_mut();
        if !ids.is_empty() {
            return;
        }
        for m in Metric::ALL {
            let mut id = 0u32;
            let kind = if m.is_gauge() { 1 } else { 0 };
            let status =
                unsafe { proxy_define_metric(kind, m.name().as_ptr(), m.name().len(), &mut id) };
            if status == OK {
                ids.push(Some(id));
            } else {
                host_log(
                    Level::Warn,
                    &format!("metric {} unavailable (status {status})", m.name()),
                );
                ids.push(None);
            }
        }
    }

    pub(super) fn set(&self, m: Metric, value: u64) {
        if let Some(Some(id)) = self.ids.borrow().get(m.index()) {
            let _ = unsafe { proxy_record_metric(*id, value) };
        }
    }

    pub(super) fn add(&self, m: Metric, delta: i64) {
        profile!(12);
        if let Some(Some(id)) = self.ids.borrow().get(m.index()) {
            let _ = unsafe { proxy_increment_metric(*id, delta) };
        }
    }
}

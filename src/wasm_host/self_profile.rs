//! `--features self-profile`: time spent inside each callback (host calls
//! made from it included), logged every tick. A profiling build only: the
//! clock reads add two host calls per callback.

use std::cell::RefCell;
pub const NAMES: [&str; 15] = [
    "context_create",
    "request_headers",
    "request_body",
    "response_headers",
    "response_body",
    "call_response",
    "done",
    "tick",
    "host:get_pairs",
    "host:get_body",
    "host:shared_get",
    "host:shared_set",
    "host:metric",
    "host:send_response",
    "host:clock",
];
thread_local! {
    static TOTALS: RefCell<[(u64, u64); 15]> = const { RefCell::new([(0, 0); 15]) };
}
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
pub struct Span(usize, u64);
pub fn span(i: usize) -> Span {
    Span(i, now_ns())
}
impl Drop for Span {
    fn drop(&mut self) {
        let dt = now_ns().saturating_sub(self.1);
        TOTALS.with(|t| {
            let mut t = t.borrow_mut();
            if let Some(e) = t.get_mut(self.0) {
                e.0 += dt;
                e.1 += 1;
            }
        });
    }
}
/// The totals since the last report, which starts the next window.
pub fn report() -> String {
    TOTALS.with(|t| {
        let t = std::mem::take(&mut *t.borrow_mut());
        let mut out = String::from("self-profile (calls, mean us):");
        for (i, (ns, n)) in t.iter().enumerate() {
            if *n > 0 {
                out.push_str(&format!(
                    " {}={} {:.2}",
                    NAMES[i],
                    n,
                    *ns as f64 / *n as f64 / 1000.0
                ));
            }
        }
        out
    })
}

#![no_main]
//! Bytes found in shared data: recorded responses and slot-table buckets.
use idempotency_filter::record::DataRecord;
use idempotency_filter::store::local::Bucket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = DataRecord::decode(data) {
        assert_eq!(DataRecord::decode(&rec.encode()).ok(), Some(rec));
    }
    let _ = DataRecord::peek_owner(data);
    for ways in [1, 16] {
        if let Ok(bucket) = Bucket::decode(data, ways) {
            assert_eq!(bucket.encode(), data);
        }
    }
});

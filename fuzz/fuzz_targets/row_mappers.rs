//! The row mappers turn any record into a row or a dead-letter reason,
//! never a panic.
#![no_main]

mod input;

use libfuzzer_sys::fuzz_target;
use sink_clickhouse::{RawEventMapper, RowMapper, RowMeta};

fuzz_target!(|data: &[u8]| {
    let record = input::record(data);
    let meta = RowMeta {
        event_id: uuid::Uuid::nil(),
        kafka_partition: record.position.partition,
        kafka_offset: record.position.offset,
        ingested_at: 0,
    };
    let _ = RawEventMapper.map(&record, meta.clone());
    let _ = examples::UserLoginMapper.map(&record, meta);
});

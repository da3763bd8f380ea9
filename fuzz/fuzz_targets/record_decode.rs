//! Record decoding must never panic: event id, event rebuild, JSON payload.
#![no_main]

mod input;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let record = input::record(data);
    if let Ok(id) = record.event_id() {
        // A decoded id is the header's UUID, whatever its spelling.
        let header = &record.headers[outbox_core::HEADER_EVENT_ID];
        assert_eq!(uuid::Uuid::parse_str(header).ok(), Some(id));
    }
    if let Ok(event) = record.to_event() {
        assert!(event.headers.keys().all(|k| !k.starts_with("outbox-")));
    }
    let _ = record.json::<serde_json::Value>();
});

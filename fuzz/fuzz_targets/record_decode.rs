//! Record decoding must never panic: event id, event rebuild, JSON payload.
//! A decoded id is the one the headers name: our event id header when
//! present, else CloudEvents' `ce_id` (its UUID, or a name-based UUID of
//! `ce_source` and `ce_id`).
#![no_main]

mod input;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let record = input::record(data);
    if let Ok(id) = record.event_id() {
        let header = |name: &str| record.headers.get(name).map(String::as_str);
        match header(outbox_core::HEADER_EVENT_ID) {
            // Our header wins, whatever its spelling.
            Some(ours) => assert_eq!(uuid::Uuid::parse_str(ours).ok(), Some(id)),
            None => {
                let ce_id = header(outbox_core::HEADER_CE_ID).unwrap_or_default();
                assert!(!ce_id.is_empty(), "an id from no id header");
                if let Ok(parsed) = uuid::Uuid::parse_str(ce_id) {
                    assert_eq!(parsed, id);
                } else {
                    // Name-based: the same headers give the same id, and
                    // another source gives another one.
                    assert_eq!(id.get_version_num(), 5);
                    assert_eq!(record.event_id().ok(), Some(id));
                    let mut other = record.clone();
                    let source = header(outbox_core::HEADER_CE_SOURCE).unwrap_or_default();
                    other.headers.insert(
                        outbox_core::HEADER_CE_SOURCE.to_string(),
                        format!("{source}/other"),
                    );
                    assert_ne!(other.event_id().ok(), Some(id));
                }
            }
        }
    }
    if let Ok(event) = record.to_event() {
        assert!(event.headers.keys().all(|k| !k.starts_with("outbox-")));
    }
    let _ = record.json::<serde_json::Value>();
});

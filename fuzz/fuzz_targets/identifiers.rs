//! Identifier validation: whatever it accepts renders as SQL that cannot
//! break out of its quoting; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = outbox_pg::SqlName::parse(text) {
        let rendered = name.to_string();
        // Quoted parts of letters, digits and '_' only, joined by one '.'.
        let inner: String = rendered
            .chars()
            .filter(|c| *c != '"' && *c != '.')
            .collect();
        assert!(
            inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{rendered}"
        );
        assert_eq!(rendered.matches('"').count() % 2, 0, "{rendered}");
        assert_eq!(outbox_pg::SqlName::parse(&name.plain()).ok(), Some(name));
    }
    if let Ok(ident) = outbox_pg::SqlIdent::parse(text) {
        let rendered = ident.to_string();
        assert!(!rendered.trim_matches('"').contains('"'), "{rendered}");
    }
    if sink_clickhouse::validate_identifier("fuzz", text).is_ok() {
        assert!(!text.contains('`') && !text.contains('\\'), "{text}");
    }
});

//! Sustained-load helpers of the test binaries that time claims
//! (`retention`, `statistics`).

use outbox_core::{Delivery, Event, Source};
use outbox_pg::{Outbox, PgOutboxSource};

use crate::common::ack;

/// Commits `n` events of round `round` in one transaction, on 97 keys.
pub async fn enqueue_round(
    client: &mut deadpool_postgres::Object,
    outbox: &Outbox,
    round: usize,
    n: usize,
) {
    let events: Vec<Event> = (0..n)
        .map(|i| {
            Event::new("t", format!("{{\"r\":{round},\"i\":{i}}}")).with_key(format!("k{}", i % 97))
        })
        .collect();
    let tx = client.transaction().await.unwrap();
    outbox.enqueue(&tx, &events).await.unwrap();
    tx.commit().await.unwrap();
}

/// Claims and acknowledges batches of up to 1,000 until nothing is pending.
/// Returns the events claimed and the mean time of one claim plus its
/// acknowledgement, in ms.
pub async fn drain(source: &PgOutboxSource) -> (usize, f64) {
    let started = std::time::Instant::now();
    let (mut events, mut claims) = (0usize, 0u32);
    while let Some(claimed) = source.claim(1000).await.unwrap() {
        events += claimed.events.len();
        let acks: Vec<Delivery> = (0..claimed.events.len()).map(|i| ack(i as i64)).collect();
        source.acknowledge(claimed, &acks).await.unwrap();
        claims += 1;
    }
    let per_claim = started.elapsed().as_secs_f64() * 1000.0 / f64::from(claims.max(1));
    (events, per_claim)
}

/// The median of `v` (the upper one of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

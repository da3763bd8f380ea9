//! The rules that keep a key's order across partly failed publishes: hold
//! back what follows a failure, probe a failing key with its first event
//! alone, and count the gaps a producer can leave.

use std::collections::HashSet;

use bytes::Bytes;

use crate::bus::Delivery;
use crate::Event;

/// Keys (topic, key) whose earliest pending event failed to publish.
pub(crate) type FailingKeys = HashSet<(String, Bytes)>;

/// More failing keys than this are forgotten at once (each is then published
/// whole again): a bound on memory, not on correctness.
const MAX_FAILING_KEYS: usize = 100_000;

/// Keys (topic, key) of `events` whose answer was [`Delivery::Retryable`].
pub(crate) fn retryable_keys(events: &[Event], deliveries: &[Delivery]) -> FailingKeys {
    events
        .iter()
        .zip(deliveries)
        .filter(|(_, delivery)| matches!(delivery, Delivery::Retryable(_)))
        .filter_map(|(event, _)| event.key.clone().map(|key| (event.topic.clone(), key)))
        .collect()
}

/// Whether `event`'s key is one of `keys` (an event without a key never is).
pub(crate) fn key_in(keys: &FailingKeys, event: &Event) -> bool {
    event
        .key
        .as_ref()
        .is_some_and(|key| keys.contains(&(event.topic.clone(), key.clone())))
}

/// Keys of `events` whose answers put an acknowledgement after a retryable
/// failure: the broker took a later event of the key while an earlier one
/// failed. Unless that failure was only a lost acknowledgement (the event
/// is on the broker after all), the key's order on the topic is already
/// broken, which no retry undoes: a consumer that keeps the first copy of
/// each event writes the later event first. A bus that keeps each
/// partition's order fails the later events with the earlier one (see
/// [`Bus::publish`](crate::Bus::publish)); librdkafka can leave such a gap when queued messages
/// reach their `message.timeout.ms` at different moments, so the relay
/// counts and reports these keys instead of assuming they cannot happen.
///
/// ```
/// use outbox_core::{keys_with_order_gaps, Delivery, Event, Position};
///
/// let events = vec![Event::new("t", "1").with_key("k"), Event::new("t", "2").with_key("k")];
/// let acked = Delivery::Acknowledged(Position { partition: 0, offset: 9 });
/// let gaps = keys_with_order_gaps(&events, &[Delivery::Retryable("timeout".into()), acked]);
/// assert_eq!(gaps, vec![("t".to_string(), bytes::Bytes::from_static(b"k"))]);
/// ```
pub fn keys_with_order_gaps(events: &[Event], deliveries: &[Delivery]) -> Vec<(String, Bytes)> {
    let mut failed: HashSet<(&str, &Bytes)> = HashSet::new();
    let mut gaps: Vec<(String, Bytes)> = Vec::new();
    for (event, delivery) in events.iter().zip(deliveries) {
        let Some(key) = event.key.as_ref() else {
            continue;
        };
        let scoped = (event.topic.as_str(), key);
        match delivery {
            Delivery::Retryable(_) => {
                failed.insert(scoped);
            }
            Delivery::Acknowledged(_) if failed.remove(&scoped) => {
                gaps.push((event.topic.clone(), key.clone()));
            }
            _ => {}
        }
    }
    gaps
}

/// Keeps per-key order across a partly failed batch.
///
/// When an event of key K was not acknowledged (retryable), a later event of
/// K that was acknowledged must not be completed: the earlier one would then
/// be published after it. Such events are turned into
/// [`Delivery::Retryable`], so both are published again, in order. Events
/// without a key have no order to keep.
///
/// ```
/// use outbox_core::{hold_back_after_failures, Delivery, Event, Position};
///
/// let events = vec![Event::new("t", "1").with_key("k"), Event::new("t", "2").with_key("k")];
/// let acked = Delivery::Acknowledged(Position { partition: 0, offset: 9 });
/// let out = hold_back_after_failures(&events, vec![Delivery::Retryable("timeout".into()), acked]);
/// assert!(matches!(out[1], Delivery::Retryable(_)));
/// ```
pub fn hold_back_after_failures(events: &[Event], deliveries: Vec<Delivery>) -> Vec<Delivery> {
    let mut failed_keys: HashSet<(&str, &Bytes)> = HashSet::new();
    events
        .iter()
        .zip(deliveries)
        .map(|(event, delivery)| {
            let Some(key) = event.key.as_ref() else {
                return delivery;
            };
            let scoped = (event.topic.as_str(), key);
            match delivery {
                Delivery::Retryable(reason) => {
                    failed_keys.insert(scoped);
                    Delivery::Retryable(reason)
                }
                Delivery::Acknowledged(_) if failed_keys.contains(&scoped) => Delivery::Retryable(
                    "held back: an earlier event of the same key was not acknowledged".into(),
                ),
                other => other,
            }
        })
        .collect()
}

/// Which events of a claimed batch to publish now: all, except that of a key
/// in `failing` (its earliest event was not taken by the broker last time)
/// only the first event is published. The rest of such a key would be
/// held back anyway (see [`hold_back_after_failures`]); not publishing them
/// keeps a poison event from making copies of its key's later events every
/// round.
///
/// ```
/// use std::collections::HashSet;
/// use outbox_core::{probe_failing_keys, Event};
///
/// let events = vec![
///     Event::new("t", "1").with_key("k"),
///     Event::new("t", "2").with_key("other"),
///     Event::new("t", "3").with_key("k"),
/// ];
/// let failing = HashSet::from([("t".to_string(), bytes::Bytes::from_static(b"k"))]);
/// assert_eq!(probe_failing_keys(&events, &failing), vec![true, true, false]);
/// ```
pub fn probe_failing_keys(events: &[Event], failing: &HashSet<(String, Bytes)>) -> Vec<bool> {
    if failing.is_empty() {
        return vec![true; events.len()];
    }
    let mut probed: HashSet<(&str, &Bytes)> = HashSet::new();
    events
        .iter()
        .map(|event| match &event.key {
            Some(key) if failing.contains(&(event.topic.clone(), key.clone())) => {
                probed.insert((event.topic.as_str(), key))
            }
            _ => true,
        })
        .collect()
}

/// After a publish: a key whose first published event was not taken (the
/// broker's answer was retryable) is failing; one whose first event was
/// acknowledged or dead-lettered is not any more.
pub(crate) fn update_failing_keys(
    failing: &mut FailingKeys,
    events: &[Event],
    published: &[bool],
    deliveries: &[Delivery],
) {
    let mut seen: HashSet<(&str, &Bytes)> = HashSet::new();
    for ((event, now), delivery) in events.iter().zip(published).zip(deliveries) {
        let Some(key) = &event.key else { continue };
        if !*now || !seen.insert((event.topic.as_str(), key)) {
            continue;
        }
        let scoped = (event.topic.clone(), key.clone());
        match delivery {
            Delivery::Retryable(_) => {
                if failing.len() >= MAX_FAILING_KEYS {
                    failing.clear();
                }
                failing.insert(scoped);
            }
            Delivery::Acknowledged(_) | Delivery::Rejected(_) => {
                failing.remove(&scoped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Position;

    #[test]
    fn holds_back_only_the_failed_key() {
        let events = vec![
            Event::new("t", "a1").with_key("a"),
            Event::new("t", "b1").with_key("b"),
            Event::new("t", "a2").with_key("a"),
            Event::new("t", "n"),
        ];
        let ack = |offset| {
            Delivery::Acknowledged(Position {
                partition: 0,
                offset,
            })
        };
        let out = hold_back_after_failures(
            &events,
            vec![Delivery::Retryable("x".into()), ack(1), ack(2), ack(3)],
        );
        assert!(matches!(out[0], Delivery::Retryable(_)));
        assert_eq!(out[1], ack(1));
        assert!(matches!(out[2], Delivery::Retryable(_)));
        assert_eq!(out[3], ack(3));
    }
}

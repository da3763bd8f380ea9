//! Where an event's time goes inside the relay and the consumer: the
//! per-batch debug lines the binaries log (as JSON) during a latency run,
//! summed into the time budget of one event.

use std::path::Path;

use serde_json::Value;

/// The mean of each stage over the batches of one log, weighted by the
/// events of each batch (so it is what the average event waited there).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Batches logged.
    pub batches: usize,
    /// Mean events per batch.
    pub mean_batch: f64,
    /// (stage field, event-weighted mean in ms).
    pub stages: Vec<(&'static str, f64)>,
}

/// The budget of the lines of `text` whose message is `message`, over the
/// millisecond fields `stages` and the batch size `batch_len`.
pub fn budget(text: &str, message: &str, stages: &[&'static str]) -> Budget {
    let mut batches = 0usize;
    let mut events = 0.0;
    let mut sums = vec![0.0; stages.len()];
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let fields = &record["fields"];
        if fields["message"].as_str() != Some(message) {
            continue;
        }
        let Some(len) = number(&fields["batch_len"]) else {
            continue;
        };
        batches += 1;
        events += len;
        for (sum, stage) in sums.iter_mut().zip(stages) {
            *sum += len * number(&fields[*stage]).unwrap_or(0.0);
        }
    }
    let per_event = |sum: f64| if events > 0.0 { sum / events } else { f64::NAN };
    Budget {
        batches,
        mean_batch: if batches > 0 {
            events / batches as f64
        } else {
            f64::NAN
        },
        stages: stages
            .iter()
            .zip(sums)
            .map(|(stage, sum)| (*stage, per_event(sum)))
            .collect(),
    }
}

/// [`budget`] of the log file at `path` (empty when it cannot be read).
pub fn budget_of(path: &Path, message: &str, stages: &[&'static str]) -> Budget {
    budget(
        &std::fs::read_to_string(path).unwrap_or_default(),
        message,
        stages,
    )
}

fn number(value: &Value) -> Option<f64> {
    value
        .as_f64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_weighted_by_the_events_of_each_batch() {
        let text = [
            r#"{"level":"DEBUG","fields":{"message":"relay batch acknowledged","batch_len":10,"claim_ms":1,"publish_ms":30,"ack_ms":2}}"#,
            r#"{"level":"DEBUG","fields":{"message":"relay batch acknowledged","batch_len":30,"claim_ms":5,"publish_ms":10,"ack_ms":"2"}}"#,
            r#"{"level":"INFO","fields":{"message":"something else","batch_len":1000}}"#,
            "not json",
        ]
        .join("\n");
        let b = budget(
            &text,
            "relay batch acknowledged",
            &["claim_ms", "publish_ms", "ack_ms"],
        );
        assert_eq!(b.batches, 2);
        assert_eq!(b.mean_batch, 20.0);
        assert_eq!(
            b.stages,
            vec![("claim_ms", 4.0), ("publish_ms", 15.0), ("ack_ms", 2.0)]
        );
        let empty = budget("", "relay batch acknowledged", &["claim_ms"]);
        assert!(empty.mean_batch.is_nan() && empty.stages[0].1.is_nan());
    }
}

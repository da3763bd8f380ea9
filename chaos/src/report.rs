//! What a run did and found, as the one summary line the scripts read.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::verify::Counts;

/// The attacks made, and what the harness had to repair.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) relay_kills: u32,
    pub(crate) relay_stops: u32,
    pub(crate) consumer_kills: u32,
    pub(crate) long_pauses: u32,
    pub(crate) unexpected_exits: u32,
    pub(crate) service_restarts: BTreeMap<&'static str, u32>,
    pub(crate) broker_panic_restarts: u32,
    /// Paths cut (blackholed or reset), by process kind and service.
    pub(crate) partitions: BTreeMap<String, u32>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Passed,
    Violated,
    DidNotDrain,
}

impl Verdict {
    /// A violation is certain even when the run did not drain.
    pub(crate) fn of(counts: &Counts, drained: bool) -> Self {
        let violated = counts.lost > 0
            || counts.duplicated > 0
            || counts.phantom > 0
            || counts.out_of_order > 0;
        match (violated, drained) {
            (true, _) => Verdict::Violated,
            (false, true) => Verdict::Passed,
            (false, false) => Verdict::DidNotDrain,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Passed => "PASS",
            Verdict::Violated => "FAIL",
            Verdict::DidNotDrain => "DID-NOT-DRAIN",
        }
    }
}

/// Everything the summary line reports.
pub(crate) struct Summary<'a> {
    pub(crate) verdict: Verdict,
    pub(crate) seed: u64,
    pub(crate) duration: Duration,
    pub(crate) committed: usize,
    pub(crate) rolled_back: u64,
    pub(crate) attempted: u64,
    pub(crate) in_clickhouse: usize,
    pub(crate) counts: &'a Counts,
    pub(crate) dead_letters: i64,
    pub(crate) tally: &'a Tally,
    pub(crate) unsafe_relay: bool,
    pub(crate) idempotence: bool,
    /// What the relays read (`outbox` or `wal`).
    pub(crate) source: &'static str,
}

impl Summary<'_> {
    pub(crate) fn print(&self) {
        let Counts {
            lost,
            duplicated,
            phantom,
            out_of_order,
            undelivered,
        } = self.counts;
        let tally = self.tally;
        let restarts: Vec<String> = tally
            .service_restarts
            .iter()
            .map(|(service, n)| format!("{service}:{n}"))
            .collect();
        let partitions: Vec<String> = tally
            .partitions
            .iter()
            .map(|(what, n)| format!("{what}={n}"))
            .collect();
        println!(
            "chaos: {} seed={} duration={}s committed={} rolled_back={} in_clickhouse={} lost={lost} duplicated={duplicated} phantom={phantom} out_of_order={out_of_order} undelivered={undelivered} dead_letters={} relay_kills={} relay_stops={} consumer_kills={} consumer_long_pauses={} unexpected_exits={} service_restarts=[{}] partitions=[{}] broker_panic_restarts={} relay={} idempotence={} source={}",
            self.verdict.label(),
            self.seed,
            self.duration.as_secs(),
            self.committed,
            self.rolled_back,
            self.in_clickhouse,
            self.dead_letters,
            tally.relay_kills,
            tally.relay_stops,
            tally.consumer_kills,
            tally.long_pauses,
            tally.unexpected_exits,
            restarts.join(" "),
            partitions.join(" "),
            tally.broker_panic_restarts,
            if self.unsafe_relay { "unsafe" } else { "shipped" },
            if self.idempotence { "on" } else { "off" },
            self.source,
        );
        println!("chaos: attempted events={}", self.attempted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certain_violation_fails_even_an_undrained_run() {
        let clean = Counts::default();
        let lost = Counts {
            lost: 1,
            ..Counts::default()
        };
        let late = Counts {
            undelivered: 9,
            ..Counts::default()
        };
        assert_eq!(Verdict::of(&clean, true), Verdict::Passed);
        assert_eq!(Verdict::of(&late, false), Verdict::DidNotDrain);
        assert_eq!(Verdict::of(&lost, false), Verdict::Violated);
        assert_eq!(Verdict::of(&lost, true), Verdict::Violated);
    }
}

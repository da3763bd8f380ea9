//! Short chaos runs against the local stack (`scripts/stack.sh up`), with the
//! shipped binaries (`cargo build -p examples --bins` first; `make test`
//! does it). Run one at a time: each restarts the shared services.
//!
//! Invariants checked by every run, from the real stores: no committed event
//! lost, none duplicated in ClickHouse (`count()` = `uniqExact(event_id)`,
//! no FINAL), none from a rolled-back transaction (phantom), each key's
//! events in order. The harness prints its counts in one summary line; these
//! tests echo it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// What one harness run printed and how it exited.
struct Run {
    exit_code: Option<i32>,
    summary: HashMap<String, String>,
    verdict: String,
}

fn run_chaos(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the chaos binary starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut verdict = String::new();
    let mut summary = HashMap::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        let mut words = line.split_whitespace();
        if words.next() != Some("chaos:") {
            continue;
        }
        let Some(first) = words.next() else { continue };
        if matches!(first, "PASS" | "FAIL" | "DID-NOT-DRAIN") {
            verdict = first.to_string();
            summary = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
    }
    let status = child.wait().expect("the chaos binary ends");
    Run {
        exit_code: status.code(),
        summary,
        verdict,
    }
}

fn count(run: &Run, key: &str) -> u64 {
    run.summary
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("summary has no number {key}: {:?}", run.summary))
}

fn assert_passed(run: &Run) {
    assert_eq!(run.verdict, "PASS", "summary: {:?}", run.summary);
    assert_eq!(run.exit_code, Some(0));
    for key in [
        "lost",
        "duplicated",
        "phantom",
        "out_of_order",
        "undelivered",
    ] {
        assert_eq!(count(run, key), 0, "{key}");
    }
    let committed = count(run, "committed");
    assert!(
        committed > 1000,
        "the writer committed only {committed} events"
    );
    // Every committed event is in ClickHouse exactly once.
    assert_eq!(count(run, "in_clickhouse"), committed);
    let attacks =
        count(run, "relay_kills") + count(run, "relay_stops") + count(run, "consumer_kills");
    assert!(attacks > 0, "the run attacked nothing");
}

#[test]
fn short_run_with_a_fixed_seed_keeps_every_guarantee() {
    let run = run_chaos(&["--duration", "75s", "--seed", "1"]);
    assert_passed(&run);
}

#[test]
fn short_run_with_a_random_seed_keeps_every_guarantee() {
    // The seed is printed in the first line, to replay a failure.
    let run = run_chaos(&["--duration", "75s"]);
    assert_passed(&run);
}

/// The WAL source under the same attacks: three relays on one slot (one
/// streams, the others wait to take over), two writers whose commits of one
/// key cross, events written with `Outbox::emit`.
#[test]
fn short_wal_run_with_a_random_seed_keeps_every_guarantee() {
    let run = run_chaos(&["--source", "wal", "--duration", "75s"]);
    assert_passed(&run);
}

/// The harness must be able to fail: with relays that delete a batch before
/// publishing it and claim without lanes, kills lose events and concurrent
/// relays reorder keys, and the harness has to say so.
#[test]
fn harness_fails_a_relay_that_deletes_before_publishing() {
    let run = run_chaos(&[
        "--unsafe-relay",
        "--duration",
        "45s",
        "--seed",
        "3",
        "--drain-timeout",
        "30s",
        // Failing is the expected outcome here: nothing to inspect.
        "--keep",
        "never",
    ]);
    assert_eq!(run.verdict, "FAIL", "summary: {:?}", run.summary);
    assert_eq!(run.exit_code, Some(1));
    assert_eq!(run.summary.get("relay").map(String::as_str), Some("unsafe"));
    let violations = count(&run, "lost") + count(&run, "out_of_order");
    assert!(violations > 0, "summary: {:?}", run.summary);
}

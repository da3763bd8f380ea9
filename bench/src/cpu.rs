//! CPU per event: what each process of a run spent, per 1,000 events.

use test_support::Process;

/// Seconds of CPU per 1,000 of `events`.
pub fn per_1k(cpu_seconds: f64, events: usize) -> f64 {
    cpu_seconds * 1000.0 / events.max(1) as f64
}

/// Seconds of CPU per 1,000 events of a drain's steady state: from the
/// moment its first events arrived (`at_first`: the CPU spent by then and
/// the events done by then) to its end, so that start-up (connections,
/// tables, the first batch's fetch) is left out as it is from the drain's
/// rate. Over the whole run when nothing was seen before the end.
pub fn steady_per_1k(at_first: Option<(f64, u64)>, cpu_at_end: f64, events: usize) -> f64 {
    match at_first {
        Some((cpu, done)) if (done as usize) < events => {
            per_1k(cpu_at_end - cpu, events - done as usize)
        }
        _ => per_1k(cpu_at_end, events),
    }
}

/// The pids of the local stack's services, from their pid files (none when
/// the services run elsewhere: their CPU is then NaN).
fn service_pids() -> [(&'static str, Option<u32>); 3] {
    let stack = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack");
    let first_line = |path: &str| {
        std::fs::read_to_string(stack.join(path))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
    };
    [
        ("postgres", first_line("postgres/data/postmaster.pid")),
        ("broker", first_line("kafka/tansu.pid")),
        ("clickhouse", first_line("clickhouse/clickhouse.pid")),
    ]
}

/// Seconds of CPU spent so far by each process a latency run reports:
/// ours, the services (each with every worker process: PostgreSQL's
/// backends, the bench's writer's included), and the benchmark itself
/// (writer, Kafka tap, ClickHouse polls).
pub fn cpu_snapshot(relay: &Process, consumer: &Process) -> Vec<(&'static str, f64)> {
    let mut snapshot = vec![
        ("relay", relay.cpu_seconds()),
        ("consumer", consumer.cpu_seconds()),
    ];
    for (name, pid) in service_pids() {
        snapshot.push((name, pid.map_or(f64::NAN, test_support::cpu::tree_seconds)));
    }
    snapshot.push(("bench", test_support::cpu::own_seconds()));
    snapshot
}

/// Per 1,000 of `events`, what each process spent between two snapshots.
pub fn cpu_between(
    start: &[(&'static str, f64)],
    end: &[(&'static str, f64)],
    events: usize,
) -> Vec<(&'static str, f64)> {
    start
        .iter()
        .zip(end)
        .map(|((name, before), (_, after))| (*name, per_1k(after - before, events)))
        .collect()
}

/// Seconds of CPU the local PostgreSQL has spent so far, every backend
/// included (NaN when it runs elsewhere).
pub fn postgres_seconds() -> f64 {
    service_pids()[0]
        .1
        .map_or(f64::NAN, test_support::cpu::tree_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_state_leaves_start_up_out() {
        // 0.5 s to start and write the first 10,000, then 1 s for 90,000.
        let steady = steady_per_1k(Some((0.5, 10_000)), 1.5, 100_000);
        assert!((steady - 1.0 / 90.0).abs() < 1e-12, "{steady}");
        assert_eq!(steady_per_1k(None, 1.5, 100_000), 0.015);
        // All of it seen at once: only the whole run is left.
        assert_eq!(steady_per_1k(Some((0.5, 100_000)), 1.5, 100_000), 0.015);
    }
}

//! The attacks: one round at a time, healing and restarting what is due,
//! then one attack chosen at random (seeded).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::fleet::Fleet;
use crate::procs::Proc;
use crate::services::{crash_service, BrokerWatch};
use crate::{Tally, CLAIM_TIMEOUT_SECS, LEASE_TIMEOUT_MS};

/// Heals the paths whose cut ran out and starts the processes due to start
/// (or that exited on their own, as a supervisor would).
pub(crate) fn tend(
    relays: &mut [Proc],
    consumers: &mut [Proc],
    tally: &mut Tally,
    started: Instant,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let now = Instant::now();
    for proc in relays.iter_mut().chain(consumers.iter_mut()) {
        for path in &mut proc.paths {
            if path.heal_at.is_some_and(|at| at <= now) {
                path.set(netfault::Fault::Pass)?;
                path.heal_at = None;
                println!(
                    "chaos: +{:>4}s healed {} -> {}",
                    started.elapsed().as_secs(),
                    proc.label,
                    path.service
                );
            }
        }
        let ended = if proc.restart_at.is_none() {
            proc.exit_status()
        } else {
            None
        };
        if let Some(status) = ended {
            // Like a supervisor: a process that ended on its own is started
            // again. Its status and its log's last lines say why it ended.
            tally.unexpected_exits += 1;
            println!(
                "chaos: +{:>4}s {} exited on its own ({status}); restarting it",
                started.elapsed().as_secs(),
                proc.label
            );
            proc.start(env)?;
        }
        if proc.restart_at.is_some_and(|at| at <= now) {
            proc.start(env)?;
        }
    }
    Ok(())
}

/// One attack: SIGKILL or SIGSTOP a relay, SIGKILL a consumer, cut one
/// process from one service, or crash a service (if `service_restarts`).
pub(crate) async fn strike(
    rng: &mut fastrand::Rng,
    relays: &mut [Proc],
    consumers: &mut [Proc],
    tally: &mut Tally,
    started: Instant,
    script: &Path,
    service_restarts: bool,
) -> anyhow::Result<()> {
    match rng.u32(0..100) {
        0..=27 => {
            let relay = &mut relays[rng.usize(0..3)];
            if relay.running() && !relay.stopped {
                relay.kill();
                tally.relay_kills += 1;
                let pause = if rng.bool() { 0 } else { rng.u64(5..20) };
                relay.restart_at = Some(Instant::now() + Duration::from_secs(pause));
                println!(
                    "chaos: +{:>4}s SIGKILL {} (restart in {pause}s)",
                    started.elapsed().as_secs(),
                    relay.label
                );
            }
        }
        28..=41 => {
            let index = rng.usize(0..3);
            let relay = &mut relays[index];
            if relay.running() && !relay.stopped {
                relay.signal("-STOP");
                relay.stopped = true;
                tally.relay_stops += 1;
                let hold = CLAIM_TIMEOUT_SECS + rng.u64(2..8);
                println!(
                    "chaos: +{:>4}s SIGSTOP {} for {hold}s",
                    started.elapsed().as_secs(),
                    relay.label
                );
                tokio::time::sleep(Duration::from_secs(hold)).await;
                let relay = &mut relays[index];
                relay.signal("-CONT");
                relay.stopped = false;
            }
        }
        42..=61 => {
            let consumer = &mut consumers[rng.usize(0..2)];
            if consumer.running() {
                consumer.kill();
                tally.consumer_kills += 1;
                // Sometimes long enough that the survivor must take over.
                let pause = if rng.bool() {
                    0
                } else {
                    tally.long_pauses += 1;
                    LEASE_TIMEOUT_MS / 1000 + rng.u64(5..15)
                };
                consumer.restart_at = Some(Instant::now() + Duration::from_secs(pause));
                println!(
                    "chaos: +{:>4}s SIGKILL {} (restart in {pause}s)",
                    started.elapsed().as_secs(),
                    consumer.label
                );
            }
        }
        62..=84 => {
            // Cut one process from one service for longer than its
            // claim or lease timeout: packets dropped (a blackhole,
            // sockets left open) or connections reset.
            let procs: Vec<&mut Proc> = relays.iter_mut().chain(consumers.iter_mut()).collect();
            let count = procs.len();
            let proc = procs.into_iter().nth(rng.usize(0..count));
            if let Some(proc) = proc {
                let index = rng.usize(0..proc.paths.len());
                let path = &mut proc.paths[index];
                if path.heal_at.is_none() {
                    let faults = path.faults();
                    let (fault, how) = faults[rng.usize(0..faults.len())];
                    let hold = CLAIM_TIMEOUT_SECS.max(LEASE_TIMEOUT_MS / 1000) + rng.u64(2..10);
                    path.set(fault)?;
                    path.heal_at = Some(Instant::now() + Duration::from_secs(hold));
                    let kind = proc.label.trim_end_matches(|c: char| c.is_ascii_digit());
                    *tally
                        .partitions
                        .entry(format!("{kind}-{}-{how}", path.service))
                        .or_default() += 1;
                    println!(
                        "chaos: +{:>4}s {how} {} -> {} for {hold}s",
                        started.elapsed().as_secs(),
                        proc.label,
                        path.service
                    );
                }
            }
        }
        _ if service_restarts => {
            let service = ["kafka", "postgres", "clickhouse"][rng.usize(0..3)];
            println!(
                "chaos: +{:>4}s crash and restart {service}",
                started.elapsed().as_secs()
            );
            crash_service(script, service).await?;
            *tally.service_restarts.entry(service).or_default() += 1;
        }
        _ => {}
    }
    Ok(())
}

/// Attacks `fleet` for `duration`: every few seconds, tends it (heals,
/// restarts what is due) and strikes once; a broker that panicked is
/// restarted as a supervisor would.
pub(crate) async fn attack_for(
    duration: Duration,
    rng: &mut fastrand::Rng,
    fleet: &mut Fleet,
    watch: &mut BrokerWatch,
    script: &Path,
    service_restarts: bool,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let started = Instant::now();
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(rng.u64(1500..5000))).await;
        watch.restart_if_panicked(script, &mut tally).await?;
        let Fleet {
            relays,
            consumers,
            env,
        } = fleet;
        tend(relays, consumers, &mut tally, started, env)?;
        strike(
            rng,
            relays,
            consumers,
            &mut tally,
            started,
            script,
            service_restarts,
        )
        .await?;
    }
    Ok(tally)
}

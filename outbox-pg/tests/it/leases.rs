//! Partition leases under involuntary loss: a terminated backend, a network
//! path that stops forwarding. The invariant of each test: a partition is
//! never granted to a second consumer while the grant of its previous owner
//! can still be valid (so with `Consume::with_lease`, never two writers).

use std::time::Duration;

use netfault::{Fault, FaultProxy};
use outbox_core::Lease;
use outbox_pg::{PartitionLeaseConfig, PartitionLeases, PgConfig};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::common::pg_config;

const SESSION_TIMEOUT: Duration = Duration::from_secs(2);

/// A member that follows its grants at once (as the consumer loop does
/// between batches) and keeps the history of what it was granted.
struct Member {
    owned: watch::Receiver<Lease>,
    history: std::sync::Arc<std::sync::Mutex<Vec<(Instant, Lease)>>>,
    stop: CancellationToken,
}

fn member(group: &str, pg: PgConfig) -> Member {
    let mut config = PartitionLeaseConfig::new(group, "topic", 4);
    config.heartbeat = Duration::from_millis(200);
    config.session_timeout = SESSION_TIMEOUT;
    config.takeover_delay = SESSION_TIMEOUT;
    let stop = CancellationToken::new();
    let (ownership, leasing) = PartitionLeases::new(pg, config)
        .unwrap()
        .start(stop.clone());
    tokio::spawn(leasing);
    let (owned, applied) = (ownership.lease, ownership.applied);
    let history = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut follow = owned.clone();
    let log = history.clone();
    tokio::spawn(async move {
        while follow.changed().await.is_ok() {
            let lease = follow.borrow_and_update().clone();
            applied.send_replace(lease.partitions.clone());
            if let Ok(mut log) = log.lock() {
                log.push((Instant::now(), lease));
            }
        }
    });
    Member {
        owned,
        history,
        stop,
    }
}

impl Member {
    fn partitions(&self) -> Vec<i32> {
        self.owned.borrow().partitions.clone()
    }

    fn history(&self) -> Vec<(Instant, Lease)> {
        self.history.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// The latest instant until which any grant of `partition` was valid.
    fn granted_until(&self, partition: i32) -> Option<Instant> {
        self.history()
            .into_iter()
            .filter(|(_, lease)| lease.partitions.contains(&partition))
            .filter_map(|(_, lease)| lease.valid_until)
            .max()
    }

    /// When `partition` was first granted after `after`.
    fn granted_at(&self, partition: i32, after: Instant) -> Option<Instant> {
        self.history()
            .into_iter()
            .find(|(at, lease)| *at >= after && lease.partitions.contains(&partition))
            .map(|(at, _)| at)
    }
}

async fn settle(members: &[&Member], expect: &[usize], limit: Duration) -> Vec<Vec<i32>> {
    let started = Instant::now();
    loop {
        let views: Vec<Vec<i32>> = members.iter().map(|m| m.partitions()).collect();
        let mut sizes: Vec<usize> = views.iter().map(Vec::len).collect();
        sizes.sort();
        if sizes == expect {
            return views;
        }
        assert!(
            started.elapsed() < limit,
            "ownership never settled to {expect:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pid of the backend of `group` holding the lock of `partition` (other
/// tests run lease groups of their own at the same time).
async fn holder_pid(group: &str, partition: i32) -> i32 {
    let app = PartitionLeases::new(pg_config(), PartitionLeaseConfig::new(group, "topic", 4))
        .unwrap()
        .application_name()
        .to_string();
    let pool = pg_config().create_pool().unwrap();
    let client = pool.get().await.unwrap();
    client
        .query_one(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
             AND objid = $1::int::oid AND pid IN (SELECT pid FROM pg_stat_activity \
             WHERE application_name = $2) LIMIT 1",
            &[&partition, &app],
        )
        .await
        .unwrap()
        .get(0)
}

/// Checks the invariant for every partition `from` held before `cut`: `to`
/// was granted it only after `from`'s last grant of it ran out. Returns the
/// smallest gap seen.
fn assert_no_overlap(from: &Member, to: &Member, partitions: &[i32], cut: Instant) -> Duration {
    let mut smallest = Duration::MAX;
    for &partition in partitions {
        let until = from.granted_until(partition).unwrap();
        let taken = to
            .granted_at(partition, cut)
            .unwrap_or_else(|| panic!("partition {partition} was never taken over"));
        assert!(
            taken >= until,
            "partition {partition} granted to the survivor {:?} before the previous owner's grant ran out",
            until - taken
        );
        smallest = smallest.min(taken - until);
    }
    smallest
}

/// Invariant (one writer per partition): when the backend of a member's
/// lease session is terminated, Postgres frees its locks at once; that
/// member's grant is revoked at once (a new epoch), and the partitions are
/// granted again (to the survivor, or to the member's next session) only
/// after the terminated session's last grant ran out.
#[tokio::test]
async fn a_terminated_lease_session_is_revoked_at_once_and_taken_only_after_its_grant() {
    let group = format!("term{}", uuid::Uuid::now_v7().simple());
    let a = member(&group, pg_config());
    settle(&[&a], &[4], Duration::from_secs(15)).await;
    let b = member(&group, pg_config());
    let views = settle(&[&a, &b], &[2, 2], Duration::from_secs(20)).await;
    let lost = views[0].clone();
    let epoch_before = a.owned.borrow().epoch;

    let pid = holder_pid(&group, lost[0]).await;
    let admin = pg_config().create_pool().unwrap();
    let killed = Instant::now();
    admin
        .get()
        .await
        .unwrap()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let revoked = || {
        a.history()
            .into_iter()
            .find(|(at, lease)| *at >= killed && lease.epoch != epoch_before)
            .map(|(at, _)| at - killed)
    };
    // The old grant, as the terminated session last proved it.
    let old_until = a
        .history()
        .into_iter()
        .filter(|(_, lease)| lease.epoch == epoch_before)
        .filter_map(|(_, lease)| lease.valid_until)
        .max()
        .unwrap();
    // Either member may take the freed partitions (the terminated one
    // reconnects as a new session): each is granted only after the old grant.
    let started = Instant::now();
    let mut regranted = Vec::new();
    for &partition in &lost {
        loop {
            let again = [&a, &b].iter().find_map(|m| {
                m.history()
                    .into_iter()
                    .find(|(at, lease)| {
                        *at >= killed
                            && lease.epoch != epoch_before
                            && lease.partitions.contains(&partition)
                    })
                    .map(|(at, _)| at)
            });
            if let Some(at) = again {
                regranted.push(at);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{partition} never granted again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let gap = regranted
        .iter()
        .map(|at| at.checked_duration_since(old_until))
        .min()
        .flatten();
    let revoked = revoked();
    println!(
        "lost={lost:?} revoked_after={revoked:?} smallest_gap_after_old_grant={gap:?} views_before={views:?}"
    );
    assert!(
        regranted.iter().all(|at| *at >= old_until),
        "a lost partition was granted again before the terminated session's grant ran out"
    );
    let revoked = revoked.expect("the terminated member's grant was never revoked");
    assert!(revoked < Duration::from_millis(500), "{revoked:?}");
    a.stop.cancel();
    b.stop.cancel();
}

/// Invariant (one writer per partition): a member whose path to Postgres
/// stops forwarding (both directions blackholed, sockets open, as packet
/// loss does) lets its grant run out within half the session timeout; the
/// server ends its session after the timeout and the survivor is granted
/// the partitions only after that grant ran out. Once the path heals, the
/// member takes its share again.
#[tokio::test]
async fn a_member_cut_off_from_postgres_stops_before_its_partitions_move() {
    let group = format!("cut{}", uuid::Uuid::now_v7().simple());
    let direct = pg_config();
    let upstream = tokio::net::lookup_host((direct.host.as_str(), direct.port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let through_proxy = PgConfig {
        host: "127.0.0.1".into(),
        port: proxy.addr().port(),
        ..direct.clone()
    };
    let a = member(&group, through_proxy);
    settle(&[&a], &[4], Duration::from_secs(15)).await;
    let b = member(&group, direct);
    let views = settle(&[&a, &b], &[2, 2], Duration::from_secs(20)).await;
    let lost = views[0].clone();

    let cut = Instant::now();
    proxy.set(Fault::Blackhole, Fault::Blackhole);
    settle(&[&a, &b], &[0, 4], Duration::from_secs(20)).await;
    let last_valid = lost
        .iter()
        .filter_map(|p| a.granted_until(*p))
        .max()
        .unwrap();
    let gap = assert_no_overlap(&a, &b, &lost, cut);
    println!(
        "lost={lost:?} grant_ran_out_after_cut={:?} smallest_gap_between_grants={gap:?}",
        last_valid.saturating_duration_since(cut)
    );
    assert!(last_valid.saturating_duration_since(cut) <= SESSION_TIMEOUT / 2);

    proxy.set(Fault::Pass, Fault::Pass);
    let healed = settle(&[&a, &b], &[2, 2], Duration::from_secs(30)).await;
    println!("after healing: {healed:?}");
    a.stop.cancel();
    b.stop.cancel();
}

/// Invariants (one writer per partition, no stalled partition): members of a
/// group split the partitions fairly and never own one twice; a newcomer
/// gets partitions only after their owner stopped working them; a member
/// that stops (or dies) has its partitions taken over within the session
/// timeout.
#[tokio::test]
async fn partition_leases_share_and_hand_over() {
    let group = format!("g{}", uuid::Uuid::now_v7().simple());
    let a = member(&group, pg_config());
    let b = member(&group, pg_config());
    let views = settle(&[&a, &b], &[2, 2], Duration::from_secs(10)).await;
    let mut all: Vec<i32> = views.concat();
    all.sort();
    assert_eq!(
        all,
        vec![0, 1, 2, 3],
        "each partition exactly once: {views:?}"
    );

    // A newcomer: partitions move only when their owner reports it stopped working them.
    let c = member(&group, pg_config());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        c.owned.borrow().partitions.is_empty(),
        "taken before the owners let go"
    );
    let views = settle(&[&a, &b, &c], &[1, 1, 2], Duration::from_secs(10)).await;
    println!("three members: {views:?}");
    let mut all: Vec<i32> = views.concat();
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3]);

    // A member stops for good: the others take its partitions.
    let started = std::time::Instant::now();
    a.stop.cancel();
    let views = settle(&[&b, &c], &[2, 2], Duration::from_secs(10)).await;
    println!("after one left: {views:?} in {:?}", started.elapsed());
    let mut all: Vec<i32> = views.concat();
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3]);
    b.stop.cancel();
    c.stop.cancel();
}

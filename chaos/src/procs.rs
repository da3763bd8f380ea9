//! The pipeline's processes and their paths to the services, which the
//! harness cuts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use test_support::{Launch, Process};

/// Group ids the relays and consumers run with (the packet filter tells
/// their connections apart by them).
pub(crate) const RELAY_GID: u32 = 4300;
pub(crate) const CONSUMER_GID: u32 = 4310;

/// The port of the first broker of `brokers` (`host:port,…`).
pub(crate) fn kafka_port(brokers: &str) -> anyhow::Result<u16> {
    let first = brokers.split(',').next().unwrap_or_default().trim();
    first
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .with_context(|| format!("no port in the broker address {first:?}"))
}

/// One process of the pipeline.
pub(crate) struct Proc {
    pub(crate) label: String,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Process>,
    pub(crate) stopped: bool,
    pub(crate) restart_at: Option<Instant>,
    /// Its own paths to the services, each of which can be cut.
    pub(crate) paths: Vec<ServicePath>,
    /// The group id it runs with, which tells its packets apart.
    pub(crate) gid: u32,
}

/// One process's path to one service, which the harness can cut.
pub(crate) struct ServicePath {
    pub(crate) service: &'static str,
    pub(crate) cut: Cut,
    pub(crate) heal_at: Option<Instant>,
}

/// How a path is cut.
pub(crate) enum Cut {
    /// A proxy of the process's own, which the binary is pointed at.
    Proxy(netfault::FaultProxy),
    /// The kernel's packet filter, by the process's group id: a Kafka
    /// client reconnects to the broker's advertised address, so a proxy
    /// would not sit on its data path.
    Filter(Arc<netfault::PacketFilter>, u32),
}

impl ServicePath {
    pub(crate) async fn to(service: &'static str, upstream: &str) -> anyhow::Result<Self> {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .with_context(|| format!("resolving {upstream}"))?
            .find(std::net::SocketAddr::is_ipv4)
            .with_context(|| format!("no IPv4 address for {upstream}"))?;
        Ok(Self {
            service,
            cut: Cut::Proxy(netfault::FaultProxy::start(upstream).await?),
            heal_at: None,
        })
    }

    /// The path to the broker of a process running with group id `gid`.
    pub(crate) fn kafka(filter: &Arc<netfault::PacketFilter>, gid: u32) -> anyhow::Result<Self> {
        filter.track(gid)?;
        Ok(Self {
            service: "kafka",
            cut: Cut::Filter(filter.clone(), gid),
            heal_at: None,
        })
    }

    /// The faults this path can be cut with.
    pub(crate) fn faults(&self) -> &'static [(netfault::Fault, &'static str)] {
        match self.cut {
            Cut::Proxy(_) => &[
                (netfault::Fault::Blackhole, "blackhole"),
                (netfault::Fault::Blackhole, "blackhole"),
                (netfault::Fault::Blackhole, "blackhole"),
                (netfault::Fault::Reset, "reset"),
            ],
            Cut::Filter(..) => &[(netfault::Fault::Blackhole, "blackhole")],
        }
    }

    pub(crate) fn set(&self, fault: netfault::Fault) -> anyhow::Result<()> {
        match &self.cut {
            Cut::Proxy(proxy) => proxy.set(fault, fault),
            Cut::Filter(filter, gid) => filter.set(*gid, fault)?,
        }
        Ok(())
    }

    /// The environment that points a binary at this path.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        let Cut::Proxy(proxy) = &self.cut else {
            return Vec::new();
        };
        let port = proxy.addr().port().to_string();
        match self.service {
            "postgres" => vec![
                ("OUTBOX_PG_HOST".into(), "127.0.0.1".into()),
                ("OUTBOX_PG_PORT".into(), port),
            ],
            _ => vec![(
                "OUTBOX_CLICKHOUSE_URL".into(),
                format!("http://127.0.0.1:{port}"),
            )],
        }
    }
}

impl Proc {
    pub(crate) fn start(&mut self, env: &[(String, String)]) -> anyhow::Result<()> {
        let mut env = env.to_vec();
        env.extend(self.paths.iter().flat_map(ServicePath::env));
        env.push(("RUST_LOG".into(), "info".into()));
        let child = Process::start(
            &self.label,
            Launch {
                program: &self.program,
                args: &self.args,
                env: &env,
                log: &self.log,
                gid: Some(self.gid),
            },
        )?;
        self.child = Some(child);
        self.stopped = false;
        self.restart_at = None;
        Ok(())
    }

    pub(crate) fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            child.signal(signal);
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
        self.stopped = false;
    }

    pub(crate) fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process ended on its own (a supervisor restarts it).
    pub(crate) fn exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// How the process ended on its own, if it did (then it is forgotten:
    /// a supervisor restarts it).
    pub(crate) fn exit_status(&mut self) -> Option<String> {
        let ended = self.child.as_mut().and_then(|child| child.ended())?;
        self.child = None;
        Some(ended)
    }
}

//! Cuts in the kernel's packet filter, for paths a proxy cannot sit on.
//!
//! A Kafka client learns the broker's advertised address from the bootstrap
//! server and connects there directly, so a [`FaultProxy`](crate::FaultProxy)
//! in front of the bootstrap address carries only the first request. This
//! module cuts one process's traffic to and from a port wherever it
//! connects: the process runs with a group id of its own; every connection
//! it opens is marked with that id in the connection tracker (`CONNMARK`),
//! and a cut drops every packet of marked connections, both
//! ways, which is what a partition between two hosts does.
//!
//! Needs `iptables` and the right to change the packet filter (root, or
//! `CAP_NET_ADMIN`). The rules live in chains of their own, named after the
//! filter, which are emptied when it is installed and removed when it is
//! dropped, so a run that was killed leaves nothing behind for long.

use std::collections::BTreeMap;
use std::io;
use std::process::Command;
use std::sync::Mutex;

use crate::Fault;

/// Cuts of the TCP traffic between processes, told apart by their group
/// id, and one port (both directions).
#[derive(Debug)]
pub struct PacketFilter {
    chain: String,
    port: u16,
    cuts: Mutex<BTreeMap<u32, Fault>>,
}

/// The two tables a filter uses: `mangle` marks, `filter` cuts.
const TABLES: [&str; 2] = ["mangle", "filter"];

impl PacketFilter {
    /// Installs empty chains named `chain` (at most 28 characters), hooked
    /// into `OUTPUT` of the `mangle` and `filter` tables (loopback traffic
    /// passes `OUTPUT` in both directions). Rules an earlier filter of the
    /// same name left behind are removed.
    pub fn install(chain: &str, port: u16) -> io::Result<Self> {
        for table in TABLES {
            if iptables(table, &["-n", "-L", chain]).is_err() {
                iptables(table, &["-N", chain])?;
            }
            iptables(table, &["-F", chain])?;
            if iptables(table, &["-C", "OUTPUT", "-j", chain]).is_err() {
                iptables(table, &["-I", "OUTPUT", "1", "-j", chain])?;
            }
        }
        Ok(Self {
            chain: chain.to_string(),
            port,
            cuts: Mutex::new(BTreeMap::new()),
        })
    }

    /// Marks every connection that processes running with group id `gid`
    /// open from now on (call it before they start).
    pub fn track(&self, gid: u32) -> io::Result<()> {
        let gid = gid.to_string();
        iptables(
            "mangle",
            &[
                "-A",
                &self.chain,
                "-m",
                "owner",
                "--gid-owner",
                &gid,
                "-j",
                "CONNMARK",
                "--set-mark",
                &gid,
            ],
        )
    }

    /// Cuts the traffic of `gid`'s connections to and from the port:
    /// [`Fault::Blackhole`] drops every packet (sockets stay open, the
    /// peers retransmit); [`Fault::Pass`] heals. Delays and resets are the
    /// proxy's: a `REJECT` rule on loopback does not reset an established
    /// connection's local end.
    pub fn set(&self, gid: u32, fault: Fault) -> io::Result<()> {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = cuts.remove(&gid) {
            iptables("filter", &self.rule("-D", gid, old)?)?;
        }
        if fault != Fault::Pass {
            iptables("filter", &self.rule("-A", gid, fault)?)?;
            cuts.insert(gid, fault);
        }
        Ok(())
    }

    fn rule(&self, op: &str, gid: u32, fault: Fault) -> io::Result<Vec<String>> {
        match fault {
            Fault::Blackhole => {}
            Fault::Pass | Fault::Delay(_) | Fault::Reset => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the packet filter cannot apply {fault:?}"),
                ))
            }
        }
        let port = self.port.to_string();
        let gid = gid.to_string();
        Ok([
            op,
            &self.chain,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--ports",
            &port,
            "-m",
            "connmark",
            "--mark",
            &gid,
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect())
    }
}

impl Drop for PacketFilter {
    fn drop(&mut self) {
        for table in TABLES {
            let _ = iptables(table, &["-D", "OUTPUT", "-j", &self.chain]);
            let _ = iptables(table, &["-F", &self.chain]);
            let _ = iptables(table, &["-X", &self.chain]);
        }
    }
}

fn iptables<S: AsRef<str>>(table: &str, args: &[S]) -> io::Result<()> {
    let output = Command::new("iptables")
        .args(["-w", "5", "-t", table])
        .args(args.iter().map(AsRef::as_ref))
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running iptables: {e}; install it (scripts/stack.sh up does)"),
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    let shown: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    Err(io::Error::other(format!(
        "iptables -t {table} {}: {} (changing the packet filter needs root or CAP_NET_ADMIN)",
        shown.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

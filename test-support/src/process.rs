//! A shipped binary run as a child process by a harness (the chaos
//! harness, the benchmark): started with its own log, signalled, stopped,
//! and watched for its peak memory.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// How to start a [`Process`].
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The binary.
    pub program: &'a Path,
    /// Its arguments.
    pub args: &'a [String],
    /// Environment variables on top of the harness's own.
    pub env: &'a [(String, String)],
    /// Where its stderr is appended (a restarted process continues its log).
    pub log: &'a Path,
    /// The group id it runs with (a packet filter can tell its connections
    /// apart by it); `None`: the harness's own.
    pub gid: Option<u32>,
}

/// A running child process and the sampler of its peak resident memory.
/// Killed when dropped.
#[derive(Debug)]
pub struct Process {
    label: String,
    child: Child,
    peak_kb: Arc<AtomicU64>,
    cpu_ticks: Arc<AtomicU64>,
}

impl Process {
    /// Starts `launch.program`; must run inside a tokio runtime. Several
    /// binaries on one host: `/metrics` listens on any free port.
    pub fn start(label: &str, launch: Launch<'_>) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(launch.log)
            .with_context(|| format!("opening {}", launch.log.display()))?;
        let mut command = Command::new(launch.program);
        command
            .args(launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("OUTBOX_METRICS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(gid) = launch.gid {
            command.gid(gid);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", launch.program.display()))?;
        let peak_kb = Arc::new(AtomicU64::new(0));
        let cpu_ticks = Arc::new(AtomicU64::new(0));
        if let Some(pid) = child.id() {
            tokio::spawn(sample(pid, peak_kb.clone(), cpu_ticks.clone()));
        }
        Ok(Self {
            label: label.to_string(),
            child,
            peak_kb,
            cpu_ticks,
        })
    }

    /// The name it was started under.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Peak resident memory so far, MiB.
    pub fn peak_rss_mb(&self) -> f64 {
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// Seconds of CPU it spent so far (as last sampled, so at most 50 ms
    /// stale; still known after it ended).
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_ticks.load(Ordering::Relaxed) as f64 / crate::cpu::ticks_per_second()
    }

    /// Whether it is still running (false once it ended, however).
    pub fn running(&mut self) -> bool {
        self.ended().is_none()
    }

    /// How it ended (`exit status: 1`, `signal: 6 (SIGABRT)`, or why
    /// waiting for it failed); `None` while it runs.
    pub fn ended(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(err) => Some(format!("waiting for it failed: {err}")),
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-TERM`, …) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// SIGKILL; the process is reaped in the background.
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// Waits for the process to end by itself, at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| format!("{} did not finish within {limit:?}", self.label))?
            .with_context(|| format!("waiting for {}", self.label))
    }

    /// SIGTERM, then waits `grace` for the clean stop before SIGKILL.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        self.signal("-TERM");
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                Ok(self.child.wait().await?)
            }
        }
    }
}

/// Keeps `peak_kb` at the process's VmHWM, the kernel's own high-water mark
/// of the resident set, so sampling it now and then still catches short
/// peaks, and `cpu_ticks` at the CPU it spent. Pids wrap around quickly on
/// a busy machine: stops as soon as the pid belongs to another process
/// (another start time).
async fn sample(pid: u32, peak_kb: Arc<AtomicU64>, cpu_ticks: Arc<AtomicU64>) {
    let path = format!("/proc/{pid}/status");
    let Some(started) = crate::cpu::stat(pid).map(|s| s.start_time) else {
        return;
    };
    while let Ok(status) = std::fs::read_to_string(&path) {
        let Some(now) = crate::cpu::stat(pid).filter(|s| s.start_time == started) else {
            break;
        };
        cpu_ticks.fetch_max(now.own, Ordering::Relaxed);
        if let Some(kb) = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
        {
            peak_kb.fetch_max(kb, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invariant: a started process is seen running, its memory sampled,
    /// and a SIGTERM stops it within the grace.
    #[tokio::test]
    async fn a_child_runs_is_sampled_and_stops_on_sigterm() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("process-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("sleep.log");
        let args = ["30".to_string()];
        let mut sleeper = Process::start(
            "sleep",
            Launch {
                program: Path::new("sleep"),
                args: &args,
                env: &[],
                log: &log,
                gid: None,
            },
        )?;
        assert!(sleeper.running());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let peak = sleeper.peak_rss_mb();
        let cpu = sleeper.cpu_seconds();
        let status = sleeper.stop(Duration::from_secs(5)).await?;
        println!("peak_rss_mb={peak:.2} cpu_s={cpu:.3} status={status:?}");
        assert!(cpu.is_finite() && cpu >= 0.0);
        assert!(peak > 0.0, "VmHWM sampled");
        assert!(!status.success(), "ended by the signal");
        assert!(!sleeper.running());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

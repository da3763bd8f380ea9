//! The shipped binaries as child processes, with their peak memory.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// A running binary and the sampler of its peak resident memory.
pub struct Proc {
    pub label: String,
    child: Child,
    peak_kb: Arc<AtomicU64>,
}

impl Proc {
    /// Starts `program` with `args`; its stderr goes to `log`.
    pub fn start(
        label: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // Several relays at once: any free port for /metrics.
            .env("OUTBOX_METRICS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let peak_kb = Arc::new(AtomicU64::new(0));
        if let Some(pid) = child.id() {
            let peak = peak_kb.clone();
            // VmHWM is the kernel's own high-water mark of the resident set,
            // so sampling it now and then still catches short peaks. Pids
            // wrap around quickly on a busy machine: stop as soon as the pid
            // belongs to another process (another start time).
            tokio::spawn(async move {
                let path = format!("/proc/{pid}/status");
                let started = start_time(pid);
                while let Ok(status) = std::fs::read_to_string(&path) {
                    if started.is_none() || start_time(pid) != started {
                        break;
                    }
                    if let Some(kb) = status
                        .lines()
                        .find(|l| l.starts_with("VmHWM:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        peak.fetch_max(kb, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
        Ok(Self {
            label: label.to_string(),
            child,
            peak_kb,
        })
    }

    /// Peak resident memory so far, MiB.
    pub fn peak_rss_mb(&self) -> f64 {
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to end by itself, at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| format!("{} did not finish within {limit:?}", self.label))?
            .with_context(|| format!("waiting for {}", self.label))
    }

    /// SIGTERM, then waits for the clean stop (SIGKILL after 30 s).
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                Ok(self.child.wait().await?)
            }
        }
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks
/// since boot; with the pid, it names one process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

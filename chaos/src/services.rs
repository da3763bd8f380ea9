//! The local stack's services: crashing one, and watching the broker.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::bail;

use crate::Tally;

/// What tansu logs once it serves requests.
pub(crate) const TANSU_READY: &[u8] = b"ready in ";

/// SIGKILLs a service of the local stack and starts it again (`stack.sh crash`).
pub(crate) async fn crash_service(script: &Path, service: &'static str) -> anyhow::Result<()> {
    let script = script.to_path_buf();
    let ok = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(&script)
            .args(["crash", service])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
    .await?;
    if !ok {
        bail!("restarting {service} failed");
    }
    Ok(())
}

/// Watches tansu's log for panics.
///
/// tansu 0.6.0 sometimes panics in its storage actor (idempotent-producer
/// check) when producers reconnect after restarts; the process then keeps
/// its port but refuses every request until restarted. A supervisor in
/// production would restart a broker that stopped serving; this plays that
/// part, so a run measures the pipeline rather than the local broker's bug.
/// Each such restart is counted in the summary (`broker_panic_restarts`).
pub(crate) struct BrokerWatch {
    pub(crate) log: PathBuf,
    pub(crate) looked_up_to: u64,
}

impl BrokerWatch {
    /// Starts looking at tansu's last start, so that a panic the broker is
    /// still wedged on is seen at once.
    pub(crate) fn new(root: &Path) -> Self {
        let log = root.join(".stack/kafka/tansu.log");
        let text = std::fs::read(&log).unwrap_or_default();
        let last_start = text
            .windows(TANSU_READY.len())
            .rposition(|w| w == TANSU_READY)
            .unwrap_or(text.len());
        Self {
            log,
            looked_up_to: last_start as u64,
        }
    }

    /// Whether tansu logged a panic since the last look.
    pub(crate) fn panicked_since_last_look(&mut self) -> bool {
        let Ok(text) = std::fs::read(&self.log) else {
            return false;
        };
        let start = usize::try_from(self.looked_up_to)
            .unwrap_or(0)
            .min(text.len());
        self.looked_up_to = text.len() as u64;
        String::from_utf8_lossy(&text[start..]).contains("panicked")
    }

    pub(crate) async fn restart_if_panicked(
        &mut self,
        script: &Path,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        if self.panicked_since_last_look() {
            println!("chaos: the broker (tansu) panicked; restarting it like a supervisor would");
            crash_service(script, "kafka").await?;
            tally.broker_panic_restarts += 1;
            // The restart's own log lines are not a new panic.
            self.panicked_since_last_look();
        }
        Ok(())
    }
}

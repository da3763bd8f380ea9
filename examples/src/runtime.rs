//! The runtime of every binary: tracing, signals, background tasks,
//! start-up checks and exit codes.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use outbox_core::ErrorChain;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Options of every binary: configuration file, logging, start and stop.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// TOML file of options (keys are the flags' names: `batch_size = 500`);
    /// flags and environment variables win over it.
    #[arg(long, env = "OUTBOX_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "OUTBOX_LOG_JSON")]
    pub log_json: bool,
    /// How long to retry reaching a service at start before giving up (s).
    #[arg(long, env = "OUTBOX_STARTUP_TIMEOUT_SECS", default_value_t = 15)]
    pub startup_timeout_secs: u64,
    /// After SIGTERM/SIGINT, how long to let work in flight finish before
    /// exiting anyway (s). Abandoned work is not lost: it was not committed.
    #[arg(long, env = "OUTBOX_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Check the options (flags, environment, --config file) and print them
    /// as understood, passwords hidden; then exit without connecting to
    /// anything (0 when valid).
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub otel: crate::OtelArgs,
}

/// With `--check-config`: prints `cli` as parsed (its `Debug` hides
/// passwords) and gives the exit code to return at once.
pub fn check_config<C: std::fmt::Debug>(log: &LogArgs, cli: &C) -> Option<std::process::ExitCode> {
    log.check_config.then(|| {
        println!("{cli:#?}");
        std::process::ExitCode::SUCCESS
    })
}

/// `duration` in whole milliseconds, for options given in ms (their
/// defaults come from the libraries' configuration structs).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Installs the tracing subscriber (`RUST_LOG` filters, default `info`).
pub fn init_tracing(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The replication client logs every ended session as an error (a
        // standby relay's every retry); the WAL source gets those errors
        // back and logs them once, classified.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One line for an error and its causes, outermost first (every layer
/// says only its own part, see [`outbox_core::ErrorChain`]).
pub fn render_error(err: &anyhow::Error) -> String {
    format!("{err:#}")
}

/// The exit of a binary: 0 on success; otherwise the error, logged and
/// printed as one `error: …` line on stderr, and 1.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let message = render_error(&err);
            tracing::error!("{message}");
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The exit code of a process whose work in flight did not finish within
/// the drain timeout after SIGINT or SIGTERM (as `timeout(1)` uses it), so
/// a supervisor can tell a stuck stop from a clean one.
pub const EXIT_DRAIN_TIMED_OUT: i32 = 124;

/// The process's shutdown token and the tasks it waits for before exiting.
static BACKGROUND: std::sync::OnceLock<(tokio_util::task::TaskTracker, CancellationToken)> =
    std::sync::OnceLock::new();

fn background() -> &'static (tokio_util::task::TaskTracker, CancellationToken) {
    BACKGROUND.get_or_init(|| {
        (
            tokio_util::task::TaskTracker::new(),
            CancellationToken::new(),
        )
    })
}

/// Spawns a task that must end before the process exits (a lease session
/// to close cleanly, a gauge refresher, the /metrics server): it must end
/// once the token of [`shutdown_on_signals`] is cancelled. See [`finish`].
pub fn spawn_background<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    background().0.spawn(task);
}

/// [`spawn_background`] for a task the process cannot work without: when
/// it fails, the error is logged naming `what` and `shutdown` is cancelled,
/// so the process stops instead of running on without it.
pub fn spawn_critical<F, E>(what: &'static str, task: F, shutdown: CancellationToken)
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + 'static,
{
    spawn_background(async move {
        if let Err(err) = task.await {
            tracing::error!(error = %ErrorChain(&err), "{what} failed for good; stopping");
            shutdown.cancel();
        }
    });
}

/// Ends the process's work: cancels the shutdown token (the main loop ended
/// on its own, say after `--drain`), then waits up to `limit` for every task
/// of [`spawn_background`]. A task still running then is an error, so the
/// exit status tells.
pub async fn finish(result: anyhow::Result<()>, limit: Duration) -> anyhow::Result<()> {
    let (tasks, token) = background();
    token.cancel();
    tasks.close();
    let joined = tokio::time::timeout(limit, tasks.wait()).await.is_ok();
    match (result, joined) {
        (Err(err), _) => Err(err),
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => anyhow::bail!(
            "background tasks did not stop within the drain timeout ({} s)",
            limit.as_secs()
        ),
    }
}

/// A token cancelled on SIGINT or SIGTERM (the process's one shutdown
/// token: [`finish`] cancels it too). If the process has not ended
/// `drain_timeout` after the signal (a batch stuck on a service that stopped
/// answering, a client library blocking on close), it exits with
/// [`EXIT_DRAIN_TIMED_OUT`] from a plain thread, which fires even if the
/// async runtime is blocked: work in flight was not committed, so it stays
/// pending or is read again.
pub fn shutdown_on_signals(drain_timeout: Duration) -> CancellationToken {
    let token = background().1.clone();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(err) => {
                        warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops cleanly");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        info!(
            drain_timeout_s = drain_timeout.as_secs(),
            "shutdown requested; finishing the batch in flight"
        );
        cancel.cancel();
        std::thread::spawn(move || {
            std::thread::sleep(drain_timeout);
            eprintln!(
                "error: work in flight did not finish within the drain timeout ({} s); exiting with code \
                 {EXIT_DRAIN_TIMED_OUT}, it stays uncommitted",
                drain_timeout.as_secs()
            );
            std::process::exit(EXIT_DRAIN_TIMED_OUT);
        });
    });
    token
}

/// Runs a start-up step until it succeeds (giving its value), fails for
/// good, or `timeout` passes.
pub async fn retry_startup<F, Fut, T, E>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + Retryable + 'static,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(err) if err.retryable() && tokio::time::Instant::now() + delay < deadline => {
                warn!(error = %ErrorChain(&err), "{what} not ready yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Errors that say whether a retry can help.
pub trait Retryable {
    /// Whether a retry can help.
    fn retryable(&self) -> bool;
}

impl Retryable for outbox_pg::PgError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Retryable for outbox_kafka::BusError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Retryable for sink_clickhouse::SinkError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

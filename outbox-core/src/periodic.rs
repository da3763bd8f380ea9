//! Work repeated on a timer for as long as the process runs.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `task` now and then every `interval` (at least 100 ms) until
/// `shutdown` is cancelled: how gauges that need a query (backlog, consumer
/// lag) are kept fresh.
///
/// A round that takes longer than `interval` delays the next one instead of
/// starting rounds back to back, so a slow server is not queried harder.
/// Cancellation is seen between rounds and while one runs.
///
/// ```
/// use std::time::Duration;
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let shutdown = CancellationToken::new();
/// let stop = shutdown.clone();
/// let mut rounds = 0;
/// outbox_core::every(Duration::from_millis(100), shutdown, || {
///     rounds += 1;
///     if rounds == 3 {
///         stop.cancel();
///     }
///     async {}
/// })
/// .await;
/// assert_eq!(rounds, 3);
/// # }
/// ```
pub async fn every<F, Fut>(interval: Duration, shutdown: CancellationToken, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = task() => {}
                }
            }
        }
    }
}

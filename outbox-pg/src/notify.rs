//! Waking relays when events are committed (`LISTEN` / `NOTIFY`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{PgConfig, SqlName};

/// The notification channel of an outbox table: `outbox_events:<table>`.
pub(crate) fn channel_for(table: &SqlName) -> String {
    format!("outbox_events:{}", table.plain())
}

/// A connection that `LISTEN`s on a channel and wakes waiters on each
/// notification; it reconnects on its own and stops when dropped.
pub(crate) struct Listener {
    wake: Arc<Notify>,
    stop: CancellationToken,
}

impl Listener {
    pub(crate) fn start(pg: PgConfig, channel: String) -> Self {
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        tokio::spawn(listen_forever(pg, channel, wake.clone(), stop.clone()));
        Self { wake, stop }
    }

    /// Waits for a notification (or one that arrived while nobody waited),
    /// at most `timeout`. Every waiter wakes: an event lands in one lane, and
    /// only the claim that holds the lane (or any idle loop, for a free lane)
    /// can take it, so waking only one waiter could wake the wrong one.
    pub(crate) async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Wakes every waiter and leaves a permit for the next one to wait, so a
/// notification that arrives between two waits is not lost (at worst one
/// wait returns early, and its claim finds nothing).
fn wake_all(wake: &Notify) {
    wake.notify_waiters();
    wake.notify_one();
}

async fn listen_forever(pg: PgConfig, channel: String, wake: Arc<Notify>, stop: CancellationToken) {
    let config = pg.client_config();
    while !stop.is_cancelled() {
        match pg.connect_session(&config).await {
            Ok((client, mut connection)) => {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                // The channel is derived from a validated table name; quoted as an identifier.
                let listen_sql = format!("LISTEN \"{channel}\"");
                let listen = client.batch_execute(&listen_sql);
                tokio::pin!(listen);
                // The connection must be driven for LISTEN to complete.
                let listened = loop {
                    tokio::select! {
                        result = &mut listen => break Some(result),
                        message = messages.next() => if message.is_none() { break None },
                        _ = stop.cancelled() => return,
                    }
                };
                if let Some(Err(err)) = &listened {
                    warn!(error = %err, "cannot LISTEN for new outbox events; polling only");
                } else if listened.is_some() {
                    debug!(channel, "listening for new outbox events");
                    // A notification may have been missed while reconnecting.
                    wake_all(&wake);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            message = messages.next() => match message {
                                Some(Ok(AsyncMessage::Notification(_))) => wake_all(&wake),
                                Some(Ok(_)) => {}
                                Some(Err(err)) => {
                                    debug!(error = %err, "outbox event listener disconnected");
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                }
            }
            Err(err) => debug!(error = %err, "outbox event listener cannot connect; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

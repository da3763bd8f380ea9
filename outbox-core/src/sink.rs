//! Where events end: a store such as ClickHouse.

use async_trait::async_trait;

use crate::bus::Record;
use crate::Result;

/// What a sink durably did with a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Records written by this call.
    pub written: usize,
    /// Records recognised as already written.
    pub duplicates: usize,
    /// Records moved to the dead-letter place, with their reasons.
    pub dead_lettered: Vec<(crate::Position, String)>,
}

impl WriteReport {
    /// Number of records handled (every record of the batch when `Ok`).
    pub fn handled(&self) -> usize {
        self.written + self.duplicates + self.dead_lettered.len()
    }
}

/// Durable storage for consumed records.
///
/// `Ok` from [`Sink::write`] is the acknowledgement the consumer waits for
/// before it moves its bus positions: every record of the batch is then
/// durably written, known to be written already, or dead-lettered. `Err`
/// means nothing can be assumed about the batch; the consumer retries the
/// same records, and the sink must not write any of them twice.
///
/// **Cancellation.** With a lease ([`crate::Consume::with_lease`]), the
/// consumer drops a `write` mid-request when its grant expires or moves
/// (inside `select!`), then calls [`Sink::forget_positions`] and reads the
/// records again. So `write` need not be cancel-safe in the usual sense,
/// but a dropped write counts as an `Err`: some of its rows may have
/// landed, and the next write of the same records must recognise them.
#[async_trait]
pub trait Sink: Send {
    /// Writes `records` durably.
    async fn write(&mut self, records: &[Record]) -> Result<WriteReport>;

    /// Forgets whatever the sink cached about positions (where each
    /// partition continues, ids recently written), so that its next write
    /// of each partition looks up what is stored. Called by
    /// [`crate::Consume`] whenever the partitions it works may have been
    /// written by someone else in between (an ownership change, an
    /// abandoned write). A sink that caches nothing keeps the default.
    fn forget_positions(&mut self) {}
}

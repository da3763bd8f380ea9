//! Where events come from: the outbox.

use std::time::Duration;

use async_trait::async_trait;

use crate::bus::Delivery;
use crate::{Event, Result};

/// A batch of events claimed from a [`Source`], plus the source's handle on the claim.
///
/// While a batch is claimed, no other relay can claim its events. Dropping it
/// without [`Source::acknowledge`] abandons the claim: the events stay pending
/// and will be claimed again.
#[derive(Debug)]
pub struct Claimed<C> {
    /// The events, in the order they must be published.
    pub events: Vec<Event>,
    /// What the source needs to finish the claim.
    pub claim: C,
}

/// What [`Source::acknowledge`] did with a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AckSummary {
    /// Events removed (or marked done) because the broker acknowledged them.
    pub completed: usize,
    /// Events moved to the dead-letter place because they can never be published.
    pub dead_lettered: usize,
    /// Events left pending, to be claimed again.
    pub released: usize,
}

/// A store of pending events, such as a Postgres outbox table.
///
/// The contract that makes the relay lose nothing: an event is removed or
/// marked done in [`Source::acknowledge`] only if its [`Delivery`] says the
/// broker acknowledged it (or rejected it for good, in which case it is
/// dead-lettered, never dropped). Anything else stays pending.
///
/// **Cancellation.** The [`Relay`](crate::Relay) drops only the future of
/// [`Source::wait_for_events`] (at shutdown, inside `select!`): it must be
/// cancel-safe, holding nothing a later call needs. `claim` and
/// `acknowledge` run to completion once started (a shutdown finishes the
/// batch in hand); a relay that dies mid-way drops a [`Claimed`], which
/// must leave its events pending.
#[async_trait]
pub trait Source: Send + Sync {
    /// The source's handle on a claimed batch (for Postgres: the open transaction).
    type Claim: Send;

    /// Claims up to `max_events` pending events, oldest first. `Ok(None)` when nothing is pending.
    async fn claim(&self, max_events: usize) -> Result<Option<Claimed<Self::Claim>>>;

    /// Finishes a claim: `deliveries[i]` is the outcome of `claimed.events[i]`.
    async fn acknowledge(
        &self,
        claimed: Claimed<Self::Claim>,
        deliveries: &[Delivery],
    ) -> Result<AckSummary>;

    /// Waits until new events may be pending, or `timeout` passed.
    ///
    /// The default sleeps for `timeout`; sources that can be notified (Postgres
    /// `LISTEN`) return earlier.
    async fn wait_for_events(&self, timeout: Duration) -> Result<()> {
        tokio::time::sleep(timeout).await;
        Ok(())
    }

    /// Claims up to `max_events` more pending events into `claimed`, which
    /// is still in flight: they are appended to `claimed.events`, and the one
    /// [`Source::acknowledge`] of the claim then finishes them all. Returns
    /// how many were added (0 when none are pending, or when the source
    /// cannot extend a claim: the default).
    ///
    /// The contract that keeps each key's order while the claim's earlier
    /// events are still on their way to the broker: for every key, the
    /// events added come after every event of that key the claim already
    /// holds, and no other claim holds an earlier pending event of that key.
    /// The relay publishes them after the claim's earlier events, on the
    /// same ordered stream ([`Bus::publish_growing`](crate::Bus::publish_growing)).
    /// Called only where [`Source::extends_claims`] says so.
    async fn extend_claim(
        &self,
        claimed: &mut Claimed<Self::Claim>,
        max_events: usize,
    ) -> Result<usize> {
        let _ = (claimed, max_events);
        Ok(0)
    }

    /// Whether [`Source::extend_claim`] can add events to a claim in flight.
    /// The relay then keeps a claim that was not full open for up to
    /// [`RelayConfig::claim_window`](crate::RelayConfig::claim_window),
    /// publishing what arrives in its lanes while it is open. The default
    /// is `false`.
    fn extends_claims(&self) -> bool {
        false
    }

    /// Whether claims held at the same time never hold events of one key
    /// (the source splits keys into lanes and a claim owns whole lanes).
    /// Only then does the [`Relay`](crate::Relay) keep more than one batch
    /// in flight: otherwise two batches could publish a key out of order.
    /// The default, `false`, is right for any source that does not prove it.
    fn claims_are_disjoint_by_key(&self) -> bool {
        false
    }
}

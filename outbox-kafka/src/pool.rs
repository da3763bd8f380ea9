//! Producers for concurrent publishes: each publish in flight has one of
//! its own.
//!
//! librdkafka's idempotent producer sends one produce request per partition
//! at a time (it counts the messages in flight against the window of five
//! requests), so a second batch handed to a producer whose request is on
//! its way waits for that request's answer, and the producer's broker
//! thread polls its socket in a loop meanwhile (the waiting messages are
//! past `linger.ms`). Two batches on two producers travel side by side and
//! neither spins. See `docs/performance.md`.

use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};

/// A fixed number of producers, made up front so that no publish waits for
/// a new producer's connection and producer id (half a second on tansu);
/// one dropped after a fatal error is replaced by the next take.
pub(crate) struct Pool<P> {
    idle: Mutex<Vec<P>>,
    permits: Semaphore,
    limit: usize,
}

/// A producer taken from a [`Pool`]; [`Pool::give_back`] returns it.
pub(crate) struct Taken<'a, P> {
    pub(crate) producer: P,
    _permit: SemaphorePermit<'a>,
}

impl<P> Pool<P> {
    /// A pool of `producers` (at least one is needed to publish at all).
    pub(crate) fn new(producers: Vec<P>) -> Self {
        let limit = producers.len();
        Self {
            idle: Mutex::new(producers),
            permits: Semaphore::new(limit),
            limit,
        }
    }

    /// Waits until a producer is free, then takes an idle one, or one made
    /// by `create` in place of one that was not given back.
    pub(crate) async fn take<E>(
        &self,
        create: impl FnOnce() -> Result<P, E>,
    ) -> Result<Taken<'_, P>, E> {
        let Ok(permit) = self.permits.acquire().await else {
            unreachable!("the pool's semaphore is never closed")
        };
        let idle = self.lock().pop();
        let producer = match idle {
            Some(producer) => producer,
            None => create()?,
        };
        Ok(Taken {
            producer,
            _permit: permit,
        })
    }

    /// Takes a producer only if one is free now: `Ok(None)` when all are
    /// taken (the caller then uses another pool rather than wait).
    pub(crate) fn try_take<E>(
        &self,
        create: impl FnOnce() -> Result<P, E>,
    ) -> Result<Option<Taken<'_, P>>, E> {
        let Ok(permit) = self.permits.try_acquire() else {
            return Ok(None);
        };
        let idle = self.lock().pop();
        let producer = match idle {
            Some(producer) => producer,
            None => create()?,
        };
        Ok(Some(Taken {
            producer,
            _permit: permit,
        }))
    }

    /// Returns a producer for the next publish. One that must not serve
    /// again (after a fatal error) is dropped instead, and the next
    /// [`Pool::take`] that finds none idle makes a fresh one.
    pub(crate) fn give_back(&self, taken: Taken<'_, P>) {
        self.lock().push(taken.producer);
    }

    /// Waits for every taken producer to be given back, then runs `f` on
    /// the idle ones (for a flush that covers every producer).
    pub(crate) async fn with_all<T>(&self, f: impl FnOnce(&[P]) -> T) -> T {
        let permits = u32::try_from(self.limit).unwrap_or(u32::MAX);
        let Ok(_all) = self.permits.acquire_many(permits).await else {
            unreachable!("the pool's semaphore is never closed")
        };
        let idle = self.lock();
        f(&idle)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<P>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counter(made: &AtomicUsize) -> impl FnOnce() -> Result<usize, std::io::Error> + '_ {
        move || Ok(made.fetch_add(1, Ordering::SeqCst) + 1)
    }

    #[tokio::test]
    async fn a_lone_publish_makes_no_producer() -> Result<(), Box<dyn std::error::Error>> {
        let pool = Pool::new(vec![0usize, 1]);
        let made = AtomicUsize::new(0);
        for _ in 0..3 {
            let taken = pool.take(counter(&made)).await?;
            pool.give_back(taken);
        }
        assert_eq!(made.load(Ordering::SeqCst), 0);
        Ok(())
    }

    #[tokio::test]
    async fn concurrent_publishes_get_producers_of_their_own(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let pool = Pool::new(vec![0usize, 1]);
        let made = AtomicUsize::new(0);
        let a = pool.take(counter(&made)).await?;
        let b = pool.take(counter(&made)).await?;
        assert_ne!(a.producer, b.producer);
        pool.give_back(a);
        pool.give_back(b);
        let mut idle = pool.with_all(|idle| idle.to_vec()).await;
        idle.sort();
        assert_eq!(idle, vec![0, 1], "both kept for the next publishes");
        Ok(())
    }

    #[test]
    fn try_take_never_waits() -> Result<(), Box<dyn std::error::Error>> {
        let pool = Pool::new(vec![0usize]);
        let made = AtomicUsize::new(0);
        let Some(a) = pool.try_take(counter(&made))? else {
            return Err("the idle producer was not taken".into());
        };
        assert!(pool.try_take(counter(&made))?.is_none(), "all taken");
        pool.give_back(a);
        assert_eq!(pool.try_take(counter(&made))?.map(|t| t.producer), Some(0));
        assert_eq!(made.load(Ordering::SeqCst), 0);
        Ok(())
    }

    #[tokio::test]
    async fn the_limit_makes_a_publish_wait_for_a_producer(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let pool = Pool::new(vec![0usize]);
        let made = AtomicUsize::new(0);
        let a = pool.take(counter(&made)).await?;
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            pool.take(counter(&made)),
        )
        .await;
        assert!(waiting.is_err(), "a second producer beyond the limit");
        pool.give_back(a);
        let b = pool.take(counter(&made)).await?;
        assert_eq!(b.producer, 0);
        assert_eq!(made.load(Ordering::SeqCst), 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_producer_not_given_back_is_replaced() -> Result<(), Box<dyn std::error::Error>> {
        let pool = Pool::new(vec![0usize]);
        let made = AtomicUsize::new(0);
        let broken = pool.take(counter(&made)).await?;
        drop(broken);
        let next = pool.take(counter(&made)).await?;
        assert_eq!(next.producer, 1, "a fresh one");
        pool.give_back(next);
        assert_eq!(pool.with_all(|idle| idle.to_vec()).await, vec![1]);
        Ok(())
    }

    #[tokio::test]
    async fn with_all_waits_for_the_taken_ones() -> Result<(), Box<dyn std::error::Error>> {
        let pool = std::sync::Arc::new(Pool::new(vec![0usize, 1]));
        let made = AtomicUsize::new(0);
        let a = pool.take(counter(&made)).await?;
        let all = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.with_all(|idle| idle.len()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!all.is_finished());
        pool.give_back(a);
        assert_eq!(all.await?, 2, "every producer, the given-back one too");
        Ok(())
    }
}

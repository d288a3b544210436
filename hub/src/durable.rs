//! Where the hub's durable work runs: redb commits to `hub.db`, and the
//! signing and audit writes of control requests, go to tokio's blocking
//! pool through [`Hub::durable`], never on the async workers. On a
//! 2-core box one slow fsync on a worker would stall every keep-alive and
//! handshake the worker carries; on the blocking pool it stalls only the
//! request that asked for it.
//!
//! Who drives it: the control stream handler (`authority::handle`), the
//! admin commands that write (token create, revoke, apply, rollback) and
//! the disconnect bookkeeping. Evidence ingest (`ingest.rs`) and the
//! evidence admin commands already run on the blocking pool.
//!
//! Bounds: at most [`DURABLE_SLOTS`] such jobs run at once (redb runs one
//! write transaction at a time anyway); at most [`DURABLE_WAITERS`]
//! callers wait for a slot, and one more is refused at once with
//! [`DurableError::Busy`] (a control request is then refused with
//! `close::BUSY`: an anonymous caller's connection is closed with a
//! retry-after, an authenticated caller's stream is reset). The hub's own
//! bookkeeping (a spoke's disconnect) waits without that bound: there is
//! at most one per connection, and connections are capped. What it must
//! not do: run async code or hold a slot while waiting on the network.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::Hub;

/// Durable jobs running at once on the blocking pool.
pub const DURABLE_SLOTS: usize = 8;

/// Callers that may wait for a durable slot; one more is refused.
pub const DURABLE_WAITERS: usize = 256;

/// The slots (one per hub) and the count of callers waiting for one.
pub(crate) struct Durable {
    slots: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
    refused: std::sync::atomic::AtomicU64,
}

/// One waiter's place in the queue, given back when it stops waiting
/// (with a slot, or cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Durable {
    pub(crate) fn new() -> Durable {
        Durable::with_bounds(DURABLE_SLOTS, DURABLE_WAITERS)
    }

    fn with_bounds(slots: usize, max_waiting: usize) -> Durable {
        Durable {
            slots: Semaphore::new(slots.max(1)),
            waiting: AtomicUsize::new(0),
            max_waiting,
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A slot: at once if one is free; else after waiting in a queue of
    /// at most `max_waiting` callers, if `bounded`; or refused with
    /// [`DurableError::Busy`] when that queue is full.
    async fn slot(&self, bounded: bool) -> Result<SemaphorePermit<'_>, DurableError> {
        if let Ok(p) = self.slots.try_acquire() {
            return Ok(p);
        }
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let place = Waiting(&self.waiting);
        if bounded && before >= self.max_waiting {
            drop(place);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(DurableError::Busy);
        }
        let p = self
            .slots
            .acquire()
            .await
            .map_err(|_| DurableError::ShuttingDown)?;
        drop(place);
        Ok(p)
    }

    /// Callers refused since start because the queue was full.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Why a durable job did not return.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// The hub is shutting down (the runtime cancelled the job).
    #[error("the hub is shutting down")]
    ShuttingDown,
    /// The job panicked (a bug; the message names it).
    #[error("internal error in a durable job: {0}")]
    Panicked(String),
    /// Every slot is taken and [`DURABLE_WAITERS`] callers already wait.
    #[error("hub busy: {DURABLE_WAITERS} durable requests already queued; retry later")]
    Busy,
}

/// How long a caller refused with [`DurableError::Busy`] is told to wait
/// (the hub adds jitter).
pub const DURABLE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl Hub {
    /// Runs `f` on the blocking pool once one of [`DURABLE_SLOTS`] is
    /// free, and returns what it returned; refused with
    /// [`DurableError::Busy`] when [`DURABLE_WAITERS`] callers already
    /// wait.
    pub(crate) async fn durable<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hub) -> T + Send + 'static,
    ) -> Result<T, DurableError> {
        self.durable_job(true, f).await
    }

    /// [`Hub::durable`] for the hub's own bookkeeping (at most one job per
    /// connection): waits for a slot however many wait.
    pub(crate) async fn durable_unbounded<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hub) -> T + Send + 'static,
    ) -> Result<T, DurableError> {
        self.durable_job(false, f).await
    }

    async fn durable_job<T: Send + 'static>(
        &self,
        bounded: bool,
        f: impl FnOnce(&Hub) -> T + Send + 'static,
    ) -> Result<T, DurableError> {
        let _slot = self.inner.durable.slot(bounded).await?;
        let hub = self.clone();
        tokio::task::spawn_blocking(move || f(&hub))
            .await
            .map_err(|e| {
                if e.is_panic() {
                    DurableError::Panicked(e.to_string())
                } else {
                    DurableError::ShuttingDown
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Two slots, a queue of three: two run, three wait, the sixth is
    /// refused at once; a cancelled waiter gives its place back; once a
    /// slot frees, every waiter gets one in turn.
    #[tokio::test]
    async fn a_full_queue_refuses_and_cancelled_waiters_leave_it() {
        let d = std::sync::Arc::new(Durable::with_bounds(2, 3));
        let a = d.slot(true).await.expect("first slot");
        let b = d.slot(true).await.expect("second slot");
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (d, done) = (d.clone(), done_tx.clone());
            waiters.push(tokio::spawn(async move {
                let _s = d.slot(true).await.expect("a waiter gets a slot");
                done.send(i).expect("send");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
        }
        while d.waiting.load(Ordering::Acquire) < 3 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(d.slot(true).await, Err(DurableError::Busy)));
        assert_eq!(d.refused(), 1);
        assert_eq!(
            d.waiting.load(Ordering::Acquire),
            3,
            "the refused caller left no place"
        );
        // the hub's own bookkeeping is not refused: it waits
        let unbounded = {
            let d = d.clone();
            tokio::spawn(async move { d.slot(false).await.map(|_| ()) })
        };
        while d.waiting.load(Ordering::Acquire) < 4 {
            tokio::task::yield_now().await;
        }
        // a cancelled waiter gives its place back
        unbounded.abort();
        let _ = unbounded.await;
        assert_eq!(d.waiting.load(Ordering::Acquire), 3);
        assert!(matches!(d.slot(true).await, Err(DurableError::Busy)));
        assert_eq!(d.refused(), 2);
        drop(a);
        drop(b);
        for w in waiters {
            w.await.expect("waiter");
        }
        let mut order = Vec::new();
        while let Ok(i) = done_rx.try_recv() {
            order.push(i);
        }
        order.sort_unstable();
        assert_eq!(order, vec![0, 1, 2]);
        assert_eq!(d.waiting.load(Ordering::Acquire), 0);
        let _free = d.slot(true).await.expect("a slot once the queue drained");
    }
}

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
//! write transaction at a time anyway); later callers wait for a slot
//! (back-pressure: each waiter is a request stream that already exists,
//! so the queue is bounded by the streams the hub admits). What it must
//! not do: run async code or hold a slot while waiting on the network.

use tokio::sync::Semaphore;

use crate::Hub;

/// Durable jobs running at once on the blocking pool.
pub const DURABLE_SLOTS: usize = 8;

/// The slots (one per hub).
pub(crate) struct Durable {
    slots: Semaphore,
}

impl Durable {
    pub(crate) fn new() -> Durable {
        Durable {
            slots: Semaphore::new(DURABLE_SLOTS),
        }
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
}

impl Hub {
    /// Runs `f` on the blocking pool once one of [`DURABLE_SLOTS`] is
    /// free, and returns what it returned.
    pub(crate) async fn durable<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hub) -> T + Send + 'static,
    ) -> Result<T, DurableError> {
        let _slot = self
            .inner
            .durable
            .slots
            .acquire()
            .await
            .map_err(|_| DurableError::ShuttingDown)?;
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

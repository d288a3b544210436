//! Following what other hub replicas change in a shared state (the
//! JetStream backend): a config version applied on another replica wakes
//! the config long polls held here, and a revocation made there is
//! enforced here (installed in the handshake verifier, pushed to the
//! spokes connected here, the revoked spoke's session closed).
//!
//! Who drives it: [`crate::Hub::serve`], once, when the backend reports a
//! watch ([`crate::HubState::watch_changes`]). What it must not do: trust
//! a notification's content. A notification only says "look again"; this
//! task re-reads the latest config version and revocation list from the
//! store and keeps them only if newer than what it holds, so a
//! notification lost while a watch was re-created, or coalesced with
//! others, loses nothing (the backend notifies once after every re-watch).

use std::time::Duration;

use tracing::{info, warn};

use crate::state::{Changed, OnChange};
use crate::Hub;
use tidemesh_proto::close;

/// Pause before re-reading again after a failed read of the store.
const REREAD_PAUSE: Duration = Duration::from_millis(500);

/// Which parts are to be read again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Pending {
    config: bool,
    revocations: bool,
}

/// Notifications counted per part, so a reader can tell which moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    config: u64,
    revocations: u64,
}

impl Hub {
    /// Starts following other replicas' changes if the state is shared;
    /// `None` (nothing started) for a state this hub owns alone.
    pub(crate) fn follow_shared_state(&self) -> Option<tokio::task::JoinHandle<()>> {
        let (tx, mut rx) = tokio::sync::watch::channel(Counts::default());
        let on_change: OnChange = std::sync::Arc::new(move |c| {
            tx.send_modify(|n| match c {
                Changed::Config => n.config += 1,
                Changed::Revocations => n.revocations += 1,
            });
        });
        if !self.inner.store.watch_changes(on_change) {
            return None;
        }
        let hub = self.clone();
        Some(tokio::spawn(async move {
            let mut seen = Counts::default();
            let mut todo = Pending::default();
            loop {
                if todo == Pending::default() && rx.changed().await.is_err() {
                    return;
                }
                let now = *rx.borrow_and_update();
                todo.config |= now.config != seen.config;
                todo.revocations |= now.revocations != seen.revocations;
                seen = now;
                if todo == Pending::default() {
                    continue;
                }
                let h = hub.clone();
                let job = todo;
                todo = match tokio::task::spawn_blocking(move || h.catch_up(job)).await {
                    Ok(left) => left,
                    Err(e) => {
                        warn!(error = %e, "re-reading the shared state failed");
                        job
                    }
                };
                if todo != Pending::default() {
                    tokio::time::sleep(REREAD_PAUSE).await;
                }
            }
        }))
    }

    /// Re-reads what `job` names and takes what is newer; returns what is
    /// still to be read (a read failed).
    fn catch_up(&self, job: Pending) -> Pending {
        let mut left = Pending::default();
        if job.config {
            let mine = *self.inner.config_tx.borrow();
            match self.inner.store.config_latest() {
                Ok(Some(v)) if v.meta.version > mine => {
                    let n = v.meta.version;
                    self.publish(v);
                    info!(
                        version = n,
                        "config version from the shared state published to this hub's spokes"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "cannot read the latest config version; retrying");
                    left.config = true;
                }
            }
        }
        if job.revocations {
            match self.inner.store.revocation_list() {
                Ok(list) => {
                    let version = list.version;
                    if version > self.revocation_version() {
                        self.install_revocations(list);
                        self.close_revoked_sessions();
                        info!(
                            revocation_version = version,
                            "revocation list from the shared state in force"
                        );
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the revocation list; retrying");
                    left.revocations = true;
                }
            }
        }
        left
    }

    /// Closes the control sessions of spokes the list in force revokes (a
    /// revocation made on another replica).
    fn close_revoked_sessions(&self) {
        let gone: Vec<(String, super::Live)> = match self.inner.live.lock() {
            Ok(mut l) => {
                let ids: Vec<String> = l.keys().filter(|id| self.is_revoked(id)).cloned().collect();
                ids.into_iter()
                    .filter_map(|id| l.remove(&id).map(|x| (id, x)))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for (id, l) in gone {
            l.conn
                .close(quinn::VarInt::from_u32(close::REVOKED), b"revoked");
            info!(spoke = %id, "session of a spoke revoked on another replica closed");
        }
    }
}

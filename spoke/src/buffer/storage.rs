//! Where the evidence buffer keeps its redb database, and the handle the
//! writer swaps when it reopens the database after an I/O error.
//!
//! Who drives it: [`super::EvidenceBuffer`] opens through [`Storage`]; its
//! writer calls [`DbSlot::reopen`] after a failed commit (redb refuses
//! every operation after an I/O error until the database is reopened);
//! readers take the current handle with [`DbSlot::get`]. What it must not
//! do: interpret tables or retry on its own (the writer decides when).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Builder, Database, StorageBackend};

/// Makes a fresh redb storage backend (see [`Storage::Backend`]).
pub type BackendFactory = Arc<dyn Fn() -> Box<dyn StorageBackend> + Send + Sync>;

/// Where the buffer's database lives.
#[derive(Clone)]
pub enum Storage {
    /// A file, created if missing (production).
    File(PathBuf),
    /// A redb storage backend made by the function at open, and again each
    /// time the writer reopens the database after an I/O error (tests: a
    /// simulated disk with power cuts and injected faults).
    Backend(BackendFactory),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::File(p) => f.debug_tuple("File").field(p).finish(),
            Storage::Backend(_) => f.write_str("Backend(..)"),
        }
    }
}

impl Storage {
    /// Opens (or creates) the database.
    pub(crate) fn open(&self, cache_bytes: usize) -> Result<Database, redb::DatabaseError> {
        let mut b = Builder::new();
        b.set_cache_size(cache_bytes);
        match self {
            Storage::File(path) => b.create(path),
            Storage::Backend(make) => b.create_with_backend(Boxed(make())),
        }
    }
}

/// A boxed backend is a backend.
#[derive(Debug)]
struct Boxed(Box<dyn StorageBackend>);

impl StorageBackend for Boxed {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
}

/// The open database, shared by the writer and the readers, and how to
/// open it again.
pub(crate) struct DbSlot {
    storage: Storage,
    cache_bytes: usize,
    db: RwLock<Option<Arc<Database>>>,
}

/// How long a reopen waits for readers to let go of the old handle (the
/// file lock is released only when the last one does).
const READERS_GRACE: Duration = Duration::from_secs(2);

impl DbSlot {
    pub(crate) fn new(storage: Storage, cache_bytes: usize, db: Database) -> DbSlot {
        DbSlot {
            storage,
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
        }
    }

    /// The current handle; `None` while a reopen has not succeeded yet.
    pub(crate) fn get(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops the current handle (waiting briefly for readers to finish)
    /// and opens the database again. On error the slot stays empty and the
    /// caller retries later.
    pub(crate) fn reopen(&self) -> Result<Arc<Database>, redb::DatabaseError> {
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut old) = old {
            let deadline = Instant::now() + READERS_GRACE;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if Instant::now() < deadline => {
                        old = still_shared;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
        }
        let db = Arc::new(self.storage.open(self.cache_bytes)?);
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(db.clone());
        Ok(db)
    }
}

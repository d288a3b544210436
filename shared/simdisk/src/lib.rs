//! A simulated disk for redb, for tests: a durable image, a volatile
//! overlay, power cuts at a chosen write or sync, and injected I/O errors
//! (disk full, failing writes).
//!
//! Who drives it: tests of the spoke's evidence buffer and the hub's
//! evidence store open their database on [`SimDisk::backend`] (redb's
//! `Builder::create_with_backend`), run a workload, cut the power, and
//! reopen from what the disk kept. What it must not do: stand in for a
//! real disk anywhere but tests (it holds the whole file in memory), or
//! keep anything a real power cut could lose: only `sync_data` makes a
//! write durable.
//!
//! # Model
//! * A `write` or `set_len` changes the **overlay** (what reads see) and is
//!   queued as **pending**; `sync_data` makes every pending change durable.
//!   This is the page cache: a SIGKILL keeps it, a power cut does not.
//! * [`SimDisk::cut_after`] arms a power cut: the `n`-th mutating operation
//!   from now (write, set_len or sync, on any handle) is where the power
//!   goes. It fails with an I/O error and so does every later operation,
//!   on every handle, until [`SimDisk::restart`]: the machine is off.
//! * [`SimDisk::restart`] is the next boot: the disk holds the durable
//!   image and, under [`CutModel::Scramble`], a random subset of the
//!   pending changes (disks reorder writes between flushes), one of them
//!   possibly torn (only a prefix of its bytes landed). Handles from
//!   before the cut stay dead; new handles see the new image. This is
//!   what redb assumes of a disk: a synced write is durable, an unsynced
//!   one may or may not be, byte writes are atomic, and a write never
//!   changes bytes outside its range.
//! * Faults: [`SimDisk::set_full`] makes writes and growth beyond a size
//!   fail with `StorageFull` (ENOSPC), [`SimDisk::fail_writes`] makes every
//!   write, set_len and sync fail with an I/O error, until cleared.
//! * Latency: [`SimDisk::set_sync_delay`] makes every `sync_data` block the
//!   calling thread that long (a slow fsync), without holding the disk's
//!   lock, so tests can show which thread pays for durable work.
//!
//! The idea is redb's own crash tests (a backend keeping a durable and a
//! live image and freezing at a chosen sync); no code is shared.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use redb::StorageBackend;

/// What a power cut leaves of the writes not yet synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutModel {
    /// Every unsynced write is lost: the disk holds exactly what the last
    /// completed `sync_data` made durable.
    DropUnsynced,
    /// A random subset of the unsynced writes landed, in any order, and one
    /// of them may be torn.
    Scramble,
}

/// What [`SimDisk::restart`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boot {
    /// Unsynced writes and resizes pending at the cut.
    pub pending: usize,
    /// Of those, how many landed anyway.
    pub landed: usize,
    /// Whether one of them landed torn.
    pub torn: bool,
    /// Size of the image after the boot.
    pub len: u64,
}

/// Operation counters since the last restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Writes, resizes and syncs (what [`SimDisk::cut_after`] counts).
    pub ops: u64,
    /// Completed syncs.
    pub syncs: u64,
    /// Operations refused by an injected fault.
    pub faults: u64,
}

#[derive(Clone, Debug)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    /// What a sync made durable.
    durable: Vec<u8>,
    /// What reads see: durable plus pending.
    live: Vec<u8>,
    /// Changes since the last sync, in order.
    pending: Vec<Change>,
    /// Bumped by every restart: older handles are dead.
    generation: u64,
    /// The power is off (a cut happened, no restart yet).
    off: bool,
    /// The power goes when `counters.ops` reaches this.
    cut_at: Option<u64>,
    /// Writes reaching beyond this size fail with ENOSPC.
    full_at: Option<u64>,
    /// Every mutating operation fails with this kind.
    failing: Option<io::ErrorKind>,
    /// How long each `sync_data` blocks its caller.
    sync_delay: std::time::Duration,
    /// The mutating operation with this count fails once, with this kind.
    fail_once: Option<(u64, io::ErrorKind)>,
    counters: Counters,
}

fn apply(image: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write { offset, data } => write_at(image, *offset, data),
        Change::SetLen(len) => resize(image, *len),
    }
}

fn resize(image: &mut Vec<u8>, len: u64) {
    // Tests keep images far below usize::MAX; a larger request is
    // refused earlier by `check_len`.
    image.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
}

fn write_at(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(data.len());
    if image.len() < end {
        image.resize(end, 0);
    }
    if let Some(dst) = image.get_mut(start..end) {
        dst.copy_from_slice(data);
    }
}

fn check_len(len: u64) -> io::Result<()> {
    // 1 GiB: far beyond any test, and safe to hold in memory.
    if len > 1 << 30 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("simulated disk: {len} bytes is beyond its 1 GiB limit"),
        ));
    }
    Ok(())
}

/// A simulated disk holding one file. Cheap to clone; all clones are the
/// same disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data; a panicking test thread leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every later `sync_data` block its calling thread for `delay`
    /// (zero: no delay), as a slow or contended fsync would.
    pub fn set_sync_delay(&self, delay: std::time::Duration) {
        self.lock().sync_delay = delay;
    }

    /// A handle for redb (`Builder::create_with_backend`). A handle made
    /// while the power is off fails every operation.
    pub fn backend(&self) -> SimBackend {
        let generation = self.lock().generation;
        SimBackend {
            disk: self.clone(),
            generation,
        }
    }

    /// Arms a power cut at the `n`-th mutating operation from now (1: the
    /// next one). `0` disarms.
    pub fn cut_after(&self, n: u64) {
        let mut s = self.lock();
        s.cut_at = (n > 0).then(|| s.counters.ops + n);
    }

    /// Cuts the power now.
    pub fn cut_now(&self) {
        let mut s = self.lock();
        s.off = true;
        s.cut_at = None;
    }

    /// Whether the power is off.
    pub fn is_off(&self) -> bool {
        self.lock().off
    }

    /// Boots after a cut (or simulates one now, if the power is on): the
    /// disk keeps the durable image and, under [`CutModel::Scramble`], a
    /// random subset of the unsynced changes, one possibly torn. Every
    /// handle made before is dead; counters restart from zero.
    pub fn restart(&self, model: CutModel, rng: &mut impl Rng) -> Boot {
        let mut s = self.lock();
        let pending = std::mem::take(&mut s.pending);
        let mut image = std::mem::take(&mut s.durable);
        let mut boot = Boot {
            pending: pending.len(),
            ..Boot::default()
        };
        if model == CutModel::Scramble {
            let tear = if pending.is_empty() || !rng.random_bool(0.5) {
                None
            } else {
                Some(rng.random_range(0..pending.len()))
            };
            for (i, change) in pending.iter().enumerate() {
                if !rng.random_bool(0.5) {
                    continue;
                }
                boot.landed += 1;
                match (change, tear == Some(i)) {
                    (Change::Write { offset, data }, true) if !data.is_empty() => {
                        let keep = rng.random_range(0..data.len());
                        write_at(&mut image, *offset, &data[..keep]);
                        boot.torn = true;
                    }
                    _ => apply(&mut image, change),
                }
            }
        }
        boot.len = image.len() as u64;
        s.live = image.clone();
        s.durable = image;
        s.generation += 1;
        s.off = false;
        s.cut_at = None;
        s.counters = Counters::default();
        boot
    }

    /// Writes or growth beyond `limit` bytes fail with `StorageFull`
    /// (`None`: unlimited).
    pub fn set_full(&self, limit: Option<u64>) {
        self.lock().full_at = limit;
    }

    /// Every write, resize and sync fails with `kind` (`None`: they work).
    pub fn fail_writes(&self, kind: Option<io::ErrorKind>) {
        self.lock().failing = kind;
    }

    /// The `n`-th mutating operation from now (1: the next) fails once
    /// with `kind`; the ones before and after work. Where in a commit it
    /// lands decides what redb saw: a failed final sync leaves a commit
    /// that was written but reported as failed.
    pub fn fail_once_after(&self, n: u64, kind: io::ErrorKind) {
        let mut s = self.lock();
        s.fail_once = (n > 0).then(|| (s.counters.ops + n, kind));
    }

    /// Operation counters since the last restart.
    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    /// Size of the file as reads see it.
    pub fn len(&self) -> u64 {
        self.lock().live.len() as u64
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn power_off() -> io::Error {
    io::Error::other("simulated power cut: the disk is off")
}

/// One open handle on a [`SimDisk`] (what redb holds).
#[derive(Debug)]
pub struct SimBackend {
    disk: SimDisk,
    generation: u64,
}

impl SimBackend {
    fn alive(&self, s: &State) -> io::Result<()> {
        if s.off || s.generation != self.generation {
            return Err(power_off());
        }
        Ok(())
    }

    /// Counts a mutating operation: the cut and injected faults happen here.
    fn mutate(&self, s: &mut MutexGuard<'_, State>, grows_to: Option<u64>) -> io::Result<()> {
        self.alive(s)?;
        s.counters.ops += 1;
        if s.cut_at == Some(s.counters.ops) {
            s.off = true;
            s.cut_at = None;
            return Err(power_off());
        }
        if let Some(kind) = s.failing {
            s.counters.faults += 1;
            return Err(io::Error::new(kind, "simulated I/O error"));
        }
        if let Some((at, kind)) = s.fail_once {
            if at == s.counters.ops {
                s.fail_once = None;
                s.counters.faults += 1;
                return Err(io::Error::new(kind, "simulated I/O error (once)"));
            }
        }
        if let (Some(limit), Some(end)) = (s.full_at, grows_to) {
            if end > limit && end > s.live.len() as u64 {
                s.counters.faults += 1;
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on the simulated disk",
                ));
            }
        }
        Ok(())
    }
}

impl StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        let s = self.disk.lock();
        self.alive(&s)?;
        Ok(s.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.disk.lock();
        self.alive(&s)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(out.len())
            .and_then(|end| s.live.get(start..end))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {offset} beyond the end ({})",
                        out.len(),
                        s.live.len()
                    ),
                )
            })?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        check_len(len)?;
        let mut s = self.disk.lock();
        self.mutate(&mut s, Some(len))?;
        let change = Change::SetLen(len);
        apply(&mut s.live, &change);
        s.pending.push(change);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let delay = self.disk.lock().sync_delay;
        if !delay.is_zero() {
            // Outside the lock: a slow fsync stalls its caller, not readers.
            std::thread::sleep(delay);
        }
        let mut s = self.disk.lock();
        self.mutate(&mut s, None)?;
        let pending = std::mem::take(&mut s.pending);
        for change in &pending {
            apply(&mut s.durable, change);
        }
        s.counters.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        check_len(end)?;
        let mut s = self.disk.lock();
        if let Err(e) = self.mutate(&mut s, Some(end)) {
            // The write the power went during may have partly landed.
            if s.off && s.generation == self.generation {
                s.pending.push(Change::Write {
                    offset,
                    data: data.to_vec(),
                });
            }
            return Err(e);
        }
        let change = Change::Write {
            offset,
            data: data.to_vec(),
        };
        apply(&mut s.live, &change);
        s.pending.push(change);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn unsynced_writes_are_lost_and_synced_ones_kept() {
        let disk = SimDisk::new();
        let b = disk.backend();
        b.write(0, b"hello").expect("write");
        b.sync_data().expect("sync");
        b.write(5, b" world").expect("write");
        let mut out = [0u8; 11];
        b.read(0, &mut out).expect("read");
        assert_eq!(&out, b"hello world");
        disk.cut_now();
        assert!(b.read(0, &mut out).is_err(), "the machine is off");
        let mut rng = StdRng::seed_from_u64(1);
        let boot = disk.restart(CutModel::DropUnsynced, &mut rng);
        assert_eq!((boot.pending, boot.landed, boot.len), (1, 0, 5));
        assert!(b.read(0, &mut [0u8; 1]).is_err(), "old handles stay dead");
        let b = disk.backend();
        let mut out = [0u8; 5];
        b.read(0, &mut out).expect("read");
        assert_eq!(&out, b"hello");
    }

    #[test]
    fn the_cut_happens_at_the_chosen_operation() {
        let disk = SimDisk::new();
        let b = disk.backend();
        disk.cut_after(3);
        b.write(0, b"a").expect("1");
        b.sync_data().expect("2");
        assert!(b.write(1, b"b").is_err(), "3: the power goes");
        assert!(disk.is_off());
        assert!(disk.backend().len().is_err(), "new handles too");
        let boot = disk.restart(CutModel::DropUnsynced, &mut StdRng::seed_from_u64(2));
        assert_eq!(boot.len, 1);
    }

    #[test]
    fn scramble_lands_some_unsynced_writes_and_may_tear_one() {
        let mut torn = false;
        let mut partial = false;
        for seed in 0..64 {
            let disk = SimDisk::new();
            let b = disk.backend();
            for i in 0..8u8 {
                b.write(u64::from(i) * 4, &[i + 1; 4]).expect("write");
            }
            let boot = disk.restart(CutModel::Scramble, &mut StdRng::seed_from_u64(seed));
            torn |= boot.torn;
            partial |= boot.landed > 0 && boot.landed < boot.pending;
        }
        assert!(torn && partial);
    }

    #[test]
    fn faults_fail_writes_until_cleared() {
        let disk = SimDisk::new();
        let b = disk.backend();
        disk.set_full(Some(8));
        b.write(0, &[1; 8]).expect("fits");
        let e = b.write(4, &[2; 8]).expect_err("full");
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        b.write(0, &[3; 8])
            .expect("overwriting within the size fits");
        disk.set_full(None);
        b.write(4, &[2; 8]).expect("space back");
        disk.fail_writes(Some(io::ErrorKind::Other));
        assert!(b.sync_data().is_err());
        disk.fail_writes(None);
        b.sync_data().expect("sync");
        disk.fail_once_after(2, io::ErrorKind::Other);
        b.sync_data().expect("1");
        assert!(b.sync_data().is_err(), "2");
        b.sync_data().expect("3");
        assert_eq!(disk.counters().faults, 3);
    }
}

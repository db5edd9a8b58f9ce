//! A simulated disk under each node's redb database: what was written since the last
//! `sync_data` is lost when the machine loses power. A process crash loses nothing (the
//! operating system still has the writes); a power loss keeps only what was synced.
//!
//! The disk keeps the current bytes (what reads see) and, for every 4 KiB page written
//! since the last sync, the page as it was then; losing power puts those pages back.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

const PAGE: u64 = 4096;

#[derive(Debug, Default)]
struct State {
    current: Vec<u8>,
    /// Durable content of each page written since the last sync (absent: unchanged).
    undo: BTreeMap<u64, Vec<u8>>,
    /// The length at the last sync.
    durable_len: u64,
    /// A database has the disk open (redb calls `close` when it is done with it).
    open: bool,
    /// Powered off: the old database's last handles may still try to write; nothing
    /// reaches the disk until a new database opens it.
    off: bool,
    /// Planted bug: `sync_data` reports success and makes nothing durable.
    lying: bool,
}

/// One node's disk; clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

impl SimDisk {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A backend for a new `Database`, or `None` while the previous one still has the disk
    /// (its handles are dropped when the aborted tasks of a crashed node are cleaned up).
    pub fn backend(&self) -> Option<SimBackendIo> {
        let mut s = self.lock();
        if s.open {
            return None;
        }
        s.open = true;
        s.off = false;
        Some(SimBackendIo(self.clone()))
    }

    /// Plants the lying-fsync bug (see [`crate::Bug::LyingFsync`]).
    pub fn lie_about_syncs(&self) {
        self.lock().lying = true;
    }

    /// Power loss: every write since the last sync is gone, and nothing more is written
    /// until the next [`SimDisk::backend`]. Returns how many pages were lost.
    pub fn power_off(&self) -> usize {
        let n = self.lose_unsynced();
        self.lock().off = true;
        n
    }

    fn lose_unsynced(&self) -> usize {
        let mut s = self.lock();
        let undo = std::mem::take(&mut s.undo);
        let n = undo.len();
        let len = s.durable_len as usize;
        // A file shortened since the sync gets its old tail back first.
        if s.current.len() < len {
            s.current.resize(len, 0);
        }
        for (page, old) in undo {
            let at = (page * PAGE) as usize;
            let end = (at + old.len()).min(s.current.len());
            if at < end {
                let k = end - at;
                s.current[at..end].copy_from_slice(&old[..k]);
            }
        }
        s.current.resize(len, 0);
        n
    }
}

/// The redb storage backend over a [`SimDisk`].
#[derive(Debug)]
pub struct SimBackendIo(SimDisk);

fn powered_off() -> io::Error {
    io::Error::other("the simulated machine lost power")
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read or write past the end of the simulated disk")
}

impl redb::StorageBackend for SimBackendIo {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.lock().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.0.lock();
        let at = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = s.current.get(at..at + out.len()).ok_or_else(out_of_range)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        if s.off {
            return Err(powered_off());
        }
        let new = usize::try_from(len).map_err(|_| out_of_range())?;
        // Pages cut off or added are remembered like written ones.
        let (lo, hi) = (new.min(s.current.len()) as u64, new.max(s.current.len()) as u64);
        remember(&mut s, lo, hi);
        s.current.resize(new, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        if s.off {
            return Err(powered_off());
        }
        if s.lying {
            return Ok(());
        }
        s.undo.clear();
        s.durable_len = s.current.len() as u64;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        if s.off {
            return Err(powered_off());
        }
        let at = usize::try_from(offset).map_err(|_| out_of_range())?;
        if at + data.len() > s.current.len() {
            return Err(out_of_range());
        }
        remember(&mut s, offset, offset + data.len() as u64);
        s.current[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        self.0.lock().open = false;
        Ok(())
    }
}

/// Saves the durable content of the pages in `[from, to)` not saved since the last sync.
fn remember(s: &mut State, from: u64, to: u64) {
    if from >= to {
        return;
    }
    for page in from / PAGE..=(to - 1) / PAGE {
        if s.undo.contains_key(&page) {
            continue;
        }
        let at = (page * PAGE) as usize;
        let end = (at + PAGE as usize).min(s.current.len());
        let old = if at < end { s.current[at..end].to_vec() } else { Vec::new() };
        s.undo.insert(page, old);
    }
}

#[cfg(test)]
mod tests {
    use redb::StorageBackend;

    use super::*;

    #[test]
    fn power_loss_keeps_only_what_was_synced() -> Result<(), io::Error> {
        let disk = SimDisk::default();
        let b = disk.backend().expect("free");
        assert!(disk.backend().is_none(), "one database at a time");
        b.set_len(3 * PAGE)?;
        b.write(10, b"durable")?;
        b.sync_data()?;
        b.write(10, b"VOLATILE")?;
        b.set_len(5 * PAGE)?;
        b.write(4 * PAGE + 1, b"x")?;
        let mut out = [0u8; 8];
        b.read(10, &mut out)?;
        assert_eq!(&out, b"VOLATILE");
        assert_eq!(disk.power_off(), 3);
        assert!(b.write(0, b"late").is_err(), "nothing is written after the power went");
        assert_eq!(b.len()?, 3 * PAGE);
        let mut out = [0u8; 7];
        b.read(10, &mut out)?;
        assert_eq!(&out, b"durable");
        // A shortened file comes back whole.
        disk.lock().off = false;
        b.set_len(PAGE)?;
        disk.lose_unsynced();
        let mut out = [0u8; 7];
        b.read(10, &mut out)?;
        assert_eq!((b.len()?, &out), (3 * PAGE, b"durable"));
        b.close()?;
        assert!(disk.backend().is_some());
        Ok(())
    }
}

//! The serial console of a VM, captured to a size-bounded log.
//!
//! Bytes get absolute offsets counted from the first byte this backend ever captured for
//! the VM. The log keeps `console.log` (current) and `console.log.1` (previous); when the
//! current file would exceed `max_file_bytes` it becomes `.1` and a new file starts, so at
//! most `2 * max_file_bytes` are kept. Readers ask for an offset and get the bytes from
//! there (or from the oldest byte still kept, with `skipped` saying how many were lost).

use std::path::{Path, PathBuf};
use std::sync::Mutex as StdMutex;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{watch, Mutex};

/// A piece of console output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleChunk {
    /// Offset of `data[0]`.
    pub start: u64,
    /// Offset just after the data: pass it as the next `offset` to follow the log.
    pub next: u64,
    /// Bytes between the requested offset and `start` that were rotated away.
    pub skipped: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

#[derive(Debug)]
struct Files {
    /// Offset of the first byte of `console.log.1` (if it exists).
    old_base: Option<u64>,
    /// Offset of the first byte of `console.log`.
    base: u64,
    /// Offset after the last byte written.
    total: u64,
    file: Option<tokio::fs::File>,
}

/// A per-VM console log.
#[derive(Debug)]
pub struct Console {
    dir: PathBuf,
    max_file_bytes: u64,
    files: Mutex<Files>,
    total_tx: watch::Sender<u64>,
    total_now: StdMutex<u64>,
}

impl Console {
    /// Open (or continue) the log in `dir`.
    pub fn open(dir: &Path, max_file_bytes: u64) -> Console {
        let cur = std::fs::metadata(dir.join("console.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        let old = std::fs::metadata(dir.join("console.log.1"))
            .ok()
            .map(|m| m.len());
        let base = old.unwrap_or(0);
        let total = base + cur;
        let (total_tx, _) = watch::channel(total);
        Console {
            dir: dir.to_path_buf(),
            max_file_bytes: max_file_bytes.max(1024),
            files: Mutex::new(Files {
                old_base: old.map(|_| 0),
                base,
                total,
                file: None,
            }),
            total_tx,
            total_now: StdMutex::new(total),
        }
    }

    fn cur_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn old_path(&self) -> PathBuf {
        self.dir.join("console.log.1")
    }

    /// Bytes captured so far (the offset of the next byte).
    pub fn total(&self) -> u64 {
        self.total_now.lock().map(|g| *g).unwrap_or(0)
    }

    /// Subscribe to the total (changes whenever bytes are appended).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.total_tx.subscribe()
    }

    /// Append bytes, rotating when needed.
    pub async fn append(&self, mut data: &[u8]) -> std::io::Result<()> {
        let mut f = self.files.lock().await;
        while !data.is_empty() {
            let used = f.total - f.base;
            if used >= self.max_file_bytes {
                f.file = None;
                tokio::fs::rename(self.cur_path(), self.old_path()).await?;
                f.old_base = Some(f.base);
                f.base = f.total;
            }
            if f.file.is_none() {
                f.file = Some(
                    tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(self.cur_path())
                        .await?,
                );
            }
            let room = (self.max_file_bytes - (f.total - f.base)) as usize;
            let n = room.min(data.len());
            if let Some(file) = f.file.as_mut() {
                file.write_all(&data[..n]).await?;
                file.flush().await?;
            }
            f.total += n as u64;
            data = &data[n..];
        }
        let total = f.total;
        if let Ok(mut g) = self.total_now.lock() {
            *g = total;
        }
        self.total_tx.send_replace(total);
        Ok(())
    }

    /// Read up to `max` bytes from `offset`.
    pub async fn read(&self, offset: u64, max: usize) -> std::io::Result<ConsoleChunk> {
        let f = self.files.lock().await;
        let oldest = f.old_base.unwrap_or(f.base);
        let start = offset.clamp(oldest, f.total);
        let skipped = oldest.saturating_sub(offset);
        let mut data = Vec::new();
        let mut pos = start;
        // Part in the old file.
        if let Some(ob) = f.old_base {
            if pos < f.base && data.len() < max {
                let want = ((f.base - pos) as usize).min(max);
                read_at(&self.old_path(), pos - ob, want, &mut data).await?;
                pos += want as u64;
            }
        }
        if pos >= f.base && pos < f.total && data.len() < max {
            let want = ((f.total - pos) as usize).min(max - data.len());
            read_at(&self.cur_path(), pos - f.base, want, &mut data).await?;
        }
        let next = start + data.len() as u64;
        Ok(ConsoleChunk {
            start,
            next,
            skipped,
            data,
        })
    }

    /// The last `n` bytes as text (for error messages).
    pub async fn tail(&self, n: usize) -> String {
        let total = self.total();
        match self.read(total.saturating_sub(n as u64), n).await {
            Ok(c) => String::from_utf8_lossy(&c.data).to_string(),
            Err(_) => String::new(),
        }
    }

    /// Whether `needle` occurs in the retained log at or after `from`.
    pub async fn contains_since(&self, from: u64, needle: &str) -> bool {
        matches!(self.find(from, needle.as_bytes()).await, Ok(Some(_)))
    }

    /// Offset just after the first occurrence of `needle` at or after `from`.
    pub async fn find(&self, from: u64, needle: &[u8]) -> std::io::Result<Option<u64>> {
        let mut pos = from;
        let mut carry: Vec<u8> = Vec::new();
        let mut carry_start = from;
        loop {
            let chunk = self.read(pos, 64 * 1024).await?;
            if chunk.data.is_empty() {
                return Ok(None);
            }
            if chunk.skipped > 0 {
                carry.clear();
                carry_start = chunk.start;
            }
            carry.extend_from_slice(&chunk.data);
            if let Some(i) = carry.windows(needle.len().max(1)).position(|w| w == needle) {
                return Ok(Some(carry_start + (i + needle.len()) as u64));
            }
            let keep = needle.len().saturating_sub(1).min(carry.len());
            let drop_n = carry.len() - keep;
            carry.drain(..drop_n);
            carry_start += drop_n as u64;
            pos = chunk.next;
        }
    }

    /// Copy everything from `reader` into the log until EOF.
    pub async fn pump<R: AsyncRead + Unpin>(&self, mut reader: R) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Err(e) = self.append(&buf[..n]).await {
                        tracing::warn!(dir = %self.dir.display(), "console log write failed: {e}");
                    }
                }
            }
        }
    }
}

async fn read_at(path: &Path, off: u64, len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(std::io::SeekFrom::Start(off)).await?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    out.extend_from_slice(&buf[..got]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_and_followable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Console::open(dir.path(), 1024);
        let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n"; // 64 bytes
        for _ in 0..100 {
            c.append(line).await.expect("append");
        }
        assert_eq!(c.total(), 6400);
        let cur = std::fs::metadata(dir.path().join("console.log"))
            .expect("cur")
            .len();
        let old = std::fs::metadata(dir.path().join("console.log.1"))
            .expect("old")
            .len();
        assert!(cur <= 1024 && old <= 1024, "{cur} {old}");
        // Reading from 0 skips what was rotated away.
        let chunk = c.read(0, 100_000).await.expect("read");
        assert_eq!(chunk.skipped, chunk.start);
        assert_eq!(chunk.next, 6400);
        assert_eq!(chunk.data.len() as u64, cur + old);
        assert!(
            chunk.data.starts_with(b"0123"),
            "rotation keeps line boundaries here"
        );
        // Follow from the end.
        let end = c.read(6400, 10).await.expect("read");
        assert!(end.data.is_empty());
        c.append(b"BLIXARD-GUEST-READY\n").await.expect("append");
        let more = c.read(end.next, 1000).await.expect("read");
        assert_eq!(more.data, b"BLIXARD-GUEST-READY\n");
        assert_eq!(c.find(6000, b"READY").await.expect("find"), Some(6400 + 19));
        assert!(!c.contains_since(6420, "READY").await);
        // Reopening continues the offsets (approximately: what is on disk).
        let c2 = Console::open(dir.path(), 1024);
        assert_eq!(
            c2.read(0, 100_000).await.expect("read").next,
            cur + old + 20
        );
    }

    #[tokio::test]
    async fn find_across_chunk_boundary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Console::open(dir.path(), 1 << 20);
        c.append(b"xxxxBLIX").await.expect("a");
        c.append(b"ARD-READY").await.expect("a");
        assert_eq!(c.find(0, b"BLIXARD-READY").await.expect("f"), Some(17));
        assert_eq!(c.find(5, b"BLIXARD-READY").await.expect("f"), None);
    }
}

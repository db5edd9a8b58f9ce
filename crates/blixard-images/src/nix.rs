//! Talking to Nix: closures (`nix-store -qR`, `--dump-db`), NAR dumps, verified import
//! (`nix-store --import` of an export stream we build), and a NAR unpacker for hosts
//! without Nix.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// The store directory. Nix's store dir is fixed at build time; Blixard only supports the
/// standard one (closures built elsewhere refer to it in their bytes).
pub const STORE_DIR: &str = "/nix/store";

/// How to run Nix.
#[derive(Debug, Clone, Default)]
pub struct NixOptions {
    /// Directory holding `nix-store`; `None` searches `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Extra environment for every Nix command (e.g. `NIX_CONFIG=build-users-group =` when
    /// running as root without build users).
    pub env: Vec<(OsString, OsString)>,
    /// The store to import into (`--store URI`, e.g. `local?root=/srv/nix`); `None` is the
    /// default store. Publishing always reads the default store.
    pub target_store: Option<String>,
    /// Never use Nix for materialising, even if it is installed: unpack closures into a
    /// store-path layout under the data dir instead.
    pub disable_import: bool,
}

impl NixOptions {
    /// The `nix-store` binary, if it exists.
    pub fn nix_store(&self) -> Option<PathBuf> {
        let dirs: Vec<PathBuf> = match &self.bin_dir {
            Some(d) => vec![d.clone()],
            None => std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default(),
        };
        dirs.into_iter().map(|d| d.join("nix-store")).find(|p| p.is_file())
    }

    pub(crate) fn command(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.stdin(Stdio::null());
        c.kill_on_drop(true);
        c
    }
}

/// Registration info of one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
    pub references: Vec<String>,
}

/// The name part of a store path (`/nix/store/<32 chars>-<name>`), if it is one.
pub fn store_path_name(p: &str) -> Option<&str> {
    let rest = p.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    if rest.len() < 34 || !rest.is_char_boundary(32) {
        return None;
    }
    let (hash, name) = rest.split_at(32);
    let name = name.strip_prefix('-')?;
    let hash_ok = hash.bytes().all(|b| NIX32.contains(&b));
    let name_ok = !name.is_empty()
        && name.len() <= 211
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
    (hash_ok && name_ok).then_some(name)
}

/// The top-level store path of `p` (a store path, a path inside one, or a symlink such as
/// `result` pointing at one).
pub fn resolve_store_path(p: &Path) -> Option<String> {
    let mut cur = p.to_path_buf();
    for _ in 0..16 {
        let s = cur.to_str()?;
        if let Some(rest) = s.strip_prefix(STORE_DIR).and_then(|r| r.strip_prefix('/')) {
            let top = rest.split('/').next()?;
            let candidate = format!("{STORE_DIR}/{top}");
            return store_path_name(&candidate).is_some().then_some(candidate);
        }
        let target = std::fs::read_link(&cur).ok()?;
        cur = if target.is_absolute() { target } else { cur.parent()?.join(target) };
    }
    None
}

const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix's base-32 encoding of a hash (used in `sha256:…` strings).
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8).div_ceil(5);
    let mut s = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes.get(i).map_or(0, |x| (*x as u32) >> j);
        let hi = bytes.get(i + 1).map_or(0, |x| (*x as u32) << (8 - j));
        s.push(NIX32[((lo | hi) & 0x1f) as usize] as char);
    }
    s
}

/// Decodes Nix base-32 into exactly 32 bytes.
pub fn nix32_decode_32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 52 {
        return None;
    }
    let mut out = [0u8; 32];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = NIX32.iter().position(|x| *x == c)? as u32;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (digit << j) as u8;
        let carry = (digit >> (8 - j)) as u8;
        if i + 1 < 32 {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// Parses `sha256:<hex|nix32>` or bare hex/nix32 as Nix prints NAR hashes.
pub fn parse_nar_hash(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    if s.len() == 64 {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    } else {
        nix32_decode_32(s)
    }
}

/// Why a Nix command failed.
#[derive(Debug, thiserror::Error)]
pub enum NixCommandError {
    #[error("cannot run {bin}: {source}")]
    Spawn { bin: PathBuf, source: io::Error },
    #[error("`nix-store {args}` failed ({status}): {stderr}")]
    Failed { args: String, status: String, stderr: String },
    #[error("unexpected output from `nix-store {args}`: {detail}")]
    Output { args: String, detail: String },
}

pub(crate) async fn run_nix_store(opts: &NixOptions, bin: &Path, args: &[String]) -> Result<String, NixCommandError> {
    let out = opts
        .command(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|source| NixCommandError::Spawn { bin: bin.to_path_buf(), source })?;
    if !out.status.success() {
        return Err(NixCommandError::Failed {
            args: short_args(args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().chars().take(2000).collect(),
        });
    }
    String::from_utf8(out.stdout)
        .map_err(|_| NixCommandError::Output { args: short_args(args), detail: "not UTF-8".into() })
}

fn short_args(args: &[String]) -> String {
    let mut s = args.iter().take(4).cloned().collect::<Vec<_>>().join(" ");
    if args.len() > 4 {
        s.push_str(&format!(" … ({} more)", args.len() - 4));
    }
    s
}

/// The closure of `path` with registration info, references before referrers.
pub(crate) async fn query_closure(
    opts: &NixOptions,
    bin: &Path,
    store: Option<&str>,
    path: &str,
) -> Result<Vec<PathInfo>, NixCommandError> {
    let mut args = store_args(store);
    args.extend(["--query".into(), "--requisites".into(), path.into()]);
    let out = run_nix_store(opts, bin, &args).await?;
    let paths: Vec<String> = out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    let infos = dump_db(opts, bin, store, &paths).await?;
    topo_sort(infos).map_err(|detail| NixCommandError::Output { args: "--query --requisites".into(), detail })
}

fn store_args(store: Option<&str>) -> Vec<String> {
    match store {
        Some(s) => vec!["--store".into(), s.into()],
        None => vec![],
    }
}

/// `nix-store --dump-db PATHS`: path, narHash, narSize, deriver, n, n references, per path.
pub(crate) async fn dump_db(
    opts: &NixOptions,
    bin: &Path,
    store: Option<&str>,
    paths: &[String],
) -> Result<Vec<PathInfo>, NixCommandError> {
    let mut infos = Vec::with_capacity(paths.len());
    for batch in paths.chunks(512) {
        let mut args = store_args(store);
        args.push("--dump-db".into());
        args.extend(batch.iter().cloned());
        let out = run_nix_store(opts, bin, &args).await?;
        let bad = |detail: String| NixCommandError::Output { args: "--dump-db".into(), detail };
        let mut lines = out.lines();
        while let Some(path) = lines.next() {
            if path.is_empty() {
                continue;
            }
            let hash = lines.next().ok_or_else(|| bad(format!("no hash for {path}")))?;
            let nar_hash = parse_nar_hash(hash).ok_or_else(|| bad(format!("bad NAR hash {hash:?} for {path}")))?;
            let size = lines.next().ok_or_else(|| bad(format!("no size for {path}")))?;
            let nar_size = size.trim().parse().map_err(|_| bad(format!("bad NAR size {size:?} for {path}")))?;
            let _deriver = lines.next();
            let n: usize = lines
                .next()
                .and_then(|l| l.trim().parse().ok())
                .ok_or_else(|| bad(format!("bad reference count for {path}")))?;
            let mut references = Vec::with_capacity(n);
            for _ in 0..n {
                references.push(lines.next().ok_or_else(|| bad(format!("missing reference of {path}")))?.to_string());
            }
            infos.push(PathInfo { path: path.to_string(), nar_hash, nar_size, references });
        }
    }
    Ok(infos)
}

/// Orders paths so that every path comes after its references (self-references ignored).
pub(crate) fn topo_sort(infos: Vec<PathInfo>) -> Result<Vec<PathInfo>, String> {
    let mut by_path: BTreeMap<String, PathInfo> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(by_path.len());
    let keys: Vec<String> = by_path.keys().cloned().collect();
    for k in keys {
        // Iterative DFS.
        let mut stack: Vec<(String, bool)> = vec![(k, false)];
        let mut on_stack: BTreeSet<String> = BTreeSet::new();
        while let Some((p, expanded)) = stack.pop() {
            if done.contains(&p) {
                continue;
            }
            if expanded {
                on_stack.remove(&p);
                done.insert(p.clone());
                if let Some(info) = by_path.remove(&p) {
                    out.push(info);
                }
                continue;
            }
            let Some(info) = by_path.get(&p) else {
                return Err(format!("reference {p} is not in the closure"));
            };
            if !on_stack.insert(p.clone()) {
                return Err(format!("reference cycle through {p}"));
            }
            stack.push((p.clone(), true));
            for r in &info.references {
                if *r != p && !done.contains(r) {
                    if on_stack.contains(r) {
                        return Err(format!("reference cycle through {r}"));
                    }
                    stack.push((r.clone(), false));
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Export framing for `nix-store --import` (format of `nix-store --export`, Nix 2.x):
//   for each path: u64 1, NAR, u64 0x4558494e ("NIXE"), str path, u64 n + n str refs,
//   str deriver, u64 0 (no signature);  then u64 0.
// Strings are u64 length + bytes + zero padding to 8.

pub(crate) fn export_header() -> Vec<u8> {
    1u64.to_le_bytes().to_vec()
}

pub(crate) fn export_trailer(path: &str, references: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(0x4558_494eu64.to_le_bytes());
    put_str(&mut v, path.as_bytes());
    v.extend((references.len() as u64).to_le_bytes());
    for r in references {
        put_str(&mut v, r.as_bytes());
    }
    put_str(&mut v, b"");
    v.extend(0u64.to_le_bytes());
    v
}

pub(crate) fn export_end() -> Vec<u8> {
    0u64.to_le_bytes().to_vec()
}

fn put_str(v: &mut Vec<u8>, s: &[u8]) {
    v.extend((s.len() as u64).to_le_bytes());
    v.extend(s);
    v.resize(v.len() + (8 - s.len() % 8) % 8, 0);
}

// ---------------------------------------------------------------------------------------
// NAR unpacking (for hosts without Nix).

/// Why a NAR could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("malformed NAR: {0}")]
    Malformed(String),
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("reading NAR: {0}")]
    Read(io::Error),
}

const MAX_NAR_STRING: u64 = 4096;

struct NarReader<R> {
    r: R,
}

impl<R: Read> NarReader<R> {
    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).map_err(NarError::Read)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b[..pad]).map_err(NarError::Read)?;
        if b[..pad].iter().any(|x| *x != 0) {
            return Err(NarError::Malformed("non-zero padding".into()));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<Vec<u8>, NarError> {
        let len = self.u64()?;
        if len > MAX_NAR_STRING {
            return Err(NarError::Malformed(format!("string of {len} bytes")));
        }
        let mut v = vec![0u8; len as usize];
        self.r.read_exact(&mut v).map_err(NarError::Read)?;
        self.padding(len)?;
        Ok(v)
    }

    fn expect(&mut self, s: &str) -> Result<(), NarError> {
        let got = self.string()?;
        if got != s.as_bytes() {
            return Err(NarError::Malformed(format!("expected {s:?}, got {:?}", String::from_utf8_lossy(&got))));
        }
        Ok(())
    }
}

/// Unpacks a NAR into `target` (which must not exist). Files get mode 0644/0755.
pub fn unpack_nar(r: impl Read, target: &Path) -> Result<(), NarError> {
    let mut nr = NarReader { r };
    nr.expect("nix-archive-1")?;
    unpack_node(&mut nr, target, 0)
}

fn unpack_node<R: Read>(nr: &mut NarReader<R>, target: &Path, depth: usize) -> Result<(), NarError> {
    if depth > 256 {
        return Err(NarError::Malformed("directories nested too deep".into()));
    }
    let io_err = |source| NarError::Io { path: target.to_path_buf(), source };
    nr.expect("(")?;
    nr.expect("type")?;
    let ty = nr.string()?;
    match ty.as_slice() {
        b"regular" => {
            let mut tag = nr.string()?;
            let mut executable = false;
            if tag == b"executable" {
                executable = true;
                nr.expect("")?;
                tag = nr.string()?;
            }
            if tag != b"contents" {
                return Err(NarError::Malformed("expected contents".into()));
            }
            let len = nr.u64()?;
            let mut f = std::fs::File::create(target).map_err(io_err)?;
            let copied = io::copy(&mut (&mut nr.r).take(len), &mut f).map_err(io_err)?;
            if copied != len {
                return Err(NarError::Malformed("file contents cut short".into()));
            }
            nr.padding(len)?;
            use std::os::unix::fs::PermissionsExt;
            let mode = if executable { 0o755 } else { 0o644 };
            f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
            nr.expect(")")?;
        }
        b"symlink" => {
            nr.expect("target")?;
            let t = nr.string()?;
            use std::os::unix::ffi::OsStrExt;
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), target).map_err(io_err)?;
            nr.expect(")")?;
        }
        b"directory" => {
            std::fs::create_dir(target).map_err(io_err)?;
            let mut prev: Option<Vec<u8>> = None;
            loop {
                let tag = nr.string()?;
                if tag == b")" {
                    break;
                }
                if tag != b"entry" {
                    return Err(NarError::Malformed("expected entry".into()));
                }
                nr.expect("(")?;
                nr.expect("name")?;
                let name = nr.string()?;
                if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
                    return Err(NarError::Malformed(format!("bad entry name {:?}", String::from_utf8_lossy(&name))));
                }
                if prev.as_ref().is_some_and(|p| *p >= name) {
                    return Err(NarError::Malformed("entries not sorted".into()));
                }
                nr.expect("node")?;
                use std::os::unix::ffi::OsStrExt;
                unpack_node(nr, &target.join(std::ffi::OsStr::from_bytes(&name)), depth + 1)?;
                nr.expect(")")?;
                prev = Some(name);
            }
        }
        other => return Err(NarError::Malformed(format!("unknown node type {:?}", String::from_utf8_lossy(other)))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix32_round_trip() {
        let h = parse_nar_hash("sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw").expect("nix32");
        assert_eq!(nix32_encode(&h), "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw");
        let hex = parse_nar_hash("1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13").expect("hex");
        assert_eq!(nix32_encode(&hex).len(), 52);
        assert_eq!(nix32_decode_32(&nix32_encode(&hex)), Some(hex));
    }

    #[test]
    fn store_paths() {
        assert_eq!(store_path_name("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt"), Some("a.txt"));
        assert_eq!(store_path_name("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt/x"), None);
        assert_eq!(store_path_name("/nix/store/short-a"), None);
        assert_eq!(store_path_name("/tmp/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt"), None);
        assert_eq!(store_path_name("/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-"), None);
    }

    #[test]
    fn topo_sort_orders_references_first() {
        let p = |n: &str, refs: &[&str]| PathInfo {
            path: n.into(),
            nar_hash: [0; 32],
            nar_size: 0,
            references: refs.iter().map(|s| s.to_string()).collect(),
        };
        let sorted = topo_sort(vec![p("a", &["b", "a"]), p("b", &["c"]), p("c", &[])]).expect("acyclic");
        let order: Vec<&str> = sorted.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(order, vec!["c", "b", "a"]);
        assert!(topo_sort(vec![p("a", &["b"]), p("b", &["a"])]).is_err());
        assert!(topo_sort(vec![p("a", &["x"])]).is_err());
    }

    #[test]
    fn unpack_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(unpack_nar(&b"garbage"[..], &dir.path().join("x")).is_err());
        let mut nar = Vec::new();
        for s in ["nix-archive-1", "(", "type", "directory", "entry", "(", "name", "..", "node"] {
            put_str(&mut nar, s.as_bytes());
        }
        assert!(matches!(unpack_nar(&nar[..], &dir.path().join("y")), Err(NarError::Malformed(_))));
    }
}

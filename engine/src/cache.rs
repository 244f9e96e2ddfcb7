//! The content-addressed stage cache.
//!
//! # Fingerprints
//!
//! Every stage cell has a *fingerprint*: blake3 over the canonical JSON encoding (keys sorted, no
//! whitespace, floats in shortest round-trip form) of a [`FingerprintInputs`]:
//!
//! | input            | what it is                                                        |
//! |------------------|-------------------------------------------------------------------|
//! | `cache_version`  | [`CACHE_VERSION`]: bumped when the encoding or layout changes     |
//! | `kind`           | the stage kind (`data.split`)                                     |
//! | `kind_version`   | the kind's implementation version (`Stage::VERSION`)              |
//! | `params`         | the kind's typed parameters, defaults applied, re-serialized      |
//! | `inputs`         | per reference field, the *content digest* of the upstream artifact |
//! | `files`          | per path field, the content digest of the file or directory read  |
//! | `seed`           | the pipeline seed, for kinds whose numbers depend on it           |
//! | `backend`        | the resolved backend, for kinds whose numbers depend on it        |
//! | `names`          | `pipeline/stage`, only for kinds that write names into their output (`Sensitivity::names`: an exported `<pipeline>-<stage>-q8_0.gguf`) |
//!
//! ## Deliberately not hashed
//!
//! - **Names and paths.** Reference fields (`data: alpaca`) and path fields (`path: x.jsonl`) are
//!   removed from `params`; what they point at enters through `inputs` and `files` as content
//!   digests. Renaming a stage, moving the project, renaming the manifest or moving a data file
//!   keeps every fingerprint; editing the data does not.
//! - **Formatting.** Comments, key order, flow vs block style, quoting: the parameters are read into
//!   typed structs and re-serialized, so only values count (and `1` and `1.0` for a float field are
//!   the same value).
//! - **Where a stage runs.** `executor:` and `resources:` are stage keys, not parameters: a cell
//!   computed by a Slurm job and one computed in the `run` process are one entry. (The backend,
//!   which does change the numbers, is hashed for the kinds it affects.)
//! - **mtimes.** File digests are over content. [`FileHasher`] remembers (size, mtime, ctime,
//!   inode) → digest to skip re-hashing unchanged files, but that is a shortcut, never a key.
//!   The shortcut follows git's "racy git" rule: a digest taken less than [`RACY_WINDOW_NS`]
//!   after the file's last change is *suspect* and the file is hashed again next time. On file
//!   systems with coarse or zeroed sub-second times (containers, network mounts, FAT's two
//!   seconds) a same-size edit in the same second as the digest keeps every stat field, so only
//!   a digest taken safely after the change may be trusted. The ctime (which no program can set
//!   back) catches an edit whose mtime was restored. Known limit: a file server whose clock runs
//!   behind this machine's by more than the window defeats the rule; `burnish run --force`
//!   or touching the file recovers.
//! - **The manifest's own name, the pipeline name, the matrix cell name.** A stage in two
//!   manifests with the same parameters and inputs is one cache entry: ablations share work.
//!   (The exception is a kind whose output *contains* those names, which says so through
//!   `Sensitivity::names`; its entry then belongs to one pipeline and stage.)
//!
//! Because upstream artifacts enter by *content*, a stage whose upstream re-ran but produced the
//! same bytes stays cached (early cut-off). The price: a downstream fingerprint is known only once
//! its upstream is cached, so `plan` reports such stages as pending on their inputs.
//!
//! Every cache miss can be explained: each entry keeps its `inputs.json`, and
//! [`explain`] diffs two [`FingerprintInputs`] field by field ("`lr` changed 0.0001 → 0.0002",
//! "input `alpaca` changed").
//!
//! # Layout
//!
//! ```text
//! <cache>/entries/<fp>/out/<output>/…   the stage's outputs (`main` or the output's name)
//! <cache>/entries/<fp>/inputs.json      the fingerprint inputs
//! <cache>/entries/<fp>/record.json      written last: output file digests, metrics, timing
//! <cache>/tmp/<fp>.<pid>/               outputs being written
//! <cache>/locks/<fp>.lock               one process computes an entry; others wait and reuse it
//!                                       (an advisory `File::lock`, released by the OS on exit)
//! <cache>/locks/<fp>.lease              the same lock on a shared file system (see below)
//! <cache>/scratch/<fp>/                 checkpoints of an unfinished stage; survive crashes
//! <cache>/runs/<run-id>/                run records and per-stage logs
//! <cache>/hashes.json                   the (size, mtime, ctime, inode) → digest shortcut table
//! ```
//!
//! An entry **without `record.json` does not exist**. A stage writes into `tmp/`, the directory is
//! renamed into `entries/` (atomic on one filesystem), and only then is `record.json` written
//! (itself via a temporary file and a rename). A process killed at any point leaves either nothing
//! or an incomplete entry that the next writer, holding the entry lock, removes.
//!
//! Restoring a cached stage reads `record.json` only: a cached rerun never re-hashes artifacts.
//! `burnish verify` does, and reports (or with `--repair` evicts) entries whose files no longer
//! match their record.
//!
//! # Entry locks on shared file systems
//!
//! `flock` is advisory and, on NFS, Lustre and other shared file systems, may hold only within
//! one client, so two nodes of a cluster sharing the cache directory could compute one entry at
//! once. There (found from `/proc/self/mountinfo`, or forced with `BURNISH_LOCK=lease`) an entry
//! lock is a lease file instead: created exclusively with an owner (host, pid, nonce) and an
//! expiry, renewed every third of the lease (`BURNISH_LOCK_LEASE_S`, 60 s) by the holder,
//! removed on release, and taken over by another process only once expired — so a killed
//! holder blocks others for at most one lease. `crate::lease` has the protocol and its limits
//! (node clocks must agree within 5 s).
//!
//! # Kind versions
//!
//! A kind's `VERSION` is bumped whenever the same parameters and inputs would give other numbers,
//! so that `plan` shows its entries stale ("`train.dpo` implementation changed (version 1 → 2)")
//! and no result computed the old way is reused. The log of bumps:
//!
//! - `train.dpo`, `train.kto`, `logprobs` 1 → 2: the reference model is the policy's starting
//!   model (an upstream adapter stays on; the base under QLoRA is NF4, bf16 compute is kept),
//!   not the base with adapters switched off; completion log-probs count the completion's
//!   tokens only (not assistant turns inside a multi-turn prompt); adapter dropout is off while
//!   training; KTO's KL companions come from a record with a different prompt.
//! - `train.orpo` 1 → 2: the NLL term is TRL's token mean over the batch's chosen sequences;
//!   dropout off; completion-only targets.
//! - every trainer (`train.cpt`, `train.sft` and the above): warmup starts at a rate of 0
//!   (`lr·k/W`), and weight decay skips biases and norm weights, as transformers does.
//! - `train.cpt`, `train.sft`, `eval` 1 → 2: packed blocks keep documents apart (positions
//!   restart, block-diagonal attention); evaluation scores each document on its own.
//! - `merge`, `export.gguf`, `export.hf` 1 → 2: a QLoRA adapter goes on the NF4 base it trained
//!   on unless asked otherwise.
//! - `dataset` 1 → 2: Parquet is decoded through the Arrow reader, so timestamps (and other
//!   values kept in their display form) read from Parquet are written as Arrow files' are
//!   (`2023-01-01 00:00:00`, not `2023-01-01 00:00:00.000 +00:00`).
//!
//! # Known limits
//!
//! - A stage that is not deterministic (GPU kernels with atomics) yields different content digests
//!   on reruns, so downstream fingerprints differ after a `--force`: correct, but less sharing.
//! - The cache must live on one filesystem (rename is the commit point).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::stage::ArtifactType;

/// Version of the fingerprint encoding and cache layout. Bumping it invalidates every entry.
///
/// - 1: first layout (entries/, tmp/, locks/, scratch/, runs/; record.json written last).
pub const CACHE_VERSION: u32 = 1;

/// Everything a fingerprint is computed from. Stored as `inputs.json` in each entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FingerprintInputs {
    pub cache_version: u32,
    pub kind: String,
    pub kind_version: u32,
    /// Parameters with reference and path fields removed.
    pub params: Value,
    /// Reference field → upstream artifact content digest.
    pub inputs: BTreeMap<String, String>,
    /// Path field → content digest of the file or directory.
    pub files: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `pipeline/stage`, for the few kinds that write names into their output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<String>,
}

impl FingerprintInputs {
    /// blake3 hex of the canonical encoding.
    pub fn fingerprint(&self) -> String {
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        blake3::hash(canonical_json(&v).as_bytes())
            .to_hex()
            .to_string()
    }
}

/// Canonical JSON: object keys sorted at every level, no insignificant whitespace.
pub fn canonical_json(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<(&String, &Value)> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sort(v)))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).unwrap_or_default()
}

/// Remove a field path (`data`, `sources[1].data`, `lora.rank`) from a JSON value.
pub fn remove_path(v: &mut Value, path: &str) {
    use crate::yaml::{PathSeg, split_path};
    let segs = split_path(path);
    let Some((last, init)) = segs.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in init {
        let next = match (seg, cur) {
            (PathSeg::Key(k), Value::Object(m)) => m.get_mut(*k),
            (PathSeg::Index(i), Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match (last, cur) {
        (PathSeg::Key(k), Value::Object(m)) => {
            m.remove(*k);
        }
        (PathSeg::Index(i), Value::Array(a)) if *i < a.len() => {
            a[*i] = Value::Null;
        }
        _ => {}
    }
}

/// Why a fingerprint differs from an earlier one, in words.
///
/// `name_of` maps a reference field to the upstream stage it points at, for messages.
pub fn explain(
    old: &FingerprintInputs,
    new: &FingerprintInputs,
    name_of: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let mut out = Vec::new();
    if old.cache_version != new.cache_version {
        out.push(format!(
            "cache format changed {} → {}",
            old.cache_version, new.cache_version
        ));
    }
    if old.kind != new.kind {
        out.push(format!("kind changed `{}` → `{}`", old.kind, new.kind));
    } else if old.kind_version != new.kind_version {
        out.push(format!(
            "`{}` implementation changed (version {} → {})",
            new.kind, old.kind_version, new.kind_version
        ));
    }
    diff_values("", &old.params, &new.params, &mut out);
    for (field, digest) in &new.inputs {
        match old.inputs.get(field) {
            Some(o) if o == digest => {}
            Some(_) if digest == PENDING => {
                out.push(format!("input `{}` will be recomputed", name_of(field)))
            }
            Some(_) => out.push(format!("input `{}` changed", name_of(field))),
            None => out.push(format!("input `{}` added", name_of(field))),
        }
    }
    for field in old.inputs.keys() {
        if !new.inputs.contains_key(field) {
            out.push(format!("input field `{field}` removed"));
        }
    }
    for (field, digest) in &new.files {
        match old.files.get(field) {
            Some(o) if o == digest => {}
            Some(_) => out.push(format!("file in `{field}` changed")),
            None => out.push(format!("file `{field}` added")),
        }
    }
    if old.seed != new.seed {
        out.push(format!(
            "seed changed {} → {}",
            opt(&old.seed),
            opt(&new.seed)
        ));
    }
    if old.backend != new.backend {
        out.push(format!(
            "backend changed {} → {}",
            opt(&old.backend),
            opt(&new.backend)
        ));
    }
    if old.names != new.names {
        out.push(format!(
            "output name changed {} → {}",
            opt(&old.names),
            opt(&new.names)
        ));
    }
    out
}

/// The digest placeholder for an upstream artifact that is not computed yet.
pub const PENDING: &str = "pending";

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "none".into(), |v| v.to_string())
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => crate::yaml::format_float(f),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn diff_values(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, nv) in b {
                match a.get(k) {
                    Some(ov) => diff_values(&join(k), ov, nv, out),
                    None if nv.is_null() => {}
                    None => out.push(format!("`{}` set to {}", join(k), show(nv))),
                }
            }
            for (k, ov) in a {
                if !b.contains_key(k) && !ov.is_null() {
                    out.push(format!("`{}` removed (was {})", join(k), show(ov)));
                }
            }
        }
        (a, b) if a == b => {}
        (a, b) => {
            let name = if path.is_empty() { "parameters" } else { path };
            out.push(format!("`{name}` changed {} → {}", show(a), show(b)));
        }
    }
}

/// Errors of the cache itself.
#[derive(Debug, Error, Diagnostic)]
pub enum CacheError {
    #[error("cannot {action} {path}: {source}")]
    #[diagnostic(
        code(burnish::cache::io),
        help(
            "check that the cache directory is writable (set it with --cache-dir or BURNISH_CACHE)"
        )
    )]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cache entry {fingerprint} has an unreadable record: {reason}")]
    #[diagnostic(
        code(burnish::cache::record),
        help("run `burnish verify --repair` to evict it")
    )]
    BadRecord { fingerprint: String, reason: String },
    #[error(
        "the lease on entry {fingerprint} was taken over by another process while it was computed here; nothing was published"
    )]
    #[diagnostic(
        code(burnish::cache::lock_lost),
        help(
            "this process stalled for longer than the lease (BURNISH_LOCK_LEASE_S, 60 s by default); the other process publishes the entry, and a rerun reuses it"
        )
    )]
    LockLost { fingerprint: String },
    #[error("{name} is `{value}`, not {expected}")]
    #[diagnostic(code(burnish::cache::setting))]
    Setting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Remote(Box<crate::remote::RemoteError>),
}

impl From<crate::remote::RemoteError> for CacheError {
    fn from(e: crate::remote::RemoteError) -> Self {
        match e {
            crate::remote::RemoteError::Cache(c) => *c,
            other => CacheError::Remote(Box::new(other)),
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.display().to_string();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}

/// One output file in a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub blake3: String,
    pub size: u64,
}

/// One output (artifact) of an entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    #[serde(rename = "type")]
    pub ty: ArtifactType,
    /// Content digest: blake3 over the sorted (relative path, file digest) list.
    pub digest: String,
    pub files: BTreeMap<String, FileRecord>,
}

/// The completion record of an entry, written last.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub cache_version: u32,
    pub fingerprint: String,
    pub kind: String,
    /// The stage (cell) name that produced it, for humans.
    pub stage: String,
    /// Output name (`main` or a named output) → what it holds.
    pub outputs: BTreeMap<String, OutputRecord>,
    pub metrics: BTreeMap<String, Value>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub duration_ms: u64,
}

/// Digest of an artifact from its files.
pub fn artifact_digest(files: &BTreeMap<String, FileRecord>) -> String {
    let mut h = blake3::Hasher::new();
    for (path, rec) in files {
        h.update(path.as_bytes());
        h.update(b"\0");
        h.update(rec.blake3.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

/// blake3 of a file's content and its size.
pub fn hash_file(path: &Path) -> std::io::Result<FileRecord> {
    let mut f = fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok(FileRecord {
        blake3: h.finalize().to_hex().to_string(),
        size,
    })
}

/// Every regular file under `dir`: (`/`-separated relative path, full path), sorted by path.
pub fn walk_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let p = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap_or(&p)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every regular file under `dir`, by relative path, hashed.
pub fn hash_tree(dir: &Path) -> std::io::Result<BTreeMap<String, FileRecord>> {
    walk_files(dir)?
        .into_iter()
        .map(|(rel, p)| Ok((rel, hash_file(&p)?)))
        .collect()
}

/// Hashes input files and directories, skipping unchanged ones through a table of
/// (size, mtime, inode) → digest kept in the cache directory.
pub struct FileHasher {
    table_path: Option<PathBuf>,
    table: HashMap<String, StatEntry>,
    dirty: bool,
}

/// How long after a file's last change its digest stays suspect (the racy-git window): two
/// seconds covers one-second and FAT's two-second time stamps.
pub const RACY_WINDOW_NS: u128 = 2_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    size: u64,
    mtime_ns: u128,
    ctime_ns: u128,
    inode: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    mtime_ns: u128,
    #[serde(default)]
    ctime_ns: u128,
    inode: u64,
    digest: String,
    /// When the digest was taken (0 in tables written before the racy rule: always suspect).
    #[serde(default)]
    recorded_ns: u128,
}

impl StatEntry {
    /// The digest may be reused for a file with this stat: every field agrees and the digest was
    /// taken safely after the last change.
    fn trusted_for(&self, st: &Stat) -> bool {
        let changed = self.mtime_ns.max(self.ctime_ns);
        self.size == st.size
            && self.mtime_ns == st.mtime_ns
            && self.ctime_ns == st.ctime_ns
            && self.inode == st.inode
            && self.recorded_ns >= changed.saturating_add(RACY_WINDOW_NS)
    }
}

fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

impl FileHasher {
    /// A hasher that remembers nothing between runs.
    pub fn ephemeral() -> Self {
        FileHasher {
            table_path: None,
            table: HashMap::new(),
            dirty: false,
        }
    }

    fn stat(meta: &fs::Metadata) -> Stat {
        let mtime_ns = meta.modified().map_or(0, unix_ns);
        #[cfg(unix)]
        let (ctime_ns, inode) = {
            use std::os::unix::fs::MetadataExt;
            let secs = u128::try_from(meta.ctime()).unwrap_or(0);
            let nsec = u128::try_from(meta.ctime_nsec()).unwrap_or(0);
            (secs * 1_000_000_000 + nsec, meta.ino())
        };
        #[cfg(not(unix))]
        let (ctime_ns, inode) = (0, 0);
        Stat {
            size: meta.len(),
            mtime_ns,
            ctime_ns,
            inode,
        }
    }

    /// Content digest of a file, or of a directory (over its sorted relative paths and file
    /// digests).
    pub fn digest(&mut self, path: &Path) -> std::io::Result<String> {
        let meta = fs::metadata(path)?;
        if meta.is_dir() {
            let mut files = BTreeMap::new();
            for (rel, p) in walk_files(path)? {
                let size = fs::metadata(&p)?.len();
                files.insert(
                    rel,
                    FileRecord {
                        blake3: self.digest(&p)?,
                        size,
                    },
                );
            }
            return Ok(artifact_digest(&files));
        }
        let key = path.to_string_lossy().into_owned();
        let st = Self::stat(&meta);
        if let Some(e) = self.table.get(&key)
            && e.trusted_for(&st)
        {
            return Ok(e.digest.clone());
        }
        // Taken before reading, so that a change during the read counts as after the digest.
        let recorded_ns = unix_ns(SystemTime::now());
        let rec = hash_file(path)?;
        self.table.insert(
            key,
            StatEntry {
                size: st.size,
                mtime_ns: st.mtime_ns,
                ctime_ns: st.ctime_ns,
                inode: st.inode,
                digest: rec.blake3.clone(),
                recorded_ns,
            },
        );
        self.dirty = true;
        Ok(rec.blake3)
    }

    /// Save the table (best effort: it is only a shortcut).
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        if let Some(p) = &self.table_path
            && let Ok(text) = serde_json::to_string(&self.table)
        {
            let _ = write_atomic(p, text.as_bytes());
        }
        self.dirty = false;
    }
}

/// Write a file through a temporary sibling and a rename, with the data synced first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}.{}", std::process::id(), unique_suffix()));
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    // A failed write (a full disk) or rename leaves no temporary file behind.
    written
        .and_then(|()| fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A cache directory.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
    /// Entry locks are leases of this length (shared file systems), not `flock`s.
    lease: Option<std::time::Duration>,
}

/// An exclusive hold on one entry; released on drop.
pub struct EntryLock {
    file: Option<fs::File>,
    _lease: Option<crate::lease::Lease>,
}

impl EntryLock {
    /// Whether a lease lock was taken over by another process while held (a stall longer than
    /// the lease); a flock is never lost.
    pub fn lost(&self) -> bool {
        self._lease
            .as_ref()
            .is_some_and(|l| l.lost.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            let _ = f.unlock();
        }
    }
}

/// How entry locks are taken in the cache at `root`: `$BURNISH_LOCK` is `flock`, `lease`, or
/// `auto` (the default: a lease on NFS, Lustre and other shared file systems); a lease lasts
/// `$BURNISH_LOCK_LEASE_S` seconds (default 60).
fn lock_mode(root: &Path) -> Result<Option<std::time::Duration>, CacheError> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let lease = match var("BURNISH_LOCK_LEASE_S") {
        None => 60.0,
        Some(v) => match v.parse::<f64>() {
            Ok(s) if (1.0..=86_400.0).contains(&s) => s,
            _ => {
                return Err(CacheError::Setting {
                    name: "BURNISH_LOCK_LEASE_S",
                    value: v,
                    expected: "seconds from 1 to 86400",
                });
            }
        },
    };
    let lease = std::time::Duration::from_secs_f64(lease);
    match var("BURNISH_LOCK").as_deref() {
        None | Some("auto") => Ok(crate::lease::fs_type(root)
            .is_some_and(|t| crate::lease::needs_lease(&t))
            .then_some(lease)),
        Some("flock") => Ok(None),
        Some("lease") => Ok(Some(lease)),
        Some(other) => Err(CacheError::Setting {
            name: "BURNISH_LOCK",
            value: other.to_owned(),
            expected: "`auto`, `flock` or `lease`",
        }),
    }
}

/// A directory being filled for an entry.
pub struct Staging {
    pub dir: PathBuf,
    fingerprint: String,
}

impl Staging {
    /// Where output `name` (`main` or a named output) is written.
    pub fn output_dir(&self, name: &str) -> PathBuf {
        self.dir.join("out").join(name)
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit(EntryRecord),
    Miss,
    /// An entry that must not be used; the reason names what is wrong.
    Broken(String),
}

/// What `verify` found in one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryHealth {
    Ok,
    /// No record: an interrupted write, invisible to lookups.
    Incomplete,
    /// Files differ from the record.
    Corrupt(Vec<String>),
}

impl Cache {
    /// Open (creating) a cache directory.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        for sub in ["entries", "tmp", "locks", "scratch", "runs"] {
            let d = root.join(sub);
            fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            let _ = fs::write(
                &tag,
                "Signature: 8a477f597d28d172789f06886806bc55\n# burnish stage cache; see https://bford.info/cachedir/\n",
            );
        }
        Ok(Cache {
            root: root.to_path_buf(),
            lease: lock_mode(root)?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn file_hasher(&self) -> FileHasher {
        let path = self.root.join("hashes.json");
        let table = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        FileHasher {
            table_path: Some(path),
            table,
            dirty: false,
        }
    }

    pub fn entry_dir(&self, fp: &str) -> PathBuf {
        self.root.join("entries").join(fp)
    }

    pub fn scratch_dir(&self, fp: &str) -> PathBuf {
        self.root.join("scratch").join(fp)
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// The record of a complete entry; `None` when the entry does not exist (no record).
    pub fn record(&self, fp: &str) -> Result<Option<EntryRecord>, CacheError> {
        let path = self.entry_dir(fp).join("record.json");
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| CacheError::BadRecord {
                        fingerprint: fp.to_owned(),
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    /// Look an entry up for reuse. A record that cannot be read, names another fingerprint, or
    /// whose files are missing or have other sizes than it records is [`Lookup::Broken`]: never
    /// used, recomputed (and replaced on publish). Sizes are checked by `stat` alone; contents
    /// are re-hashed only by `verify`.
    pub fn lookup(&self, fp: &str) -> Result<Lookup, CacheError> {
        let record = match self.record(fp) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Lookup::Miss),
            Err(CacheError::BadRecord { reason, .. }) => {
                return Ok(Lookup::Broken(format!(
                    "record.json is unreadable: {reason}"
                )));
            }
            Err(e) => return Err(e),
        };
        if record.fingerprint != fp {
            return Ok(Lookup::Broken(format!(
                "record.json belongs to entry {}",
                record.fingerprint
            )));
        }
        for (name, out) in &record.outputs {
            let dir = self.entry_dir(fp).join("out").join(name);
            for (rel, f) in &out.files {
                match fs::metadata(dir.join(rel)) {
                    Ok(m) if m.len() == f.size => {}
                    Ok(m) => {
                        return Ok(Lookup::Broken(format!(
                            "{name}/{rel} has {} bytes, the record says {}",
                            m.len(),
                            f.size
                        )));
                    }
                    Err(_) => return Ok(Lookup::Broken(format!("{name}/{rel} is missing"))),
                }
            }
        }
        Ok(Lookup::Hit(record))
    }

    /// [`Cache::lookup`] for readers that only show results (`plan`, `compare`, `metrics`): a
    /// broken entry counts as absent.
    pub fn usable_record(&self, fp: &str) -> Result<Option<EntryRecord>, CacheError> {
        Ok(match self.lookup(fp)? {
            Lookup::Hit(r) => Some(r),
            Lookup::Miss | Lookup::Broken(_) => None,
        })
    }

    /// The fingerprint inputs stored with an entry (complete or not).
    pub fn inputs(&self, fp: &str) -> Option<FingerprintInputs> {
        let bytes = fs::read(self.entry_dir(fp).join("inputs.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Take the entry lock, blocking; `on_wait` is called once if another process holds it.
    pub fn lock(&self, fp: &str, on_wait: &mut dyn FnMut()) -> Result<EntryLock, CacheError> {
        if let Some(lease) = self.lease {
            let path = self.root.join("locks").join(format!("{fp}.lease"));
            let held = crate::lease::Lease::acquire(&path, lease, on_wait)
                .map_err(io("take the lease", &path))?;
            return Ok(EntryLock {
                file: None,
                _lease: Some(held),
            });
        }
        let path = self.root.join("locks").join(format!("{fp}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open lock", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock().map_err(io("lock", &path))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
        }
        Ok(EntryLock {
            file: Some(file),
            _lease: None,
        })
    }

    /// Whether some process holds the entry lock (used by `gc` to leave running work alone).
    pub fn is_locked(&self, fp: &str) -> bool {
        if let Some(lease) = self.lease {
            let path = self.root.join("locks").join(format!("{fp}.lease"));
            return crate::lease::is_held(&path, lease);
        }
        let path = self.root.join("locks").join(format!("{fp}.lock"));
        let Ok(file) = fs::OpenOptions::new().write(true).open(&path) else {
            return false;
        };
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(_) => true,
        }
    }

    /// Prepare a fresh staging directory (under the entry lock): removes leftovers of
    /// interrupted writers and creates `out/<name>` for each output.
    pub fn begin(
        &self,
        fp: &str,
        outputs: &[&str],
        _lock: &EntryLock,
    ) -> Result<Staging, CacheError> {
        let entry = self.entry_dir(fp);
        if entry.exists() && !entry.join("record.json").exists() {
            fs::remove_dir_all(&entry).map_err(io("remove incomplete entry", &entry))?;
        }
        let tmp_root = self.root.join("tmp");
        if let Ok(rd) = fs::read_dir(&tmp_root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{fp}.")) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp_root.join(format!("{fp}.{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let staging = Staging {
            dir,
            fingerprint: fp.to_owned(),
        };
        for o in outputs {
            let d = staging.output_dir(o);
            fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        Ok(staging)
    }

    /// Hash the staged outputs, move them into place and write the record last.
    #[allow(clippy::too_many_arguments)] // each argument is a distinct part of the record
    pub fn publish(
        &self,
        staging: Staging,
        inputs: &FingerprintInputs,
        stage: &str,
        types: &BTreeMap<String, ArtifactType>,
        metrics: BTreeMap<String, Value>,
        duration_ms: u64,
        lock: &EntryLock,
    ) -> Result<EntryRecord, CacheError> {
        let fp = staging.fingerprint.clone();
        let staged = staging.dir.clone();
        if lock.lost() {
            let _ = fs::remove_dir_all(&staged);
            return Err(CacheError::LockLost { fingerprint: fp });
        }
        let result = self.publish_staged(staging, inputs, stage, types, metrics, duration_ms);
        if result.is_err() {
            // Out of space, or any other failure: leave neither a staging directory nor an
            // entry without its record behind (the entry would be invisible, but hold space).
            let _ = fs::remove_dir_all(&staged);
            let entry = self.entry_dir(&fp);
            if !entry.join("record.json").exists() {
                let _ = fs::remove_dir_all(&entry);
            }
        }
        result
    }

    fn publish_staged(
        &self,
        staging: Staging,
        inputs: &FingerprintInputs,
        stage: &str,
        types: &BTreeMap<String, ArtifactType>,
        metrics: BTreeMap<String, Value>,
        duration_ms: u64,
    ) -> Result<EntryRecord, CacheError> {
        let fp = staging.fingerprint.clone();
        let mut outputs = BTreeMap::new();
        for (name, ty) in types {
            let d = staging.output_dir(name);
            let files = hash_tree(&d).map_err(io("hash outputs in", &d))?;
            sync_tree(&d);
            outputs.insert(
                name.clone(),
                OutputRecord {
                    ty: *ty,
                    digest: artifact_digest(&files),
                    files,
                },
            );
        }
        let record = EntryRecord {
            cache_version: CACHE_VERSION,
            fingerprint: fp.clone(),
            kind: inputs.kind.clone(),
            stage: stage.to_owned(),
            outputs,
            metrics,
            created: now_unix(),
            duration_ms,
        };
        self.commit(&staging, inputs, &record)?;
        Ok(record)
    }

    /// Make an entry pulled from a remote visible: `staging` holds its files, already checked
    /// against `record` by the caller. The same commit as [`Cache::publish`] (record last).
    pub fn install(
        &self,
        staging: Staging,
        record: &EntryRecord,
        inputs: &FingerprintInputs,
        _lock: &EntryLock,
    ) -> Result<EntryRecord, CacheError> {
        for name in record.outputs.keys() {
            sync_tree(&staging.output_dir(name));
        }
        let staged = staging.dir.clone();
        let result = self.commit(&staging, inputs, record);
        if result.is_err() {
            let _ = fs::remove_dir_all(&staged);
            let entry = self.entry_dir(&record.fingerprint);
            if !entry.join("record.json").exists() {
                let _ = fs::remove_dir_all(&entry);
            }
        }
        result.map(|()| record.clone())
    }

    /// Remove a staging directory whose entry will not be published.
    pub fn discard(&self, staging: Staging) {
        let _ = fs::remove_dir_all(&staging.dir);
    }

    /// Write `inputs.json` into the staging directory, rename it into `entries/` (replacing an
    /// older entry) and write `record.json` last.
    fn commit(
        &self,
        staging: &Staging,
        inputs: &FingerprintInputs,
        record: &EntryRecord,
    ) -> Result<(), CacheError> {
        let fp = &staging.fingerprint;
        let inputs_json = serde_json::to_vec_pretty(inputs).unwrap_or_default();
        let ip = staging.dir.join("inputs.json");
        write_atomic(&ip, &inputs_json).map_err(io("write", &ip))?;

        let entry = self.entry_dir(fp);
        if entry.exists() {
            // A forced rerun replaces the old entry; set it aside first so the rename is atomic.
            let old = self
                .root
                .join("tmp")
                .join(format!("{fp}.old.{}", std::process::id()));
            fs::rename(&entry, &old).map_err(io("move aside", &entry))?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(&staging.dir, &entry).map_err(io("publish", &entry))?;
        let rp = entry.join("record.json");
        let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
        write_atomic(&rp, &bytes).map_err(io("write", &rp))?;
        let scratch = self.scratch_dir(fp);
        if scratch.exists() {
            let _ = fs::remove_dir_all(&scratch);
        }
        Ok(())
    }

    /// Fingerprints of all entry directories (complete or not).
    pub fn entries(&self) -> Result<Vec<String>, CacheError> {
        let d = self.root.join("entries");
        let mut out = Vec::new();
        for e in fs::read_dir(&d).map_err(io("list", &d))?.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
        out.sort();
        Ok(out)
    }

    /// Re-hash an entry's files against its record.
    pub fn verify(&self, fp: &str) -> Result<EntryHealth, CacheError> {
        let record = match self.record(fp) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(EntryHealth::Incomplete),
            Err(CacheError::BadRecord { reason, .. }) => {
                return Ok(EntryHealth::Corrupt(vec![format!(
                    "record.json unreadable: {reason}"
                )]));
            }
            Err(e) => return Err(e),
        };
        let mut problems = Vec::new();
        for (name, out) in &record.outputs {
            let dir = self.entry_dir(fp).join("out").join(name);
            let found = match hash_tree(&dir) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(format!("output `{name}` unreadable: {e}"));
                    continue;
                }
            };
            for (path, rec) in &out.files {
                match found.get(path) {
                    None => problems.push(format!("{name}/{path} is missing")),
                    Some(f) if f.size != rec.size => problems.push(format!(
                        "{name}/{path} has {} bytes, the record says {}",
                        f.size, rec.size
                    )),
                    Some(f) if f.blake3 != rec.blake3 => {
                        problems.push(format!("{name}/{path} content differs from its record"))
                    }
                    Some(_) => {}
                }
            }
            for path in found.keys() {
                if !out.files.contains_key(path) {
                    problems.push(format!("{name}/{path} is not in the record"));
                }
            }
        }
        Ok(if problems.is_empty() {
            EntryHealth::Ok
        } else {
            EntryHealth::Corrupt(problems)
        })
    }

    /// Remove an entry (under its lock).
    pub fn evict(&self, fp: &str) -> Result<(), CacheError> {
        let lock = self.lock(fp, &mut || {})?;
        let d = self.entry_dir(fp);
        // Remove the record first so a concurrent reader never sees a record without files.
        let _ = fs::remove_file(d.join("record.json"));
        if d.exists() {
            fs::remove_dir_all(&d).map_err(io("remove", &d))?;
        }
        drop(lock);
        Ok(())
    }

    /// Leftover staging directories (`tmp/`) and scratch directories (`scratch/`) whose
    /// fingerprints no process holds a lock on.
    pub fn leftovers(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for sub in ["tmp", "scratch"] {
            if let Ok(rd) = fs::read_dir(self.root.join(sub)) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let fp = name.split('.').next().unwrap_or("").to_owned();
                    if !self.is_locked(&fp) {
                        out.push((fp, e.path()));
                    }
                }
            }
        }
        out
    }
}

fn sync_tree(dir: &Path) {
    for (_, p) in walk_files(dir).unwrap_or_default() {
        if let Ok(f) = fs::File::open(&p) {
            let _ = f.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fi(params: Value) -> FingerprintInputs {
        FingerprintInputs {
            cache_version: CACHE_VERSION,
            kind: "data.split".into(),
            kind_version: 1,
            params,
            inputs: BTreeMap::from([("data".into(), "abc".into())]),
            files: BTreeMap::new(),
            seed: Some(1),
            backend: None,
            names: None,
        }
    }

    #[test]
    fn key_order_does_not_change_fingerprints() {
        let a = fi(json!({"a": 1, "b": {"x": 1, "y": 2}}));
        let b = fi(serde_json::from_str(r#"{"b": {"y": 2, "x": 1}, "a": 1}"#).unwrap());
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(
            a.fingerprint(),
            fi(json!({"a": 2, "b": {"x": 1, "y": 2}})).fingerprint()
        );
    }

    #[test]
    fn explain_names_each_change() {
        let a = fi(json!({"lr": 0.0001, "lora": {"rank": 8}}));
        let mut b = fi(json!({"lr": 0.0002, "lora": {"rank": 8, "alpha": 16}}));
        b.inputs.insert("data".into(), "def".into());
        b.seed = Some(2);
        let r = explain(&a, &b, &|f| format!("{f}-stage"));
        assert_eq!(
            r,
            vec![
                "`lr` changed 0.0001 → 0.0002",
                "`lora.alpha` set to 16",
                "input `data-stage` changed",
                "seed changed 1 → 2",
            ]
        );
    }

    /// The racy-git rule: a digest recorded within the window after the file's change is not
    /// reused; one recorded safely after it is (so the shortcut still works).
    #[test]
    fn a_digest_taken_right_after_a_change_is_suspect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        fs::write(&path, b"{\"text\": \"b\"}\n").unwrap();
        let real = hash_file(&path).unwrap().blake3;
        let st = FileHasher::stat(&fs::metadata(&path).unwrap());
        let changed = st.mtime_ns.max(st.ctime_ns);
        let with_recorded = |recorded_ns, ctime_ns| {
            let mut h = FileHasher::ephemeral();
            h.table.insert(
                path.to_string_lossy().into_owned(),
                StatEntry {
                    size: st.size,
                    mtime_ns: st.mtime_ns,
                    ctime_ns,
                    inode: st.inode,
                    // What the file held when the digest was taken: same size, other bytes.
                    digest: "stale".into(),
                    recorded_ns,
                },
            );
            h.digest(&path).unwrap()
        };
        let late = changed + 2 * RACY_WINDOW_NS;
        assert_eq!(
            with_recorded(changed + RACY_WINDOW_NS / 4, st.ctime_ns),
            real
        );
        assert_eq!(
            with_recorded(0, st.ctime_ns),
            real,
            "a table from before the rule"
        );
        // Size, mtime and inode agree but the ctime moved: an edit whose mtime was put back.
        assert_eq!(with_recorded(late, st.ctime_ns.saturating_sub(1)), real);
        assert_eq!(with_recorded(late, st.ctime_ns), "stale");
    }

    #[test]
    fn remove_path_handles_nested_and_indexed_fields() {
        let mut v = json!({"data": "x", "sources": [{"data": "a", "weight": 1}], "k": 2});
        remove_path(&mut v, "data");
        remove_path(&mut v, "sources[0].data");
        assert_eq!(v, json!({"sources": [{"weight": 1}], "k": 2}));
    }
}

//! The shared remote cache: computed entries on object storage, reusable from any machine.
//!
//! A remote holds the same entries as a local cache, in a layout made for object stores:
//!
//! ```text
//! <remote>/v1/blobs/<blake3>       one output file's bytes, named by their digest: a file that
//!                                  two entries (or two outputs) share is stored once
//! <remote>/v1/entries/<fp>.json    one entry: its record and its fingerprint inputs, written last
//! ```
//!
//! The URL (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///dir`, `http(s)://…` read-only)
//! goes to `object_store`'s builders, which take credentials the standard way: the provider's
//! environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`), web identity and instance metadata;
//! for S3 also the static keys of `$AWS_PROFILE` (or `default`) in the shared credentials file,
//! which `object_store` does not read itself. A URL with a user, password or query is refused,
//! so that no secret can reach a manifest, a lock file, a run record or a log.
//!
//! # Pushing
//!
//! Blobs first: each file is skipped when the remote has its blob (a HEAD), else uploaded in one
//! request, or as a multipart upload of [`PART`]-byte parts from [`MULTIPART`] bytes up;
//! [`PARALLEL`] transfers at a time. Each file is hashed as it is read and compared with the
//! local record, so a file changed after it was cached is refused, never sent under its old
//! digest. Only then is the entry file written, with put-if-absent (`PutMode::Create`:
//! `If-None-Match: *` on S3). Hence:
//!
//! - **a reader never sees a half-pushed entry**: an entry file exists only once every blob it
//!   names does (a blob becomes visible whole: a single put, or a completed multipart upload);
//! - **a killed push leaves nothing visible**, only blobs no entry names yet; the next push
//!   finds them and sends the rest (resumable), and `gc` removes them past its horizon;
//! - **two writers of one entry do not fight**: the second's put-if-absent fails, which counts
//!   as success (both computed the same fingerprint; either record is valid).
//!
//! # Pulling
//!
//! Nothing pulled is used before it is verified (Bazel's poisoned-cache lesson). The entry file
//! must be for the fingerprint asked (its inputs hash to it), each output's digest must follow
//! from its file list, and every path must be a plain relative one. Each blob streams into a
//! staging directory of the local cache with its blake3 and size checked; any mismatch is an
//! error naming the key. Only a fully verified entry is installed, under the entry lock, with
//! the local cache's own commit rules (record last).
//!
//! # Garbage collection
//!
//! [`Remote::gc`] removes the entries no root reaches: the roots are the fingerprints the caller
//! keeps (lock files, recent local runs) and every entry pushed within the horizon. Then it
//! removes blobs that no remaining entry names and that are older than the horizon (a younger
//! one may belong to a push still in progress). Entry files go first, so no entry is ever left
//! naming a removed blob.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use miette::Diagnostic;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, WriteMultipart};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cache::{
    self, CACHE_VERSION, Cache, CacheError, EntryLock, EntryRecord, FingerprintInputs, Lookup,
};

/// Version of the remote layout (`v1/`).
pub const LAYOUT: u32 = 1;
/// Files from this size up go as multipart uploads.
pub const MULTIPART: u64 = 16 << 20;
/// Part size of multipart uploads (S3's minimum is 5 MiB).
pub const PART: usize = 8 << 20;
/// Transfers at a time.
pub const PARALLEL: usize = 8;
/// The largest entry file read (an entry lists files and metrics, never data).
const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// Whether this machine may write to the remote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteMode {
    /// Pull on a miss and push what this machine computes.
    #[default]
    ReadWrite,
    /// Pull only (a shared team cache that CI fills, say).
    ReadOnly,
}

impl RemoteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteMode::ReadWrite => "read-write",
            RemoteMode::ReadOnly => "read-only",
        }
    }
}

/// An entry as the remote stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteEntry {
    pub layout: u32,
    pub record: EntryRecord,
    pub inputs: FingerprintInputs,
}

/// Errors of the remote cache.
#[derive(Debug, Error, Diagnostic)]
pub enum RemoteError {
    #[error("remote `{url}` cannot be used: {reason}")]
    #[diagnostic(
        code(burnish::remote::url),
        help(
            "remotes are s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///dir or http(s)://host/path (read-only); credentials come from the environment, never the URL"
        )
    )]
    Url { url: String, reason: String },
    #[error("remote `{url}` is read-only: cannot push entry {fingerprint}")]
    #[diagnostic(
        code(burnish::remote::read_only),
        help("set `cache.mode: read-write` or pass `--remote-mode read-write` to push")
    )]
    ReadOnly { url: String, fingerprint: String },
    #[error("remote `{url}`: cannot {action} {key}: {source}")]
    #[diagnostic(
        code(burnish::remote::transfer),
        help(
            "check the remote's credentials and that it is reachable; `--no-remote` runs on the local cache alone"
        )
    )]
    Transfer {
        url: String,
        action: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("remote `{url}`: {key} is corrupt: {reason}")]
    #[diagnostic(
        code(burnish::remote::corrupt),
        help(
            "nothing of it was used; remove the key from the remote (or run `burnish gc --remote`) and push the entry again"
        )
    )]
    Corrupt {
        url: String,
        key: String,
        reason: String,
    },
    #[error("cannot push entry {fingerprint}: {reason}")]
    #[diagnostic(
        code(burnish::remote::local),
        help("run `burnish verify --repair` and then the pipeline again")
    )]
    Local { fingerprint: String, reason: String },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Cache(Box<CacheError>),
}

impl From<CacheError> for RemoteError {
    fn from(e: CacheError) -> Self {
        RemoteError::Cache(Box::new(e))
    }
}

/// What has moved, for the run summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    pub pulled: u64,
    pub pulled_bytes: u64,
    pub pushed: u64,
    pub pushed_bytes: u64,
}

#[derive(Default)]
struct Counters {
    pulled: AtomicU64,
    pulled_bytes: AtomicU64,
    pushed: AtomicU64,
    pushed_bytes: AtomicU64,
}

/// A remote cache.
pub struct Remote {
    url: String,
    mode: RemoteMode,
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    runtime: tokio::runtime::Runtime,
    /// Entry files read so far (`None`: absent when asked), so that a run asks once per entry.
    seen: Mutex<HashMap<String, Option<Arc<RemoteEntry>>>>,
    counters: Counters,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Why `url` cannot name a remote (`None` when it can); checked before any connection.
pub fn url_problem(url: &str) -> Option<String> {
    let parsed = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return Some(format!("not a URL ({e})")),
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Some("it carries credentials; give them through the environment".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Some("it has a query or fragment (credentials stay out of URLs)".into());
    }
    match parsed.scheme() {
        "s3" | "s3a" | "gs" | "az" | "http" | "https" if parsed.host_str().is_none() => {
            Some("it names no bucket or host".into())
        }
        "s3" | "s3a" | "gs" | "az" | "http" | "https" | "memory" => None,
        "file" if parsed.host_str().is_some_and(|h| !h.is_empty()) => {
            Some("a file URL names a local directory: file:///dir".into())
        }
        "file" => None,
        other => Some(format!(
            "scheme `{other}` is not one of s3, gs, az, file, http, https"
        )),
    }
}

/// `url` fit to show: a user, password or query replaced by `***`.
pub fn redact(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return match url.rsplit_once('@') {
            Some((_, rest)) => format!("***@{rest}"),
            None => url.to_owned(),
        };
    };
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_password(None);
        let _ = u.set_username("***");
    }
    if u.query().is_some() {
        u.set_query(Some("***"));
    }
    u.set_fragment(None);
    u.to_string()
}

impl Remote {
    /// Open the remote at `url` (no request is made until it is used).
    pub fn open(url: &str, mode: RemoteMode) -> Result<Remote, RemoteError> {
        let bad = |reason: String| RemoteError::Url {
            url: redact(url),
            reason,
        };
        if let Some(reason) = url_problem(url) {
            return Err(bad(reason));
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let (scheme, prefix) =
            object_store::ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
        use object_store::ObjectStoreScheme as S;
        let store: Arc<dyn ObjectStore> = match scheme {
            S::AmazonS3 => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url);
                if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
                    && let Some(keys) = aws_profile_keys()
                {
                    b = b
                        .with_access_key_id(keys.access_key_id)
                        .with_secret_access_key(keys.secret_access_key);
                    if let Some(t) = keys.session_token {
                        b = b.with_token(t);
                    }
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            S::GoogleCloudStorage => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            S::MicrosoftAzure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            S::Http => {
                if mode == RemoteMode::ReadWrite {
                    return Err(bad(
                        "an http(s) remote is read-only: add `mode: read-only` (or --remote-mode read-only)".into(),
                    ));
                }
                Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(url)
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                )
            }
            S::Local => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| bad("not a local path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?;
                return Remote::with_store(url, mode, Arc::new(fs), Key::default());
            }
            S::Memory => Arc::new(object_store::memory::InMemory::new()),
            _ => return Err(bad("unsupported store".into())),
        };
        Remote::with_store(url, mode, store, prefix)
    }

    /// A remote over an existing store (tests share one [`object_store::memory::InMemory`]).
    pub fn with_store(
        url: &str,
        mode: RemoteMode,
        store: Arc<dyn ObjectStore>,
        prefix: Key,
    ) -> Result<Remote, RemoteError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("burnish-remote")
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Url {
                url: url.to_owned(),
                reason: format!("cannot start its transfer threads: {e}"),
            })?;
        Ok(Remote {
            url: url.to_owned(),
            mode,
            store,
            prefix,
            runtime,
            seen: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn mode(&self) -> RemoteMode {
        self.mode
    }

    /// What has moved since the remote was opened.
    pub fn transfers(&self) -> Transfers {
        let c = &self.counters;
        Transfers {
            pulled: c.pulled.load(Ordering::Relaxed),
            pulled_bytes: c.pulled_bytes.load(Ordering::Relaxed),
            pushed: c.pushed.load(Ordering::Relaxed),
            pushed_bytes: c.pushed_bytes.load(Ordering::Relaxed),
        }
    }

    fn key(&self, rel: &str) -> Key {
        let mut parts: Vec<object_store::path::PathPart> = self.prefix.parts().collect();
        parts.extend(rel.split('/').map(object_store::path::PathPart::from));
        Key::from_iter(parts)
    }

    fn entry_key(&self, fp: &str) -> Key {
        self.key(&format!("v{LAYOUT}/entries/{fp}.json"))
    }

    fn blob_key(&self, digest: &str) -> Key {
        self.key(&format!("v{LAYOUT}/blobs/{digest}"))
    }

    fn transfer(
        &self,
        action: &'static str,
        key: &Key,
    ) -> impl FnOnce(object_store::Error) -> RemoteError {
        let (url, key) = (self.url.clone(), key.to_string());
        move |source| RemoteError::Transfer {
            url,
            action,
            key,
            source: Box::new(source),
        }
    }

    fn corrupt(&self, key: &Key, reason: String) -> RemoteError {
        RemoteError::Corrupt {
            url: self.url.clone(),
            key: key.to_string(),
            reason,
        }
    }

    /// The remote's entry `fp`, checked (`None` when the remote has none).
    pub fn entry(&self, fp: &str) -> Result<Option<Arc<RemoteEntry>>, RemoteError> {
        if let Some(e) = self.seen.lock().map_err(|_| poisoned())?.get(fp) {
            return Ok(e.clone());
        }
        let key = self.entry_key(fp);
        let found = self.runtime.block_on(async {
            match self.store.get(&key).await {
                Ok(r) if r.meta.size > MAX_ENTRY_BYTES => Err(self.corrupt(
                    &key,
                    format!("{} bytes, more than an entry file holds", r.meta.size),
                )),
                Ok(r) => r
                    .bytes()
                    .await
                    .map(Some)
                    .map_err(self.transfer("read", &key)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.transfer("read", &key)(e)),
            }
        })?;
        let entry = match found {
            None => None,
            Some(bytes) => {
                let e: RemoteEntry = serde_json::from_slice(&bytes)
                    .map_err(|e| self.corrupt(&key, format!("unreadable entry file: {e}")))?;
                check_entry(fp, &e).map_err(|reason| self.corrupt(&key, reason))?;
                Some(Arc::new(e))
            }
        };
        self.seen
            .lock()
            .map_err(|_| poisoned())?
            .insert(fp.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Download `entry` into `cache`, verified, and make it visible there (under its lock).
    pub fn pull(
        &self,
        cache: &Cache,
        entry: &RemoteEntry,
        lock: &EntryLock,
    ) -> Result<EntryRecord, RemoteError> {
        let record = &entry.record;
        let fp = &record.fingerprint;
        let names: Vec<&str> = record.outputs.keys().map(String::as_str).collect();
        let staging = cache.begin(fp, &names, lock)?;
        let files: Vec<(std::path::PathBuf, cache::FileRecord)> = record
            .outputs
            .iter()
            .flat_map(|(name, out)| {
                let dir = staging.output_dir(name);
                out.files
                    .iter()
                    .map(move |(rel, f)| (dir.join(rel), f.clone()))
            })
            .collect();
        let fetched = self.runtime.block_on(
            futures::stream::iter(files.iter().map(|(path, f)| self.download(path, f)))
                .buffer_unordered(PARALLEL)
                .try_fold(0u64, |n, b| async move { Ok(n + b) }),
        );
        let bytes = match fetched {
            Ok(b) => b,
            Err(e) => {
                cache.discard(staging);
                return Err(e);
            }
        };
        let installed = cache.install(staging, record, &entry.inputs, lock)?;
        self.counters.pulled.fetch_add(1, Ordering::Relaxed);
        self.counters
            .pulled_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(installed)
    }

    /// Stream one blob into `path`, checking its size and digest; the bytes fetched.
    async fn download(&self, path: &Path, want: &cache::FileRecord) -> Result<u64, RemoteError> {
        let key = self.blob_key(&want.blake3);
        let local = |e: std::io::Error| {
            RemoteError::from(CacheError::Io {
                action: "write",
                path: path.display().to_string(),
                source: e,
            })
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(local)?;
        }
        let got = self
            .store
            .get(&key)
            .await
            .map_err(self.transfer("read", &key))?;
        if got.meta.size != want.size {
            return Err(self.corrupt(
                &key,
                format!("{} bytes, the entry says {}", got.meta.size, want.size),
            ));
        }
        let mut file = std::fs::File::create(path).map_err(local)?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.transfer("read", &key))?;
            size += chunk.len() as u64;
            if size > want.size {
                return Err(self.corrupt(
                    &key,
                    format!("more than the {} bytes the entry says", want.size),
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(local)?;
        }
        let digest = hasher.finalize().to_hex().to_string();
        if size != want.size || digest != want.blake3 {
            return Err(self.corrupt(
                &key,
                format!("its content hashes to {digest} ({size} bytes), not to its name"),
            ));
        }
        file.sync_all().map_err(local)?;
        Ok(size)
    }

    /// Push the complete local entry `fp` (nothing happens when the remote has it); whether
    /// this call sent it.
    pub fn push(&self, cache: &Cache, fp: &str) -> Result<bool, RemoteError> {
        if self.mode == RemoteMode::ReadOnly {
            return Err(RemoteError::ReadOnly {
                url: self.url.clone(),
                fingerprint: fp.to_owned(),
            });
        }
        if self.entry(fp)?.is_some() {
            return Ok(false);
        }
        let not_local = |reason: String| RemoteError::Local {
            fingerprint: fp.to_owned(),
            reason,
        };
        let record = match cache.lookup(fp)? {
            Lookup::Hit(r) => r,
            Lookup::Miss => return Err(not_local("it is not in the local cache".into())),
            Lookup::Broken(why) => return Err(not_local(why)),
        };
        let inputs = cache
            .inputs(fp)
            .ok_or_else(|| not_local("its inputs.json is missing".into()))?;
        // One upload per distinct blob.
        let mut blobs: BTreeMap<String, (std::path::PathBuf, cache::FileRecord)> = BTreeMap::new();
        for (name, out) in &record.outputs {
            for (rel, f) in &out.files {
                let path = cache.entry_dir(fp).join("out").join(name).join(rel);
                blobs
                    .entry(f.blake3.clone())
                    .or_insert_with(|| (path, f.clone()));
            }
        }
        let entry = RemoteEntry {
            layout: LAYOUT,
            record,
            inputs,
        };
        let body = serde_json::to_vec_pretty(&entry).unwrap_or_default();
        let key = self.entry_key(fp);
        let sent = self.runtime.block_on(async {
            let bytes = futures::stream::iter(blobs.values().map(|(p, f)| self.upload(fp, p, f)))
                .buffer_unordered(PARALLEL)
                .try_fold(0u64, |n, b| async move { Ok(n + b) })
                .await?;
            let opts = PutOptions::from(PutMode::Create);
            match self
                .store
                .put_opts(&key, PutPayload::from(body), opts)
                .await
            {
                Ok(_) => Ok(Some(bytes)),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(None),
                Err(e) => Err(self.transfer("write", &key)(e)),
            }
        })?;
        self.seen
            .lock()
            .map_err(|_| poisoned())?
            .insert(fp.to_owned(), Some(Arc::new(entry)));
        if let Some(bytes) = sent {
            self.counters.pushed.fetch_add(1, Ordering::Relaxed);
            self.counters
                .pushed_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(sent.is_some())
    }

    /// Upload one file as its blob unless the remote has it; the bytes sent.
    async fn upload(
        &self,
        fp: &str,
        path: &Path,
        want: &cache::FileRecord,
    ) -> Result<u64, RemoteError> {
        let key = self.blob_key(&want.blake3);
        match self.store.head(&key).await {
            Ok(meta) if meta.size == want.size => return Ok(0),
            // A blob of the wrong size is replaced (its name says what it must hold).
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.transfer("check", &key)(e)),
        }
        let changed = |found: String| RemoteError::Local {
            fingerprint: fp.to_owned(),
            reason: format!(
                "{} changed since it was cached ({found}, the record says {} bytes with digest {})",
                path.display(),
                want.size,
                want.blake3
            ),
        };
        let local = |e: std::io::Error| {
            RemoteError::from(CacheError::Io {
                action: "read",
                path: path.display().to_string(),
                source: e,
            })
        };
        let mut file = std::fs::File::open(path).map_err(local)?;
        let mut hasher = blake3::Hasher::new();
        if want.size < MULTIPART {
            let mut bytes = Vec::with_capacity(want.size as usize);
            (&mut file)
                .take(want.size + 1)
                .read_to_end(&mut bytes)
                .map_err(local)?;
            hasher.update(&bytes);
            let digest = hasher.finalize().to_hex().to_string();
            if bytes.len() as u64 != want.size || digest != want.blake3 {
                return Err(changed(format!("{} bytes, digest {digest}", bytes.len())));
            }
            self.store
                .put(&key, PutPayload::from(bytes))
                .await
                .map_err(self.transfer("write", &key))?;
            return Ok(want.size);
        }
        let upload = self
            .store
            .put_multipart(&key)
            .await
            .map_err(self.transfer("start an upload of", &key))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(local(e));
                }
            };
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
            if let Err(e) = writer.wait_for_capacity(PARALLEL).await {
                return Err(self.transfer("upload", &key)(e));
            }
            writer.write(&buf[..n]);
        }
        let digest = hasher.finalize().to_hex().to_string();
        if size != want.size || digest != want.blake3 {
            let _ = writer.abort().await;
            return Err(changed(format!("{size} bytes, digest {digest}")));
        }
        writer
            .finish()
            .await
            .map_err(self.transfer("finish the upload of", &key))?;
        Ok(size)
    }

    /// Every entry's fingerprint and when it was pushed (seconds since the epoch).
    pub fn list_entries(&self) -> Result<Vec<(String, i64)>, RemoteError> {
        let dir = self.key(&format!("v{LAYOUT}/entries"));
        let metas: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&dir)).try_collect())
            .map_err(self.transfer("list", &dir))?;
        let mut out: Vec<(String, i64)> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.strip_suffix(".json")?.to_owned();
                Some((name, m.last_modified.timestamp()))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Remove the entries no root reaches and the blobs no remaining entry names (see the
    /// module doc); `keep` are the root fingerprints, `horizon` the age limit in seconds since
    /// the epoch. `dry_run` only counts.
    pub fn gc(
        &self,
        keep: &HashSet<String>,
        horizon: u64,
        dry_run: bool,
    ) -> Result<RemoteGcReport, RemoteError> {
        let horizon = horizon as i64;
        let mut report = RemoteGcReport {
            dry_run,
            ..RemoteGcReport::default()
        };
        let mut referenced: HashSet<String> = HashSet::new();
        for (fp, pushed) in self.list_entries()? {
            let reached = keep.contains(&fp) || pushed > horizon;
            // An unreadable entry is garbage; its blobs stay until no entry names them.
            let entry = self.entry(&fp).ok().flatten();
            match (reached, entry) {
                (true, Some(e)) => {
                    report.kept += 1;
                    for out in e.record.outputs.values() {
                        referenced.extend(out.files.values().map(|f| f.blake3.clone()));
                    }
                }
                (true, None) if pushed > horizon => report.kept += 1,
                _ => report.entries.push(fp),
            }
        }
        let blob_dir = self.key(&format!("v{LAYOUT}/blobs"));
        let blobs: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&blob_dir)).try_collect())
            .map_err(self.transfer("list", &blob_dir))?;
        let mut doomed = Vec::new();
        for b in blobs {
            let name = b.location.filename().unwrap_or_default().to_owned();
            if !referenced.contains(&name) && b.last_modified.timestamp() <= horizon {
                report.blobs += 1;
                report.blob_bytes += b.size;
                doomed.push(b.location);
            }
        }
        if !dry_run {
            for fp in &report.entries {
                let key = self.entry_key(fp);
                self.delete(&key)?;
                if let Ok(mut seen) = self.seen.lock() {
                    seen.remove(fp);
                }
            }
            for key in &doomed {
                self.delete(key)?;
            }
        }
        Ok(report)
    }

    fn delete(&self, key: &Key) -> Result<(), RemoteError> {
        match self.runtime.block_on(self.store.delete(key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.transfer("delete", key)(e)),
        }
    }
}

fn poisoned() -> RemoteError {
    RemoteError::Local {
        fingerprint: String::new(),
        reason: "a transfer thread panicked".into(),
    }
}

/// What `gc` removed from a remote (or, in a dry run, would remove).
#[derive(Clone, Debug, Default)]
pub struct RemoteGcReport {
    pub dry_run: bool,
    /// Entries no root reaches.
    pub entries: Vec<String>,
    /// Blobs no remaining entry names.
    pub blobs: usize,
    pub blob_bytes: u64,
    pub kept: usize,
}

/// Why a remote entry must not be used for `fp` (`Ok` when it may).
fn check_entry(fp: &str, e: &RemoteEntry) -> Result<(), String> {
    if e.layout != LAYOUT {
        return Err(format!(
            "layout {}, this burnish reads layout {LAYOUT}",
            e.layout
        ));
    }
    if e.record.cache_version != CACHE_VERSION {
        return Err(format!(
            "cache version {}, this burnish uses {CACHE_VERSION}",
            e.record.cache_version
        ));
    }
    if e.record.fingerprint != fp {
        return Err(format!("its record is for entry {}", e.record.fingerprint));
    }
    let computed = e.inputs.fingerprint();
    if computed != fp {
        return Err(format!("its inputs hash to {computed}, not to its name"));
    }
    for (name, out) in &e.record.outputs {
        if !safe_relative(name) || name.contains('/') {
            return Err(format!("output name `{name}` is not a plain name"));
        }
        for (rel, f) in &out.files {
            if !safe_relative(rel) {
                return Err(format!(
                    "file `{rel}` of output `{name}` is not a plain relative path"
                ));
            }
            if f.blake3.len() != 64 || !f.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "file `{rel}` has digest `{}`, not a blake3 digest",
                    f.blake3
                ));
            }
        }
        let digest = cache::artifact_digest(&out.files);
        if digest != out.digest {
            return Err(format!(
                "output `{name}` has digest {}, its files give {digest}",
                out.digest
            ));
        }
    }
    Ok(())
}

/// A `/`-separated relative path that stays inside its directory.
fn safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.contains(['\\', '\0'])
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Static keys from the AWS shared credentials file.
struct AwsKeys {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// The keys of `$AWS_PROFILE` (or `default`) in `$AWS_SHARED_CREDENTIALS_FILE` (or
/// `~/.aws/credentials`).
fn aws_profile_keys() -> Option<AwsKeys> {
    let path = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".aws/credentials"),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    profile_keys(&text, &profile)
}

/// The keys of `profile` in an INI credentials file.
fn profile_keys(text: &str, profile: &str) -> Option<AwsKeys> {
    let mut section = String::new();
    let mut keys: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
        } else if section == profile
            && let Some((k, v)) = line.split_once('=')
        {
            keys.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Some(AwsKeys {
        access_key_id: keys.remove("aws_access_key_id")?,
        secret_access_key: keys.remove("aws_secret_access_key")?,
        session_token: keys.remove("aws_session_token"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_secrets_or_odd_schemes_are_refused() {
        assert_eq!(url_problem("s3://bucket/prefix"), None);
        assert_eq!(url_problem("file:///tmp/x"), None);
        assert_eq!(url_problem("gs://b"), None);
        let p = url_problem("s3://AKIA:secret@bucket/x").unwrap();
        assert!(p.contains("credentials"), "{p}");
        assert!(
            url_problem("https://h/x?sig=abc")
                .unwrap()
                .contains("query")
        );
        assert!(url_problem("ftp://h/x").unwrap().contains("`ftp`"));
        assert!(
            url_problem("file://host/x")
                .unwrap()
                .contains("file:///dir")
        );
        assert!(
            url_problem("bucket/prefix")
                .unwrap()
                .starts_with("not a URL")
        );
    }

    #[test]
    fn redaction_hides_users_passwords_and_queries() {
        assert_eq!(redact("s3://AKIA:secret@bucket/x"), "s3://***@bucket/x");
        assert_eq!(redact("https://h/x?sig=abc"), "https://h/x?***");
        assert_eq!(redact("s3://bucket/x"), "s3://bucket/x");
        assert_eq!(redact("not a url:pw@host"), "***@host");
    }

    #[test]
    fn profile_keys_read_the_named_section() {
        let ini = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n[ci]\n# c\naws_access_key_id=C\naws_secret_access_key = D\naws_session_token = T\n";
        let d = profile_keys(ini, "default").unwrap();
        assert_eq!(
            (d.access_key_id.as_str(), d.secret_access_key.as_str()),
            ("A", "B")
        );
        assert!(d.session_token.is_none());
        let c = profile_keys(ini, "ci").unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.session_token.as_deref()),
            ("C", Some("T"))
        );
        assert!(profile_keys(ini, "other").is_none());
    }

    #[test]
    fn only_plain_relative_paths_are_safe() {
        for ok in ["a", "a/b.json", "tokenizer/vocab.txt", "..x"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "a/",
        ] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }
}

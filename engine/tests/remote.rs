//! The remote cache against three object stores: object_store's in-memory store, a `file://`
//! directory, and an S3-compatible server when one is configured (`.ci/run` starts
//! `moto_server` on 127.0.0.1 and sets `AWS_ENDPOINT`, the test keys and `BURNISH_S3_BUCKET`;
//! `BURNISH_REQUIRE_S3=1` makes its absence a failure).
//!
//! Each backend runs the same scenarios: a push from cache A pulled into an empty cache B gives
//! byte-identical, verified entries; a killed push leaves nothing visible and the next push
//! sends only the rest; two concurrent pushes of one entry both succeed; corrupted blobs and
//! entry files are detected and never used; a path outside the entry is refused; `gc` removes
//! exactly the unreached entries and blobs; a read-only remote refuses pushes; a local file
//! changed after publishing is refused; large files go as multipart uploads.

#[path = "../../stages/tests/common/skip.rs"]
mod skip;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use burnish_engine::cache::{
    CACHE_VERSION, Cache, EntryHealth, EntryRecord, FingerprintInputs, Lookup, now_unix,
};
use burnish_engine::remote::{Remote, RemoteError, RemoteMode};
use burnish_engine::stage::{ArtifactKind, ArtifactType, DatasetFamily};
use burnish_engine::store::Store;
use object_store::ObjectStore;
use object_store::path::Path as Key;
use serde_json::json;

/// One object store, opened as many times as a scenario needs.
struct Backend {
    url: String,
    /// The same store, for a scenario that tampers with it.
    raw: Arc<dyn ObjectStore>,
    /// Where the remote's keys start inside `raw`.
    prefix: String,
    /// In-memory stores are shared by handing `raw` to each remote.
    shared: bool,
    /// A `file://` remote's directory, removed with the backend.
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    fn open(&self, mode: RemoteMode) -> Remote {
        if self.shared {
            Remote::with_store(
                &self.url,
                mode,
                self.raw.clone(),
                Key::from(self.prefix.as_str()),
            )
            .unwrap()
        } else {
            Remote::open(&self.url, mode).unwrap()
        }
    }

    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn put(&self, rel: &str, bytes: Vec<u8>) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(self.raw.put(&self.key(rel), bytes.into()))
            .unwrap();
    }

    fn get(&self, rel: &str) -> Option<Vec<u8>> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            match self.raw.get(&self.key(rel)).await {
                Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("get {rel}: {e}"),
            }
        })
    }

    fn list(&self, rel: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let metas: Vec<object_store::ObjectMeta> = rt
            .block_on(self.raw.list(Some(&self.key(rel))).try_collect())
            .unwrap();
        let mut names: Vec<String> = metas
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect();
        names.sort();
        names
    }
}

fn memory() -> Backend {
    Backend {
        url: "memory:///".into(),
        raw: Arc::new(object_store::memory::InMemory::new()),
        prefix: "team/cache".into(),
        shared: true,
        _dir: None,
    }
}

fn file() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(dir.path())
        .unwrap()
        .to_string();
    Backend {
        url,
        raw: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        prefix: String::new(),
        shared: false,
        _dir: Some(dir),
    }
}

/// The S3 server `.ci/run` starts, under a fresh prefix; `None` (skipped) without one.
fn s3() -> Option<Backend> {
    let (Ok(_), Ok(bucket)) = (
        std::env::var("AWS_ENDPOINT"),
        std::env::var("BURNISH_S3_BUCKET"),
    ) else {
        skip::skip(
            "BURNISH_REQUIRE_S3",
            "no S3 server is configured (AWS_ENDPOINT and BURNISH_S3_BUCKET); `.ci/run` starts moto_server",
        );
        return None;
    };
    let prefix = format!(
        "t{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let raw = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .build()
        .unwrap();
    Some(Backend {
        url: format!("s3://{bucket}/{prefix}"),
        raw: Arc::new(raw),
        prefix,
        shared: false,
        _dir: None,
    })
}

fn inputs(salt: &str) -> FingerprintInputs {
    FingerprintInputs {
        cache_version: CACHE_VERSION,
        kind: "test.kind".into(),
        kind_version: 1,
        params: json!({ "salt": salt }),
        inputs: BTreeMap::new(),
        files: BTreeMap::new(),
        seed: Some(7),
        backend: None,
        names: None,
    }
}

/// Publish an entry into `cache` with outputs `main` and `extra`; `files` are (output, path,
/// bytes). Its fingerprint.
fn publish(cache: &Cache, salt: &str, files: &[(&str, &str, Vec<u8>)]) -> String {
    let fi = inputs(salt);
    let fp = fi.fingerprint();
    let lock = cache.lock(&fp, &mut || {}).unwrap();
    let staging = cache.begin(&fp, &["main", "extra"], &lock).unwrap();
    for (out, rel, bytes) in files {
        let p = staging.output_dir(out).join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let types = BTreeMap::from([
        ("main".to_owned(), ArtifactType::of(ArtifactKind::Model)),
        (
            "extra".to_owned(),
            ArtifactType::dataset(DatasetFamily::Text),
        ),
    ]);
    let metrics = BTreeMap::from([("loss".to_owned(), json!(1.25))]);
    cache
        .publish(staging, &fi, "stage", &types, metrics, 10, &lock)
        .unwrap();
    fp
}

fn standard(cache: &Cache, salt: &str) -> String {
    publish(
        cache,
        salt,
        &[
            ("main", "config.json", b"{\"hidden\": 8}".to_vec()),
            (
                "main",
                "weights/model.safetensors",
                salt.repeat(1000).into_bytes(),
            ),
            // The same bytes as `config.json`: one blob for both.
            ("extra", "copy.json", b"{\"hidden\": 8}".to_vec()),
        ],
    )
}

fn record(cache: &Cache, fp: &str) -> EntryRecord {
    match cache.lookup(fp).unwrap() {
        Lookup::Hit(r) => r,
        other => panic!("entry {fp} is not usable: {other:?}"),
    }
}

fn store(dir: &Path, remote: Remote) -> Store {
    Store::open(dir).unwrap().with_remote(remote)
}

/// Rewrite the remote's entry file of `fp` through `edit`; its key.
fn edit_entry(b: &Backend, fp: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let key = format!("v1/entries/{fp}.json");
    let mut entry: serde_json::Value = serde_json::from_slice(&b.get(&key).unwrap()).unwrap();
    edit(&mut entry);
    b.put(&key, serde_json::to_vec(&entry).unwrap());
    key
}

fn round_trip(b: &Backend) {
    let (a, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cache_a = Cache::open(a.path()).unwrap();
    let fp = standard(&cache_a, "x");
    let remote = b.open(RemoteMode::ReadWrite);
    assert!(remote.push(&cache_a, &fp).unwrap(), "first push sends");
    assert!(!remote.push(&cache_a, &fp).unwrap(), "second push finds it");
    let t = remote.transfers();
    assert_eq!((t.pushed, t.pushed_bytes), (1, 13 + 1000), "{t:?}");
    // Two distinct contents, one blob each.
    assert_eq!(b.list("v1/blobs").len(), 2);
    assert_eq!(b.list("v1/entries"), vec![format!("{fp}.json")]);

    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    let (peeked, remote_only) = sb.peek(&fp).unwrap();
    assert!(matches!(peeked, Lookup::Hit(_)) && remote_only);
    let Lookup::Hit(got) = sb.lookup(&fp).unwrap() else {
        panic!("not pulled")
    };
    assert_eq!(got, record(&cache_a, &fp));
    assert_eq!(sb.local().verify(&fp).unwrap(), EntryHealth::Ok);
    for rel in [
        "out/main/config.json",
        "out/main/weights/model.safetensors",
        "out/extra/copy.json",
        "inputs.json",
    ] {
        assert_eq!(
            std::fs::read(cache_a.entry_dir(&fp).join(rel)).unwrap(),
            std::fs::read(sb.local().entry_dir(&fp).join(rel)).unwrap(),
            "{rel}"
        );
    }
    assert_eq!(sb.remote().unwrap().transfers().pulled, 1);
    assert!(matches!(sb.peek(&fp).unwrap(), (Lookup::Hit(_), false)));
}

fn killed_push_is_invisible_and_resumes(b: &Backend) {
    let (a, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cache_a = Cache::open(a.path()).unwrap();
    let fp = standard(&cache_a, "k");
    // What a push killed after its first blob leaves: one blob, no entry file.
    let r = record(&cache_a, &fp);
    let big = &r.outputs["main"].files["weights/model.safetensors"];
    b.put(
        &format!("v1/blobs/{}", big.blake3),
        "k".repeat(1000).into_bytes(),
    );
    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    assert!(matches!(sb.lookup(&fp).unwrap(), Lookup::Miss));
    assert!(sb.usable_record(&fp).unwrap().is_none());
    // The next push sends only what is missing.
    let remote = b.open(RemoteMode::ReadWrite);
    assert!(remote.push(&cache_a, &fp).unwrap());
    assert_eq!(remote.transfers().pushed_bytes, 13);
    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    assert!(matches!(sb.lookup(&fp).unwrap(), Lookup::Hit(_)));
}

fn concurrent_pushes_both_succeed(b: &Backend) {
    let a = tempfile::tempdir().unwrap();
    let cache_a = Cache::open(a.path()).unwrap();
    let fp = standard(&cache_a, "c");
    let results: Vec<Result<bool, RemoteError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (cache, fp) = (&cache_a, &fp);
                let remote = b.open(RemoteMode::ReadWrite);
                s.spawn(move || remote.push(cache, fp))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sent: Vec<bool> = results.into_iter().map(|r| r.unwrap()).collect();
    assert!(sent.iter().any(|s| *s), "{sent:?}");
    assert_eq!(b.list("v1/entries"), vec![format!("{fp}.json")]);
    let bdir = tempfile::tempdir().unwrap();
    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    assert!(matches!(sb.lookup(&fp).unwrap(), Lookup::Hit(_)));
}

fn corruption_is_detected_and_never_used(b: &Backend) {
    let a = tempfile::tempdir().unwrap();
    let cache_a = Cache::open(a.path()).unwrap();
    let fp = standard(&cache_a, "z");
    b.open(RemoteMode::ReadWrite).push(&cache_a, &fp).unwrap();
    let r = record(&cache_a, &fp);
    let big = &r.outputs["main"].files["weights/model.safetensors"];
    let blob = format!("v1/blobs/{}", big.blake3);
    for (bad, want) in [
        ("y".repeat(1000).into_bytes(), "hashes to"),
        (b"short".to_vec(), "5 bytes, the entry says 1000"),
    ] {
        b.put(&blob, bad);
        let bdir = tempfile::tempdir().unwrap();
        let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
        let err = sb.lookup(&fp).unwrap_err().to_string();
        assert!(err.contains(&blob) && err.contains(want), "{err}");
        // Nothing became visible, nothing was left behind.
        assert!(matches!(sb.local().lookup(&fp).unwrap(), Lookup::Miss));
        assert!(!sb.local().entry_dir(&fp).exists());
        assert_eq!(
            std::fs::read_dir(bdir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    // An entry file whose inputs were edited no longer hashes to its name.
    let key = edit_entry(b, &fp, |entry| {
        entry["inputs"]["params"]["salt"] = json!("other");
    });
    let bdir = tempfile::tempdir().unwrap();
    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    let err = sb.lookup(&fp).unwrap_err().to_string();
    assert!(
        err.contains(&key) && err.contains("its inputs hash to"),
        "{err}"
    );
}

fn paths_outside_the_entry_are_refused(b: &Backend) {
    let a = tempfile::tempdir().unwrap();
    let cache_a = Cache::open(a.path()).unwrap();
    let fp = standard(&cache_a, "p");
    b.open(RemoteMode::ReadWrite).push(&cache_a, &fp).unwrap();
    // A consistent entry (digests recomputed) that names a file outside its directory.
    edit_entry(b, &fp, |entry| {
        let extra = &mut entry["record"]["outputs"]["extra"];
        let files = extra["files"].as_object_mut().unwrap();
        let f = files.remove("copy.json").unwrap();
        files.insert("../../../escaped.json".into(), f);
        let typed: BTreeMap<String, burnish_engine::cache::FileRecord> =
            serde_json::from_value(extra["files"].clone()).unwrap();
        extra["digest"] = json!(burnish_engine::cache::artifact_digest(&typed));
    });
    let bdir = tempfile::tempdir().unwrap();
    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    let err = sb.lookup(&fp).unwrap_err().to_string();
    assert!(err.contains("not a plain relative path"), "{err}");
    assert!(!bdir.path().join("escaped.json").exists());
}

fn gc_removes_exactly_the_unreached(b: &Backend) {
    let a = tempfile::tempdir().unwrap();
    let cache_a = Cache::open(a.path()).unwrap();
    let keep = standard(&cache_a, "g1");
    let drop1 = standard(&cache_a, "g2");
    let drop2 = standard(&cache_a, "g3");
    let remote = b.open(RemoteMode::ReadWrite);
    for fp in [&keep, &drop1, &drop2] {
        remote.push(&cache_a, fp).unwrap();
    }
    // config.json is shared by all three; each has its own weights.
    assert_eq!(b.list("v1/blobs").len(), 4);
    let roots = HashSet::from([keep.clone()]);
    // A horizon in the past keeps everything pushed since.
    let young = remote.gc(&roots, now_unix() - 3600, false).unwrap();
    assert_eq!((young.entries.len(), young.blobs, young.kept), (0, 0, 3));
    // With everything older than the horizon, only the roots stay.
    let horizon = now_unix() + 10;
    let dry = remote.gc(&roots, horizon, true).unwrap();
    let mut want = vec![drop1.clone(), drop2.clone()];
    want.sort();
    assert_eq!(
        (dry.entries.clone(), dry.blobs, dry.blob_bytes, dry.kept),
        (want.clone(), 2, 4000, 1)
    );
    assert_eq!(b.list("v1/entries").len(), 3, "a dry run removes nothing");
    let done = remote.gc(&roots, horizon, false).unwrap();
    assert_eq!((done.entries, done.blobs), (want, 2));
    assert_eq!(b.list("v1/entries"), vec![format!("{keep}.json")]);
    let k = record(&cache_a, &keep);
    let mut blobs: Vec<String> = k
        .outputs
        .values()
        .flat_map(|o| o.files.values().map(|f| f.blake3.clone()))
        .collect();
    blobs.sort();
    blobs.dedup();
    assert_eq!(b.list("v1/blobs"), blobs);
    let bdir = tempfile::tempdir().unwrap();
    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    assert!(matches!(sb.lookup(&keep).unwrap(), Lookup::Hit(_)));
    assert!(matches!(sb.lookup(&drop1).unwrap(), Lookup::Miss));
}

fn read_only_and_changed_files_refuse_to_push(b: &Backend) {
    let a = tempfile::tempdir().unwrap();
    let cache_a = Cache::open(a.path()).unwrap();
    let fp = standard(&cache_a, "r");
    let err = b
        .open(RemoteMode::ReadOnly)
        .push(&cache_a, &fp)
        .unwrap_err();
    assert!(matches!(err, RemoteError::ReadOnly { .. }), "{err}");
    // Same size, other bytes: caught by the digest taken while reading.
    let p = cache_a
        .entry_dir(&fp)
        .join("out/main/weights/model.safetensors");
    std::fs::write(&p, "s".repeat(1000)).unwrap();
    let err = b
        .open(RemoteMode::ReadWrite)
        .push(&cache_a, &fp)
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed since it was cached"), "{err}");
    assert!(b.get(&format!("v1/entries/{fp}.json")).is_none());
}

fn large_files_go_in_parts(b: &Backend) {
    let (a, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cache_a = Cache::open(a.path()).unwrap();
    let size = (burnish_engine::remote::MULTIPART + 3 * 1024 * 1024 + 17) as usize;
    let big: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let fp = publish(
        &cache_a,
        "big",
        &[("main", "model.safetensors", big.clone())],
    );
    let remote = b.open(RemoteMode::ReadWrite);
    assert!(remote.push(&cache_a, &fp).unwrap());
    assert_eq!(remote.transfers().pushed_bytes, size as u64);
    let sb = store(bdir.path(), b.open(RemoteMode::ReadOnly));
    assert!(matches!(sb.lookup(&fp).unwrap(), Lookup::Hit(_)));
    let got = std::fs::read(sb.local().entry_dir(&fp).join("out/main/model.safetensors")).unwrap();
    assert!(got == big, "the pulled file differs");
}

fn local_hits_fill_a_read_write_remote(b: &Backend) {
    let a = tempfile::tempdir().unwrap();
    let sa = store(a.path(), b.open(RemoteMode::ReadOnly));
    let fp = standard(sa.local(), "ro");
    // A local hit on a read-only remote pushes nothing.
    assert!(matches!(sa.lookup(&fp).unwrap(), Lookup::Hit(_)));
    assert!(b.get(&format!("v1/entries/{fp}.json")).is_none());
    // On a read-write remote, the lookup pushes what the remote lacks.
    let sa = store(a.path(), b.open(RemoteMode::ReadWrite));
    assert!(matches!(sa.lookup(&fp).unwrap(), Lookup::Hit(_)));
    assert!(b.get(&format!("v1/entries/{fp}.json")).is_some());
}

/// Every scenario, each on a fresh backend from `make`.
fn all(make: &dyn Fn() -> Option<Backend>) {
    let scenarios: [fn(&Backend); 9] = [
        round_trip,
        killed_push_is_invisible_and_resumes,
        concurrent_pushes_both_succeed,
        corruption_is_detected_and_never_used,
        paths_outside_the_entry_are_refused,
        gc_removes_exactly_the_unreached,
        read_only_and_changed_files_refuse_to_push,
        large_files_go_in_parts,
        local_hits_fill_a_read_write_remote,
    ];
    for scenario in scenarios {
        let Some(b) = make() else { return };
        scenario(&b);
    }
}

#[test]
fn in_memory_remote() {
    all(&|| Some(memory()));
}

#[test]
fn file_remote() {
    all(&|| Some(file()));
}

#[test]
fn s3_remote() {
    all(&s3);
}

/// object_store's conformance functions against the S3 server, in a bucket of their own (they
/// expect to start from an empty one): the remote relies on what they check — conditional
/// puts, multipart uploads, listing, ranged and streamed reads.
#[test]
fn object_store_conformance_on_s3() {
    let Ok(endpoint) = std::env::var("AWS_ENDPOINT") else {
        skip::skip(
            "BURNISH_REQUIRE_S3",
            "no S3 server is configured (AWS_ENDPOINT); `.ci/run` starts moto_server",
        );
        return;
    };
    let bucket = format!("conformance-{}", std::process::id());
    let made = std::process::Command::new("curl")
        .args(["-sf", "-X", "PUT", &format!("{endpoint}/{bucket}")])
        .status()
        .unwrap();
    assert!(
        made.success(),
        "cannot create bucket {bucket} at {endpoint}"
    );
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_copy_if_not_exists(object_store::aws::S3CopyIfNotExists::Multipart)
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use object_store::integration::*;
        put_get_delete_list(&store).await;
        get_opts(&store).await;
        put_opts(&store, true).await;
        list_uses_directories_correctly(&store).await;
        list_with_delimiter(&store).await;
        rename_and_copy(&store).await;
        copy_if_not_exists(&store).await;
        stream_get(&store).await;
        multipart(&store, &store).await;
        multipart_race_condition(&store, true).await;
        multipart_out_of_order(&store).await;
    });
}

#[test]
fn bad_urls_name_the_problem() {
    for (url, want) in [
        ("s3://key:secret@bucket/p", "carries credentials"),
        ("ftp://host/p", "scheme `ftp`"),
        ("https://host/p", "read-only"),
    ] {
        let err = Remote::open(url, RemoteMode::ReadWrite)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{url}: {err}");
        assert!(!err.contains("secret"), "{err}");
    }
}

//! `hf://` against a Hugging Face hub cache laid out as huggingface_hub writes it: `blobs/<hash>`
//! files, `refs/main`, a `refs/v1` tag and a `refs/refs/pr/1` ref, and `snapshots/<commit>/…`
//! entries that are symlinks into `../../blobs/…`. The data files are the committed fixtures of
//! `fixtures/data/hub/` (written by pyarrow and `datasets`, see `make_hub_fixtures.py`); the
//! layout is assembled here at test time, so no Python is needed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use burnish_engine::stage::{FileInput, RunContext, Stage, StageError};
use burnish_stages::data::dataset::dataset_files_in;
use burnish_stages::data::hf::{hf_cache_dirs_from, is_hf, resolve_hf_files_in, resolve_hf_in};
use burnish_stages::data::records::RECORDS_FILE;
use burnish_stages::data::source::read_rows;
use burnish_stages::data::{DataError, DatasetParams, DatasetStage};
use serde_json::{Value, json};
use tempfile::TempDir;

const MAIN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const V1: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f000112233";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data/hub")
}

/// A fake hub cache in a temp dir.
struct Hub {
    _tmp: TempDir,
    root: PathBuf,
}

impl Hub {
    /// A cache directory that does not exist, then the hub: the first one holding the repository
    /// wins.
    fn caches(&self) -> Vec<PathBuf> {
        vec![PathBuf::from("/nonexistent/hub"), self.root.clone()]
    }
    fn repo(&self, name: &str) -> PathBuf {
        self.root.join(format!("datasets--org--{name}"))
    }
    fn snapshot(&self, name: &str, commit: &str) -> PathBuf {
        self.repo(name).join("snapshots").join(commit)
    }
}

/// Where a snapshot entry's content comes from.
enum Src<'a> {
    Fixture(&'a str),
    Bytes(&'a [u8]),
}

/// Add `files` (path in the repository → content) to snapshot `commit` of `repo_dir`: each a
/// blob named by its content hash, linked from the snapshot by a relative symlink.
fn snapshot(repo_dir: &Path, commit: &str, files: &[(&str, Src<'_>)]) {
    for (path, src) in files {
        let content = match src {
            Src::Fixture(f) => fs::read(fixtures().join(f)).unwrap(),
            Src::Bytes(b) => b.to_vec(),
        };
        let blob = blake3::hash(&content).to_hex().to_string();
        let blobs = repo_dir.join("blobs");
        fs::create_dir_all(&blobs).unwrap();
        fs::write(blobs.join(&blob), &content).unwrap();
        let link = repo_dir.join("snapshots").join(commit).join(path);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        // snapshots/<commit>/a/b → ../../../blobs/<hash>
        let ups = 1 + path.split('/').count();
        let target = format!("{}blobs/{blob}", "../".repeat(ups));
        link_or_copy(&target, &link);
    }
}

#[cfg(unix)]
fn link_or_copy(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
    assert!(link.is_file(), "{} → {target} dangles", link.display());
}

#[cfg(not(unix))]
fn link_or_copy(target: &str, link: &Path) {
    fs::copy(link.parent().unwrap().join(target), link).unwrap();
}

fn set_ref(repo_dir: &Path, name: &str, commit: &str) {
    let p = repo_dir.join("refs").join(name);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, commit).unwrap();
}

const TRAIN: [&str; 3] = [
    "train-00000-of-00003.parquet",
    "train-00001-of-00003.parquet",
    "train-00002-of-00003.parquet",
];

fn hub() -> Hub {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("hub");
    let hub = Hub {
        _tmp: tmp,
        root: root.clone(),
    };

    // org/name: a train split in 3 shards, a test split, and files of every other type.
    let name = hub.repo("name");
    snapshot(
        &name,
        MAIN,
        &[
            ("data/train-00000-of-00003.parquet", Src::Fixture(TRAIN[0])),
            ("data/train-00001-of-00003.parquet", Src::Fixture(TRAIN[1])),
            ("data/train-00002-of-00003.parquet", Src::Fixture(TRAIN[2])),
            (
                "data/test-00000-of-00001.parquet",
                Src::Fixture("test-00000-of-00001.parquet"),
            ),
            ("extra/rows.jsonl.gz", Src::Fixture("rows.jsonl.gz")),
            ("extra/bad.jsonl.gz", Src::Fixture("bad.jsonl.gz")),
            ("extra/rows.tsv", Src::Fixture("rows.tsv")),
            (
                "arrow/data-00000-of-00001.arrow",
                Src::Fixture("saved/data-00000-of-00001.arrow"),
            ),
            ("arrow/file.arrow", Src::Fixture("file.arrow")),
            (
                "saved/data-00000-of-00001.arrow",
                Src::Fixture("saved/data-00000-of-00001.arrow"),
            ),
            ("saved/state.json", Src::Fixture("saved/state.json")),
            (
                "saved/dataset_info.json",
                Src::Fixture("saved/dataset_info.json"),
            ),
            (
                "README.md",
                Src::Bytes(b"---\nlicense: mit\n---\n# fixture\n"),
            ),
            (".gitattributes", Src::Bytes(b"*.parquet filter=lfs\n")),
        ],
    );
    // v1: an older commit with one file (the rows of the second shard).
    snapshot(
        &name,
        V1,
        &[("data/train-00000-of-00001.parquet", Src::Fixture(TRAIN[1]))],
    );
    set_ref(&name, "main", MAIN);
    set_ref(&name, "v1", V1);
    set_ref(&name, "refs/pr/1", MAIN);

    // org/broken: shard 1 of 3 never arrived.
    let broken = hub.repo("broken");
    snapshot(
        &broken,
        MAIN,
        &[
            ("data/train-00000-of-00003.parquet", Src::Fixture(TRAIN[0])),
            ("data/train-00002-of-00003.parquet", Src::Fixture(TRAIN[2])),
        ],
    );
    set_ref(&broken, "main", MAIN);

    // org/sharded: nothing but the shards of one split.
    let sharded = hub.repo("sharded");
    snapshot(
        &sharded,
        MAIN,
        &[
            ("train-00000-of-00003.parquet", Src::Fixture(TRAIN[0])),
            ("train-00001-of-00003.parquet", Src::Fixture(TRAIN[1])),
            ("train-00002-of-00003.parquet", Src::Fixture(TRAIN[2])),
            ("README.md", Src::Bytes(b"# sharded\n")),
        ],
    );
    set_ref(&sharded, "main", MAIN);

    // org/configs: gsm8k's layout, one directory per config.
    let configs = hub.repo("configs");
    snapshot(
        &configs,
        MAIN,
        &[
            ("main/train-00000-of-00001.parquet", Src::Fixture(TRAIN[0])),
            (
                "main/test-00000-of-00001.parquet",
                Src::Fixture("test-00000-of-00001.parquet"),
            ),
            (
                "socratic/train-00000-of-00001.parquet",
                Src::Fixture(TRAIN[2]),
            ),
        ],
    );
    set_ref(&configs, "main", MAIN);

    // org/dirs: splits as directories, and no refs/main (its only snapshot is used).
    snapshot(
        &hub.repo("dirs"),
        V1,
        &[
            ("train/part-0.parquet", Src::Fixture(TRAIN[0])),
            ("train/part-1.parquet", Src::Fixture(TRAIN[1])),
            (
                "test/part-0.parquet",
                Src::Fixture("test-00000-of-00001.parquet"),
            ),
        ],
    );
    hub
}

fn params(path: &str, split: Option<&str>) -> DatasetParams {
    let mut p = json!({"path": path, "format": "alpaca"});
    if let Some(s) = split {
        p["split"] = json!(s);
    }
    serde_json::from_value(p).unwrap()
}

/// Run the stage on the files as the engine would hand them over (`dataset_files_in`, a
/// relative path joined to `dir`); the instruction of each record, in order.
fn run_stage(
    params: &DatasetParams,
    files: &[FileInput],
    dir: &Path,
) -> Result<Vec<String>, StageError> {
    let problems = DatasetStage::check(params);
    assert!(problems.is_empty(), "check: {problems:?}");
    let tmp = TempDir::new().unwrap();
    let mut cx = RunContext::standalone("test", tmp.path(), 1);
    for f in files {
        assert!(!is_hf(&f.path.0), "unresolved: {}", f.path.0);
        cx = cx.with_file(&f.field, dir.join(&f.path.0));
    }
    let out = tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    cx = cx.with_output("main", out.clone());
    DatasetStage::run(params, &mut cx)?;
    Ok(fs::read_to_string(out.join(RECORDS_FILE))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let content = &v["messages"][0]["content"];
            content
                .as_str()
                .map_or_else(|| content.to_string(), str::to_owned)
        })
        .collect())
}

/// Load `path` from the hub as a manifest would; the records' instructions.
fn load(hub: &Hub, path: &str, split: Option<&str>) -> Vec<String> {
    let p = params(path, split);
    let files = dataset_files_in(&p, &hub.caches());
    if let [f] = files.as_slice()
        && is_hf(&f.path.0)
    {
        panic!(
            "{path}: {}",
            resolve_hf_in(&f.path.0, &hub.caches()).unwrap_err()
        );
    }
    run_stage(&p, &files, Path::new("/")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn resolve_err(hub: &Hub, path: &str, split: Option<&str>) -> DataError {
    match resolve_hf_files_in(path, split, &hub.caches()) {
        Ok(files) => panic!("{path}: expected an error, got {files:?}"),
        Err(e) => e,
    }
}

fn code(e: &DataError) -> String {
    miette::Diagnostic::code(e).unwrap().to_string()
}

fn help(e: &DataError) -> String {
    miette::Diagnostic::help(e)
        .map(|h| h.to_string())
        .unwrap_or_default()
}

fn train_rows() -> Vec<String> {
    [(0, 2), (1, 3), (2, 4)]
        .iter()
        .flat_map(|&(shard, n)| (0..n).map(move |i| format!("train {shard}.{i}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_url_form_names_the_same_file() {
    let hub = hub();
    // alpaca: the instruction, then the input after a blank line.
    let want = ["tsv 0", "tsv 1\n\nsome input"];
    for spec in [
        "hf://org/name/extra/rows.tsv",
        "hf://datasets/org/name/extra/rows.tsv",
        "hf://datasets/org/name@main/extra/rows.tsv",
        &format!("hf://datasets/org/name@{MAIN}/extra/rows.tsv"),
        &format!("hf://org/name@{MAIN}/extra/rows.tsv"),
        "hf://datasets/org/name@refs/pr/1/extra/rows.tsv",
        "hf://datasets/org/name@refs%2Fpr%2F1/extra/rows.tsv",
    ] {
        let files = resolve_hf_files_in(spec, None, &hub.caches()).unwrap();
        assert_eq!(files.len(), 1, "{spec}");
        assert!(
            files[0].ends_with(format!(
                "datasets--org--name/snapshots/{MAIN}/extra/rows.tsv"
            )),
            "{spec}: {}",
            files[0].display()
        );
        assert_eq!(load(&hub, spec, None), want, "{spec}");
    }
    // The tab-separated fields, a quoted tab kept.
    let rows = read_rows(&hub.snapshot("name", MAIN).join("extra/rows.tsv")).unwrap();
    assert_eq!(rows[1].fields["input"], "some input");
    assert_eq!(rows[1].fields["output"], "with\ta tab");
    assert_eq!(
        rows[1].at.to_string(),
        format!(
            "{}:3",
            hub.snapshot("name", MAIN).join("extra/rows.tsv").display()
        )
    );
}

#[test]
fn a_revision_picks_its_snapshot() {
    let hub = hub();
    let v1 = ["train 1.0", "train 1.1", "train 1.2"];
    for spec in [
        "hf://datasets/org/name@v1",
        &format!("hf://datasets/org/name@{V1}"),
        &format!("hf://org/name@{V1}"),
        "hf://datasets/org/name@v1/data/train-00000-of-00001.parquet",
    ] {
        let files = resolve_hf_files_in(spec, None, &hub.caches()).unwrap();
        assert!(
            files[0].ends_with(format!("snapshots/{V1}/data/train-00000-of-00001.parquet")),
            "{spec}"
        );
        assert_eq!(load(&hub, spec, None), v1, "{spec}");
    }
    // Without a revision, refs/main.
    assert_eq!(
        load(
            &hub,
            "hf://datasets/org/name/data/test-00000-of-00001.parquet",
            None
        ),
        ["test 0.0", "test 0.1"]
    );
}

#[test]
fn a_split_gathers_every_shard_in_order() {
    let hub = hub();
    let p = params("hf://datasets/org/name", Some("train"));
    let files = dataset_files_in(&p, &hub.caches());
    let fields: Vec<&str> = files.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["path", "path[1]", "path[2]"]);
    for (f, shard) in files.iter().zip(TRAIN) {
        assert!(
            f.path
                .0
                .ends_with(&format!("snapshots/{MAIN}/data/{shard}")),
            "{}",
            f.path.0
        );
    }
    assert_eq!(
        load(&hub, "hf://datasets/org/name", Some("train")),
        train_rows()
    );
    // `?split=` is the same, and so is the short form.
    assert_eq!(
        load(&hub, "hf://datasets/org/name?split=train", None),
        train_rows()
    );
    assert_eq!(load(&hub, "hf://org/name", Some("train")), train_rows());
    // The rows in split order: `id` counts 0..9 across the shards.
    let ids: Vec<Value> = resolve_hf_files_in("hf://org/name", Some("train"), &hub.caches())
        .unwrap()
        .iter()
        .flat_map(|f| read_rows(f).unwrap())
        .map(|r| r.fields["id"].clone())
        .collect();
    assert_eq!(ids, (0..9).map(Value::from).collect::<Vec<_>>());

    assert_eq!(
        load(&hub, "hf://datasets/org/name", Some("test")),
        ["test 0.0", "test 0.1"]
    );
    // Splits as directories, in a repository without refs/main (its only snapshot).
    assert_eq!(
        load(&hub, "hf://datasets/org/dirs", Some("train")),
        [
            "train 0.0",
            "train 0.1",
            "train 1.0",
            "train 1.1",
            "train 1.2"
        ]
    );
    assert_eq!(
        load(&hub, "hf://datasets/org/dirs", Some("test")),
        ["test 0.0", "test 0.1"]
    );
    // A config's directory, then its split.
    assert_eq!(
        load(&hub, "hf://datasets/org/configs/main", Some("train")),
        ["train 0.0", "train 0.1"]
    );
    assert_eq!(
        load(&hub, "hf://datasets/org/configs/main", Some("test")),
        ["test 0.0", "test 0.1"]
    );
}

#[test]
fn the_shards_of_one_split_need_no_split() {
    let hub = hub();
    assert_eq!(load(&hub, "hf://datasets/org/sharded", None), train_rows());
    assert_eq!(load(&hub, "hf://org/sharded", Some("train")), train_rows());
}

#[test]
fn globs_match_data_files_in_sorted_order() {
    let hub = hub();
    assert_eq!(
        load(&hub, "hf://datasets/org/name/data/train-*.parquet", None),
        train_rows()
    );
    assert_eq!(
        load(
            &hub,
            "hf://datasets/org/name/data/*-0000[0-9]-of-00003.parquet",
            None
        ),
        train_rows()
    );
    assert_eq!(
        load(&hub, "hf://datasets/org/name/**/*.tsv", None),
        ["tsv 0", "tsv 1\n\nsome input"]
    );
    assert_eq!(
        load(&hub, "hf://org/name@v1/**", None),
        ["train 1.0", "train 1.1", "train 1.2"]
    );
    // `**` spans directories, `*` does not; sorted by path: arrow/ before saved/.
    assert_eq!(
        load(&hub, "hf://datasets/org/name/**/data-*.arrow", None),
        [
            "saved 0", "saved 1", "saved 2", "saved 0", "saved 1", "saved 2"
        ]
    );
    let err = resolve_err(&hub, "hf://datasets/org/name/*.arrow", None);
    assert!(
        err.to_string().contains("no data file matches `*.arrow`"),
        "{err}"
    );
}

#[test]
fn a_missing_shard_is_an_error_naming_it() {
    let hub = hub();
    let snapshot = hub.snapshot("broken", MAIN);
    let want = format!(
        "shard `data/train-00001-of-00003.parquet` is missing (2 of the 3 shards are in {})",
        snapshot.display()
    );
    for (spec, split) in [
        ("hf://datasets/org/broken", Some("train")),
        ("hf://datasets/org/broken?split=train", None),
        ("hf://datasets/org/broken/data/train-*.parquet", None),
        ("hf://datasets/org/broken", None),
    ] {
        let err = resolve_err(&hub, spec, split);
        assert_eq!(err.to_string(), format!("`{spec}`: {want}"), "{spec}");
        assert_eq!(code(&err), "burnish::data::missing_shard");
        assert!(
            help(&err).contains("hf download org/broken --repo-type dataset"),
            "{}",
            help(&err)
        );
    }
    // A directory of the snapshot names the shard inside it.
    let err = resolve_err(&hub, "hf://datasets/org/broken/data", None);
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://datasets/org/broken/data`: shard `train-00001-of-00003.parquet` is missing (2 \
             of the 3 shards are in {})",
            snapshot.join("data").display()
        )
    );
    // Through the stage: the path stays unresolved for the engine's resolver, which says why.
    let files = dataset_files_in(
        &params("hf://datasets/org/broken", Some("train")),
        &hub.caches(),
    );
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].path.0, "hf://datasets/org/broken?split=train");
    let err = resolve_hf_in(&files[0].path.0, &hub.caches()).unwrap_err();
    assert!(err.to_string().ends_with(&want), "{err}");
}

#[test]
fn a_wrong_revision_names_what_was_looked_for() {
    let hub = hub();
    let repo = hub.repo("name");
    let err = resolve_err(&hub, "hf://datasets/org/name@v9/data", None);
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://datasets/org/name@v9/data`: revision `v9` is not in the cache: no refs/v9 and \
             no snapshots/v9 in {}",
            repo.display()
        )
    );
    assert_eq!(code(&err), "burnish::data::hf_revision");
    assert_eq!(
        help(&err),
        format!(
            "refs in the cache: main, refs/pr/1, v1; snapshots: {V1}, {MAIN}; burnish never \
             downloads: fetch it once, e.g. `hf download org/name --repo-type dataset --revision v9`"
        )
    );
    // A ref whose commit has no snapshot.
    set_ref(&repo, "stale", "ffffffffffffffffffffffffffffffffffffffff");
    let err = resolve_err(&hub, "hf://org/name@stale", None);
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://org/name@stale`: {} names commit `ffffffffffffffffffffffffffffffffffffffff`, \
             which has no snapshot in {}",
            repo.join("refs/stale").display(),
            repo.join("snapshots").display()
        )
    );
}

#[test]
fn no_match_names_the_pattern_the_split_and_the_caches() {
    let hub = hub();
    let snapshot = hub.snapshot("name", MAIN);
    let err = resolve_err(&hub, "hf://datasets/org/name/data/valid-*.parquet", None);
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://datasets/org/name/data/valid-*.parquet`: no data file matches \
             `data/valid-*.parquet` in snapshot {}",
            snapshot.display()
        )
    );
    assert!(
        help(&err).contains("data/test-00000-of-00001.parquet"),
        "{}",
        help(&err)
    );

    let err = resolve_err(&hub, "hf://datasets/org/name", Some("validation"));
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://datasets/org/name`: no split `validation` in snapshot {}: by `datasets`' rule \
             data/{{split}}-NNNNN-of-NNNNN.*, its splits are `train`, `test`",
            snapshot.display()
        )
    );
    let err = resolve_err(&hub, "hf://datasets/org/dirs", Some("validation"));
    assert!(
        err.to_string().ends_with(
            "by `datasets`' rule of directories named for a split (train/…), its splits are \
             `train`, `test`"
        ),
        "{err}"
    );

    let err = resolve_err(&hub, "hf://datasets/org/name/data/nope.parquet", None);
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://datasets/org/name/data/nope.parquet`: no file `data/nope.parquet` in snapshot {}",
            snapshot.display()
        )
    );

    let err = resolve_err(&hub, "hf://datasets/org/absent/x.parquet", None);
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://datasets/org/absent/x.parquet` is not in the local hugging face cache \
             (searched /nonexistent/hub/datasets--org--absent, {})",
            hub.repo("absent").display()
        )
    );
    assert_eq!(code(&err), "burnish::data::hf_not_found");

    // A split sharded in config directories asks for the directory.
    let err = resolve_err(&hub, "hf://datasets/org/configs", Some("train"));
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://datasets/org/configs`: split `train` of snapshot {} is sharded in 2 \
             directories (main/, socratic/): they look like configs",
            hub.snapshot("configs", MAIN).display()
        )
    );
    assert_eq!(
        help(&err),
        "name the config's directory, e.g. hf://datasets/org/configs/main with `split: train`"
    );
}

#[test]
fn several_files_without_a_split_are_listed() {
    let hub = hub();
    let err = resolve_err(&hub, "hf://datasets/org/name/extra", None);
    assert!(
        err.to_string().contains(
            "holds 3 data files; name one as hf://datasets/org/name/extra/<file>, or choose a \
             split with `split:`"
        ),
        "{err}"
    );
    assert_eq!(
        help(&err),
        "data files in the snapshot: bad.jsonl.gz, rows.jsonl.gz, rows.tsv"
    );
    let err = resolve_err(&hub, "hf://datasets/org/name", None);
    assert!(err.to_string().contains("holds 10 data files"), "{err}");
}

#[test]
fn arrow_stream_and_file_formats() {
    let hub = hub();
    assert_eq!(
        load(
            &hub,
            "hf://datasets/org/name/arrow/data-00000-of-00001.arrow",
            None
        ),
        ["saved 0", "saved 1", "saved 2"]
    );
    assert_eq!(
        load(&hub, "hf://datasets/org/name/arrow/file.arrow", None),
        ["ipc file 0", "ipc file 1"]
    );
    // A save_to_disk directory inside the repository.
    assert_eq!(
        load(&hub, "hf://datasets/org/name/saved", None),
        ["saved 0", "saved 1", "saved 2"]
    );
    let rows = read_rows(&fixtures().join("saved/data-00000-of-00001.arrow")).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].fields["tags"], json!(["a"]));
    assert_eq!(rows[1].fields["tags"], json!([]));
    assert_eq!(rows[2].fields["tags"], json!(["b", "c"]));
    assert_eq!(rows[1].fields["meta"], json!({"n": 2, "score": 1.25}));
    assert_eq!(rows[0].fields["note"], Value::Null);
    assert_eq!(rows[1].fields["note"], "x");
    assert_eq!(
        rows[2].at.to_string(),
        format!(
            "{} row 2",
            fixtures().join("saved/data-00000-of-00001.arrow").display()
        )
    );
}

#[test]
fn gzip_json_lines_keep_their_line_numbers() {
    let hub = hub();
    assert_eq!(
        load(&hub, "hf://datasets/org/name/extra/rows.jsonl.gz", None),
        ["gz 0", "gz 1", "gz 2"]
    );
    let p = params("hf://datasets/org/name/extra/bad.jsonl.gz", None);
    let files = dataset_files_in(&p, &hub.caches());
    let err = run_stage(&p, &files, Path::new("/")).unwrap_err();
    let bad = hub.snapshot("name", MAIN).join("extra/bad.jsonl.gz");
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3: malformed json: ", bad.display())),
        "{err}"
    );
    assert_eq!(
        err.code().map(|c| c.to_string()).as_deref(),
        Some("burnish::data::malformed")
    );
}

#[test]
fn save_to_disk_directories_load_as_local_paths() {
    let dir = fixtures();
    let run = |path: &str, split: Option<&str>| {
        let p = params(path, split);
        let files = dataset_files_in(&p, &[]);
        assert_eq!(files.len(), 1);
        run_stage(&p, &files, &dir)
    };
    assert_eq!(
        run("saved", None).unwrap(),
        ["saved 0", "saved 1", "saved 2"]
    );
    assert_eq!(
        run("saved_dict", Some("train")).unwrap(),
        ["dict train 0", "dict train 1"]
    );
    assert_eq!(run("saved_dict", Some("test")).unwrap(), ["dict test 0"]);
    let err = run("saved_dict", None).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: the saved DatasetDict holds 2 splits; choose one with `split:`",
            dir.join("saved_dict").display()
        )
    );
    let err = run("saved_dict", Some("validation"))
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("the saved DatasetDict has no split `validation`"),
        "{err}"
    );
    let err = run("saved", Some("train")).unwrap_err().to_string();
    assert!(err.contains("this is one saved Dataset"), "{err}");
}

#[test]
fn huggingface_hub_cache_is_honoured_in_order() {
    let env = |vars: &[(&str, &str)]| {
        let map: BTreeMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        hf_cache_dirs_from(move |k| map.get(k).cloned())
    };
    let p = |s: &str| PathBuf::from(s);
    assert_eq!(
        env(&[
            ("HOME", "/e"),
            ("XDG_CACHE_HOME", "/d"),
            ("HF_HOME", "/c"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HUB_CACHE", "/a"),
        ]),
        [
            p("/a"),
            p("/b"),
            p("/c/hub"),
            p("/d/huggingface/hub"),
            p("/e/.cache/huggingface/hub")
        ]
    );
    assert_eq!(
        env(&[("HUGGINGFACE_HUB_CACHE", "/b"), ("HOME", "/home/u")]),
        [p("/b"), p("/home/u/.cache/huggingface/hub")]
    );
    // Empty variables are unset; repeats are dropped; `~/` is the home directory.
    assert_eq!(
        env(&[
            ("HF_HUB_CACHE", ""),
            ("HUGGINGFACE_HUB_CACHE", "~/hub"),
            ("HF_HOME", "/home/u"),
            ("HOME", "/home/u"),
        ]),
        [p("/home/u/hub"), p("/home/u/.cache/huggingface/hub")]
    );
    assert_eq!(env(&[]), Vec::<PathBuf>::new());

    // The legacy variable finds a repository.
    let hub = hub();
    let caches = env(&[("HUGGINGFACE_HUB_CACHE", hub.root.to_str().unwrap())]);
    let files = resolve_hf_files_in("hf://datasets/org/sharded", None, &caches).unwrap();
    assert_eq!(files.len(), 3);
}

#[test]
fn check_rejects_what_cannot_resolve() {
    let problems = |path: &str, split: Option<&str>| -> Vec<String> {
        DatasetStage::check(&params(path, split))
            .into_iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect()
    };
    assert!(problems("hf://datasets/org/name", Some("train")).is_empty());
    assert!(problems("hf://datasets/org/name/data/*.parquet", None).is_empty());
    assert!(problems("hf://datasets/org/name/main", Some("train")).is_empty());
    assert!(problems("saved_dict", Some("train")).is_empty());
    assert!(problems("data/rows.tsv.gz", None).is_empty());
    assert_eq!(
        problems("hf://datasets/org/name/data/*.parquet", Some("train")),
        ["split: the glob in `path` already picks the files"]
    );
    assert_eq!(
        problems("hf://datasets/org/name/x.parquet", Some("train")),
        [
            "split: a split picks files of an hf:// repository or directory, or of a save_to_disk \
          directory; `path` names one file"
        ]
    );
    assert_eq!(
        problems("hf://datasets/org/name?split=test", Some("train")),
        ["split: `split: train` contradicts `?split=test` in the path"]
    );
    assert_eq!(
        problems("hf://datasets/org/name", Some("train[:10]")),
        ["split: `train[:10]` is not a split name (letters, digits, `_`, `.`)"]
    );
    assert_eq!(
        problems("hf://datasets/org", None),
        [
            "path: `hf://datasets/org` is not a valid hf:// path: the repository id must be \
          namespace/name, got `org`"
        ]
    );
}

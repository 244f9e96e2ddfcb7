//! `hf://` paths: datasets from the local Hugging Face hub cache, never the network.
//!
//! # Accepted forms
//!
//! - `hf://datasets/org/name[@revision][/path/in/repo]`: the URL pandas, polars, duckdb and
//!   `datasets` use (huggingface_hub's `HfFileSystem` grammar, dataset repositories only; the
//!   repository id is `namespace/name`).
//! - `hf://org/name[@revision][/path/in/repo]` and `hf://name[@revision]`: burnish's older
//!   short form, also a dataset repository (where huggingface_hub would read a model).
//! - `@revision` right after the repository id: a branch or tag, looked up as `refs/<revision>`
//!   (its content is the commit), else a snapshot directory `snapshots/<revision>` (a full commit
//!   hash). It is percent-decoded (`refs%2Fpr%2F1`); `refs/pr/<n>` and `refs/convert/<name>` may
//!   also be written unencoded. Without one: the snapshot `refs/main` names, else the only
//!   snapshot.
//! - The path in the repository names a file, a directory, or a glob (`*`, `?`, `[…]`, `**` as a
//!   whole path component; `*` never crosses `/`, hidden entries only match a literal `.`): every
//!   matching data file, in sorted order.
//! - `?split=<name>` at the end: the same as the `dataset` stage's `split:` parameter.
//!
//! Without a file, a directory (the snapshot or one inside it) yields its only data file; all
//! its files when they are the shards of one split (`train-00000-of-00003.parquet`, …); a
//! `save_to_disk` directory (`state.json`, `dataset_dict.json`) its Arrow files; else an error
//! listing them. A split gathers its files by `datasets`' rules (`data_files.py`), in its order:
//! `data/{split}-NNNNN-of-NNNNN*.*`; then files under directories named for the split
//! (`train/…`, `data/train-x/…`); then files named for it (`train.csv`, `data/my_train_0.jsonl`);
//! then, when no file names a split, everything is `train`. Keywords as in `datasets`: `train`
//! (`training`), `validation` (`valid`, `dev`, `val`), `test` (`testing`, `eval`, `evaluation`).
//! A split found in several directories as separate shard sets (configs such as `main/` and
//! `socratic/`) is an error asking for the directory. Whenever files named
//! `…-NNNNN-of-NNNNN…` are gathered, every shard of their set must be present.
//!
//! # Search order
//!
//! The hub cache directories, first match wins: `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`,
//! `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub` (as
//! huggingface_hub's `constants.py`, those that are set, without repeats). In each,
//! `datasets--org--name/` holds `refs/<branch or tag>` (a commit hash), `snapshots/<commit>/…`
//! (links into `blobs/`) and `blobs/`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use glob::{MatchOptions, Pattern};
use regex::Regex;

use super::error::DataError;
use super::source::{FileKind, saved_dataset_files};

/// Extensions of files that hold dataset rows.
pub const DATA_EXTENSIONS: &[&str] = &[
    "jsonl",
    "ndjson",
    "json",
    "csv",
    "tsv",
    "parquet",
    "arrow",
    "jsonl.gz",
    "ndjson.gz",
    "json.gz",
    "csv.gz",
    "tsv.gz",
];

/// Which files hold rows, for help texts.
pub const DATA_FILES_HELP: &str =
    "data files end in .jsonl, .ndjson, .json, .csv, .tsv (each maybe .gz), .parquet or .arrow";

/// JSON files of a dataset repository that describe it rather than hold rows.
const METADATA_FILES: &[&str] = &[
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
    "config.json",
];

/// How globs match paths inside a repository: as `datasets` (fsspec ≥ 2023.12) resolves them.
const GLOB: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: true,
};

/// A parsed `hf://` path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfPath {
    /// `org/name` (or `name` for the few repositories without an owner).
    pub repo: String,
    /// The revision after `@`, percent-decoded.
    pub revision: Option<String>,
    /// A path inside the repository: a file (`data/train-00000-of-00001.parquet`), a directory
    /// or a glob.
    pub file: Option<String>,
    /// The split of a trailing `?split=`.
    pub split: Option<String>,
}

impl HfPath {
    /// The repository's directory name inside the hub cache.
    pub fn cache_dir_name(&self) -> String {
        format!("datasets--{}", self.repo.replace('/', "--"))
    }

    /// Whether the path inside the repository is a glob.
    pub fn is_glob(&self) -> bool {
        self.file.as_deref().is_some_and(is_glob)
    }
}

/// Whether a path holds glob characters.
pub fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// `refs/pr/<n>` and `refs/convert/<name>`: revisions with `/` written unencoded.
static SPECIAL_REF: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^refs/(?:convert/[\w.-]+|pr/\d+)").expect("valid regex"));

/// A shard's file name: `<prefix>-<index>-of-<total><rest>`.
static SHARD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?<prefix>.+)-(?<index>[0-9]{5})-of-(?<total>[0-9]{5})(?<rest>.*)$")
        .expect("valid regex")
});

/// Whether a split name is one `datasets` accepts (`\w+(\.\w+)*`).
pub fn valid_split_name(split: &str) -> bool {
    !split.is_empty()
        && split
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

/// Parse `hf://[datasets/]org/name[@revision][/path/in/repo][?split=name]` (or `hf://name`).
pub fn parse_hf(spec: &str) -> Result<HfPath, DataError> {
    let bad = |reason: &str| DataError::HfPath {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = spec
        .strip_prefix("hf://")
        .ok_or_else(|| bad("it does not start with hf://"))?;
    let (rest, split) = match rest.rsplit_once("?split=") {
        Some((rest, split)) => {
            if !valid_split_name(split) {
                return Err(bad(&format!(
                    "`{split}` is not a split name (letters, digits, `_`, `.`)"
                )));
            }
            (rest, Some(split.to_owned()))
        }
        None => (rest, None),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (prefixed, body) = match rest.split_once('/') {
        Some(("datasets", body)) => (true, body),
        Some((kind @ ("models" | "spaces" | "buckets"), _)) => {
            return Err(bad(&format!(
                "`{kind}/` is not a dataset repository; burnish reads hf://datasets/…"
            )));
        }
        _ => (false, rest),
    };
    if body.is_empty() || rest == "datasets" {
        return Err(bad("it names no repository"));
    }
    // `@` ends the repository id only right after it (at most one `/` before it); an `@`
    // further on belongs to a file name.
    let at = body
        .find('@')
        .filter(|&i| body[..i].matches('/').count() <= 1);
    let (repo, revision, file) = match at {
        None => {
            let parts: Vec<&str> = body.splitn(3, '/').collect();
            match parts.as_slice() {
                [name] => ((*name).to_owned(), None, None),
                [org, name] => (format!("{org}/{name}"), None, None),
                [org, name, file] => (format!("{org}/{name}"), None, Some((*file).to_owned())),
                _ => return Err(bad("it names no repository")),
            }
        }
        Some(i) => {
            let after = &body[i + 1..];
            let special = SPECIAL_REF
                .find(after)
                .filter(|m| after[m.end()..].is_empty() || after[m.end()..].starts_with('/'));
            let (raw, file) = match special {
                Some(m) => (m.as_str(), after[m.end()..].strip_prefix('/')),
                None => match after.split_once('/') {
                    Some((rev, file)) => (rev, Some(file)),
                    None => (after, None),
                },
            };
            if raw.is_empty() {
                return Err(bad("the revision after `@` is empty"));
            }
            let revision = percent_decode(raw)
                .ok_or_else(|| bad(&format!("the revision `{raw}` has a bad %-escape")))?;
            (
                body[..i].to_owned(),
                Some(revision),
                file.filter(|f| !f.is_empty()).map(str::to_owned),
            )
        }
    };
    if prefixed && repo.matches('/').count() != 1 {
        return Err(bad(&format!(
            "the repository id must be namespace/name, got `{repo}`"
        )));
    }
    let segments = |s: &str| -> Vec<String> { s.split('/').map(str::to_owned).collect() };
    let mut all = segments(&repo);
    if let Some(f) = &file {
        all.extend(segments(f));
    }
    if all
        .iter()
        .any(|p| p.is_empty() || p == "." || p == ".." || p.contains('\\'))
    {
        return Err(bad("it has an empty, `.` or `..` segment"));
    }
    if let Some(rev) = &revision
        && rev
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == ".." || p.contains('\\'))
    {
        return Err(bad(&format!("the revision `{rev}` is not a ref or commit")));
    }
    Ok(HfPath {
        repo,
        revision,
        file,
        split,
    })
}

/// Decode `%XX` escapes (as `urllib.parse.unquote`), or `None` for a malformed one.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether a manifest path is an `hf://` path.
pub fn is_hf(path: &str) -> bool {
    path.starts_with("hf://")
}

/// `spec` with its split set to `split` (a trailing `?split=`), or as written without one.
pub fn with_split(spec: &str, split: Option<&str>) -> String {
    match split {
        None => spec.to_owned(),
        Some(split) => {
            let base = spec.rsplit_once("?split=").map_or(spec, |(b, _)| b);
            format!("{base}?split={split}")
        }
    }
}

/// The hub cache directories to search, from the process environment: see
/// [`hf_cache_dirs_from`].
pub fn hf_cache_dirs() -> Vec<PathBuf> {
    hf_cache_dirs_from(|name| std::env::var_os(name))
}

/// The hub cache directories to search, in order: `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`,
/// `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub` (those whose
/// variables are set and not empty, without repeats; a leading `~/` is the home directory).
/// `env` looks a variable up.
pub fn hf_cache_dirs_from(env: impl Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let home = var("HOME").map(PathBuf::from);
    let expand = |v: OsString| -> PathBuf {
        let s = v.to_string_lossy();
        match (s.strip_prefix("~/"), &home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(v),
        }
    };
    let mut dirs = Vec::new();
    if let Some(d) = var("HF_HUB_CACHE") {
        dirs.push(expand(d));
    }
    if let Some(d) = var("HUGGINGFACE_HUB_CACHE") {
        dirs.push(expand(d));
    }
    if let Some(d) = var("HF_HOME") {
        dirs.push(expand(d).join("hub"));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        dirs.push(expand(d).join("huggingface").join("hub"));
    }
    if let Some(home) = &home {
        dirs.push(home.join(".cache").join("huggingface").join("hub"));
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        if seen.contains(d) {
            false
        } else {
            seen.push(d.clone());
            true
        }
    });
    dirs
}

/// Resolve an `hf://` path that must name exactly one data file (the engine's URI resolver),
/// from the cache directories of [`hf_cache_dirs`].
pub fn resolve_hf(spec: &str) -> Result<PathBuf, DataError> {
    resolve_hf_in(spec, &hf_cache_dirs())
}

/// [`resolve_hf`] over explicit cache directories.
pub fn resolve_hf_in(spec: &str, caches: &[PathBuf]) -> Result<PathBuf, DataError> {
    let mut files = resolve_hf_files_in(spec, None, caches)?;
    if files.len() == 1 {
        return Ok(files.remove(0));
    }
    Err(DataError::HfFiles {
        spec: spec.to_owned(),
        message: format!("it resolves to {} data files, not one", files.len()),
        help: Some(format!(
            "the files: {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    })
}

/// Every data file an `hf://` path names, in reading order, with the split to gather (`split`,
/// else the path's `?split=`), from the cache directories of [`hf_cache_dirs`].
pub fn resolve_hf_files(spec: &str, split: Option<&str>) -> Result<Vec<PathBuf>, DataError> {
    resolve_hf_files_in(spec, split, &hf_cache_dirs())
}

/// [`resolve_hf_files`] over explicit cache directories.
pub fn resolve_hf_files_in(
    spec: &str,
    split: Option<&str>,
    caches: &[PathBuf],
) -> Result<Vec<PathBuf>, DataError> {
    let hf = parse_hf(spec)?;
    let split = split.or(hf.split.as_deref());
    let snapshot = locate_snapshot(spec, &hf, caches)?;
    Resolver {
        spec,
        hf: &hf,
        snapshot: &snapshot,
    }
    .files(split)
}

/// The snapshot directory of the path's repository and revision, in the first cache that has
/// both.
fn locate_snapshot(spec: &str, hf: &HfPath, caches: &[PathBuf]) -> Result<PathBuf, DataError> {
    let dir_name = hf.cache_dir_name();
    let repo_dirs: Vec<PathBuf> = caches
        .iter()
        .map(|c| c.join(&dir_name))
        .filter(|d| d.join("snapshots").is_dir())
        .collect();
    if repo_dirs.is_empty() {
        let searched: Vec<String> = caches
            .iter()
            .map(|c| c.join(&dir_name).display().to_string())
            .collect();
        return Err(DataError::HfNotFound {
            spec: spec.to_owned(),
            repo: hf.repo.clone(),
            searched: if searched.is_empty() {
                "nothing: none of HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, \
                 HOME is set"
                    .to_owned()
            } else {
                searched.join(", ")
            },
        });
    }
    let mut first_err = None;
    for repo_dir in &repo_dirs {
        match pick_snapshot(spec, hf, repo_dir) {
            Ok(dir) => return Ok(dir),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.expect("at least one repository directory"))
}

/// The snapshot of `hf.revision` (a ref, else a commit), or without one the snapshot
/// `refs/main` points at, else the only snapshot.
fn pick_snapshot(spec: &str, hf: &HfPath, repo_dir: &Path) -> Result<PathBuf, DataError> {
    let snapshots = repo_dir.join("snapshots");
    let refs = repo_dir.join("refs");
    if let Some(rev) = &hf.revision {
        let ref_file = refs.join(rev);
        if ref_file.is_file() {
            let commit = fs::read_to_string(&ref_file)
                .map_err(|e| DataError::io("read", &ref_file, e))?
                .trim()
                .to_owned();
            let dir = snapshots.join(&commit);
            if !commit.is_empty() && dir.is_dir() {
                return Ok(dir);
            }
            return Err(DataError::HfRevision {
                spec: spec.to_owned(),
                message: format!(
                    "{} names commit `{commit}`, which has no snapshot in {}",
                    ref_file.display(),
                    snapshots.display()
                ),
                help: Some(fetch_help(hf, Some(rev))),
            });
        }
        let dir = snapshots.join(rev);
        if dir.is_dir() {
            return Ok(dir);
        }
        return Err(DataError::HfRevision {
            spec: spec.to_owned(),
            message: format!(
                "revision `{rev}` is not in the cache: no refs/{rev} and no snapshots/{rev} in {}",
                repo_dir.display()
            ),
            help: Some(format!(
                "{}; {}",
                cached_revisions(repo_dir),
                fetch_help(hf, Some(rev))
            )),
        });
    }
    if let Ok(rev) = fs::read_to_string(refs.join("main")) {
        let dir = snapshots.join(rev.trim());
        if !rev.trim().is_empty() && dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut revs: Vec<PathBuf> = fs::read_dir(&snapshots)
        .map_err(|e| DataError::io("read", &snapshots, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    revs.sort();
    match revs.len() {
        1 => Ok(revs.remove(0)),
        0 => Err(DataError::HfFiles {
            spec: spec.to_owned(),
            message: format!("{} holds no snapshot", snapshots.display()),
            help: None,
        }),
        n => Err(DataError::HfFiles {
            spec: spec.to_owned(),
            message: format!(
                "{} holds {n} snapshots and refs/main names none of them",
                snapshots.display()
            ),
            help: Some(format!(
                "name one as hf://datasets/{}@<revision>, remove the stale snapshots, or point \
                 refs/main at the one to use; {}",
                hf.repo,
                cached_revisions(repo_dir)
            )),
        }),
    }
}

/// `refs in the cache: main, v1; snapshots: 0123…` for messages.
fn cached_revisions(repo_dir: &Path) -> String {
    let refs_dir = repo_dir.join("refs");
    let mut refs = Vec::new();
    let mut stack = vec![refs_dir.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(&refs_dir) {
                refs.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    refs.sort();
    let mut snaps: Vec<String> = fs::read_dir(repo_dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    snaps.sort();
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    format!(
        "refs in the cache: {}; snapshots: {}",
        list(&refs),
        list(&snaps)
    )
}

fn fetch_help(hf: &HfPath, revision: Option<&str>) -> String {
    let rev = revision.map_or(String::new(), |r| format!(" --revision {r}"));
    format!(
        "burnish never downloads: fetch it once, e.g. `hf download {} --repo-type dataset{rev}`",
        hf.repo
    )
}

/// Picks the files of one path inside one snapshot.
struct Resolver<'a> {
    spec: &'a str,
    hf: &'a HfPath,
    snapshot: &'a Path,
}

impl Resolver<'_> {
    fn err(&self, message: String, help: Option<String>) -> DataError {
        DataError::HfFiles {
            spec: self.spec.to_owned(),
            message,
            help,
        }
    }

    /// The spec up to the path in the repository, for hints (`hf://org/name`).
    fn base_spec(&self) -> &str {
        let s = self
            .spec
            .rsplit_once("?split=")
            .map_or(self.spec, |(b, _)| b);
        s.strip_suffix('/').unwrap_or(s)
    }

    fn files(&self, split: Option<&str>) -> Result<Vec<PathBuf>, DataError> {
        let snapshot = self.snapshot;
        let Some(file) = &self.hf.file else {
            return self.directory(snapshot, "", split);
        };
        if is_glob(file) {
            if split.is_some() {
                return Err(self.err(
                    "a glob in the path and a split together: the glob already picks the files"
                        .into(),
                    Some("drop `split:`, or name the repository or a directory of it".into()),
                ));
            }
            let pattern = Pattern::new(file).map_err(|e| DataError::HfPath {
                spec: self.spec.to_owned(),
                reason: format!("`{file}` is not a valid glob: {e}"),
            })?;
            let all = data_files(snapshot);
            let matched: Vec<String> = all
                .iter()
                .filter(|rel| pattern.matches_with(rel, GLOB))
                .cloned()
                .collect();
            if matched.is_empty() {
                return Err(self.err(
                    format!(
                        "no data file matches `{file}` in snapshot {}",
                        snapshot.display()
                    ),
                    Some(list_help(&all)),
                ));
            }
            check_shards(self.spec, snapshot, &matched, &self.hf.repo)?;
            return Ok(matched.iter().map(|r| snapshot.join(r)).collect());
        }
        let path = snapshot.join(file);
        if path.is_file() {
            if split.is_some() {
                return Err(self.err(
                    format!("`{file}` is one file; a split picks files of a directory"),
                    Some(
                        "drop `split:`, or name the repository or the directory that holds the \
                         split"
                            .into(),
                    ),
                ));
            }
            return Ok(vec![path]);
        }
        if path.is_dir() {
            return self.directory(&path, file, split);
        }
        Err(self.err(
            format!("no file `{file}` in snapshot {}", snapshot.display()),
            Some(list_help(&data_files(snapshot))),
        ))
    }

    /// The files of a directory of the snapshot (`rel`: its path in the repository, or empty).
    fn directory(
        &self,
        dir: &Path,
        rel: &str,
        split: Option<&str>,
    ) -> Result<Vec<PathBuf>, DataError> {
        if let Some(files) = saved_dataset_files(dir, split)? {
            return Ok(files);
        }
        let what = if rel.is_empty() {
            format!("snapshot {}", self.snapshot.display())
        } else {
            format!("directory `{rel}` of snapshot {}", self.snapshot.display())
        };
        let files = data_files(dir);
        if let Some(split) = split {
            let picked = split_files(&files, split).map_err(|m| {
                self.err(
                    format!("no split `{split}` in {what}: {m}"),
                    Some(list_help(&files)),
                )
            })?;
            configs_guard(self.spec, &what, split, &picked, self.base_spec())?;
            check_shards(self.spec, dir, &picked, &self.hf.repo)?;
            return Ok(picked.iter().map(|r| dir.join(r)).collect());
        }
        match files.len() {
            1 => Ok(vec![dir.join(&files[0])]),
            0 => Err(self.err(
                format!("{what} holds no data file"),
                Some(DATA_FILES_HELP.into()),
            )),
            n => {
                if one_shard_set(&files) {
                    check_shards(self.spec, dir, &files, &self.hf.repo)?;
                    return Ok(files.iter().map(|r| dir.join(r)).collect());
                }
                Err(self.err(
                    format!(
                        "{what} holds {n} data files; name one as {}/<file>, or choose a split \
                         with `split:`",
                        self.base_spec()
                    ),
                    Some(list_help(&files)),
                ))
            }
        }
    }
}

fn list_help(files: &[String]) -> String {
    if files.is_empty() {
        return "the snapshot holds no data file".to_owned();
    }
    format!("data files in the snapshot: {}", files.join(", "))
}

/// Data files under a directory, as `/`-separated paths relative to it, sorted: hidden entries,
/// `__special__` directories and metadata JSON are skipped, as `datasets` skips them.
fn data_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                if !name.starts_with("__") {
                    stack.push(path);
                }
            } else if path.is_file()
                && FileKind::of(&name).is_some()
                && !METADATA_FILES.contains(&name.as_str())
                && let Ok(rel) = path.strip_prefix(root)
            {
                out.push(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
    }
    out.sort();
    out
}

/// The splits `datasets` infers from file and directory names, and their keywords.
const SPLIT_KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// `datasets`' `NON_WORDS_CHARS`, as a glob class.
const SEP: &str = "[-._ 0-9]";

/// `datasets`' `SPLIT_PATTERN_SHARDED` with `{split}` as given.
fn sharded_pattern(split: &str) -> String {
    format!("data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*")
}

/// `KEYWORDS_IN_DIR_NAME_BASE_PATTERNS` (fsspec ≥ 2023.12) for one keyword.
fn dir_name_patterns(kw: &str) -> Vec<String> {
    vec![
        format!("**/{kw}/**"),
        format!("**/{kw}{SEP}*/**"),
        format!("**/*{SEP}{kw}/**"),
        format!("**/*{SEP}{kw}{SEP}*/**"),
    ]
}

/// `KEYWORDS_IN_FILENAME_BASE_PATTERNS` (fsspec ≥ 2023.12) for one keyword.
fn file_name_patterns(kw: &str) -> Vec<String> {
    vec![format!("**/{kw}{SEP}*"), format!("**/*{SEP}{kw}{SEP}*")]
}

/// The patterns of one keyword, for one tier.
type SplitPatterns = fn(&str) -> Vec<String>;

fn matching(files: &[String], patterns: &[String]) -> Vec<String> {
    let patterns: Vec<Pattern> = patterns
        .iter()
        .map(|p| Pattern::new(p).expect("valid split pattern"))
        .collect();
    files
        .iter()
        .filter(|f| patterns.iter().any(|p| p.matches_with(f, GLOB)))
        .cloned()
        .collect()
}

/// The files of `split` among `files` (relative paths, sorted), by `datasets`' default data
/// files patterns, tier by tier (`_get_data_files_patterns`): the first tier where any split has
/// files decides which splits exist. The error says which splits there are.
fn split_files(files: &[String], split: &str) -> Result<Vec<String>, String> {
    // Tier 1: data/{split}-NNNNN-of-NNNNN*.*
    let sharded = matching(files, &[sharded_pattern("*")]);
    if !sharded.is_empty() {
        let mut splits = BTreeSet::new();
        for f in &sharded {
            let name = f.rsplit('/').next().unwrap_or(f);
            if let Some(c) = SHARD.captures(name) {
                splits.insert(c["prefix"].to_owned());
            }
        }
        if splits.contains(split) {
            return Ok(matching(files, &[sharded_pattern(&Pattern::escape(split))]));
        }
        return Err(format!(
            "by `datasets`' rule data/{{split}}-NNNNN-of-NNNNN.*, its splits are {}",
            ordered_splits(&splits)
        ));
    }
    // Tiers 2 and 3: directories, then files, named for the default splits.
    let tiers: [(&str, SplitPatterns); 2] = [
        ("directories named for a split (train/…)", dir_name_patterns),
        ("files named for a split (train.csv, …)", file_name_patterns),
    ];
    for (rule, patterns) in tiers {
        let mut found: Vec<(&str, Vec<String>)> = Vec::new();
        for (name, keywords) in SPLIT_KEYWORDS {
            let pats: Vec<String> = keywords.iter().flat_map(|k| patterns(k)).collect();
            let hits = matching(files, &pats);
            if !hits.is_empty() {
                found.push((name, hits));
            }
        }
        if found.is_empty() {
            continue;
        }
        if let Some((_, hits)) = found.iter().find(|(name, _)| *name == split) {
            return Ok(hits.clone());
        }
        let names: BTreeSet<String> = found.iter().map(|(n, _)| (*n).to_owned()).collect();
        return Err(format!(
            "by `datasets`' rule of {rule}, its splits are {}",
            ordered_splits(&names)
        ));
    }
    // Tier 4: no file names a split; all of them are `train`.
    if files.is_empty() {
        return Err("it holds no data file".into());
    }
    if split == "train" {
        return Ok(files.to_vec());
    }
    Err(
        "no file or directory is named for a split, so `datasets` reads every file as `train`"
            .into(),
    )
}

/// Split names in `datasets`' order: train, validation, test, then the others sorted.
fn ordered_splits(splits: &BTreeSet<String>) -> String {
    let mut out: Vec<String> = SPLIT_KEYWORDS
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .filter(|n| splits.contains(n))
        .collect();
    out.extend(
        splits
            .iter()
            .filter(|s| !SPLIT_KEYWORDS.iter().any(|(n, _)| n == s))
            .cloned(),
    );
    out.iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A shard set: the directory, the name before `-NNNNN-of-NNNNN`, and the count.
type ShardSet = (String, String, usize);

fn shard_of(rel: &str) -> Option<(ShardSet, usize, String)> {
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let c = SHARD.captures(name)?;
    let index: usize = c["index"].parse().ok()?;
    let total: usize = c["total"].parse().ok()?;
    Some((
        (dir.to_owned(), c["prefix"].to_owned(), total),
        index,
        c["rest"].to_owned(),
    ))
}

/// Whether every file is a shard of the same set.
fn one_shard_set(files: &[String]) -> bool {
    let mut sets = files.iter().map(|f| shard_of(f).map(|(s, _, _)| s));
    match sets.next() {
        Some(Some(first)) => sets.all(|s| s.as_ref() == Some(&first)),
        _ => false,
    }
}

/// Every shard set among `files` must be whole: an error names the first missing shard.
fn check_shards(spec: &str, dir: &Path, files: &[String], repo: &str) -> Result<(), DataError> {
    let mut sets: BTreeMap<ShardSet, (BTreeSet<usize>, BTreeSet<String>)> = BTreeMap::new();
    for f in files {
        if let Some((set, index, rest)) = shard_of(f) {
            let e = sets.entry(set).or_default();
            e.0.insert(index);
            e.1.insert(rest);
        }
    }
    for ((sub, prefix, total), (present, rests)) in &sets {
        let Some(missing) = (0..*total).find(|i| !present.contains(i)) else {
            continue;
        };
        // The name the missing shard would have: its siblings' ending when they share one.
        let rest = match rests.iter().collect::<Vec<_>>().as_slice() {
            [one] => (*one).clone(),
            _ => "*".to_owned(),
        };
        let name = format!("{prefix}-{missing:05}-of-{total:05}{rest}");
        let file = if sub.is_empty() {
            name
        } else {
            format!("{sub}/{name}")
        };
        let count = present.iter().filter(|i| *i < total).count();
        return Err(DataError::MissingShard {
            spec: spec.to_owned(),
            file,
            present: count,
            total: *total,
            dir: dir.display().to_string(),
            help: Some(format!(
                "burnish never reads part of a sharded split: fetch the whole split again, e.g. \
                 `hf download {repo} --repo-type dataset`"
            )),
        });
    }
    Ok(())
}

/// A split whose files are shard sets in several directories (configs such as `main/` and
/// `socratic/`) is ambiguous: `datasets` would take the config from the README.
fn configs_guard(
    spec: &str,
    what: &str,
    split: &str,
    files: &[String],
    base_spec: &str,
) -> Result<(), DataError> {
    let dirs: BTreeSet<String> = files
        .iter()
        .filter_map(|f| shard_of(f).map(|((dir, _, _), _, _)| dir))
        .collect();
    if dirs.len() < 2 {
        return Ok(());
    }
    let shown: Vec<String> = dirs
        .iter()
        .map(|d| {
            if d.is_empty() {
                "./".to_owned()
            } else {
                format!("{d}/")
            }
        })
        .collect();
    let example = dirs
        .iter()
        .find(|d| !d.is_empty())
        .cloned()
        .unwrap_or_default();
    Err(DataError::HfFiles {
        spec: spec.to_owned(),
        message: format!(
            "split `{split}` of {what} is sharded in {} directories ({}): they look like configs",
            dirs.len(),
            shown.join(", ")
        ),
        help: Some(format!(
            "name the config's directory, e.g. {base_spec}/{example} with `split: {split}`"
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(repo: &str, revision: Option<&str>, file: Option<&str>) -> HfPath {
        HfPath {
            repo: repo.into(),
            revision: revision.map(Into::into),
            file: file.map(Into::into),
            split: None,
        }
    }

    #[test]
    fn parses_paths() {
        assert_eq!(
            parse_hf("hf://yahma/alpaca-cleaned").unwrap(),
            hf("yahma/alpaca-cleaned", None, None)
        );
        assert_eq!(
            parse_hf("hf://openai/gsm8k/main/train-00000-of-00001.parquet").unwrap(),
            hf(
                "openai/gsm8k",
                None,
                Some("main/train-00000-of-00001.parquet")
            )
        );
        assert_eq!(
            parse_hf("hf://gsm8k").unwrap().cache_dir_name(),
            "datasets--gsm8k"
        );
        assert!(parse_hf("hf://org//x").is_err());
        assert!(parse_hf("hf://org/name/../x").is_err());
        assert!(parse_hf("s3://x").is_err());
    }

    #[test]
    fn parses_the_datasets_url_form() {
        assert_eq!(
            parse_hf("hf://datasets/openai/gsm8k/main/train-00000-of-00001.parquet").unwrap(),
            hf(
                "openai/gsm8k",
                None,
                Some("main/train-00000-of-00001.parquet")
            )
        );
        assert_eq!(
            parse_hf("hf://datasets/org/name@v1.0/data/x.parquet").unwrap(),
            hf("org/name", Some("v1.0"), Some("data/x.parquet"))
        );
        assert_eq!(
            parse_hf("hf://org/name@0123abcd").unwrap(),
            hf("org/name", Some("0123abcd"), None)
        );
        assert_eq!(
            parse_hf("hf://datasets/org/name@refs%2Fpr%2F1/x.csv").unwrap(),
            hf("org/name", Some("refs/pr/1"), Some("x.csv"))
        );
        assert_eq!(
            parse_hf("hf://datasets/org/name@refs/pr/12/x.csv").unwrap(),
            hf("org/name", Some("refs/pr/12"), Some("x.csv"))
        );
        assert_eq!(
            parse_hf("hf://datasets/org/name@refs/convert/parquet").unwrap(),
            hf("org/name", Some("refs/convert/parquet"), None)
        );
        // An `@` past the repository id is part of a file name.
        assert_eq!(
            parse_hf("hf://datasets/org/name/data/a@b.csv").unwrap(),
            hf("org/name", None, Some("data/a@b.csv"))
        );
        assert_eq!(
            parse_hf("hf://datasets/org/name/data/train-*.parquet?split=train").unwrap(),
            HfPath {
                split: Some("train".into()),
                ..hf("org/name", None, Some("data/train-*.parquet"))
            }
        );
        assert!(parse_hf("hf://datasets/org/name/").unwrap().file.is_none());
        assert!(parse_hf("hf://datasets/gsm8k").is_err());
        assert!(parse_hf("hf://datasets").is_err());
        assert!(parse_hf("hf://models/org/name").is_err());
        assert!(parse_hf("hf://datasets/org/name@").is_err());
        assert!(parse_hf("hf://datasets/org/name@v%2").is_err());
        assert!(parse_hf("hf://datasets/org/name@..").is_err());
        assert!(parse_hf("hf://org/name?split=train[:10]").is_err());
    }

    #[test]
    fn split_patterns_follow_datasets() {
        let files: Vec<String> = [
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "other.jsonl",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            split_files(&files, "train").unwrap(),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        let err = split_files(&files, "validation").unwrap_err();
        assert!(err.ends_with("its splits are `train`, `test`"), "{err}");

        let files: Vec<String> = ["train/a.csv", "train/b/c.csv", "valid/a.csv", "test.csv"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            split_files(&files, "train").unwrap(),
            ["train/a.csv", "train/b/c.csv"]
        );
        assert_eq!(split_files(&files, "validation").unwrap(), ["valid/a.csv"]);
        // Directories decide before file names: `test.csv` is no split here.
        assert!(split_files(&files, "test").is_err());

        let files: Vec<String> = ["my_train_0.jsonl", "dev.jsonl", "training.jsonl", "x.jsonl"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            split_files(&files, "train").unwrap(),
            ["my_train_0.jsonl", "training.jsonl"]
        );
        assert_eq!(split_files(&files, "validation").unwrap(), ["dev.jsonl"]);

        let files = vec!["a.jsonl".to_string(), "b.jsonl".to_string()];
        assert_eq!(split_files(&files, "train").unwrap(), files);
        assert!(split_files(&files, "test").is_err());
    }

    #[test]
    fn shard_names() {
        assert!(one_shard_set(&[
            "data/train-00000-of-00002.parquet".into(),
            "data/train-00001-of-00002.parquet".into()
        ]));
        assert!(!one_shard_set(&[
            "data/train-00000-of-00001.parquet".into(),
            "data/test-00000-of-00001.parquet".into()
        ]));
        let err = check_shards(
            "hf://o/n",
            Path::new("/snap"),
            &[
                "data/train-00000-of-00003-abc.parquet".into(),
                "data/train-00002-of-00003-def.parquet".into(),
            ],
            "o/n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`hf://o/n`: shard `data/train-00001-of-00003*` is missing (2 of the 3 shards are \
             in /snap)"
        );
    }
}

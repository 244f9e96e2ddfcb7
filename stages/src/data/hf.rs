//! `hf://org/name[/file]`: datasets from the local Hugging Face hub cache, never the network.
//!
//! The cache layout (as `huggingface_hub` writes it):
//! `<cache>/datasets--org--name/refs/main` (a commit hash) and
//! `<cache>/datasets--org--name/snapshots/<commit>/<files…>` (links into `blobs/`).

use std::fs;
use std::path::{Path, PathBuf};

use super::error::DataError;

/// Extensions of files that hold dataset rows.
pub const DATA_EXTENSIONS: &[&str] = &["jsonl", "ndjson", "json", "csv", "parquet"];

/// JSON files of a dataset repository that describe it rather than hold rows.
const METADATA_FILES: &[&str] = &[
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
    "config.json",
];

/// A parsed `hf://` path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfPath {
    /// `org/name` (or `name` for the few repositories without an owner).
    pub repo: String,
    /// A file inside the repository, e.g. `data/train-00000-of-00001.parquet`.
    pub file: Option<String>,
}

impl HfPath {
    /// The repository's directory name inside the hub cache.
    pub fn cache_dir_name(&self) -> String {
        format!("datasets--{}", self.repo.replace('/', "--"))
    }
}

/// Parse `hf://org/name[/path/in/repo]` (or `hf://name`).
pub fn parse_hf(spec: &str) -> Result<HfPath, DataError> {
    let bad = |reason: &str| DataError::HfPath {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = spec
        .strip_prefix("hf://")
        .ok_or_else(|| bad("it does not start with hf://"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(bad("it has an empty, `.` or `..` segment"));
    }
    match parts.as_slice() {
        [] => Err(bad("it names no repository")),
        [name] => Ok(HfPath {
            repo: (*name).to_owned(),
            file: None,
        }),
        [org, name] => Ok(HfPath {
            repo: format!("{org}/{name}"),
            file: None,
        }),
        [org, name, file @ ..] => Ok(HfPath {
            repo: format!("{org}/{name}"),
            file: Some(file.join("/")),
        }),
    }
}

/// Whether a manifest path is an `hf://` path.
pub fn is_hf(path: &str) -> bool {
    path.starts_with("hf://")
}

/// The hub cache directories to search, in order: `$HF_HUB_CACHE`, `$HF_HOME/hub`,
/// `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub` (those whose variables are set,
/// without repeats).
pub fn hf_cache_dirs() -> Vec<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let mut dirs = Vec::new();
    if let Some(d) = var("HF_HUB_CACHE") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(d) = var("HF_HOME") {
        dirs.push(PathBuf::from(d).join("hub"));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        dirs.push(PathBuf::from(d).join("huggingface").join("hub"));
    }
    if let Some(d) = var("HOME") {
        dirs.push(
            PathBuf::from(d)
                .join(".cache")
                .join("huggingface")
                .join("hub"),
        );
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

/// Resolve `hf://org/name[/file]` to a data file in the local hub cache (see [`hf_cache_dirs`]).
/// Without a file, the snapshot must hold exactly one data file.
pub fn resolve_hf(spec: &str) -> Result<PathBuf, DataError> {
    resolve_hf_in(spec, &hf_cache_dirs())
}

/// [`resolve_hf`] over explicit cache directories.
pub fn resolve_hf_in(spec: &str, caches: &[PathBuf]) -> Result<PathBuf, DataError> {
    let hf = parse_hf(spec)?;
    let dir_name = hf.cache_dir_name();
    let Some(repo_dir) = caches
        .iter()
        .map(|c| c.join(&dir_name))
        .find(|d| d.join("snapshots").is_dir())
    else {
        let searched: Vec<String> = caches
            .iter()
            .map(|c| c.join(&dir_name).display().to_string())
            .collect();
        return Err(DataError::HfNotFound {
            spec: spec.to_owned(),
            repo: hf.repo.clone(),
            searched: if searched.is_empty() {
                "nothing: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HOME is set".to_owned()
            } else {
                searched.join(", ")
            },
        });
    };
    let snapshot = pick_snapshot(spec, &repo_dir)?;
    match &hf.file {
        Some(file) => {
            let path = snapshot.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                let files = data_files(&snapshot);
                Err(DataError::HfFiles {
                    spec: spec.to_owned(),
                    message: format!("no file `{file}` in snapshot {}", snapshot.display()),
                    help: Some(list_help(&snapshot, &files)),
                })
            }
        }
        None => {
            let files = data_files(&snapshot);
            match files.len() {
                1 => Ok(files.into_iter().next().expect("one file")),
                0 => Err(DataError::HfFiles {
                    spec: spec.to_owned(),
                    message: format!("snapshot {} holds no data file", snapshot.display()),
                    help: Some(format!(
                        "data files end in .{}",
                        DATA_EXTENSIONS.join(", .")
                    )),
                }),
                n => Err(DataError::HfFiles {
                    spec: spec.to_owned(),
                    message: format!(
                        "snapshot {} holds {n} data files; name one as hf://{}/<file>",
                        snapshot.display(),
                        hf.repo
                    ),
                    help: Some(list_help(&snapshot, &files)),
                }),
            }
        }
    }
}

fn list_help(snapshot: &Path, files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "the snapshot holds no data file".to_owned();
    }
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(snapshot)
                .unwrap_or(f)
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    format!("data files in the snapshot: {}", names.join(", "))
}

/// The snapshot `refs/main` points at, else the only snapshot.
fn pick_snapshot(spec: &str, repo_dir: &Path) -> Result<PathBuf, DataError> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = fs::read_to_string(repo_dir.join("refs").join("main")) {
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
            help: Some("remove the stale snapshots, or point refs/main at the one to use".into()),
        }),
    }
}

/// Data files under a snapshot, sorted, skipping hidden entries and metadata JSON.
fn data_files(snapshot: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![snapshot.to_path_buf()];
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
                stack.push(path);
            } else if path.is_file() {
                let ext = path
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase())
                    .unwrap_or_default();
                if DATA_EXTENSIONS.contains(&ext.as_str())
                    && !METADATA_FILES.contains(&name.as_str())
                {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths() {
        assert_eq!(
            parse_hf("hf://yahma/alpaca-cleaned").unwrap(),
            HfPath {
                repo: "yahma/alpaca-cleaned".into(),
                file: None
            }
        );
        assert_eq!(
            parse_hf("hf://openai/gsm8k/main/train-00000-of-00001.parquet").unwrap(),
            HfPath {
                repo: "openai/gsm8k".into(),
                file: Some("main/train-00000-of-00001.parquet".into())
            }
        );
        assert_eq!(
            parse_hf("hf://gsm8k").unwrap().cache_dir_name(),
            "datasets--gsm8k"
        );
        assert!(parse_hf("hf://org//x").is_err());
        assert!(parse_hf("hf://org/name/../x").is_err());
        assert!(parse_hf("s3://x").is_err());
    }
}

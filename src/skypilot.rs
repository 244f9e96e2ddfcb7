//! `burnish skypilot FILE [--stage STAGE] -o task.yaml`: a SkyPilot task that runs the pipeline
//! (or one stage and what it needs) on a cloud node against the remote cache.
//!
//! What goes where in the task:
//! - `resources` from the stages' `resources:` — `accelerators: <accelerator>:<gpus>`,
//!   `cpus: N+`, `memory: N+` (GB, from `mem`), `use_spot`, `disk_size`, `infra`; for the whole
//!   pipeline, the largest ask of any stage (spot only when every asking stage says so);
//! - `envs`: the remote (`BURNISH_REMOTE`, `BURNISH_REMOTE_MODE`) and the non-secret settings of
//!   its store (`AWS_ENDPOINT`, `AWS_REGION`, …) as set here; the keys go under `secrets` with
//!   no value, for `sky launch --secret` to fill, so they never reach the file;
//! - `file_mounts`: the burnish binary (unless `--install` gives a setup command), the manifest
//!   and its `extends` bases, and every local file the run reads, under `~/burnish/project` at
//!   their places relative to their common directory (so the manifest's relative paths hold);
//!   files from the Hugging Face hub cache go to the node's hub cache;
//! - `run`: `burnish run` on the node, `--until STAGE` for one stage, `--backend cuda` when the
//!   task asks for GPUs. Everything computed reaches the remote cache; a `burnish run` (or
//!   `pull`) here then restores it and writes the lock file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use burnish_engine::manifest::Resources;
use burnish_engine::plan::Plan;
use burnish_engine::stage::Registry;
use miette::{IntoDiagnostic, Result, miette};

use crate::{BackendArg, CacheArgs, INVALID, load, plan_and_cache};

#[derive(clap::Args)]
pub struct SkypilotArgs {
    file: PathBuf,
    /// Run only this stage (or matrix cell) and what it depends on
    #[arg(long, value_name = "STAGE")]
    stage: Option<String>,
    /// Write the task here (default: stdout)
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    /// A setup command that installs burnish on the node, instead of mounting this binary
    #[arg(long, value_name = "CMD")]
    install: Option<String>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Where the project's files go on the node.
const PROJECT: &str = "~/burnish/project";
const BINARY: &str = "~/burnish/bin/burnish";

/// Environment variables of each store that name where it is, not who may use it.
const SETTINGS: [&str; 7] = [
    "AWS_ENDPOINT",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "GOOGLE_CLOUD_PROJECT",
];

/// The credentials each store reads, by URL scheme.
fn secrets_for(url: &str) -> &'static [&'static str] {
    match url.split_once("://").map_or("", |(s, _)| s) {
        "s3" | "s3a" => &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        "gs" => &["GOOGLE_SERVICE_ACCOUNT_KEY"],
        "az" => &["AZURE_STORAGE_ACCOUNT_KEY"],
        _ => &[],
    }
}

pub fn skypilot(args: &SkypilotArgs, reg: &Registry) -> Result<ExitCode> {
    let Some(m) = load(&args.file, reg) else {
        return Ok(ExitCode::from(INVALID));
    };
    let sources: Vec<PathBuf> = m
        .sources
        .names()
        .map(|n| std::path::absolute(n).unwrap_or_else(|_| PathBuf::from(n)))
        .collect();
    // The node picks its backend; fingerprints do not matter to the task.
    let (plan, store, _) = plan_and_cache(m, reg, Some(BackendArg::Cpu), &args.cache)?;
    let Some(remote) = store.remote() else {
        return Err(miette!(
            code = "burnish::skypilot::no_remote",
            help = "add `cache: {{remote: s3://bucket/prefix}}` to the manifest, or pass `--remote URL`",
            "a SkyPilot task needs a remote cache: what the node computes would stay on the node"
        ));
    };
    let selected = crate::until_cells(&plan, args.stage.as_deref(), &args.file)?;
    let task = Task {
        name: task_name(&plan, args.stage.as_deref()),
        resources: merged_resources(&plan, &selected, args.stage.as_deref()),
        remote: (remote.url().to_owned(), remote.mode().as_str()),
        sources,
        files: plan
            .cells
            .iter()
            .zip(&selected)
            .filter(|(_, s)| **s)
            .flat_map(|(c, _)| c.files.iter().map(|(_, p)| p.clone()))
            .collect(),
        stage: args.stage.clone(),
        install: args.install.clone(),
        binary: std::env::current_exe().into_diagnostic()?,
    };
    let text = task.render(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))?;
    match &args.output {
        Some(path) => {
            burnish_engine::cache::write_atomic(path, text.as_bytes()).map_err(|e| {
                miette!(
                    code = "burnish::skypilot::write",
                    "cannot write {}: {e}",
                    path.display()
                )
            })?;
            eprintln!(
                "wrote {} (launch with `sky launch {}`)",
                path.display(),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn task_name(plan: &Plan, stage: Option<&str>) -> String {
    let raw = match stage {
        Some(s) => format!("{}-{s}", plan.manifest.header.pipeline),
        None => plan.manifest.header.pipeline.clone(),
    };
    // SkyPilot names: letters, digits, `-`, `_`, `.`.
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// One stage's resources, or the largest ask over the selected cells.
fn merged_resources(plan: &Plan, selected: &[bool], stage: Option<&str>) -> Resources {
    let cells: Vec<&burnish_engine::plan::Cell> = plan
        .cells
        .iter()
        .zip(selected)
        .filter(|(c, s)| **s && stage.is_none_or(|st| c.name == st || c.stage == st))
        .map(|(c, _)| c)
        .collect();
    let mut out = Resources::default();
    // A stage whose numbers depend on the backend (a trainer) asks for one GPU unless it says
    // otherwise, when the manifest lets the node pick CUDA (`auto` or `cuda`).
    use burnish_engine::manifest::BackendChoice;
    let gpu_backend = matches!(
        plan.manifest.header.backend,
        BackendChoice::Auto | BackendChoice::Cuda
    );
    let gpus = |c: &burnish_engine::plan::Cell| {
        c.resources.gpus.unwrap_or(u32::from(
            (c.sensitivity.backend && gpu_backend) || c.resources.accelerator.is_some(),
        ))
    };
    for c in &cells {
        let r = &c.resources;
        let g = gpus(c);
        if g > out.gpus.unwrap_or(0) {
            out.gpus = Some(g);
            out.accelerator = r.accelerator.clone().or(out.accelerator.take());
        } else if out.accelerator.is_none() {
            out.accelerator = r.accelerator.clone();
        }
        out.cpus = out.cpus.max(r.cpus);
        out.disk = out.disk.max(r.disk);
        if mem_gb(r.mem.as_deref()) > mem_gb(out.mem.as_deref()) {
            out.mem = r.mem.clone();
        }
        out.infra = out.infra.take().or_else(|| r.infra.clone());
    }
    let asking: Vec<bool> = cells.iter().filter_map(|c| c.resources.spot).collect();
    out.spot = (!asking.is_empty()).then(|| asking.iter().all(|s| *s));
    out
}

/// A Slurm-style memory size in whole GB, rounded up (`16G` → 16, `512M` → 1).
fn mem_gb(mem: Option<&str>) -> u64 {
    let Some(m) = mem else { return 0 };
    let (digits, unit) = match m.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => m.split_at(i),
        None => (m, "M"),
    };
    let n: u64 = digits.parse().unwrap_or(0);
    let kib = match unit {
        "K" => n,
        "M" => n * 1024,
        "G" => n * 1024 * 1024,
        "T" => n * 1024 * 1024 * 1024,
        _ => 0,
    };
    kib.div_ceil(1024 * 1024)
}

struct Task {
    name: String,
    resources: Resources,
    /// URL and mode.
    remote: (String, &'static str),
    /// The manifest and its `extends` bases, absolute.
    sources: Vec<PathBuf>,
    /// Local files and directories the selected cells read, absolute.
    files: Vec<PathBuf>,
    stage: Option<String>,
    install: Option<String>,
    binary: PathBuf,
}

/// A YAML scalar: JSON's double-quoted strings are YAML's too.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

impl Task {
    fn render(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<String> {
        let hub = hub_cache(env);
        let (hub_files, project_files): (Vec<&PathBuf>, Vec<&PathBuf>) = self
            .files
            .iter()
            .partition(|p| hub.as_ref().is_some_and(|h| p.starts_with(h)));
        let project: Vec<&PathBuf> = self.sources.iter().chain(project_files).collect();
        let root = common_dir(&project).ok_or_else(|| {
            miette!(
                code = "burnish::skypilot::paths",
                "the manifest and its files share no directory"
            )
        })?;
        let manifest_rel = relative(&self.sources[0], &root);

        let mut y = String::new();
        let _ = writeln!(
            y,
            "# SkyPilot task written by `burnish skypilot`: {}{}, against the remote cache.",
            manifest_rel,
            self.stage
                .as_ref()
                .map_or(String::new(), |s| format!(" until `{s}`"))
        );
        let _ = writeln!(
            y,
            "# Launch: sky launch <this file> --secret <KEY> for each key under `secrets`."
        );
        let _ = writeln!(y, "name: {}", q(&self.name));
        y.push_str(&self.resources_yaml());
        y.push_str("envs:\n");
        let _ = writeln!(y, "  BURNISH_REMOTE: {}", q(&self.remote.0));
        let _ = writeln!(y, "  BURNISH_REMOTE_MODE: {}", q(self.remote.1));
        for k in SETTINGS {
            if let Some(v) = env(k) {
                let _ = writeln!(y, "  {k}: {}", q(&v));
            }
        }
        let secrets = secrets_for(&self.remote.0);
        if !secrets.is_empty() {
            y.push_str("secrets:\n");
            for k in secrets {
                let _ = writeln!(y, "  {k}: null");
            }
        }
        y.push_str("file_mounts:\n");
        if self.install.is_none() {
            let _ = writeln!(
                y,
                "  {}: {}",
                q(BINARY),
                q(&self.binary.display().to_string())
            );
        }
        let mut mounts: BTreeMap<String, String> = BTreeMap::new();
        for p in &project {
            mounts.insert(
                format!("{PROJECT}/{}", relative(p, &root)),
                normalize(p).display().to_string(),
            );
        }
        if let Some(h) = &hub {
            for p in hub_files {
                mounts.insert(
                    format!("~/.cache/huggingface/hub/{}", relative(p, h)),
                    normalize(p).display().to_string(),
                );
            }
        }
        for (dst, src) in &mounts {
            let _ = writeln!(y, "  {}: {}", q(dst), q(src));
        }
        y.push_str("setup: |\n  set -e\n");
        match &self.install {
            Some(cmd) => {
                for line in cmd.lines() {
                    let _ = writeln!(y, "  {line}");
                }
            }
            None => {
                let _ = writeln!(y, "  chmod +x {BINARY}");
            }
        }
        let program = if self.install.is_some() {
            "burnish"
        } else {
            BINARY
        };
        let _ = writeln!(y, "  {program} --version");
        let mut run = format!("{program} run {}", shell_word(&manifest_rel));
        if let Some(s) = &self.stage {
            run.push_str(&format!(" --until {}", shell_word(s)));
        }
        if self.resources.gpus.unwrap_or(0) > 0 {
            run.push_str(" --backend cuda");
        }
        let _ = writeln!(y, "run: |\n  set -e\n  cd {PROJECT}\n  {run}");
        Ok(y)
    }

    fn resources_yaml(&self) -> String {
        let r = &self.resources;
        let mut y = String::from("resources:\n");
        if let Some(g) = r.gpus.filter(|g| *g > 0) {
            let model = r.accelerator.as_deref().unwrap_or("H100");
            let _ = writeln!(y, "  accelerators: {}", q(&format!("{model}:{g}")));
        }
        if let Some(c) = r.cpus {
            let _ = writeln!(y, "  cpus: {}", q(&format!("{c}+")));
        }
        let mem = mem_gb(r.mem.as_deref());
        if mem > 0 {
            let _ = writeln!(y, "  memory: {}", q(&format!("{mem}+")));
        }
        if let Some(s) = r.spot {
            let _ = writeln!(y, "  use_spot: {s}");
        }
        if let Some(d) = r.disk {
            let _ = writeln!(y, "  disk_size: {d}");
        }
        if let Some(i) = &r.infra {
            let _ = writeln!(y, "  infra: {}", q(i));
        }
        if y == "resources:\n" {
            y.push_str("  cpus: \"2+\"\n");
        }
        y
    }
}

/// The local Hugging Face hub cache, where `hf://` paths resolve.
fn hub_cache(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(h) = env("HF_HUB_CACHE") {
        return Some(PathBuf::from(h));
    }
    if let Some(h) = env("HF_HOME") {
        return Some(PathBuf::from(h).join("hub"));
    }
    Some(PathBuf::from(env("HOME")?).join(".cache/huggingface/hub"))
}

/// The deepest directory holding every path (a file's directory for a file).
fn common_dir(paths: &[&PathBuf]) -> Option<PathBuf> {
    let mut common: Option<PathBuf> = None;
    for p in paths {
        let p = normalize(p);
        let dir = if p.is_dir() {
            p.clone()
        } else {
            p.parent()?.to_path_buf()
        };
        common = Some(match common {
            None => dir,
            Some(c) => c
                .components()
                .zip(dir.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    common.filter(|c| c.components().count() > 1)
}

/// `p` without `.` and `..` components (no file system access).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// `p` relative to its ancestor `root`, `/`-separated.
fn relative(p: &Path, root: &Path) -> String {
    let p = normalize(p);
    p.strip_prefix(root)
        .unwrap_or(&p)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// A word for `sh`: quoted unless it is plain.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=+:".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_rounds_up_to_whole_gigabytes() {
        assert_eq!(mem_gb(Some("16G")), 16);
        assert_eq!(mem_gb(Some("512M")), 1);
        assert_eq!(mem_gb(Some("2T")), 2048);
        assert_eq!(mem_gb(Some("2048")), 2);
        assert_eq!(mem_gb(None), 0);
    }

    #[test]
    fn files_keep_their_places_under_a_common_directory() {
        let a = PathBuf::from("/p/pipelines/x.yaml");
        let b = PathBuf::from("/p/pipelines/../fixtures/data/d.jsonl");
        let root = common_dir(&[&a, &b]).unwrap();
        assert_eq!(root, PathBuf::from("/p"));
        assert_eq!(relative(&a, &root), "pipelines/x.yaml");
        assert_eq!(relative(&b, &root), "fixtures/data/d.jsonl");
        assert_eq!(shell_word("sft[lr=1e-4]"), "'sft[lr=1e-4]'");
        assert_eq!(shell_word("pipelines/x.yaml"), "pipelines/x.yaml");
    }
}

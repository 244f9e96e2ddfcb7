//! Manifests: loading (with `extends`), and validation into a [`Manifest`].
//!
//! Validation collects every problem it can find rather than stopping at the first: the header,
//! every stage's kind and parameters (through the kind's own typed struct, the same type that
//! generates the JSON Schema), matrix axes, references and their artifact types, cycles, files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::de::{DeError, DeErrorKind, NodeDeserializer};
use crate::diag::{Code, ManifestErrors, Problem, choices_help, suggest};
use crate::stage::{ErasedParams, Input, OutputDecl, Registry};
use crate::yaml::{self, Key, Node, Sources, Span, Value};

/// Where stages run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// CUDA if a driver answers, else a non-CPU wgpu adapter, else the CPU.
    #[default]
    Auto,
    /// burn's `flex` CPU backend (the embedded default).
    Cpu,
    /// wgpu (Vulkan, Metal, DX12; lavapipe on CPU-only Linux).
    Wgpu,
    /// CUDA (needs an NVIDIA driver at run time).
    Cuda,
}

impl BackendChoice {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Cpu => "cpu",
            BackendChoice::Wgpu => "wgpu",
            BackendChoice::Cuda => "cuda",
        }
    }
}

/// What runs a stage's cells: this process, or a job on a Slurm cluster (`executor:` in the
/// header for every stage, or in one stage; `burnish run --executor` replaces the header's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    /// Threads of the `burnish run` process (`--jobs` at once).
    #[default]
    Local,
    /// One `sbatch` job per cell, running `burnish run-cell` on a cluster node.
    Slurm,
}

/// What a stage's job asks of the machine it runs on (`resources:` in a stage), for executors
/// that submit jobs. Where a cell runs does not change its result: resources enter no
/// fingerprint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs (`--gpus`). Default: 1 for a backend-sensitive kind on `cuda`, else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// CPU cores (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory, as Slurm writes it (`--mem`): `16G`, `512M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[KMGT]?$"))]
    pub mem: Option<String>,
    /// Wall-clock limit, as Slurm writes it (`--time`): `90` (minutes), `2:00:00`,
    /// `1-12:00:00`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$"))]
    pub time: Option<String>,
    /// Partition (`--partition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// GPU model for cloud tasks (`burnish skypilot`: `accelerators: H100:1`): `H100`,
    /// `A100-80GB`, `L4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"))]
    pub accelerator: Option<String>,
    /// Spot (preemptible) instances for cloud tasks (`use_spot`); a preempted task resumes
    /// from what reached the remote cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot: Option<bool>,
    /// Disk size in GB for cloud tasks (`disk_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u32>,
    /// Where a cloud task runs, as SkyPilot names it (`infra`): `nebius`, `aws/us-east-1`,
    /// `k8s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra: Option<String>,
}

/// The fields of `resources:`, from its schema (the same type that reads it).
fn resource_fields() -> Vec<String> {
    crate::schema::top_fields(&schemars::schema_for!(Resources).to_value())
}

impl Resources {
    /// The fields whose value Slurm would refuse: (field, value, the form it takes).
    fn problems(&self) -> Vec<(&'static str, String, &'static str)> {
        let mut out = Vec::new();
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some(m) = &self.mem {
            let n = m.strip_suffix(['K', 'M', 'G', 'T']).unwrap_or(m);
            if !digits(n) {
                out.push((
                    "mem",
                    m.clone(),
                    "a number with an optional K, M, G or T: `16G`",
                ));
            }
        }
        if let Some(t) = &self.time {
            let (days, clock) = t.split_once('-').unwrap_or(("0", t));
            let parts: Vec<&str> = clock.split(':').collect();
            if !digits(days) || parts.len() > 3 || !parts.iter().all(|p| digits(p)) {
                out.push(("time", t.clone(), "minutes, `H:MM:SS` or `D-HH:MM:SS`"));
            }
        }
        if let Some(p) = &self.partition
            && (p.is_empty() || p.contains(|c: char| c.is_whitespace() || c == ','))
        {
            out.push(("partition", p.clone(), "one partition name"));
        }
        if let Some(a) = &self.accelerator
            && (a.is_empty()
                || !a
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)))
        {
            out.push(("accelerator", a.clone(), "a GPU model name: `H100`"));
        }
        if let Some(i) = &self.infra
            && (i.is_empty() || i.contains(char::is_whitespace))
        {
            out.push((
                "infra",
                i.clone(),
                "a cloud, optionally with a region: `nebius`, `aws/us-east-1`",
            ));
        }
        out
    }
}

/// `cache:` in a manifest: where computed entries are shared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`, `file:///dir` or
    /// `https://host/path` (read-only). Credentials come from the environment, never the URL.
    pub remote: String,
    /// `read-write` (pull on a miss, push what is computed) or `read-only` (pull only).
    #[serde(default)]
    pub mode: crate::remote::RemoteMode,
}

fn default_seed() -> u64 {
    42
}

/// Top-level manifest fields. `stages` is validated kind by kind; its schema is assembled from
/// the registry in [`crate::schema`].
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Pipeline name: used in exported file names and run records.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub pipeline: String,
    /// What this pipeline is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Seed for every seeded stage that does not set its own (default 42).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where stages run; `burnish run --backend` overrides it.
    #[serde(default)]
    pub backend: BackendChoice,
    /// What runs the stages that do not say (`local` by default).
    #[serde(default)]
    pub executor: Executor,
    /// A shared remote cache for this pipeline's entries; `--remote`, `$BURNISH_REMOTE` and
    /// `--no-remote` override it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSettings>,
    /// A base manifest (path relative to this file) deep-merged under this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// The stages, by name (`[a-z0-9_-]+`), in the order written. Read kind by kind; the schema
    /// of this field is assembled from the registry in [`crate::schema`].
    #[serde(default, skip_serializing)]
    #[schemars(skip)]
    pub stages: serde::de::IgnoredAny,
}

/// Keys a stage mapping may hold besides its kind's parameters.
pub const STAGE_KEYS: [&str; 4] = ["kind", "matrix", "executor", "resources"];

/// One axis of a stage's `matrix:`.
#[derive(Clone, Debug)]
pub struct MatrixAxis {
    /// Field path inside the stage (`eval_fraction`, `lora.rank`).
    pub field: String,
    pub key_span: Span,
    pub values: Vec<Node>,
}

/// A validated stage declaration (before matrix expansion).
#[derive(Clone)]
pub struct StageDecl {
    pub name: String,
    pub name_span: Span,
    pub kind: &'static str,
    /// The stage's parameters as written (without `kind` and `matrix`), spans kept.
    pub node: Node,
    /// Parameters with the first value of every matrix axis applied.
    pub params: Arc<dyn ErasedParams>,
    pub matrix: Vec<MatrixAxis>,
    pub inputs: Vec<Input>,
    pub outputs: Vec<OutputDecl>,
    /// The stage's own `executor:`, if it has one.
    pub executor: Option<Executor>,
    /// The stage's `resources:`.
    pub resources: Resources,
}

impl std::fmt::Debug for StageDecl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageDecl")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// A validated manifest.
pub struct Manifest {
    /// The manifest file as named by the user.
    pub display: String,
    /// Absolute path of the manifest file.
    pub path: PathBuf,
    /// Absolute directory of the manifest file (paths inside are relative to it).
    pub dir: PathBuf,
    pub sources: Sources,
    pub header: Header,
    /// In the order written (bases first for `extends`).
    pub stages: Vec<StageDecl>,
    /// The merged document.
    pub root: Node,
}

impl Manifest {
    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The file name without extension: `<stem>.lock` sits beside the manifest.
    pub fn stem(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into())
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.stem()))
    }

    /// Resolve a path written in the manifest (relative to its directory, or a `scheme://` URI
    /// through the registry's resolver).
    pub fn resolve_path(&self, registry: &Registry, written: &str) -> Result<PathBuf, String> {
        resolve_path(&self.dir, registry, written)
    }

    /// Resolve path field `field` of a stage (`node`): relative to the directory of the file
    /// that wrote it, which for a stage from an `extends` base is the base's.
    pub fn resolve_field_path(
        &self,
        registry: &Registry,
        node: &Node,
        field: &str,
        written: &str,
    ) -> Result<PathBuf, String> {
        let span = field_span(node, field);
        let dir = self.sources.dir_of(span).unwrap_or(&self.dir);
        resolve_path(dir, registry, written)
    }
}

pub(crate) fn resolve_path(
    dir: &Path,
    registry: &Registry,
    written: &str,
) -> Result<PathBuf, String> {
    if let Some((scheme, _)) = written.split_once("://") {
        return match registry.uri_resolver() {
            Some(r) => r(written),
            None => Err(format!("`{scheme}://` paths are not supported")),
        };
    }
    Ok(dir.join(written))
}

/// Load and validate a manifest. All problems are reported together.
pub fn load(path: &Path, registry: &Registry) -> Result<Manifest, ManifestErrors> {
    let display = path.display().to_string();
    let mut v = Validator {
        registry,
        sources: Sources::default(),
        problems: Vec::new(),
    };
    let abs = absolute(path);
    let root = v.load_with_extends(&abs, &display, None, &mut Vec::new());
    let fail = |mut v: Validator| {
        // Source order (file, then position); problems without a place first.
        v.problems
            .sort_by_key(|p| p.at.as_ref().map(|(_, s)| (s.file, s.offset)));
        ManifestErrors {
            manifest: display.clone(),
            problems: v.problems,
        }
    };
    let Some(root) = root else {
        return Err(fail(v));
    };
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let header = v.header(&root);
    let stages = v.stages(&root, &dir);
    if !v.problems.is_empty() {
        return Err(fail(v));
    }
    let Some(header) = header else {
        return Err(fail(v));
    };
    Ok(Manifest {
        display,
        path: abs,
        dir,
        sources: v.sources,
        header,
        stages,
        root,
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

struct Validator<'r> {
    registry: &'r Registry,
    sources: Sources,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, p: Problem) {
        self.problems.push(p);
    }

    fn at(
        &self,
        code: Code,
        msg: impl Into<String>,
        span: Span,
        label: impl Into<String>,
    ) -> Problem {
        Problem::new(code, msg).at(&self.sources, span, label)
    }

    /// Read, parse and merge a manifest and its `extends` chain. `from` is the `extends` value
    /// that named this file, for errors.
    fn load_with_extends(
        &mut self,
        abs: &Path,
        display: &str,
        from: Option<Span>,
        chain: &mut Vec<PathBuf>,
    ) -> Option<Node> {
        let canon = std::fs::canonicalize(abs).unwrap_or_else(|_| abs.to_path_buf());
        if let Some(pos) = chain.iter().position(|p| *p == canon) {
            let names: Vec<String> = chain[pos..]
                .iter()
                .chain(std::iter::once(&canon))
                .map(|p| file_name(p))
                .collect();
            let p = Problem::new(
                Code::Extends,
                format!("`extends` forms a cycle: {}", names.join(" → ")),
            )
            .help("a manifest may extend a chain of bases, but no file may extend itself");
            let p = match from {
                Some(span) => p.at(&self.sources, span, "extended again here"),
                None => p,
            };
            self.problem(p);
            return None;
        }
        let bytes = match std::fs::read(abs) {
            Ok(b) => b,
            Err(e) => {
                let msg = if e.kind() == std::io::ErrorKind::NotFound {
                    format!("manifest `{display}` not found")
                } else {
                    format!("cannot read manifest `{display}`: {e}")
                };
                let p = match from {
                    Some(span) => Problem::new(Code::Extends, msg)
                        .at(&self.sources, span, "extended here")
                        .help("`extends` paths are relative to the manifest that contains them"),
                    None => Problem::new(Code::Io, msg),
                };
                self.problem(p);
                return None;
            }
        };
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let off = e.utf8_error().valid_up_to();
                let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
                let file = self.sources.add(display.to_owned(), lossy);
                let span = Span {
                    file,
                    offset: off.min(self.sources.get(file).text.len()),
                    len: 1,
                };
                let p = self.at(
                    Code::Syntax,
                    format!("manifest is not valid UTF-8 (invalid byte at offset {off})"),
                    span,
                    "invalid byte",
                );
                self.problem(p);
                return None;
            }
        };
        let file = self.sources.add_file(display.to_owned(), text, abs);
        let text = self.sources.get(file).text.clone();
        let node = match yaml::parse(&text, file) {
            Ok(n) => n,
            Err(e) => {
                let p = Problem::new(Code::Syntax, format!("invalid YAML: {}", e.message));
                let p = match e.span {
                    Some(span) => p.at(&self.sources, span, "here"),
                    None => p,
                };
                self.problem(p);
                return None;
            }
        };
        let node = match node.value {
            Value::Map(_) => node,
            Value::Null => {
                let p = Problem::new(Code::Shape, format!("manifest `{display}` is empty"))
                    .help("a manifest needs at least `pipeline:` and `stages:`");
                self.problem(p);
                return None;
            }
            ref other => {
                let msg = format!("a manifest must be a mapping, found {}", other.describe());
                let p = self.at(Code::Shape, msg, node.span, "not a mapping");
                self.problem(p);
                return None;
            }
        };
        self.check_duplicates(&node);

        let Some(ext) = node.get("extends") else {
            return Some(node);
        };
        let Some(ext_path) = ext.as_str() else {
            let msg = format!("`extends` must be a path, found {}", ext.value.describe());
            let p = self.at(Code::WrongType, msg, ext.span, "expected a path");
            self.problem(p);
            return None;
        };
        let base_abs = abs.parent().unwrap_or(Path::new(".")).join(ext_path);
        let base_display = join_display(display, ext_path);
        chain.push(canon);
        let base = self.load_with_extends(&base_abs, &base_display, Some(ext.span), chain);
        chain.pop();
        let base = base?;
        let mut child = node;
        if let Value::Map(m) = &mut child.value {
            m.retain(|(k, _)| k.name != "extends");
        }
        Some(merge(base, child))
    }

    /// Report keys that appear twice in any mapping (the parser passes duplicates through).
    fn check_duplicates(&mut self, node: &Node) {
        match &node.value {
            Value::Map(entries) => {
                let mut seen: HashMap<&str, Span> = HashMap::new();
                for (k, v) in entries {
                    if let Some(first) = seen.get(k.name.as_str()) {
                        let what = if self.is_stages_map(node) {
                            "stage"
                        } else {
                            "key"
                        };
                        let p = self
                            .at(
                                Code::DuplicateKey,
                                format!("duplicate {what} `{}`", k.name),
                                k.span,
                                "defined again here",
                            )
                            .also(*first, "first defined here")
                            .help(format!("each {what} name may appear once in a mapping"));
                        self.problem(p);
                    } else {
                        seen.insert(&k.name, k.span);
                    }
                    self.check_duplicates(v);
                }
            }
            Value::Seq(items) => items.iter().for_each(|n| self.check_duplicates(n)),
            _ => {}
        }
    }

    fn is_stages_map(&self, node: &Node) -> bool {
        node.as_map()
            .is_some_and(|m| m.iter().all(|(_, v)| v.get("kind").is_some()))
    }

    fn header(&mut self, root: &Node) -> Option<Header> {
        // Unknown top-level keys: report all of them, then read the rest.
        let known = [
            "pipeline",
            "description",
            "seed",
            "backend",
            "executor",
            "cache",
            "extends",
            "stages",
        ];
        let mut clean = root.clone();
        if let Value::Map(m) = &mut clean.value {
            let mut unknown = Vec::new();
            m.retain(|(k, _)| {
                let ok = known.contains(&k.name.as_str());
                if !ok {
                    unknown.push(k.clone());
                }
                ok
            });
            for k in unknown {
                let help = choices_help(&k.name, &known, "top-level fields");
                let p = self
                    .at(
                        Code::UnknownField,
                        format!("unknown top-level field `{}`", k.name),
                        k.span,
                        "unknown field",
                    )
                    .help(help);
                self.problem(p);
            }
        }
        match Header::deserialize(NodeDeserializer::new(&clean)) {
            Ok(h) => {
                if h.pipeline.is_empty()
                    || !h
                        .pipeline
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                {
                    let span = root.get("pipeline").map_or(root.span, |n| n.span);
                    let p = self
                        .at(Code::OutOfRange, format!("pipeline name `{}` has characters other than letters, digits, `_`, `.` and `-`", h.pipeline), span, "invalid name")
                        .help("the pipeline name appears in exported file names");
                    self.problem(p);
                }
                if let Some(c) = &h.cache
                    && let Some(why) = crate::remote::url_problem(&c.remote)
                {
                    let span = root
                        .get("cache")
                        .and_then(|n| n.get("remote"))
                        .map_or(root.span, |n| n.span);
                    let p = self
                        .at(
                            Code::BadValue,
                            format!("`cache.remote` is `{}`: {why}", crate::remote::redact(&c.remote)),
                            span,
                            "not a remote",
                        )
                        .help("remotes are s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///dir or https://host/path (with mode: read-only)");
                    self.problem(p);
                }
                Some(h)
            }
            Err(e) => {
                let p = self.de_problem(e, root.span, "the manifest");
                self.problem(p);
                None
            }
        }
    }

    /// A stage's `executor:` and `resources:` (`None` after reporting a problem).
    fn placement(&mut self, node: &Node, what: &str) -> Option<(Option<Executor>, Resources)> {
        let mut ok = true;
        let executor = match node.get("executor") {
            Some(n) => match Executor::deserialize(NodeDeserializer::new(n)) {
                Ok(e) => Some(e),
                Err(e) => {
                    let p = self.de_problem(e.at_field("executor"), n.span, what);
                    self.problem(p);
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let resources =
            match node.get("resources") {
                Some(n) => match Resources::deserialize(NodeDeserializer::new(
                    &self.known_keys_only(n, &resource_fields(), "resources", what, &mut ok),
                )) {
                    Ok(r) => {
                        for (field, value, form) in r.problems() {
                            let span = n.get(field).map_or(n.span, |v| v.span);
                            let p = self
                                .at(
                                    Code::BadValue,
                                    format!(
                                        "`resources.{field}` of {what} is `{value}`, not {form}"
                                    ),
                                    span,
                                    "not a valid value",
                                )
                                .help(format!("{field}: {form}"));
                            self.problem(p);
                            ok = false;
                        }
                        r
                    }
                    Err(e) => {
                        let p = self.de_problem(e.at_field("resources"), n.span, what);
                        self.problem(p);
                        ok = false;
                        Resources::default()
                    }
                },
                None => Resources::default(),
            };
        ok.then_some((executor, resources))
    }

    /// `n` without the keys outside `fields`, each reported (serde would stop at the first).
    fn known_keys_only(
        &mut self,
        n: &Node,
        fields: &[String],
        at: &str,
        what: &str,
        ok: &mut bool,
    ) -> Node {
        let names: Vec<&str> = fields.iter().map(String::as_str).collect();
        let mut clean = n.clone();
        if let Value::Map(m) = &mut clean.value {
            let mut unknown = Vec::new();
            m.retain(|(k, _)| {
                let known = fields.contains(&k.name);
                if !known {
                    unknown.push(k.clone());
                }
                known
            });
            for k in unknown {
                *ok = false;
                let p = self
                    .at(
                        Code::UnknownField,
                        format!("unknown field `{at}.{}` in {what}", k.name),
                        k.span,
                        "unknown field",
                    )
                    .help(choices_help(&k.name, &names, "fields"));
                self.problem(p);
            }
        }
        clean
    }

    /// Turn a serde error into a problem, with help for unknown names.
    fn de_problem(&self, e: DeError, fallback: Span, what: &str) -> Problem {
        let span = e.span.unwrap_or(fallback);
        let path = e.path_string();
        match &e.kind {
            DeErrorKind::UnknownField { field, expected } => {
                let help = choices_help(field, expected, "fields");
                self.at(
                    Code::UnknownField,
                    format!("unknown field `{path}` in {what}"),
                    span,
                    "unknown field",
                )
                .help(help)
            }
            DeErrorKind::UnknownVariant { variant, expected } => {
                let help = choices_help(variant, expected, "values");
                self.at(
                    Code::BadValue,
                    format!("`{path}` cannot be `{variant}`"),
                    span,
                    "not a valid value",
                )
                .help(help)
            }
            DeErrorKind::MissingField(field) => {
                let full = if path.is_empty() {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                };
                self.at(
                    Code::MissingField,
                    format!("{what} is missing the required field `{full}`"),
                    span,
                    format!("`{field}` is missing here"),
                )
            }
            DeErrorKind::DuplicateField(field) => self.at(
                Code::DuplicateKey,
                format!("duplicate field `{field}` in {what}"),
                span,
                "duplicate",
            ),
            DeErrorKind::Other => {
                let msg = if path.is_empty() {
                    format!("{what}: {}", e.message)
                } else {
                    format!("`{path}` in {what}: {}", e.message)
                };
                self.at(Code::WrongType, msg, span, "wrong type")
            }
        }
    }

    fn stages(&mut self, root: &Node, dir: &Path) -> Vec<StageDecl> {
        let Some(stages_node) = root.get("stages") else {
            let p = self
                .at(Code::MissingField, "the manifest has no `stages`", root.span, "`stages` is missing")
                .help("add `stages:` with at least one stage, e.g. `data: {kind: dataset, path: data.jsonl, format: text}`");
            self.problem(p);
            return Vec::new();
        };
        let entries = match &stages_node.value {
            Value::Map(m) if !m.is_empty() => m.clone(),
            Value::Map(_) | Value::Null => {
                let p = self
                    .at(
                        Code::Shape,
                        "`stages` is empty",
                        stages_node.span,
                        "no stages",
                    )
                    .help("a pipeline needs at least one stage");
                self.problem(p);
                return Vec::new();
            }
            other => {
                let msg = format!(
                    "`stages` must be a mapping of stage names to stages, found {}",
                    other.describe()
                );
                let p = self.at(Code::Shape, msg, stages_node.span, "expected a mapping");
                self.problem(p);
                return Vec::new();
            }
        };

        let mut decls = Vec::new();
        let mut seen = HashSet::new();
        for (key, node) in &entries {
            if !seen.insert(key.name.clone()) {
                continue; // reported as a duplicate
            }
            if let Some(d) = self.stage(key, node) {
                decls.push(d);
            }
        }
        self.references(&mut decls, &entries);
        self.files(&decls, dir);
        decls
    }

    fn stage(&mut self, key: &Key, node: &Node) -> Option<StageDecl> {
        let name = &key.name;
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !name_ok {
            let suggestion: String = name
                .to_ascii_lowercase()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let p = self
                .at(
                    Code::BadStageName,
                    format!("stage name `{name}` must match [a-z0-9_-]+ (at most 64 characters)"),
                    key.span,
                    "invalid stage name",
                )
                .help(format!(
                    "stage names become directory names; try `{suggestion}`"
                ));
            self.problem(p);
        }
        let Some(map) = node.as_map() else {
            let msg = format!(
                "stage `{name}` must be a mapping with a `kind`, found {}",
                node.value.describe()
            );
            let p = self.at(Code::Shape, msg, node.span, "expected a mapping");
            self.problem(p);
            return None;
        };
        let Some(kind_node) = node.get("kind") else {
            let kinds = self.registry.kind_names();
            let p = self
                .at(
                    Code::MissingField,
                    format!("stage `{name}` has no `kind`"),
                    key.span,
                    "`kind` is missing",
                )
                .help(format!("valid kinds: {}", kinds.join(", ")));
            self.problem(p);
            return None;
        };
        let Some(kind_name) = kind_node.as_str() else {
            let msg = format!(
                "`kind` of stage `{name}` must be a string, found {}",
                kind_node.value.describe()
            );
            let p = self.at(Code::WrongType, msg, kind_node.span, "expected a kind name");
            self.problem(p);
            return None;
        };
        let Some(entry) = self.registry.get(kind_name).cloned() else {
            let kinds = self.registry.kind_names();
            let p = self
                .at(
                    Code::UnknownKind,
                    format!("unknown stage kind `{kind_name}` in stage `{name}`"),
                    kind_node.span,
                    "unknown kind",
                )
                .help(choices_help(kind_name, &kinds, "kinds"));
            self.problem(p);
            return None;
        };
        let what = format!("stage `{name}` ({})", entry.kind);

        // The parameters: everything but `kind` and `matrix`.
        let params_node = Node::new(
            Value::Map(
                map.iter()
                    .filter(|(k, _)| !STAGE_KEYS.contains(&k.name.as_str()))
                    .cloned()
                    .collect(),
            ),
            node.span,
        );
        let schema = crate::schema::kind_schema(self.registry, entry.kind);
        let fields = crate::schema::top_fields(&schema);

        // Unknown keys: all of them, with suggestions (serde stops at the first).
        let mut clean = params_node.clone();
        let mut bad_keys = false;
        let mut suggested: Vec<String> = Vec::new();
        if let Value::Map(m) = &mut clean.value {
            let mut unknown = Vec::new();
            m.retain(|(k, _)| {
                let ok = fields.iter().any(|f| f == &k.name);
                if !ok {
                    unknown.push(k.clone());
                }
                ok
            });
            let mut all: Vec<&str> = fields.iter().map(String::as_str).collect();
            all.extend(STAGE_KEYS);
            for k in unknown {
                bad_keys = true;
                if let Some(s) = suggest(&k.name, all.iter().copied()) {
                    suggested.push(s.to_owned());
                }
                let p = self
                    .at(
                        Code::UnknownField,
                        format!("unknown field `{}` in {what}", k.name),
                        k.span,
                        "unknown field",
                    )
                    .help(choices_help(&k.name, &all, "fields"));
                self.problem(p);
            }
        }

        let matrix = self.matrix(name, node, &schema);
        let first_cell = apply_matrix_values(&clean, &matrix, &vec![0; matrix.len()]);
        let params = match self.registry.parse(entry.kind, &first_cell) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                // `fromat:` already said "did you mean `format`"; don't also say it is missing.
                let knock_on = matches!(e.kind, DeErrorKind::MissingField(f) if suggested.iter().any(|s| s == f));
                if !knock_on {
                    let p = self.de_problem(*e, key.span, &what);
                    self.problem(p);
                }
                None
            }
            None => None,
        };
        // Each further matrix value must parse too; point at the value.
        for (ai, axis) in matrix.iter().enumerate() {
            for vi in 1..axis.values.len() {
                let mut pick = vec![0; matrix.len()];
                pick[ai] = vi;
                let cell = apply_matrix_values(&clean, &matrix, &pick);
                match self.registry.parse(entry.kind, &cell) {
                    Some(Err(e)) => {
                        let p = self.de_problem(*e, axis.values[vi].span, &what);
                        self.problem(p);
                    }
                    Some(Ok(params)) => {
                        for fp in params.check() {
                            if fp.field != axis.field {
                                continue; // reported for the first cell already
                            }
                            let p = self
                                .at(
                                    Code::OutOfRange,
                                    format!(
                                        "matrix value of `{}` in {what}: {}",
                                        fp.field, fp.message
                                    ),
                                    axis.values[vi].span,
                                    "out of range",
                                )
                                .maybe_help(fp.help);
                            self.problem(p);
                        }
                    }
                    None => {}
                }
            }
        }
        let params = params?;
        if bad_keys {
            return None;
        }
        for fp in params.check() {
            let span = field_span(&first_cell, &fp.field);
            let p = self
                .at(
                    Code::OutOfRange,
                    format!("`{}` in {what}: {}", fp.field, fp.message),
                    span,
                    "out of range",
                )
                .maybe_help(fp.help);
            self.problem(p);
        }
        let inputs = params.inputs();
        for axis in &matrix {
            if inputs.iter().any(|i| {
                i.field == axis.field
                    || i.field.starts_with(&format!("{}.", axis.field))
                    || i.field.starts_with(&format!("{}[", axis.field))
            }) {
                let p = self
                    .at(Code::BadMatrix, format!("`matrix` in stage `{name}` varies the reference field `{}`", axis.field), axis.key_span, "a reference")
                    .help("matrix axes vary parameters; to compare inputs, write one stage per input (or one manifest per input with `extends`)");
                self.problem(p);
            }
        }
        let (executor, resources) = self.placement(node, &what)?;
        Some(StageDecl {
            name: name.clone(),
            name_span: key.span,
            kind: entry.kind,
            node: clean,
            params,
            matrix,
            inputs,
            outputs: Vec::new(),
            executor,
            resources,
        })
    }

    fn matrix(&mut self, name: &str, node: &Node, schema: &serde_json::Value) -> Vec<MatrixAxis> {
        let Some(m) = node.get("matrix") else {
            return Vec::new();
        };
        let Some(entries) = m.as_map() else {
            let msg = format!(
                "`matrix` of stage `{name}` must map field paths to lists of values, found {}",
                m.value.describe()
            );
            let p = self.at(Code::BadMatrix, msg, m.span, "expected a mapping");
            self.problem(p);
            return Vec::new();
        };
        if entries.is_empty() {
            let p = self.at(Code::BadMatrix, format!("`matrix` of stage `{name}` is empty"), m.span, "no axes")
                .help("give at least one field with a list of values, e.g. `matrix: {lr: [1e-4, 2e-4]}`");
            self.problem(p);
        }
        let mut axes = Vec::new();
        for (k, v) in entries {
            if STAGE_KEYS.contains(&k.name.as_str()) || !crate::schema::has_field(schema, &k.name) {
                let fields = crate::schema::top_fields(schema);
                let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
                let p = self
                    .at(
                        Code::BadMatrix,
                        format!(
                            "matrix key `{}` in stage `{name}` is not a field of this kind",
                            k.name
                        ),
                        k.span,
                        "no such field",
                    )
                    .help(choices_help(&k.name, &fields, "fields"));
                self.problem(p);
                continue;
            }
            match &v.value {
                Value::Seq(items) if !items.is_empty() => {
                    let mut seen = Vec::new();
                    for item in items {
                        let j = item.to_json();
                        if seen.contains(&j) {
                            let p = self.at(
                                Code::BadMatrix,
                                format!(
                                    "matrix key `{}` in stage `{name}` lists `{}` twice",
                                    k.name,
                                    item.scalar_text()
                                ),
                                item.span,
                                "repeated value",
                            );
                            self.problem(p);
                        }
                        seen.push(j);
                    }
                    axes.push(MatrixAxis {
                        field: k.name.clone(),
                        key_span: k.span,
                        values: items.clone(),
                    });
                }
                Value::Seq(_) => {
                    let p = self
                        .at(
                            Code::BadMatrix,
                            format!("matrix key `{}` in stage `{name}` has no values", k.name),
                            v.span,
                            "empty list",
                        )
                        .help("a matrix axis needs at least one value");
                    self.problem(p);
                }
                other => {
                    let msg = format!(
                        "matrix key `{}` in stage `{name}` must have a list of values, found {}",
                        k.name,
                        other.describe()
                    );
                    let p = self
                        .at(Code::BadMatrix, msg, v.span, "expected a list")
                        .help(format!("write `{}: [{}]`", k.name, v.scalar_text()));
                    self.problem(p);
                }
            }
        }
        axes
    }

    /// References: targets exist, named outputs exist, artifact types fit, no cycles. Fills in
    /// each declaration's outputs (in dependency order, since outputs may depend on input types).
    fn references(&mut self, decls: &mut [StageDecl], entries: &[(Key, Node)]) {
        let index: HashMap<String, usize> = decls
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        let all_names: Vec<&str> = entries.iter().map(|(k, _)| k.name.as_str()).collect();
        // Edges: i depends on j.
        let mut deps: Vec<Vec<(usize, String)>> = vec![Vec::new(); decls.len()];
        for (i, d) in decls.iter().enumerate() {
            for input in &d.inputs {
                let target = input.reference.stage();
                let span = field_span(&d.node, &input.field);
                match index.get(target) {
                    Some(&j) => deps[i].push((j, input.field.clone())),
                    None if all_names.contains(&target) => {} // that stage had its own errors
                    None => {
                        let help = match suggest(target, all_names.iter().copied()) {
                            Some(s) => format!(
                                "did you mean `{s}`? stages in this manifest: {}",
                                all_names.join(", ")
                            ),
                            None => format!("stages in this manifest: {}", all_names.join(", ")),
                        };
                        let p = self
                            .at(Code::UnknownReference, format!("stage `{}` refers to `{target}` in `{}`, but there is no stage `{target}`", d.name, input.field), span, "no such stage")
                            .help(help);
                        self.problem(p);
                    }
                }
            }
        }
        // Cycles.
        let order = match topo_order(&deps) {
            Ok(order) => order,
            Err(cycle) => {
                let names: Vec<&str> = cycle.iter().map(|&i| decls[i].name.as_str()).collect();
                let first = cycle[0];
                let next = cycle.get(1).copied().unwrap_or(first);
                let field = deps[first]
                    .iter()
                    .find(|(j, _)| *j == next)
                    .map(|(_, f)| f.clone())
                    .unwrap_or_default();
                let span = field_span(&decls[first].node, &field);
                let mut path = names.clone();
                path.push(names[0]);
                let p = self
                    .at(
                        Code::Cycle,
                        format!(
                            "stages depend on each other in a cycle: {}",
                            path.join(" → ")
                        ),
                        span,
                        "this reference closes the cycle",
                    )
                    .help("a pipeline is a DAG: remove one of these references");
                self.problem(p);
                return;
            }
        };
        // Types, in dependency order.
        for i in order {
            let mut types = BTreeMap::new();
            let mut ok = true;
            for input in decls[i].inputs.clone() {
                let Some(&j) = index.get(input.reference.stage()) else {
                    ok = false;
                    continue;
                };
                let span = field_span(&decls[i].node, &input.field);
                let outs = &decls[j].outputs;
                let found = match input.reference.output() {
                    Some(o) => outs.iter().find(|d| d.name.as_deref() == Some(o)),
                    None => outs.iter().find(|d| d.name.is_none()),
                };
                let Some(out) = found else {
                    ok = false;
                    if outs.is_empty() {
                        continue; // the target had errors of its own
                    }
                    let names: Vec<String> = outs
                        .iter()
                        .map(|d| match &d.name {
                            Some(n) => format!("`{}.{n}`", decls[j].name),
                            None => format!("`{}`", decls[j].name),
                        })
                        .collect();
                    let msg = match input.reference.output() {
                        Some(o) => format!(
                            "stage `{}` ({}) has no output `{o}`",
                            decls[j].name, decls[j].kind
                        ),
                        None => format!(
                            "stage `{}` ({}) has only named outputs",
                            decls[j].name, decls[j].kind
                        ),
                    };
                    let p = self
                        .at(Code::UnknownReference, msg, span, "no such output")
                        .help(format!("refer to one of {}", names.join(", ")));
                    self.problem(p);
                    continue;
                };
                if !input.accepts.admits(&out.ty) {
                    ok = false;
                    let p = self
                        .at(
                            Code::WrongArtifact,
                            format!(
                                "`{}` of stage `{}` ({}) needs a {}, but `{}` yields a {}",
                                input.field,
                                decls[i].name,
                                decls[i].kind,
                                input.accepts,
                                input.reference,
                                out.ty
                            ),
                            span,
                            format!("a {}", out.ty),
                        )
                        .help(format!(
                            "point `{}` at a stage that yields a {}",
                            input.field, input.accepts
                        ));
                    self.problem(p);
                    continue;
                }
                types.insert(input.field.clone(), out.ty);
            }
            if ok {
                decls[i].outputs = decls[i].params.outputs(&types);
            }
        }
    }

    fn files(&mut self, decls: &[StageDecl], dir: &Path) {
        for d in decls {
            for f in d.params.files() {
                let span = field_span(&d.node, &f.field);
                let dir = self.sources.dir_of(span).unwrap_or(dir);
                match resolve_path(dir, self.registry, &f.path.0) {
                    Ok(p) if p.exists() => {}
                    Ok(_) => {
                        let p = self
                            .at(Code::MissingFile, format!("`{}` of stage `{}`: file `{}` not found", f.field, d.name, f.path.0), span, "no such file")
                            .help("paths are relative to the directory of the manifest that contains them");
                        self.problem(p);
                    }
                    Err(msg) => {
                        let p = self.at(
                            Code::MissingFile,
                            format!("`{}` of stage `{}`: {msg}", f.field, d.name),
                            span,
                            "not found",
                        );
                        self.problem(p);
                    }
                }
            }
        }
    }
}

/// The span of a field path inside a stage node, or the nearest enclosing node.
pub fn field_span(node: &Node, field: &str) -> Span {
    match node.lookup(field) {
        Ok(n) | Err(n) => n.span,
    }
}

/// Dependency order; `Err` holds one cycle (as indices, in reference order).
pub(crate) fn topo_order(deps: &[Vec<(usize, String)>]) -> Result<Vec<usize>, Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let n = deps.len();
    let mut mark = vec![Mark::New; n];
    let mut order = Vec::with_capacity(n);
    let mut stack: Vec<usize> = Vec::new();
    fn visit(
        i: usize,
        deps: &[Vec<(usize, String)>],
        mark: &mut [Mark],
        order: &mut Vec<usize>,
        stack: &mut Vec<usize>,
    ) -> Result<(), Vec<usize>> {
        match mark[i] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                let pos = stack.iter().position(|&s| s == i).unwrap_or(0);
                return Err(stack[pos..].to_vec());
            }
            Mark::New => {}
        }
        mark[i] = Mark::Active;
        stack.push(i);
        for (j, _) in &deps[i] {
            visit(*j, deps, mark, order, stack)?;
        }
        stack.pop();
        mark[i] = Mark::Done;
        order.push(i);
        Ok(())
    }
    for i in 0..n {
        visit(i, deps, &mut mark, &mut order, &mut stack)?;
    }
    Ok(order)
}

/// Set field paths in a mapping node to the chosen matrix values.
pub(crate) fn apply_matrix_values(node: &Node, axes: &[MatrixAxis], pick: &[usize]) -> Node {
    let mut out = node.clone();
    for (axis, &vi) in axes.iter().zip(pick) {
        if let Some(v) = axis.values.get(vi) {
            set_path(&mut out, &axis.field, v.clone(), axis.key_span);
        }
    }
    out
}

fn set_path(node: &mut Node, path: &str, value: Node, key_span: Span) {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    if !matches!(node.value, Value::Map(_)) {
        node.value = Value::Map(Vec::new());
    }
    let Value::Map(entries) = &mut node.value else {
        return;
    };
    let pos = entries.iter().position(|(k, _)| k.name == head);
    let pos = match pos {
        Some(p) => p,
        None => {
            entries.push((
                Key {
                    name: head.to_owned(),
                    span: key_span,
                },
                Node::new(Value::Map(Vec::new()), key_span),
            ));
            entries.len() - 1
        }
    };
    match rest {
        None => entries[pos].1 = value,
        Some(r) => set_path(&mut entries[pos].1, r, value, key_span),
    }
}

/// Deep merge for `extends`: mappings merge key by key (the child's value wins, and a child `null`
/// removes the key); everything else is replaced. Base keys keep their order; new keys follow.
pub fn merge(base: Node, child: Node) -> Node {
    match (base.value, child.value) {
        (Value::Map(mut b), Value::Map(c)) => {
            for (ck, cv) in c {
                match b.iter().position(|(bk, _)| bk.name == ck.name) {
                    Some(i) if matches!(cv.value, Value::Null) => {
                        b.remove(i);
                    }
                    Some(i) => {
                        let (bk, bv) = b.remove(i);
                        let _ = bk;
                        b.insert(i, (ck, merge(bv, cv)));
                    }
                    None => b.push((ck, cv)),
                }
            }
            Node::new(Value::Map(b), child.span)
        }
        (_, cv) => Node::new(cv, child.span),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn join_display(parent_display: &str, rel: &str) -> String {
    let parent = Path::new(parent_display).parent().unwrap_or(Path::new(""));
    let joined = parent.join(rel);
    // Lexically tidy `a/../b` so diagnostics read naturally.
    let mut parts: Vec<String> = Vec::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir if parts.last().is_some_and(|l| l != "..") => {
                parts.pop();
            }
            other => parts.push(other.as_os_str().to_string_lossy().into_owned()),
        }
    }
    parts.join("/")
}

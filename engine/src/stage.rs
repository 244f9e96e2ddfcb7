//! The contract between the engine and the stage kinds.
//!
//! A stage kind is a type implementing [`Stage`]: a kind name (`data.split`), an implementation
//! version (bump it whenever the same parameters and inputs would produce different outputs), a
//! typed parameter struct (serde + schemars, unknown fields rejected), a declaration of what it
//! reads (other stages' artifacts, files) and what it yields, and a `run` function.
//!
//! The engine never sees the parameter types: [`Registry::register`] erases them behind
//! [`ErasedParams`], and the same types produce both the JSON Schema (`burnish schema`) and the
//! runtime validation, so the two cannot disagree.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::de::{DeError, NodeDeserializer};
use crate::yaml::Node;

/// What a stage passes along.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Dataset,
    Tokenizer,
    Model,
    Adapter,
    Metrics,
    File,
    /// Per-example completion log-probabilities of a frozen reference model on a dataset.
    LogProbs,
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ArtifactKind::Dataset => "dataset",
            ArtifactKind::Tokenizer => "tokenizer",
            ArtifactKind::Model => "model",
            ArtifactKind::Adapter => "adapter",
            ArtifactKind::Metrics => "metrics",
            ArtifactKind::File => "file",
            ArtifactKind::LogProbs => "logprobs",
        };
        f.write_str(s)
    }
}

/// The record shape of a Dataset artifact. Every dataset holds records of exactly one family.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFamily {
    /// `{"text"}`: raw text for pretraining.
    Text,
    /// `{"messages": [{"role", "content"}]}`: instructions and conversations.
    Chat,
    /// `{"prompt": [msg], "chosen": [msg], "rejected": [msg]}`: paired preferences.
    Preference,
    /// `{"prompt": [msg], "completion": [msg], "label": bool}`: unpaired (KTO) feedback.
    Labeled,
    /// `{"prompt": [msg], "responses": [{"text", "rank"}]}`: ranked responses.
    Ranking,
    /// `{"prompt": [msg], "reasoning", "answer"}`: problems with worked answers.
    Reasoning,
}

impl fmt::Display for DatasetFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DatasetFamily::Text => "text",
            DatasetFamily::Chat => "chat",
            DatasetFamily::Preference => "preference",
            DatasetFamily::Labeled => "labeled",
            DatasetFamily::Ranking => "ranking",
            DatasetFamily::Reasoning => "reasoning",
        };
        f.write_str(s)
    }
}

/// The static type of an artifact: its kind and, for datasets, the record family when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArtifactType {
    pub kind: ArtifactKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<DatasetFamily>,
}

impl ArtifactType {
    pub const fn of(kind: ArtifactKind) -> Self {
        ArtifactType { kind, family: None }
    }
    pub const fn dataset(family: DatasetFamily) -> Self {
        ArtifactType {
            kind: ArtifactKind::Dataset,
            family: Some(family),
        }
    }
}

impl fmt::Display for ArtifactType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.family {
            Some(fam) => write!(f, "{} ({fam})", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// What a reference field accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepts {
    pub kinds: Vec<ArtifactKind>,
    /// For datasets: the families accepted; empty means any.
    pub families: Vec<DatasetFamily>,
}

impl Accepts {
    pub fn kind(kind: ArtifactKind) -> Self {
        Accepts {
            kinds: vec![kind],
            families: vec![],
        }
    }
    pub fn kinds(kinds: &[ArtifactKind]) -> Self {
        Accepts {
            kinds: kinds.to_vec(),
            families: vec![],
        }
    }
    pub fn datasets(families: &[DatasetFamily]) -> Self {
        Accepts {
            kinds: vec![ArtifactKind::Dataset],
            families: families.to_vec(),
        }
    }
    pub fn any_dataset() -> Self {
        Accepts::datasets(&[])
    }

    pub fn admits(&self, ty: &ArtifactType) -> bool {
        if !self.kinds.contains(&ty.kind) {
            return false;
        }
        match (ty.kind, ty.family) {
            (ArtifactKind::Dataset, Some(fam)) => {
                self.families.is_empty() || self.families.contains(&fam)
            }
            _ => true,
        }
    }
}

impl fmt::Display for Accepts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self.kinds.iter().map(|k| k.to_string()).collect();
        write!(f, "{}", kinds.join(" or "))?;
        if !self.families.is_empty() {
            let fams: Vec<String> = self.families.iter().map(|k| k.to_string()).collect();
            write!(f, " ({})", fams.join(", "))?;
        }
        Ok(())
    }
}

/// A reference to another stage's output, as written: `alpaca` or `split.train`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageRef(pub String);

impl StageRef {
    /// The referenced stage's name.
    pub fn stage(&self) -> &str {
        self.0.split_once('.').map_or(&self.0, |(s, _)| s)
    }
    /// The named output, if any (`train` in `split.train`).
    pub fn output(&self) -> Option<&str> {
        self.0.split_once('.').map(|(_, o)| o)
    }
}

impl fmt::Display for StageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for StageRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StageRef".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "another stage's name, or `stage.output` for a named output",
            "pattern": "^[a-z0-9_-]+(\\.[a-z0-9_-]+)?$"
        })
    }
}

/// A path as written in a manifest, relative to the manifest file's directory (or `hf://org/name`
/// for a dataset in the local Hugging Face cache). Resolved by the engine, never by a stage.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ManifestPath(pub String);

impl JsonSchema for ManifestPath {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ManifestPath".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "a path relative to this manifest's directory",
            "minLength": 1
        })
    }
}

/// One upstream artifact a stage reads, declared from its parameters.
#[derive(Clone, Debug)]
pub struct Input {
    /// The field path that holds the reference, e.g. `data` or `sources[1].data`.
    pub field: String,
    pub reference: StageRef,
    pub accepts: Accepts,
}

/// One file (or directory) a stage reads, declared from its parameters.
#[derive(Clone, Debug)]
pub struct FileInput {
    /// The field path that holds the path, e.g. `path`.
    pub field: String,
    pub path: ManifestPath,
}

/// One output a stage yields. The default output has no name; named outputs are referenced as
/// `stage.name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputDecl {
    pub name: Option<String>,
    pub ty: ArtifactType,
}

impl OutputDecl {
    pub fn main(ty: ArtifactType) -> Self {
        OutputDecl { name: None, ty }
    }
    pub fn named(name: &str, ty: ArtifactType) -> Self {
        OutputDecl {
            name: Some(name.to_owned()),
            ty,
        }
    }
    /// The directory name of this output inside a cache entry.
    pub fn dir_name(&self) -> &str {
        self.name.as_deref().unwrap_or(MAIN_OUTPUT)
    }
}

/// Directory name of an unnamed (default) output.
pub const MAIN_OUTPUT: &str = "main";

/// A parameter that is out of range or inconsistent, found by [`Stage::check`].
#[derive(Clone, Debug)]
pub struct FieldProblem {
    /// Field path inside the stage, e.g. `eval_fraction` or `lora.rank`.
    pub field: String,
    pub message: String,
    pub help: Option<String>,
}

impl FieldProblem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldProblem {
            field: field.into(),
            message: message.into(),
            help: None,
        }
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// How a stage's numbers depend on the environment, which decides what enters its fingerprint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sensitivity {
    /// The pipeline seed enters the fingerprint.
    pub seed: bool,
    /// The backend (and dtype) enter the fingerprint.
    pub backend: bool,
    /// The pipeline and stage names enter the fingerprint: for stages that write them into their
    /// output (an exported file named `<pipeline>-<stage>-….gguf`). Off for everything else, so
    /// renaming a stage or a manifest keeps its cache entries.
    pub names: bool,
}

/// A stage kind.
pub trait Stage: Send + Sync + 'static {
    /// Kind name as written in manifests: `dataset`, `data.split`, `train.sft`.
    const KIND: &'static str;
    /// Implementation version: part of every fingerprint of this kind. Bump it when the same
    /// parameters and inputs would now produce different outputs.
    const VERSION: u32;
    /// One line for `burnish schema` and help texts.
    const ABOUT: &'static str;

    type Params: DeserializeOwned + Serialize + JsonSchema + Send + Sync + 'static;

    /// The upstream artifacts this stage reads.
    fn inputs(params: &Self::Params) -> Vec<Input>;

    /// The files this stage reads (hashed into its fingerprint).
    fn files(_params: &Self::Params) -> Vec<FileInput> {
        Vec::new()
    }

    /// What it yields, given the types of its inputs (keyed by field path).
    fn outputs(params: &Self::Params, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl>;

    /// Short lines `plan` prints under the stage: what a reader would otherwise work out from
    /// the kind's rules (which model a trainer's reference is), given the types of its inputs.
    fn notes(_params: &Self::Params, _inputs: &BTreeMap<String, ArtifactType>) -> Vec<String> {
        Vec::new()
    }

    /// Range and consistency checks on parameters (all problems, not the first).
    fn check(_params: &Self::Params) -> Vec<FieldProblem> {
        Vec::new()
    }

    /// What besides parameters and inputs changes this stage's numbers.
    fn sensitivity(_params: &Self::Params) -> Sensitivity {
        Sensitivity {
            seed: true,
            backend: false,
            names: false,
        }
    }

    /// Produce the outputs into `cx.output_dir(..)`.
    fn run(params: &Self::Params, cx: &mut RunContext) -> Result<StageOutcome, StageError>;
}

/// What a finished stage reports besides its output files.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StageOutcome {
    /// Headline numbers (record counts, losses, scores): in the lock file and `burnish metrics`.
    pub metrics: BTreeMap<String, serde_json::Value>,
}

impl StageOutcome {
    pub fn metric(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.metrics.insert(name.to_owned(), value.into());
        self
    }
}

/// A stage failure: any diagnostic (stages define their own error enums with codes).
pub type StageError = Box<dyn miette::Diagnostic + Send + Sync + 'static>;

/// A resolved upstream artifact handed to a running stage.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub ty: ArtifactType,
    /// Directory holding the artifact's files (inside a published cache entry: read-only).
    pub dir: PathBuf,
    /// Content digest (blake3 hex) over the artifact's files.
    pub digest: String,
}

/// Progress reporting from a running stage; cheap to clone.
pub trait ProgressSink: Send + Sync {
    fn set_total(&self, total: u64);
    fn set_position(&self, pos: u64);
    fn set_message(&self, msg: &str);
}

/// A sink that reports nowhere.
pub struct NoProgress;
impl ProgressSink for NoProgress {
    fn set_total(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: &str) {}
}

/// Everything a running stage may touch.
pub struct RunContext {
    pub(crate) pipeline: String,
    pub(crate) stage: String,
    pub(crate) manifest_dir: PathBuf,
    pub(crate) inputs: BTreeMap<String, Artifact>,
    pub(crate) files: BTreeMap<String, PathBuf>,
    pub(crate) outputs: BTreeMap<String, PathBuf>,
    pub(crate) scratch: PathBuf,
    pub(crate) seed: u64,
    pub(crate) backend: String,
    pub(crate) log: Option<std::fs::File>,
    pub(crate) progress: Arc<dyn ProgressSink>,
    pub(crate) cancel: Arc<AtomicBool>,
}

impl RunContext {
    /// A context for exercising a stage outside the executor (tests, benchmarks).
    pub fn standalone(stage: &str, root: &Path, seed: u64) -> RunContext {
        RunContext {
            pipeline: "standalone".into(),
            stage: stage.to_owned(),
            manifest_dir: root.to_path_buf(),
            inputs: BTreeMap::new(),
            files: BTreeMap::new(),
            outputs: BTreeMap::new(),
            scratch: root.join("scratch"),
            seed,
            backend: "cpu".into(),
            log: None,
            progress: Arc::new(NoProgress),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Builder for standalone contexts: attach an input artifact under a field path.
    pub fn with_input(mut self, field: &str, artifact: Artifact) -> Self {
        self.inputs.insert(field.to_owned(), artifact);
        self
    }
    /// Builder for standalone contexts: attach a resolved file under a field path.
    pub fn with_file(mut self, field: &str, path: PathBuf) -> Self {
        self.files.insert(field.to_owned(), path);
        self
    }
    /// Builder for standalone contexts: where an output (`main` or a name) is written.
    pub fn with_output(mut self, name: &str, dir: PathBuf) -> Self {
        self.outputs.insert(name.to_owned(), dir);
        self
    }

    /// The pipeline's name (its manifest's `pipeline:`).
    pub fn pipeline_name(&self) -> &str {
        &self.pipeline
    }

    /// Builder for standalone contexts: the pipeline name.
    pub fn with_pipeline(mut self, name: &str) -> Self {
        self.pipeline = name.to_owned();
        self
    }

    /// The stage's name in the plan (a matrix cell name like `split[eval_fraction=0.1]`).
    pub fn stage_name(&self) -> &str {
        &self.stage
    }

    /// The upstream artifact bound to a reference field (`data`, `sources[0].data`).
    pub fn input(&self, field: &str) -> Result<&Artifact, StageError> {
        self.inputs.get(field).ok_or_else(|| {
            Box::new(crate::error::InternalError(format!(
                "stage `{}` asked for input field `{field}`, which it did not declare",
                self.stage
            ))) as StageError
        })
    }

    /// The resolved path of a declared file field (`path`).
    pub fn file(&self, field: &str) -> Result<&Path, StageError> {
        self.files.get(field).map(|p| p.as_path()).ok_or_else(|| {
            Box::new(crate::error::InternalError(format!(
                "stage `{}` asked for file field `{field}`, which it did not declare",
                self.stage
            ))) as StageError
        })
    }

    /// Directory of the manifest (paths in parameters are relative to it).
    pub fn manifest_dir(&self) -> &Path {
        &self.manifest_dir
    }

    /// The directory to write an output into: `None` for the main output, or its name.
    /// It exists and is empty when the stage starts.
    pub fn output_dir(&self, name: Option<&str>) -> Result<&Path, StageError> {
        let key = name.unwrap_or(MAIN_OUTPUT);
        self.outputs.get(key).map(|p| p.as_path()).ok_or_else(|| {
            Box::new(crate::error::InternalError(format!(
                "stage `{}` wrote to output `{key}`, which it did not declare",
                self.stage
            ))) as StageError
        })
    }

    /// A directory keyed by this stage's fingerprint that survives crashes: put checkpoints here.
    /// Removed once the stage's entry is published.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The resolved backend name (`cpu`, `wgpu`, `cuda`).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Append a line to the stage's log (`<cache>/runs/<run-id>/<stage>.log`).
    pub fn log(&mut self, line: impl AsRef<str>) {
        use std::io::Write;
        if let Some(f) = self.log.as_mut() {
            let _ = writeln!(f, "{}", line.as_ref());
        }
    }

    pub fn progress(&self) -> &dyn ProgressSink {
        self.progress.as_ref()
    }

    /// True once the user asked to stop (Ctrl-C); long stages should return at the next step.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// A parsed parameter set of some stage kind, with the kind's behaviour attached.
pub trait ErasedParams: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn to_json(&self) -> serde_json::Value;
    fn inputs(&self) -> Vec<Input>;
    fn files(&self) -> Vec<FileInput>;
    fn outputs(&self, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl>;
    fn notes(&self, inputs: &BTreeMap<String, ArtifactType>) -> Vec<String>;
    fn check(&self) -> Vec<FieldProblem>;
    fn sensitivity(&self) -> Sensitivity;
    fn run(&self, cx: &mut RunContext) -> Result<StageOutcome, StageError>;
}

struct Typed<S: Stage>(S::Params);

impl<S: Stage> ErasedParams for Typed<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap_or(serde_json::Value::Null)
    }
    fn inputs(&self) -> Vec<Input> {
        S::inputs(&self.0)
    }
    fn files(&self) -> Vec<FileInput> {
        S::files(&self.0)
    }
    fn outputs(&self, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        S::outputs(&self.0, inputs)
    }
    fn notes(&self, inputs: &BTreeMap<String, ArtifactType>) -> Vec<String> {
        S::notes(&self.0, inputs)
    }
    fn check(&self) -> Vec<FieldProblem> {
        S::check(&self.0)
    }
    fn sensitivity(&self) -> Sensitivity {
        S::sensitivity(&self.0)
    }
    fn run(&self, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        S::run(&self.0, cx)
    }
}

type ParseFn = fn(&Node) -> Result<Arc<dyn ErasedParams>, Box<DeError>>;
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// A registered stage kind.
#[derive(Clone)]
pub struct KindEntry {
    pub kind: &'static str,
    pub version: u32,
    pub about: &'static str,
    /// Hidden kinds (test-only) are accepted at run time but left out of the schema.
    pub hidden: bool,
    pub(crate) parse: ParseFn,
    pub(crate) schema: SchemaFn,
}

impl KindEntry {
    /// The JSON Schema of this kind's parameters.
    pub fn params_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        (self.schema)(generator)
    }
}

/// The stage kinds a binary knows.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, KindEntry>,
    uri_resolver: Option<UriResolver>,
}

/// Resolves a `scheme://…` path written in a manifest (e.g. `hf://org/name`) to a local file,
/// or explains why it cannot.
pub type UriResolver = fn(&str) -> Result<PathBuf, String>;

fn parse_typed<S: Stage>(node: &Node) -> Result<Arc<dyn ErasedParams>, Box<DeError>> {
    let params = S::Params::deserialize(NodeDeserializer::new(node)).map_err(Box::new)?;
    Ok(Arc::new(Typed::<S>(params)))
}

fn schema_typed<S: Stage>(generator: &mut SchemaGenerator) -> Schema {
    S::Params::json_schema(generator)
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register<S: Stage>(&mut self) -> &mut Self {
        self.insert::<S>(false)
    }

    /// Register a kind that is accepted but not advertised (test-only kinds).
    pub fn register_hidden<S: Stage>(&mut self) -> &mut Self {
        self.insert::<S>(true)
    }

    fn insert<S: Stage>(&mut self, hidden: bool) -> &mut Self {
        self.kinds.insert(
            S::KIND,
            KindEntry {
                kind: S::KIND,
                version: S::VERSION,
                about: S::ABOUT,
                hidden,
                parse: parse_typed::<S>,
                schema: schema_typed::<S>,
            },
        );
        self
    }

    /// Set how `scheme://` paths resolve to local files.
    pub fn set_uri_resolver(&mut self, resolver: UriResolver) -> &mut Self {
        self.uri_resolver = Some(resolver);
        self
    }

    pub fn uri_resolver(&self) -> Option<UriResolver> {
        self.uri_resolver
    }

    pub fn get(&self, kind: &str) -> Option<&KindEntry> {
        self.kinds.get(kind)
    }

    /// Kinds in name order (hidden ones excluded).
    pub fn public_kinds(&self) -> impl Iterator<Item = &KindEntry> {
        self.kinds.values().filter(|k| !k.hidden)
    }

    pub fn kind_names(&self) -> Vec<&'static str> {
        self.public_kinds().map(|k| k.kind).collect()
    }

    pub(crate) fn parse(
        &self,
        kind: &str,
        node: &Node,
    ) -> Option<Result<Arc<dyn ErasedParams>, Box<DeError>>> {
        self.kinds.get(kind).map(|k| (k.parse)(node))
    }
}

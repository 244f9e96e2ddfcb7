//! Plans: a validated manifest expanded into matrix cells, in dependency order, with the
//! fingerprint of every cell whose inputs are known.
//!
//! A stage with `matrix:` becomes one cell per combination of its axes' values; every stage
//! downstream of a matrixed stage becomes one cell per combination of its upstream cells (joined
//! on shared axes, so a diamond does not multiply). Cells are named `split[eval_fraction=0.1]`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::cache::{self, CacheError, FileHasher, FingerprintInputs, Lookup, PENDING};
use crate::error::InternalError;
use crate::lock::LockFile;
use crate::manifest::{Executor, Manifest, Resources, apply_matrix_values};
use crate::stage::{ArtifactType, ErasedParams, OutputDecl, Registry, Sensitivity};
use crate::store::Store;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};

/// One upstream artifact of a cell.
#[derive(Clone, Debug)]
pub struct CellInput {
    /// The reference field (`data`, `sources[1].data`).
    pub field: String,
    /// Index of the upstream cell in [`Plan::cells`].
    pub upstream: usize,
    /// The upstream output's directory name (`main`, `train`).
    pub output: String,
    pub ty: ArtifactType,
}

/// One runnable unit: a stage, or one cell of a matrixed stage.
#[derive(Clone)]
pub struct Cell {
    /// `split` or `split[eval_fraction=0.1]`.
    pub name: String,
    /// The stage it belongs to.
    pub stage: String,
    pub kind: &'static str,
    /// Matrix axis label → value, for the axes that reach this cell.
    pub assignment: BTreeMap<String, String>,
    pub params: Arc<dyn ErasedParams>,
    pub inputs: Vec<CellInput>,
    pub outputs: Vec<OutputDecl>,
    /// Path field → resolved path.
    pub files: Vec<(String, PathBuf)>,
    pub sensitivity: Sensitivity,
    /// The kind's notes for `plan` ([`crate::stage::Stage::notes`]).
    pub notes: Vec<String>,
    /// The stage's own `executor:`, if any (else the manifest's, or `--executor`).
    pub executor: Option<Executor>,
    /// What its job asks for (`resources:`).
    pub resources: Resources,
}

impl Cell {
    /// Indices of the cells this one reads from (deduplicated).
    pub fn deps(&self) -> Vec<usize> {
        let mut d: Vec<usize> = self.inputs.iter().map(|i| i.upstream).collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// The parameters as they enter the fingerprint: reference and path fields removed.
    pub fn fingerprint_params(&self) -> serde_json::Value {
        let mut v = self.params.to_json();
        for i in &self.inputs {
            cache::remove_path(&mut v, &i.field);
        }
        for (f, _) in &self.files {
            cache::remove_path(&mut v, f);
        }
        v
    }
}

/// A manifest expanded into cells in dependency order.
pub struct Plan {
    pub manifest: Arc<Manifest>,
    /// Cells in topological order (every cell after the cells it reads from).
    pub cells: Vec<Cell>,
    /// The cell DAG: node `i` is `cells[i]`, edges run upstream → downstream.
    pub graph: DiGraph<usize, ()>,
    /// The resolved backend name that enters backend-sensitive fingerprints.
    pub backend: String,
}

impl Plan {
    /// Expand a validated manifest.
    pub fn build(
        manifest: Arc<Manifest>,
        registry: &Registry,
        backend: &str,
    ) -> Result<Plan, InternalError> {
        let decls = &manifest.stages;
        let index: HashMap<&str, usize> = decls
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.as_str(), i))
            .collect();
        let deps: Vec<Vec<(usize, String)>> = decls
            .iter()
            .map(|d| {
                d.inputs
                    .iter()
                    .filter_map(|i| {
                        index
                            .get(i.reference.stage())
                            .map(|&j| (j, i.field.clone()))
                    })
                    .collect()
            })
            .collect();
        // Dependency order that keeps the written order among independent stages.
        let order = crate::manifest::topo_order(&deps)
            .map_err(|_| InternalError("cycle in a validated manifest".into()))?;

        // Axis labels: the field path, qualified by the stage when two stages share it.
        let mut field_count: HashMap<&str, usize> = HashMap::new();
        for d in decls {
            for a in &d.matrix {
                *field_count.entry(a.field.as_str()).or_default() += 1;
            }
        }
        let label = |stage: &str, field: &str| {
            if field_count.get(field).copied().unwrap_or(0) > 1 {
                format!("{stage}.{field}")
            } else {
                field.to_owned()
            }
        };

        let mut cells: Vec<Cell> = Vec::new();
        let mut cells_of: Vec<Vec<usize>> = vec![Vec::new(); decls.len()];
        for &i in &order {
            let d = &decls[i];
            // Join the upstream stages' assignments.
            let mut combos: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
            let mut ups: Vec<usize> = deps[i].iter().map(|(j, _)| *j).collect();
            ups.sort_unstable();
            ups.dedup();
            for j in ups {
                let mut next = Vec::new();
                for a in &combos {
                    for &c in &cells_of[j] {
                        if compatible(a, &cells[c].assignment) {
                            let mut m = a.clone();
                            m.extend(cells[c].assignment.clone());
                            if !next.contains(&m) {
                                next.push(m);
                            }
                        }
                    }
                }
                combos = next;
            }
            // Then this stage's own axes.
            let mut picks: Vec<Vec<usize>> = vec![Vec::new()];
            for axis in &d.matrix {
                picks = picks
                    .into_iter()
                    .flat_map(|p| {
                        (0..axis.values.len()).map(move |v| {
                            let mut q = p.clone();
                            q.push(v);
                            q
                        })
                    })
                    .collect();
            }
            for combo in &combos {
                for pick in &picks {
                    let mut assignment = combo.clone();
                    for (axis, &v) in d.matrix.iter().zip(pick) {
                        assignment
                            .insert(label(&d.name, &axis.field), axis.values[v].scalar_text());
                    }
                    let params = if d.matrix.is_empty() {
                        d.params.clone()
                    } else {
                        let node = apply_matrix_values(&d.node, &d.matrix, pick);
                        match registry.parse(d.kind, &node) {
                            Some(Ok(p)) => p,
                            _ => {
                                return Err(InternalError(format!(
                                    "matrix cell of `{}` failed to parse after validation",
                                    d.name
                                )));
                            }
                        }
                    };
                    let mut inputs = Vec::new();
                    for input in &params.inputs() {
                        let Some(&j) = index.get(input.reference.stage()) else {
                            return Err(InternalError(format!(
                                "unresolved reference `{}`",
                                input.reference
                            )));
                        };
                        let up = cells_of[j]
                            .iter()
                            .copied()
                            .find(|&c| compatible(&assignment, &cells[c].assignment))
                            .ok_or_else(|| {
                                InternalError(format!("no cell of `{}` matches", decls[j].name))
                            })?;
                        let out = match input.reference.output() {
                            Some(o) => decls[j]
                                .outputs
                                .iter()
                                .find(|x| x.name.as_deref() == Some(o)),
                            None => decls[j].outputs.iter().find(|x| x.name.is_none()),
                        }
                        .ok_or_else(|| {
                            InternalError(format!("unresolved output `{}`", input.reference))
                        })?;
                        inputs.push(CellInput {
                            field: input.field.clone(),
                            upstream: up,
                            output: out.dir_name().to_owned(),
                            ty: out.ty,
                        });
                    }
                    let types: BTreeMap<String, ArtifactType> =
                        inputs.iter().map(|i| (i.field.clone(), i.ty)).collect();
                    let outputs = params.outputs(&types);
                    let notes = params.notes(&types);
                    let mut files = Vec::new();
                    for f in params.files() {
                        let p = manifest
                            .resolve_field_path(registry, &d.node, &f.field, &f.path.0)
                            .map_err(InternalError)?;
                        files.push((f.field, p));
                    }
                    let name = cell_name(&d.name, &assignment);
                    let sensitivity = params.sensitivity();
                    cells_of[i].push(cells.len());
                    cells.push(Cell {
                        name,
                        stage: d.name.clone(),
                        kind: d.kind,
                        assignment,
                        params,
                        inputs,
                        outputs,
                        files,
                        sensitivity,
                        notes,
                        executor: d.executor,
                        resources: d.resources.clone(),
                    });
                }
            }
        }
        let mut graph = DiGraph::new();
        for i in 0..cells.len() {
            graph.add_node(i);
        }
        for (i, c) in cells.iter().enumerate() {
            for d in c.deps() {
                graph.add_edge(NodeIndex::new(d), NodeIndex::new(i), ());
            }
        }
        Ok(Plan {
            manifest,
            cells,
            graph,
            backend: backend.to_owned(),
        })
    }

    /// The fingerprint inputs of a cell, given its upstream artifacts' digests (`None` while an
    /// upstream is not computed) and a file hasher.
    pub fn fingerprint_inputs(
        &self,
        cell: usize,
        upstream_digest: &dyn Fn(usize, &str) -> Option<String>,
        hasher: &mut FileHasher,
    ) -> std::io::Result<FingerprintInputs> {
        let c = &self.cells[cell];
        let mut inputs = BTreeMap::new();
        for i in &c.inputs {
            let d = upstream_digest(i.upstream, &i.output).unwrap_or_else(|| PENDING.to_owned());
            inputs.insert(i.field.clone(), d);
        }
        let mut files = BTreeMap::new();
        for (field, path) in &c.files {
            files.insert(field.clone(), hasher.digest(path)?);
        }
        Ok(FingerprintInputs {
            cache_version: cache::CACHE_VERSION,
            kind: c.kind.to_owned(),
            kind_version: c.params.version(),
            params: c.fingerprint_params(),
            inputs,
            files,
            seed: c.sensitivity.seed.then_some(self.manifest.header.seed),
            backend: c.sensitivity.backend.then(|| self.backend.clone()),
            names: c
                .sensitivity
                .names
                .then(|| format!("{}/{}", self.manifest.header.pipeline, c.name)),
        })
    }

    /// The cells of a stage (by stage name or cell name).
    pub fn select(&self, name: &str) -> Vec<usize> {
        self.cells
            .iter()
            .enumerate()
            .filter(|(_, c)| c.name == name || c.stage == name)
            .map(|(i, _)| i)
            .collect()
    }

    /// `targets` and everything they depend on.
    pub fn ancestors_of(&self, targets: &[usize]) -> Vec<bool> {
        let mut keep = vec![false; self.cells.len()];
        let reversed = Reversed(&self.graph);
        for &t in targets {
            let mut dfs = Dfs::new(reversed, NodeIndex::new(t));
            while let Some(n) = dfs.next(reversed) {
                keep[n.index()] = true;
            }
        }
        keep
    }

    /// Compute each cell's state against the store and the lock file.
    pub fn status(
        &self,
        store: &Store,
        lock: Option<&LockFile>,
        hasher: &mut FileHasher,
    ) -> Result<Vec<CellStatus>, PlanError> {
        let mut out: Vec<CellStatus> = Vec::with_capacity(self.cells.len());
        let mut digests: Vec<Option<BTreeMap<String, String>>> = vec![None; self.cells.len()];
        for (i, c) in self.cells.iter().enumerate() {
            let fi = self
                .fingerprint_inputs(
                    i,
                    &|up, output| digests[up].as_ref().and_then(|m| m.get(output).cloned()),
                    hasher,
                )
                .map_err(|e| PlanError::Hash {
                    stage: c.name.clone(),
                    source: e,
                })?;
            let pending: Vec<String> = c
                .inputs
                .iter()
                .filter(|inp| fi.inputs.get(&inp.field).is_some_and(|d| d == PENDING))
                .map(|inp| self.cells[inp.upstream].name.clone())
                .collect();
            let fingerprint = pending.is_empty().then(|| fi.fingerprint());
            let (record, broken, remote) = match &fingerprint {
                Some(fp) => match store.peek(fp)? {
                    (Lookup::Hit(r), remote) => (Some(r), None, remote),
                    (Lookup::Miss, _) => (None, None, false),
                    (Lookup::Broken(why), _) => {
                        (None, Some(format!("{}: {why}", short(fp))), false)
                    }
                },
                None => (None, None, false),
            };
            if let Some(r) = &record {
                digests[i] = Some(
                    r.outputs
                        .iter()
                        .map(|(k, o)| (k.clone(), o.digest.clone()))
                        .collect(),
                );
            }
            let name_of = |field: &str| {
                c.inputs
                    .iter()
                    .find(|x| x.field == field)
                    .map_or_else(|| field.to_owned(), |x| self.cells[x.upstream].name.clone())
            };
            let locked_fp = lock
                .and_then(|l| l.stages.get(&c.name))
                .map(|s| s.fingerprint.clone());
            let (state, reasons) = if remote {
                let url = store.remote().map_or("", |r| r.url());
                (
                    State::Cached,
                    vec![format!("on the remote {url}; `run` pulls it")],
                )
            } else if record.is_some() {
                (State::Cached, Vec::new())
            } else if let Some(why) = broken {
                (
                    State::Stale,
                    vec![format!("cache entry {why}; it will be recomputed")],
                )
            } else {
                match &locked_fp {
                    None => (State::New, Vec::new()),
                    Some(old) if Some(old) == fingerprint.as_ref() => (
                        State::Stale,
                        vec![
                            "cache entry missing (evicted, or the lock came from another machine)"
                                .to_owned(),
                        ],
                    ),
                    Some(old) => {
                        let reasons = match store.inputs(old) {
                            Some(old_inputs) => {
                                let mut r = cache::explain(&old_inputs, &fi, &name_of);
                                if r.is_empty() {
                                    r.push("fingerprint changed".into());
                                }
                                r
                            }
                            None if !pending.is_empty() => pending
                                .iter()
                                .map(|p| format!("input `{p}` will be recomputed"))
                                .collect(),
                            None => vec![format!(
                                "fingerprint changed from {} (its inputs are no longer in the cache)",
                                short(old)
                            )],
                        };
                        (State::Stale, reasons)
                    }
                }
            };
            out.push(CellStatus {
                stage: c.name.clone(),
                kind: c.kind.to_owned(),
                state,
                fingerprint,
                reasons,
                notes: c.notes.clone(),
                inputs: fi,
            });
        }
        Ok(out)
    }
}

/// Whether two assignments agree on their shared axes.
fn compatible(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    b.iter().all(|(k, v)| a.get(k).is_none_or(|x| x == v))
}

/// `stage` or `stage[a=1,b=x]`.
pub fn cell_name(stage: &str, assignment: &BTreeMap<String, String>) -> String {
    if assignment.is_empty() {
        return stage.to_owned();
    }
    let parts: Vec<String> = assignment.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{stage}[{}]", parts.join(","))
}

/// The first 12 hex digits, for humans.
pub fn short(fp: &str) -> &str {
    &fp[..fp.len().min(12)]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Cached,
    Stale,
    New,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Cached => "cached",
            State::Stale => "stale",
            State::New => "new",
        }
    }
}

/// A cell's state as `burnish plan` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CellStatus {
    pub stage: String,
    pub kind: String,
    pub state: State,
    /// `None` while an upstream is not computed (content-addressed inputs).
    pub fingerprint: Option<String>,
    pub reasons: Vec<String>,
    /// The kind's notes on this stage (which model is a trainer's reference, …).
    pub notes: Vec<String>,
    #[serde(skip)]
    pub inputs: FingerprintInputs,
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum PlanError {
    #[error("cannot hash the files of stage `{stage}`: {source}")]
    #[diagnostic(code(burnish::plan::hash))]
    Hash {
        stage: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Internal(#[from] InternalError),
}

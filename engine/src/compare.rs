//! Comparing runs: parameters and metrics across manifests and matrix cells, read from the
//! cache (never by running anything).
//!
//! Each manifest contributes one row per complete matrix assignment (one row when it has no
//! matrix). Columns are `stage.field` parameters and `stage.metric` metrics; parameter columns
//! whose values are equal in every row are hidden unless `all` is set.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::plan::{CellStatus, Plan};
use crate::store::Store;

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `ablation.yaml` or `ablation.yaml[lr=0.0002]`.
    pub run: String,
    pub params: BTreeMap<String, String>,
    pub metrics: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub param_columns: Vec<String>,
    pub metric_columns: Vec<String>,
    pub rows: Vec<Row>,
}

/// Rows for one planned manifest.
pub fn rows(plan: &Plan, status: &[CellStatus], store: &Store) -> Vec<Row> {
    // Maximal assignments: those not contained in another.
    let mut assignments: Vec<BTreeMap<String, String>> = Vec::new();
    for c in &plan.cells {
        if !assignments.contains(&c.assignment) {
            assignments.push(c.assignment.clone());
        }
    }
    let maximal: Vec<BTreeMap<String, String>> = assignments
        .iter()
        .filter(|a| {
            !assignments
                .iter()
                .any(|b| b.len() > a.len() && a.iter().all(|(k, v)| b.get(k) == Some(v)))
        })
        .cloned()
        .collect();
    let label = &plan.manifest.display;
    maximal
        .into_iter()
        .map(|a| {
            let mut params = BTreeMap::new();
            let mut metrics = BTreeMap::new();
            for (i, c) in plan.cells.iter().enumerate() {
                if !c.assignment.iter().all(|(k, v)| a.get(k) == Some(v)) {
                    continue;
                }
                flatten(&c.stage, &c.params.to_json(), &mut params);
                if let Some(fp) = &status[i].fingerprint
                    && let Ok(Some(r)) = store.usable_record(fp)
                {
                    for (m, v) in r.metrics {
                        metrics.insert(format!("{}.{m}", c.stage), v);
                    }
                }
            }
            let run = if a.is_empty() {
                label.clone()
            } else {
                let parts: Vec<String> = a.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{label}[{}]", parts.join(","))
            };
            Row {
                run,
                params,
                metrics,
            }
        })
        .collect()
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        Value::Null => {}
        Value::String(s) => {
            out.insert(prefix.to_owned(), s.clone());
        }
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            out.insert(
                prefix.to_owned(),
                crate::yaml::format_float(n.as_f64().unwrap_or(f64::NAN)),
            );
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// Assemble the table, hiding unchanged parameter columns unless `all`.
pub fn table(rows: Vec<Row>, all: bool) -> Table {
    let mut params: BTreeSet<String> = BTreeSet::new();
    let mut metrics: BTreeSet<String> = BTreeSet::new();
    for r in &rows {
        params.extend(r.params.keys().cloned());
        metrics.extend(r.metrics.keys().cloned());
    }
    let param_columns: Vec<String> = params
        .into_iter()
        .filter(|p| {
            all || {
                let first = rows[0].params.get(p);
                rows.iter().any(|r| r.params.get(p) != first)
            }
        })
        .collect();
    Table {
        param_columns,
        metric_columns: metrics.into_iter().collect(),
        rows,
    }
}

fn metric_text(v: Option<&Value>) -> String {
    match v {
        None => "-".into(),
        Some(Value::Number(n)) if !n.is_i64() && !n.is_u64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.abs() >= 1e-3 && f.abs() < 1e6 {
                format!("{f:.4}")
            } else {
                format!("{f:.4e}")
            }
        }
        Some(v) => v.to_string(),
    }
}

impl Table {
    fn cells(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let mut header = vec!["run".to_owned()];
        header.extend(self.param_columns.iter().cloned());
        header.extend(self.metric_columns.iter().cloned());
        let body = self
            .rows
            .iter()
            .map(|r| {
                let mut line = vec![r.run.clone()];
                line.extend(
                    self.param_columns
                        .iter()
                        .map(|c| r.params.get(c).cloned().unwrap_or_else(|| "-".into())),
                );
                line.extend(
                    self.metric_columns
                        .iter()
                        .map(|c| metric_text(r.metrics.get(c))),
                );
                line
            })
            .collect();
        (header, body)
    }

    /// Aligned plain text.
    pub fn to_text(&self) -> String {
        let (header, body) = self.cells();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for line in &body {
            for (i, c) in line.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let fmt_line = |cells: &[String]| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let mut out = fmt_line(&header);
        out.push('\n');
        out.push_str(
            &widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  "),
        );
        out.push('\n');
        for line in &body {
            out.push_str(&fmt_line(line));
            out.push('\n');
        }
        out
    }

    pub fn to_markdown(&self) -> String {
        let (header, body) = self.cells();
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = format!(
            "| {} |\n|{}|\n",
            header
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" | "),
            header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        );
        for line in body {
            out.push_str(&format!(
                "| {} |\n",
                line.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
            ));
        }
        out
    }

    pub fn to_csv(&self) -> String {
        let (header, body) = self.cells();
        let field = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_owned()
            }
        };
        let mut out = String::new();
        for line in std::iter::once(header).chain(body) {
            out.push_str(&line.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
        out
    }
}

/// The DAG as Mermaid.
pub fn mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, c) in plan.cells.iter().enumerate() {
        out.push_str(&format!(
            "  n{i}[\"{}<br/><i>{}</i>\"]\n",
            c.name.replace('"', "'"),
            c.kind
        ));
    }
    for (i, c) in plan.cells.iter().enumerate() {
        for inp in &c.inputs {
            let label = if inp.output == crate::stage::MAIN_OUTPUT {
                inp.field.clone()
            } else {
                format!("{}: {}", inp.field, inp.output)
            };
            out.push_str(&format!("  n{} -->|{}| n{i}\n", inp.upstream, label));
        }
    }
    out
}

/// The DAG as Graphviz DOT.
pub fn dot(plan: &Plan) -> String {
    let mut out = String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box];\n");
    for (i, c) in plan.cells.iter().enumerate() {
        out.push_str(&format!(
            "  n{i} [label=\"{}\\n{}\"];\n",
            c.name.replace('"', "\\\""),
            c.kind
        ));
    }
    for (i, c) in plan.cells.iter().enumerate() {
        for inp in &c.inputs {
            out.push_str(&format!(
                "  n{} -> n{i} [label=\"{}\"];\n",
                inp.upstream, inp.field
            ));
        }
    }
    out.push_str("}\n");
    out
}

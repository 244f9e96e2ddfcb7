//! The scheduler on its own: every decision kind, failure isolation, `--until`, `--force`,
//! `--locked`, the launcher's room and Ctrl-C, with a table in place of the store.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use burnish_engine::cache::{
    CACHE_VERSION, CacheError, EntryRecord, FileHasher, FingerprintInputs, Lookup, OutputRecord,
};
use burnish_engine::exec::schedule::{Decision, Probe, Scheduler};
use burnish_engine::exec::{ExecError, Outcome, RunOptions};
use burnish_engine::lock::{LOCK_VERSION, LockFile, LockedStage};
use burnish_engine::manifest;
use burnish_engine::plan::Plan;
use tempfile::TempDir;

/// `raw → upper → split` and `raw → side`, and an independent `other → after`.
const MANIFEST: &str = "\
pipeline: sched
seed: 1
stages:
  raw: {kind: src, path: data/raw.txt}
  upper: {kind: map, data: raw}
  split: {kind: split, data: upper, eval_fraction: 0.5}
  side: {kind: map, data: raw}
  other: {kind: src, path: data/other.txt}
  after: {kind: map, data: other}
";

fn plan() -> (TempDir, Plan) {
    let tmp = TempDir::new().unwrap();
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    std::fs::write(tmp.path().join("data/raw.txt"), "a\nb\n").unwrap();
    std::fs::write(tmp.path().join("data/other.txt"), "c\n").unwrap();
    let path = tmp.path().join("sched.yaml");
    std::fs::write(&path, MANIFEST).unwrap();
    let reg = common::registry();
    let m = manifest::load(&path, &reg).unwrap_or_else(|e| panic!("{}", e.render(80, false)));
    let plan = Plan::build(Arc::new(m), &reg, "cpu").unwrap();
    (tmp, plan)
}

/// The store as a table: which cells are cached or broken, which cannot be hashed; and which
/// cells had their fingerprint computed.
#[derive(Default)]
struct Table {
    cached: HashSet<&'static str>,
    broken: HashSet<&'static str>,
    unhashable: HashSet<&'static str>,
    fingerprinted: Vec<String>,
    /// fingerprint → (cell, its output names)
    cells: HashMap<String, (String, Vec<String>)>,
}

impl Probe for Table {
    fn fingerprint(
        &mut self,
        plan: &Plan,
        cell: usize,
        upstream_digest: &dyn Fn(usize, &str) -> Option<String>,
    ) -> std::io::Result<FingerprintInputs> {
        let c = &plan.cells[cell];
        self.fingerprinted.push(c.name.clone());
        if self.unhashable.contains(c.name.as_str()) {
            return Err(std::io::Error::other("permission denied"));
        }
        let fi = plan.fingerprint_inputs(cell, upstream_digest, &mut FileHasher::ephemeral())?;
        let outputs = c.outputs.iter().map(|o| o.dir_name().to_owned()).collect();
        self.cells
            .insert(fi.fingerprint(), (c.name.clone(), outputs));
        Ok(fi)
    }
    fn lookup(&mut self, fp: &str) -> Result<Lookup, CacheError> {
        let (name, outputs) = &self.cells[fp];
        Ok(if self.cached.contains(name.as_str()) {
            Lookup::Hit(record(name, fp, outputs))
        } else if self.broken.contains(name.as_str()) {
            Lookup::Broken("record.json does not parse".into())
        } else {
            Lookup::Miss
        })
    }
}

/// A record whose output digests depend on the cell alone (so a rerun gives the same bytes).
fn record(name: &str, fp: &str, outputs: &[String]) -> EntryRecord {
    EntryRecord {
        cache_version: CACHE_VERSION,
        fingerprint: fp.to_owned(),
        kind: "test".into(),
        stage: name.to_owned(),
        outputs: outputs
            .iter()
            .map(|o| {
                let out = OutputRecord {
                    ty: burnish_engine::stage::ArtifactType::of(
                        burnish_engine::stage::ArtifactKind::Model,
                    ),
                    digest: format!("{name}/{o}"),
                    files: BTreeMap::new(),
                };
                (o.clone(), out)
            })
            .collect(),
        metrics: BTreeMap::new(),
        created: 0,
        duration_ms: 0,
    }
}

/// Each decision as a word and the cell: `run raw`, `skip split (upper)`.
fn decide(s: &mut Scheduler, t: &mut Table, room: usize) -> (Vec<String>, Vec<usize>) {
    let plan = s.plan();
    let name = |i: usize| plan.cells[i].name.clone();
    let mut words = Vec::new();
    let mut jobs = Vec::new();
    for d in s.decide(t, room) {
        words.push(match d {
            Decision::Skip { cell, upstream } => format!("skip {} ({upstream})", name(cell)),
            Decision::Fail { cell } => format!("fail {}", name(cell)),
            Decision::LockMismatch { cell } => format!("lock {}", name(cell)),
            Decision::Restore { cell } => format!("restore {}", name(cell)),
            Decision::Broken { cell, .. } => format!("broken {}", name(cell)),
            Decision::Run(job) => {
                jobs.push(job.cell);
                format!(
                    "run {}{}",
                    name(job.cell),
                    if job.force { " (forced)" } else { "" }
                )
            }
        });
    }
    (words, jobs)
}

/// Finish a job as if it ran and published.
fn succeed(s: &mut Scheduler, cell: usize) {
    let c = &s.plan().cells[cell];
    let fp = s.fingerprint(cell).unwrap().to_owned();
    let outputs: Vec<String> = c.outputs.iter().map(|o| o.dir_name().to_owned()).collect();
    let r = record(&c.name, &fp, &outputs);
    s.finished(cell, Ok((r, true)), Duration::ZERO, false);
}

fn fail(s: &mut Scheduler, cell: usize, interrupted: bool) {
    let e = ExecError::Panic {
        stage: s.plan().cells[cell].name.clone(),
        message: "boom".into(),
    };
    s.finished(cell, Err(e), Duration::ZERO, interrupted);
}

fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn outcomes(s: Scheduler, interrupted: bool) -> BTreeMap<String, String> {
    let (cells, _) = s.into_cells(interrupted);
    cells
        .into_iter()
        .map(|c| {
            let o = match &c.outcome {
                Outcome::Skipped { upstream } => format!("skipped ({upstream})"),
                o => o.label().to_owned(),
            };
            (c.name, o)
        })
        .collect()
}

#[test]
fn ready_cells_run_in_plan_order_within_the_launchers_room() {
    let (_tmp, plan) = plan();
    let mut t = Table::default();
    let mut s = Scheduler::new(&plan, &RunOptions::default(), None);
    let (w, jobs) = decide(&mut s, &mut t, 1);
    assert_eq!(w, words(&["run raw"]));
    // No room: `other` waits, and nothing downstream of `raw` is decided before it finishes.
    assert_eq!(decide(&mut s, &mut t, 0).0, Vec::<String>::new());
    succeed(&mut s, jobs[0]);
    let (w, _) = decide(&mut s, &mut t, 3);
    assert_eq!(w, words(&["run other", "run upper", "run side"]));
    assert_eq!(t.fingerprinted, words(&["raw", "other", "upper", "side"]));
}

#[test]
fn cached_cells_are_restored_and_forced_ones_run() {
    let (_tmp, plan) = plan();
    let all = ["raw", "upper", "split", "side", "other", "after"];
    let mut t = Table {
        cached: all.into_iter().collect(),
        ..Table::default()
    };
    let mut s = Scheduler::new(&plan, &RunOptions::default(), None);
    let (w, _) = decide(&mut s, &mut t, 4);
    assert_eq!(
        w,
        words(&[
            "restore raw",
            "restore upper",
            "restore split",
            "restore side",
            "restore other",
            "restore after"
        ])
    );
    assert!(outcomes(s, false).values().all(|o| o == "cached"));

    let opts = RunOptions {
        force: vec!["upper".into()],
        ..RunOptions::default()
    };
    let mut s = Scheduler::new(&plan, &opts, None);
    let (w, jobs) = decide(&mut s, &mut t, 4);
    assert_eq!(
        w,
        words(&[
            "restore raw",
            "restore side",
            "restore other",
            "restore after",
            "run upper (forced)"
        ])
    );
    // The forced cell reran to the same bytes: its downstream stays cached (early cut-off).
    succeed(&mut s, jobs[0]);
    assert_eq!(decide(&mut s, &mut t, 4).0, words(&["restore split"]));
    let o = outcomes(s, false);
    assert_eq!(o["upper"], "ran");
    assert_eq!(o["split"], "cached");
}

#[test]
fn a_failure_skips_its_descendants_and_independent_branches_finish() {
    let (_tmp, plan) = plan();
    let mut t = Table {
        unhashable: ["upper"].into_iter().collect(),
        ..Table::default()
    };
    let mut s = Scheduler::new(&plan, &RunOptions::default(), None);
    let (w, jobs) = decide(&mut s, &mut t, 4);
    assert_eq!(w, words(&["run raw", "run other"]));
    succeed(&mut s, jobs[0]);
    fail(&mut s, jobs[1], false);
    let (w, jobs) = decide(&mut s, &mut t, 4);
    assert_eq!(
        w,
        words(&[
            "fail upper",
            "skip split (upper)",
            "skip after (other)",
            "run side"
        ])
    );
    succeed(&mut s, jobs[0]);
    assert!(decide(&mut s, &mut t, 4).0.is_empty());
    let o = outcomes(s, false);
    assert_eq!(
        o,
        [
            ("raw", "ran"),
            ("upper", "failed"),
            ("split", "skipped (upper)"),
            ("side", "ran"),
            ("other", "failed"),
            ("after", "skipped (other)"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect()
    );
}

#[test]
fn a_skip_names_the_cell_that_failed_not_the_one_between() {
    let (_tmp, plan) = plan();
    let mut t = Table::default();
    let mut s = Scheduler::new(&plan, &RunOptions::default(), None);
    let (_, jobs) = decide(&mut s, &mut t, 1);
    fail(&mut s, jobs[0], false);
    let (w, _) = decide(&mut s, &mut t, 1);
    assert_eq!(
        w,
        words(&[
            "skip upper (raw)",
            "skip split (raw)",
            "skip side (raw)",
            "run other"
        ])
    );
}

#[test]
fn until_decides_the_target_and_its_ancestors_only() {
    let (_tmp, plan) = plan();
    let mut t = Table {
        cached: ["raw"].into_iter().collect(),
        ..Table::default()
    };
    let opts = RunOptions {
        until: Some("split".into()),
        ..RunOptions::default()
    };
    let mut s = Scheduler::new(&plan, &opts, None);
    let (w, jobs) = decide(&mut s, &mut t, 4);
    assert_eq!(w, words(&["restore raw", "run upper"]));
    succeed(&mut s, jobs[0]);
    assert_eq!(decide(&mut s, &mut t, 4).0, words(&["run split"]));
    assert_eq!(t.fingerprinted, words(&["raw", "upper", "split"]));
    let o = outcomes(s, false);
    assert_eq!(o["side"], "not selected");
    assert_eq!(o["after"], "not selected");
}

#[test]
fn a_broken_entry_is_recomputed_with_a_warning() {
    let (_tmp, plan) = plan();
    let mut t = Table {
        broken: ["raw"].into_iter().collect(),
        cached: ["other", "after"].into_iter().collect(),
        ..Table::default()
    };
    let mut s = Scheduler::new(&plan, &RunOptions::default(), None);
    let (w, _) = decide(&mut s, &mut t, 4);
    assert_eq!(
        w,
        words(&["broken raw", "restore other", "restore after", "run raw"])
    );
}

/// The lock file a complete run of the plan would write (every cell, its fingerprint).
fn lock_of(plan: &Plan) -> LockFile {
    let mut t = Table::default();
    let mut s = Scheduler::new(plan, &RunOptions::default(), None);
    loop {
        let (_, jobs) = decide(&mut s, &mut t, 8);
        if jobs.is_empty() {
            break;
        }
        for j in jobs {
            succeed(&mut s, j);
        }
    }
    let (cells, _) = s.into_cells(false);
    let stages = cells
        .into_iter()
        .map(|c| {
            let r = c.record.unwrap();
            let stage = LockedStage {
                kind: c.kind,
                fingerprint: c.fingerprint.unwrap(),
                outputs: r
                    .outputs
                    .iter()
                    .map(|(k, o)| (k.clone(), o.digest.clone()))
                    .collect(),
                metrics: BTreeMap::new(),
            };
            (c.name, stage)
        })
        .collect();
    LockFile {
        version: LOCK_VERSION,
        pipeline: "sched".into(),
        stages,
    }
}

#[test]
fn locked_runs_stop_at_the_first_difference_from_the_lock_file() {
    let (_tmp, plan) = plan();
    let lock = lock_of(&plan);
    let locked = RunOptions {
        locked: true,
        ..RunOptions::default()
    };

    // The same plan against its own lock: everything cached, nothing differs.
    let all = ["raw", "upper", "split", "side", "other", "after"];
    let mut t = Table {
        cached: all.into_iter().collect(),
        ..Table::default()
    };
    let mut s = Scheduler::new(&plan, &locked, Some(lock.clone()));
    assert_eq!(decide(&mut s, &mut t, 4).0.len(), 6);
    assert!(s.lock_diff().is_empty());

    // A fingerprint that differs: that cell fails and nothing more is decided.
    let mut changed = lock.clone();
    changed.stages.get_mut("upper").unwrap().fingerprint = "0".repeat(64);
    let mut s = Scheduler::new(&plan, &locked, Some(changed));
    let (w, _) = decide(&mut s, &mut t, 4);
    assert_eq!(w, words(&["restore raw", "lock upper"]));
    assert!(s.stopped());
    assert!(s.lock_diff()[0].starts_with("upper"), "{:?}", s.lock_diff());
    assert!(decide(&mut s, &mut t, 4).0.is_empty());
    let o = outcomes(s, false);
    assert_eq!(o["upper"], "failed");
    assert_eq!(o["side"], "interrupted");

    // A cell the lock file lacks: a difference before anything is decided.
    let mut fewer = lock.clone();
    fewer.stages.remove("after");
    let mut s = Scheduler::new(&plan, &locked, Some(fewer));
    assert_eq!(s.lock_diff(), ["after: not in the lock file"]);
    assert!(decide(&mut s, &mut t, 4).0.is_empty());

    // Outputs that differ from the lock's after a run: that cell fails.
    let mut t = Table::default();
    let mut other_bytes = lock;
    other_bytes
        .stages
        .get_mut("raw")
        .unwrap()
        .outputs
        .insert("main".into(), "other bytes".into());
    let mut s = Scheduler::new(&plan, &locked, Some(other_bytes));
    let (_, jobs) = decide(&mut s, &mut t, 1);
    succeed(&mut s, jobs[0]);
    assert!(s.stopped());
    assert_eq!(outcomes(s, false)["raw"], "failed");
}

#[test]
fn an_interrupted_run_marks_stopped_and_undecided_cells_interrupted() {
    let (_tmp, plan) = plan();
    let mut t = Table::default();
    let mut s = Scheduler::new(&plan, &RunOptions::default(), None);
    let (_, jobs) = decide(&mut s, &mut t, 1);
    fail(&mut s, jobs[0], true);
    let o = outcomes(s, true);
    assert!(o.values().all(|o| o == "interrupted"), "{o:?}");
}

//! Cache-key behaviour: cosmetic edits keep every fingerprint; a real change invalidates exactly
//! the changed stage and its descendants, and `plan` says why.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burnish_engine::exec::{self, Outcome, RunOptions};
use burnish_engine::lock::LockFile;
use burnish_engine::manifest;
use burnish_engine::plan::{Plan, State};
use burnish_engine::store::Store;

const BASE: &str = "\
pipeline: keys
seed: 7
stages:
  raw:
    kind: src
    path: data/raw.txt
    format: text
  upper:
    kind: map
    data: raw
    factor: 1.5
    lora: {rank: 4, alpha: 8}
  split:
    kind: split
    data: upper
    eval_fraction: 0.25
  side:
    kind: map
    data: raw
";

fn project(dir: &Path, manifest_name: &str, text: &str) {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/raw.txt"), "a\nb\nc\n").unwrap();
    std::fs::write(dir.join(manifest_name), text).unwrap();
}

/// Run a manifest and return each cell's fingerprint.
fn run(path: &Path, cache: &Path) -> BTreeMap<String, String> {
    let reg = common::registry();
    let m = manifest::load(path, &reg).unwrap_or_else(|e| panic!("{}", e.render(80, false)));
    let plan = Plan::build(Arc::new(m), &reg, "cpu").unwrap();
    let cache = Store::open(cache).unwrap();
    let opts = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let report = exec::run(&plan, &cache, &opts, Arc::new(AtomicBool::new(false))).unwrap();
    assert!(report.succeeded(), "{report:?}");
    if let Some(lock) = report.lock_file("keys") {
        lock.write(&plan.manifest.lock_path()).unwrap();
    }
    report
        .cells
        .into_iter()
        .map(|c| (c.name, c.fingerprint.unwrap()))
        .collect()
}

#[test]
fn cosmetic_edits_keep_every_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let a = tmp.path().join("a");
    project(&a, "pipeline.yaml", BASE);
    let base = run(&a.join("pipeline.yaml"), &cache);
    assert_eq!(base.len(), 4);

    let variants = [
        // Comments and blank lines.
        (
            "comments",
            "pipeline.yaml",
            format!(
                "# a comment\n\n{}",
                BASE.replace("factor: 1.5", "factor: 1.5   # tuned")
            ),
        ),
        // Key order within stages and at the top level.
        (
            "order",
            "pipeline.yaml",
            "\
stages:
  side: {data: raw, kind: map}
  split:
    eval_fraction: 0.25
    data: upper
    kind: split
  upper:
    lora: {alpha: 8, rank: 4}
    factor: 1.5
    data: raw
    kind: map
  raw:
    format: text
    path: data/raw.txt
    kind: src
seed: 7
pipeline: keys
"
            .to_owned(),
        ),
        // Flow vs block style, quoting, and a different pipeline name.
        (
            "style",
            "pipeline.yaml",
            "\
pipeline: renamed-pipeline
seed: 7
stages:
  raw: {kind: src, path: \"data/raw.txt\", format: 'text'}
  upper:
    kind: map
    data: raw
    factor: 1.50
    lora:
      rank: 4
      alpha: 8.0
  split: {kind: split, data: upper, eval_fraction: 0.25}
  side: {kind: map, data: raw, factor: 1}
"
            .to_owned(),
        ),
        // The manifest file renamed.
        ("renamed", "experiment-42.yml", BASE.to_owned()),
    ];
    for (what, name, text) in variants {
        let dir = tmp.path().join(what);
        project(&dir, name, &text);
        let fps = run(&dir.join(name), &cache);
        assert_eq!(fps, base, "{what}: fingerprints changed");
    }

    // The whole project moved elsewhere (its own cache moves with it).
    let moved = tmp.path().join("elsewhere/deeper/project");
    project(&moved, "pipeline.yaml", BASE);
    let fps = run(&moved.join("pipeline.yaml"), &moved.join(".burnish"));
    assert_eq!(fps, base, "moving the project changed fingerprints");

    // A stage renamed: its own and its dependents' fingerprints stay (names are not hashed).
    let renamed = tmp.path().join("stage-renamed");
    project(
        &renamed,
        "pipeline.yaml",
        &BASE
            .replace("raw", "source")
            .replace("data/source.txt", "data/raw.txt"),
    );
    let fps = run(&renamed.join("pipeline.yaml"), &cache);
    assert_eq!(fps["source"], base["raw"]);
    assert_eq!(fps["split"], base["split"]);
}

#[test]
fn one_change_invalidates_the_stage_and_its_descendants_and_plan_explains() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    project(&dir, "pipeline.yaml", BASE);
    let path = dir.join("pipeline.yaml");
    let cache_dir = tmp.path().join("cache");
    let before = run(&path, &cache_dir);

    std::fs::write(&path, BASE.replace("factor: 1.5", "factor: 2.5")).unwrap();
    let reg = common::registry();
    let m = manifest::load(&path, &reg).unwrap();
    let plan = Plan::build(Arc::new(m), &reg, "cpu").unwrap();
    let cache = Store::open(&cache_dir).unwrap();
    let lock = LockFile::read(&plan.manifest.lock_path()).unwrap().unwrap();
    let status = plan
        .status(&cache, Some(&lock), &mut cache.file_hasher())
        .unwrap();
    let by: BTreeMap<&str, _> = status.iter().map(|s| (s.stage.as_str(), s)).collect();
    assert_eq!(by["raw"].state, State::Cached);
    assert_eq!(by["side"].state, State::Cached);
    assert_eq!(by["upper"].state, State::Stale);
    assert_eq!(by["upper"].reasons, vec!["`factor` changed 1.5 → 2.5"]);
    assert_eq!(by["split"].state, State::Stale);
    assert_eq!(by["split"].fingerprint, None, "split waits on upper");
    assert_eq!(
        by["split"].reasons,
        vec!["input `upper` will be recomputed"]
    );

    let after = run(&path, &cache_dir);
    let changed: Vec<&str> = after
        .iter()
        .filter(|(k, v)| before[*k] != **v)
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(changed, vec!["split", "upper"]);

    // A data file edit: the source and everything below it.
    std::fs::write(dir.join("data/raw.txt"), "a\nb\nz\n").unwrap();
    let m = manifest::load(&path, &reg).unwrap();
    let plan = Plan::build(Arc::new(m), &reg, "cpu").unwrap();
    let lock = LockFile::read(&plan.manifest.lock_path()).unwrap().unwrap();
    let status = plan
        .status(&cache, Some(&lock), &mut cache.file_hasher())
        .unwrap();
    assert_eq!(status[0].stage, "raw");
    assert_eq!(status[0].reasons, vec!["file in `path` changed"]);
    let third = run(&path, &cache_dir);
    assert!(
        third.iter().all(|(k, v)| after[k] != *v),
        "every stage reads raw"
    );
}

#[test]
fn rerun_is_fully_cached_and_force_reruns_one_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    project(&dir, "pipeline.yaml", BASE);
    let path = dir.join("pipeline.yaml");
    run(&path, &dir.join(".burnish"));

    let reg = common::registry();
    let plan = Plan::build(Arc::new(manifest::load(&path, &reg).unwrap()), &reg, "cpu").unwrap();
    let cache = Store::open(&dir.join(".burnish")).unwrap();
    let opts = RunOptions {
        quiet: true,
        force: vec!["upper".into()],
        ..Default::default()
    };
    let report = exec::run(&plan, &cache, &opts, Arc::new(AtomicBool::new(false))).unwrap();
    let outcomes: BTreeMap<&str, &str> = report
        .cells
        .iter()
        .map(|c| (c.name.as_str(), c.outcome.label()))
        .collect();
    assert_eq!(outcomes["upper"], "ran");
    // Same bytes out of `upper`, so its dependents stay cached (content-addressed inputs).
    assert_eq!(outcomes["split"], "cached");
    assert_eq!(outcomes["raw"], "cached");
    assert!(matches!(report.cells[0].outcome, Outcome::Cached));
}

#[test]
fn matrix_fans_out_downstream_and_joins_diamonds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    project(
        &dir,
        "m.yaml",
        "\
pipeline: m
stages:
  raw: {kind: src, path: data/raw.txt}
  split:
    kind: split
    data: raw
    eval_fraction: 0.1
    matrix: {eval_fraction: [0.1, 0.2]}
  left: {kind: map, data: split.train, matrix: {factor: [1, 2]}}
  right: {kind: map, data: split.eval}
",
    );
    let fps = run(&dir.join("m.yaml"), &dir.join(".burnish"));
    let names: Vec<&str> = fps.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        vec![
            "left[eval_fraction=0.1,factor=1]",
            "left[eval_fraction=0.1,factor=2]",
            "left[eval_fraction=0.2,factor=1]",
            "left[eval_fraction=0.2,factor=2]",
            "raw",
            "right[eval_fraction=0.1]",
            "right[eval_fraction=0.2]",
            "split[eval_fraction=0.1]",
            "split[eval_fraction=0.2]",
        ]
    );
    assert_ne!(
        fps["split[eval_fraction=0.1]"],
        fps["split[eval_fraction=0.2]"]
    );
}

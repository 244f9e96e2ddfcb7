//! Manifest diagnostics, end to end: every malformed manifest in `fixtures/manifests/bad/` must
//! fail to load, and its rendered problems are snapshotted (`tests/snapshots/`); every manifest in
//! `fixtures/manifests/good/` must load. A few targeted assertions keep the tests meaningful even
//! if someone accepts snapshots blindly.
//!
//! Paths are given relative to the package root (cargo runs integration tests there), so no
//! machine path appears in a snapshot. Regenerate with
//! `INSTA_UPDATE=always cargo test --test diagnostics` and read the diff.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;

use burnish_engine::diag::ManifestErrors;
use burnish_engine::manifest::{self, Manifest};

const BAD: &str = "fixtures/manifests/bad";
const GOOD: &str = "fixtures/manifests/good";
const WIDTH: usize = 80;

/// The `*.yaml` files of a fixture folder, sorted, as paths relative to the package root.
/// Files whose name starts with `_` exist only to be extended and are left out.
fn manifests(dir: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && !n.starts_with('_'))
        .map(|n| Path::new(dir).join(n))
        .collect();
    out.sort();
    out
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Fixtures load on a thread with the CLI main thread's 8 MiB of stack, so that one fixture
/// overflowing the stack cannot abort the whole harness; the 2 MiB case is checked on its own in
/// `deep_nesting_fits_a_default_thread_stack`.
const STACK: usize = 8 << 20;

fn load(path: &Path) -> Result<Manifest, ManifestErrors> {
    let path = path.to_path_buf();
    let loader = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || manifest::load(&path, &burnish_stages::registry()))
        .unwrap();
    match loader.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Load a manifest that must fail; `Err` says why it did not (it loaded, or loading panicked).
fn load_bad(path: &Path) -> Result<ManifestErrors, String> {
    match catch_unwind(|| load(path)) {
        Ok(Err(e)) => Ok(e),
        Ok(Ok(m)) => Err(format!(
            "{} loaded without error ({} stages)",
            path.display(),
            m.stages.len()
        )),
        Err(panic) => Err(format!(
            "{} PANICKED while loading: {}",
            path.display(),
            panic_message(&*panic)
        )),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

fn render(path: &Path) -> String {
    let e = load_bad(path).unwrap_or_else(|why| panic!("{why}"));
    e.render(WIDTH, false)
}

#[test]
fn bad_manifests_fail_with_snapshotted_diagnostics() {
    let files = manifests(BAD);
    let mut failures = Vec::new();
    let root = env!("CARGO_MANIFEST_DIR");
    for path in &files {
        let name = stem(path);
        let e = match load_bad(path) {
            Ok(e) => e,
            Err(why) => {
                failures.push(why);
                continue;
            }
        };
        if e.problems.is_empty() {
            failures.push(format!("{}: failed with no problems", path.display()));
        }
        // House style, checked here so that accepting snapshots blindly cannot hide a regression.
        for p in &e.problems {
            let m = &p.message;
            if m.starts_with(|c: char| c.is_ascii_uppercase()) || m.ends_with('.') {
                failures.push(format!(
                    "{}: message not in house style (lowercase, no final period): {m:?}",
                    path.display()
                ));
            }
        }
        let rendered = match catch_unwind(AssertUnwindSafe(|| e.render(WIDTH, false))) {
            Ok(r) => r,
            Err(panic) => {
                failures.push(format!(
                    "{}: rendering PANICKED: {}",
                    path.display(),
                    panic_message(&*panic)
                ));
                continue;
            }
        };
        let n = e.problems.len();
        let summary = format!(
            "error: {} has {n} problem{}\n",
            path.display(),
            if n == 1 { "" } else { "s" }
        );
        if !rendered.ends_with(&summary) || rendered.matches("burnish::manifest::").count() != n {
            failures.push(format!(
                "{}: rendering lacks a code per problem or the summary line",
                path.display()
            ));
        }
        if rendered.contains(root) {
            failures.push(format!(
                "{}: the rendering holds a machine path ({root})",
                path.display()
            ));
        }
        let snap = catch_unwind(AssertUnwindSafe(|| {
            insta::with_settings!({
                description => format!("burnish validate {}", path.display()),
                omit_expression => true,
            }, {
                insta::assert_snapshot!(name.as_str(), rendered);
            });
        }));
        if snap.is_err() {
            failures.push(format!("{}: snapshot differs", path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad manifests failed:\n  {}",
        failures.len(),
        files.len(),
        failures.join("\n  ")
    );
}

#[test]
fn there_are_enough_bad_manifests() {
    let n = manifests(BAD).len();
    assert!(n >= 25, "only {n} bad manifests in {BAD}");
}

/// A snapshot whose fixture was removed or renamed is stale: it would never be checked again.
#[test]
fn every_snapshot_has_its_fixture() {
    let names: Vec<String> = manifests(BAD).iter().map(|p| stem(p)).collect();
    let mut stale = Vec::new();
    for e in std::fs::read_dir("tests/snapshots").unwrap() {
        let file = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(name) = file
            .strip_prefix("diagnostics__")
            .and_then(|f| f.strip_suffix(".snap"))
            && !names.iter().any(|n| n == name)
        {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "snapshots without a fixture in {BAD}: {stale:?}"
    );
}

#[test]
fn good_manifests_load() {
    let files = manifests(GOOD);
    assert!(!files.is_empty(), "no manifests in {GOOD}");
    for path in &files {
        if let Err(e) = load(path) {
            panic!(
                "{} should load but has problems:\n{}",
                path.display(),
                e.render(WIDTH, false)
            );
        }
    }
}

#[test]
fn good_matrix_manifest_extends_its_base() {
    let m = load(Path::new(GOOD).join("matrix.yaml").as_path())
        .unwrap_or_else(|e| panic!("{}", e.render(WIDTH, false)));
    assert_eq!(m.header.pipeline, "alpaca-matrix");
    assert_eq!(m.header.seed, 7, "seed comes from base.yaml");
    let names: Vec<&str> = m.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["alpaca", "clean", "split", "short"]);
    let split = m.stage("split").unwrap();
    assert_eq!(split.matrix.len(), 1);
    assert_eq!(split.matrix[0].field, "eval_fraction");
    assert_eq!(split.matrix[0].values.len(), 2);
}

#[test]
fn unknown_stage_field_suggests_the_right_name() {
    let r = render(&Path::new(BAD).join("unknown_stage_field.yaml"));
    assert!(r.contains("burnish::manifest::unknown_field"), "{r}");
    assert!(r.contains("fromat"), "{r}");
    assert!(r.contains("did you mean `format`"), "{r}");
}

#[test]
fn unknown_top_field_suggests_stages() {
    let r = render(&Path::new(BAD).join("unknown_top_field.yaml"));
    assert!(r.contains("did you mean `stages`"), "{r}");
}

#[test]
fn unknown_reference_suggests_the_stage() {
    let r = render(&Path::new(BAD).join("unknown_reference.yaml"));
    assert!(r.contains("burnish::manifest::unknown_reference"), "{r}");
    assert!(r.contains("did you mean `alpaca`"), "{r}");
}

#[test]
fn multiple_problems_are_all_reported() {
    let path = Path::new(BAD).join("multiple_problems.yaml");
    let e = load_bad(&path).unwrap_or_else(|why| panic!("{why}"));
    let r = e.render(WIDTH, false);
    assert!(e.problems.len() >= 3, "{} problems:\n{r}", e.problems.len());
    assert!(
        r.contains(&format!("has {} problems", e.problems.len())),
        "{r}"
    );
}

fn burnish(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("BURNISH_CACHE")
        .output()
        .expect("run burnish")
}

#[test]
fn validate_exits_2_on_a_bad_manifest_and_0_on_a_good_one() {
    let bad = format!("{BAD}/unknown_stage_field.yaml");
    let out = burnish(&["validate", &bad]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("did you mean `format`"),
        "stderr:\n{stderr}"
    );

    let good = format!("{GOOD}/base.yaml");
    let out = burnish(&["validate", &good]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Good and bad together: still a failure.
    let out = burnish(&["validate", &good, &bad]);
    assert_eq!(out.status.code(), Some(2));
}

/// Nesting up to and past the parser's depth budget must be refused with a diagnostic, never
/// by overflowing the stack, even on a default 2 MiB thread in a debug build (the spanned YAML
/// parse recurses with large frames: with a budget of 64, about 45 levels overflowed).
#[test]
fn deep_nesting_fits_a_default_thread_stack() {
    let dir = tempfile::tempdir().unwrap();
    for depth in [1, 8, 16, 20, 22, 23, 24, 25, 30, 64, 200] {
        let path = dir.path().join(format!("deep{depth}.yaml"));
        let text = format!(
            "pipeline: deep\nstages:\n  a:\n    kind: dataset\n    path: a.jsonl\n    format: alpaca\n    columns: {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        std::fs::write(&path, text).unwrap();
        let e = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || manifest::load(&path, &burnish_stages::registry()).err())
            .unwrap()
            .join()
            .unwrap()
            .unwrap_or_else(|| panic!("depth {depth}: a list where a mapping belongs must fail"));
        assert!(!e.problems.is_empty(), "depth {depth}");
    }
}

/// Every matrix value must pass the kind's range checks, not only the first: today
/// `params.check()` runs on the first cell only, so `[0.1, 1.5]` validates and fails at run time.
/// Ignored until the engine checks every cell; then move this case into `fixtures/manifests/bad/`.
#[test]
fn matrix_values_are_range_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::path::absolute("fixtures/data/alpaca.jsonl").unwrap();
    let path = dir.path().join("m.yaml");
    let text = format!(
        "pipeline: m\nstages:\n  alpaca: {{kind: dataset, path: {}, format: alpaca}}\n  split:\n    kind: data.split\n    data: alpaca\n    eval_fraction: 0.1\n    matrix:\n      eval_fraction: [0.1, 1.5]\n",
        data.display()
    );
    std::fs::write(&path, text).unwrap();
    let e = load_bad(&path).unwrap_or_else(|why| panic!("{why}"));
    let r = e.render(WIDTH, false);
    assert!(
        r.contains("burnish::manifest::out_of_range") && r.contains("1.5"),
        "{r}"
    );
}

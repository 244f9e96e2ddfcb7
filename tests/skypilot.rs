//! `burnish skypilot`: the task written for the committed cloud example carries the stages'
//! resources, the remote and the non-secret store settings, the keys only as `secrets` without
//! values, and mounts for the manifest chain and every local file; SkyPilot's own parser
//! (`sky.Task.from_yaml`, from the `skypilot` package in `$BURNISH_SKYPILOT_PYTHON`) accepts it.
//! Without that Python the parser check skips and says so (`BURNISH_REQUIRE_SKYPILOT=1` fails).

mod common;

use std::path::Path;
use std::process::Command;

use common::{burnish, skip};

const EXAMPLE: &str = "pipelines/cloud/claudesidian-nebius.yaml";

fn write_task(args: &[&str], out: &Path) -> String {
    let mut c = burnish();
    c.args(["skypilot", EXAMPLE, "-o"])
        .arg(out)
        .args(args)
        .env("AWS_ENDPOINT", "https://storage.eu-north1.nebius.cloud")
        .env("AWS_REGION", "eu-north1")
        .env("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
        .env("AWS_SECRET_ACCESS_KEY", "hunter2-secret")
        .env_remove("BURNISH_REMOTE")
        .env_remove("BURNISH_NO_REMOTE");
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(out).unwrap()
}

/// The YAML value of `key:` on its own line (first match), quotes removed.
fn value(task: &str, key: &str) -> String {
    task.lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{task}"))
        .trim_matches('"')
        .to_owned()
}

#[test]
fn the_cloud_example_becomes_a_task() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("task.yaml");
    let task = write_task(&[], &path);
    assert_eq!(value(&task, "name"), "claudesidian-nebius");
    assert_eq!(value(&task, "accelerators"), "H100:1");
    assert_eq!(value(&task, "cpus"), "16+");
    assert_eq!(value(&task, "memory"), "200+");
    assert_eq!(value(&task, "use_spot"), "true");
    assert_eq!(value(&task, "disk_size"), "256");
    assert_eq!(value(&task, "infra"), "nebius");
    assert_eq!(
        value(&task, "BURNISH_REMOTE"),
        "s3://burnish-cache/claudesidian"
    );
    assert_eq!(
        value(&task, "AWS_ENDPOINT"),
        "https://storage.eu-north1.nebius.cloud"
    );
    assert_eq!(value(&task, "AWS_SECRET_ACCESS_KEY"), "null");
    assert_eq!(value(&task, "AWS_ACCESS_KEY_ID"), "null");
    assert!(
        !task.contains("hunter2") && !task.contains("AKIAEXAMPLEKEY"),
        "{task}"
    );
    let root = std::path::absolute(".").unwrap();
    for (dst, src) in [
        ("pipelines/cloud/claudesidian-nebius.yaml", EXAMPLE),
        (
            "pipelines/claudesidian-sft-kto.yaml",
            "pipelines/claudesidian-sft-kto.yaml",
        ),
        (
            "fixtures/data/claudesidian_1k.jsonl",
            "fixtures/data/claudesidian_1k.jsonl",
        ),
        ("fixtures/models/tiny-llama", "fixtures/models/tiny-llama"),
    ] {
        let line = format!(
            "\"~/burnish/project/{dst}\": \"{}\"",
            root.join(src).display()
        );
        assert!(task.contains(&line), "no `{line}` in:\n{task}");
    }
    assert!(
        task.contains(
            "  ~/burnish/bin/burnish run pipelines/cloud/claudesidian-nebius.yaml --backend cuda\n"
        ),
        "{task}"
    );
    sky_parses(&path);

    // One stage: its own resources and `--until`.
    let one = dir.path().join("reference.yaml");
    let task = write_task(&["--stage", "reference"], &one);
    assert_eq!(value(&task, "name"), "claudesidian-nebius-reference");
    assert!(
        !task.contains("use_spot") && !task.contains("disk_size"),
        "{task}"
    );
    assert!(task.contains("--until reference --backend cuda"), "{task}");
    sky_parses(&one);
}

#[test]
fn a_task_needs_a_remote() {
    let o = burnish()
        .args(["skypilot", "pipelines/quickstart.yaml"])
        .env_remove("BURNISH_REMOTE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("needs a remote cache"),
        "{err}"
    );
}

/// `sky.Task.from_yaml` accepts the file and reads back its resources.
fn sky_parses(path: &Path) {
    let Some(py) = std::env::var_os("BURNISH_SKYPILOT_PYTHON") else {
        skip(
            "BURNISH_REQUIRE_SKYPILOT",
            "BURNISH_SKYPILOT_PYTHON names no Python with the `skypilot` package",
        );
        return;
    };
    let script = "import sys, sky\nt = sky.Task.from_yaml(sys.argv[1])\nr = list(t.resources)[0]\nprint(t.name, r.accelerators, r.use_spot, sorted(t.envs), sorted(t.file_mounts or {}))\n";
    let o = Command::new(py)
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "sky.Task.from_yaml refused {}:\n{}\n{}",
        path.display(),
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(path).unwrap()
    );
    assert!(out.contains("{'H100': 1}"), "{out}");
}

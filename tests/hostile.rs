//! The hostile-input corpus (`fixtures/hostile/`, made by its `make.py`): templates that loop,
//! recurse or repeat output without end, a config with absurd dimensions, truncated and lying
//! safetensors, a 200 MiB line, nesting 100,000 deep, a million CSV columns, a non-UTF-8 line, a
//! zip-bomb-like Parquet file, a YAML billion laughs. Each one, given to the binary as a user
//! would, must fail with an error naming the file and the field or line, in under 5 s and under
//! 500 MB of resident memory (the binary reports its peak with `BURNISH_REPORT_PEAK_RSS`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{burnish, fixtures};

const TIME_LIMIT: Duration = Duration::from_secs(5);
const MEMORY_LIMIT_KB: u64 = 500 * 1000;

fn hostile(name: &str) -> PathBuf {
    fixtures().join("hostile").join(name)
}

/// Run `burnish args` in `dir`; assert it fails within the limits and that its output holds
/// every one of `expect`.
fn fails_within_limits(case: &str, args: &[&str], dir: &Path, expect: &[&str]) {
    let t0 = Instant::now();
    let out = burnish()
        .args(args)
        .current_dir(dir)
        .env("BURNISH_REPORT_PEAK_RSS", "1")
        .env("COLUMNS", "1000")
        .output()
        .unwrap();
    let took = t0.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{case}: succeeded:\n{text}");
    assert!(
        out.status.code().is_some(),
        "{case}: killed by a signal:\n{text}"
    );
    assert!(!text.contains("panicked"), "{case}: panicked:\n{text}");
    for e in expect {
        assert!(text.contains(e), "{case}: no `{e}` in:\n{text}");
    }
    let peak: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("peak RSS: ")?
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{case}: no peak RSS line in:\n{text}"));
    assert!(took < TIME_LIMIT, "{case}: took {took:?}");
    assert!(
        peak < MEMORY_LIMIT_KB,
        "{case}: peak resident memory {peak} kB"
    );
    let line = format!(
        "hostile: {case}: {:.2} s, {} MB\n",
        took.as_secs_f64(),
        peak / 1000
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

#[test]
fn hostile_chat_templates_run_out_of_fuel_recursion_or_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-llama");
    let data = fixtures().join("data/chat.jsonl");
    for (file, expect) in [
        (
            "loop.jinja",
            "exceeded the fuel limit of 20000000 instructions",
        ),
        ("recursion.jinja", "recursion"),
        (
            "output.jinja",
            "exceeded the output limit of 67108864 bytes",
        ),
    ] {
        let template = hostile(file);
        fails_within_limits(
            file,
            &[
                "render",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--n",
                "1",
                "--chat-template",
                template.to_str().unwrap(),
            ],
            tmp.path(),
            &[file, expect],
        );
    }
}

/// A pipeline reading `path` as a dataset with `format`.
fn dataset_manifest(dir: &Path, path: &Path, format: &str) -> PathBuf {
    let m = dir.join("pipeline.yaml");
    std::fs::write(
        &m,
        format!(
            "pipeline: hostile\nstages:\n  d: {{kind: dataset, path: '{}', format: {format}}}\n",
            path.display()
        ),
    )
    .unwrap();
    m
}

#[test]
fn hostile_data_files_fail_with_file_and_line_within_limits() {
    for (file, format, expect) in [
        (
            "huge-line.jsonl.gz",
            "text",
            &[
                "huge-line.jsonl.gz:1",
                "the line is longer than 67108864 bytes",
            ][..],
        ),
        (
            "nested.jsonl",
            "text",
            &["nested.jsonl:2", "recursion limit exceeded"],
        ),
        (
            "non-utf8.jsonl",
            "text",
            &["non-utf8.jsonl:2", "invalid utf-8 (byte 0xff at column 14)"],
        ),
        (
            "wide.csv.gz",
            "text",
            &["wide.csv.gz:1", "the header has 1000000 columns"],
        ),
        (
            "bomb.parquet",
            "text",
            &["bomb.parquet", "row group 0", "uncompressed"],
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let m = dataset_manifest(tmp.path(), &hostile(file), format);
        fails_within_limits(
            file,
            &["run", "-q", m.to_str().unwrap()],
            tmp.path(),
            expect,
        );
    }
}

/// A copy of the fixture Llama with `change` applied to it.
fn model_dir(tmp: &Path, change: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("models/tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    change(&dir);
    dir
}

#[test]
fn hostile_checkpoints_fail_naming_the_file_and_field_within_limits() {
    type Change = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(&str, Change, &[&str])> = vec![
        (
            "hidden_size 1e9",
            Box::new(|d: &Path| {
                std::fs::copy(hostile("huge-dims.config.json"), d.join("config.json")).unwrap();
            }),
            &[
                "model.embed_tokens.weight",
                "config.json implies [512, 1000000000]",
            ],
        ),
        (
            "truncated safetensors",
            Box::new(|d: &Path| {
                let p = d.join("model.safetensors");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            }),
            &["model.safetensors"],
        ),
        (
            "lying safetensors header",
            Box::new(|d: &Path| {
                std::fs::copy(
                    hostile("lying-header.safetensors"),
                    d.join("model.safetensors"),
                )
                .unwrap();
            }),
            &[
                "model.safetensors",
                "the header describes 17179869184 bytes of tensor data",
            ],
        ),
        (
            "2^40-byte safetensors header",
            Box::new(|d: &Path| {
                std::fs::copy(
                    hostile("huge-header.safetensors"),
                    d.join("model.safetensors"),
                )
                .unwrap();
            }),
            &["model.safetensors", "header"],
        ),
    ];
    for (case, change, expect) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = model_dir(tmp.path(), change);
        let m = tmp.path().join("pipeline.yaml");
        std::fs::write(
            &m,
            format!(
                "pipeline: hostile\nbackend: cpu\nstages:\n  base: {{kind: model, from: '{}'}}\n  chat: {{kind: dataset, path: '{}', format: chat}}\n  score: {{kind: eval, model: base, data: chat}}\n",
                dir.display(),
                fixtures().join("data/chat.jsonl").display()
            ),
        )
        .unwrap();
        fails_within_limits(
            case,
            &["run", "-q", m.to_str().unwrap()],
            tmp.path(),
            expect,
        );
    }
}

#[test]
fn a_yaml_billion_laughs_is_refused_within_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = hostile("laughs.yaml");
    fails_within_limits(
        "laughs.yaml",
        &["validate", m.to_str().unwrap()],
        tmp.path(),
        &["laughs.yaml:7", "expands to more than 200000 nodes"],
    );
}

#[test]
fn a_model_init_larger_than_memory_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("../pipelines/grpo-math-tiny.yaml"))
        .unwrap()
        .replace("../fixtures", &fixtures().display().to_string())
        .replace("init: {hidden_size: 64,", "init: {hidden_size: 1000000,");
    assert!(text.contains("hidden_size: 1000000,"));
    let m = tmp.path().join("pipeline.yaml");
    std::fs::write(&m, text).unwrap();
    fails_within_limits(
        "init hidden_size 1e6",
        &["run", "-q", "--until", "base", m.to_str().unwrap()],
        tmp.path(),
        &[
            "stage `base` failed",
            "`init`: the model has 8001799000000 parameters",
            "GB of memory available",
        ],
    );
}

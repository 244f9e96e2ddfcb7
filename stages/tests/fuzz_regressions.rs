//! The fuzz targets' harnesses on stable: every input kept under `fuzz/regressions/<target>/`
//! (each once a crash, hang or runaway allocation), and a few inputs made from the fixtures, must
//! come back without a panic within a time limit.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use burnish_stages::data::formats::Format;
use burnish_stages::fuzzing::{Harness, SEPARATOR, TARGETS, dataset_choice};

/// How long one input may take (the fuzzer's `-timeout` is the same).
const LIMIT: Duration = Duration::from_secs(10);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the stages crate is in the workspace")
        .to_path_buf()
}

fn harness(target: &str) -> Harness {
    match TARGETS.iter().find(|(name, _)| *name == target) {
        Some((_, f)) => *f,
        None => panic!("no fuzz target named `{target}`"),
    }
}

/// Run `target` on `input` in a thread of its own; the failure, if it panics or overruns
/// [`LIMIT`].
fn replay(target: &str, input: Vec<u8>) -> Result<(), String> {
    let f = harness(target);
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("fuzz-{target}"))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(|| f(&input));
            let _ = tx.send(outcome.map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "a panic".into())
            }));
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    match rx.recv_timeout(LIMIT) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(panic)) => Err(format!("panicked: {panic}")),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("did not finish in {LIMIT:?}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("its thread died".into()),
    }
}

fn read(rel: &str) -> Vec<u8> {
    let path = root().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Files joined with the separator line, as the multi-file targets take them.
fn joined(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEPARATOR)
}

/// A safetensors file's header alone (what the `checkpoint` target takes after `config.json`).
fn safetensors_header(rel: &str) -> Vec<u8> {
    let bytes = read(rel);
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    bytes[8..8 + n].to_vec()
}

/// A few inputs per target, made from the fixtures.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let llama = "fixtures/models/tiny-llama";
    match target {
        "manifest" => vec![
            read("pipelines/quickstart.yaml"),
            joined(&[
                &read("fixtures/manifests/good/matrix.yaml"),
                &read("fixtures/manifests/good/base.yaml"),
            ]),
            read("fixtures/manifests/bad/multiple_problems.yaml"),
            read("fixtures/manifests/bad/binary_garbage.yaml"),
            b"extends: main.yaml\n".to_vec(),
        ],
        "dataset" => [
            ("alpaca.jsonl", 0, Format::Alpaca),
            ("alpaca.json", 1, Format::Alpaca),
            ("alpaca.csv", 2, Format::Alpaca),
            ("alpaca.parquet", 4, Format::Alpaca),
            ("chat.jsonl", 0, Format::Chat),
            ("sharegpt.jsonl", 0, Format::Sharegpt),
            ("prefs.jsonl", 0, Format::Preference),
            ("kto.jsonl", 0, Format::Kto),
            ("ranking.jsonl", 0, Format::Ranking),
            ("gsm8k.jsonl", 0, Format::Reasoning),
            ("code.jsonl", 0, Format::Text),
            ("hub/rows.tsv", 3, Format::Text),
            ("hub/file.arrow", 5, Format::Text),
            ("hub/rows.jsonl.gz", 6, Format::Text),
        ]
        .into_iter()
        .map(|(file, kind, format)| {
            let mut input = vec![dataset_choice(kind, format)];
            input.extend(read(&format!("fixtures/data/{file}")));
            input
        })
        .collect(),
        "checkpoint" => vec![
            joined(&[
                &read(&format!("{llama}/config.json")),
                &read(&format!("{llama}/model.safetensors")),
            ]),
            joined(&[
                &read("fixtures/models/tiny-qwen2/config.json"),
                &safetensors_header("fixtures/models/tiny-qwen2/model.safetensors"),
            ]),
        ],
        "tokenizer" => vec![
            joined(&[
                &read(&format!("{llama}/tokenizer.json")),
                &read(&format!("{llama}/tokenizer_config.json")),
                "Hello <|im_end|> wörld".as_bytes(),
            ]),
            read("fixtures/models/tiny-qwen2/tokenizer.json"),
        ],
        "chat_template" => {
            let text = read("fixtures/templates/conversations.jsonl");
            let conversations: Vec<&[u8]> = text.split(|&b| b == b'\n').take(5).collect();
            ["llama3", "gemma3_training", "deepseekv3"]
                .iter()
                .zip(&conversations)
                .map(|(t, c)| joined(&[&read(&format!("fixtures/templates/trl/{t}.jinja")), c]))
                .chain([read(&format!("{llama}/chat_template.jinja"))])
                .collect()
        }
        "gguf" => vec![
            read("fixtures/gguf/burnish_written.gguf"),
            read("fixtures/gguf/python_written.gguf"),
        ],
        "lock" => vec![LOCK.as_bytes().to_vec()],
        "record" => vec![RECORD.as_bytes().to_vec(), RUN.as_bytes().to_vec()],
        other => panic!("no seeds for fuzz target `{other}`"),
    }
}

// The seeds fuzz/seed.sh copies for these targets (no fixture holds a lock or a record).
const LOCK: &str = include_str!("../../fuzz/seeds/lock/quickstart.lock");
const RECORD: &str = include_str!("../../fuzz/seeds/record/record.json");
const RUN: &str = include_str!("../../fuzz/seeds/record/run.json");

#[test]
fn every_regression_input_replays() {
    let dir = root().join("fuzz/regressions");
    let mut failures = Vec::new();
    let mut count = 0;
    let Ok(targets) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in targets {
        let entry = entry.expect("a directory entry");
        if !entry.path().is_dir() {
            continue;
        }
        let target = entry.file_name().to_string_lossy().into_owned();
        assert!(
            TARGETS.iter().any(|(name, _)| *name == target),
            "fuzz/regressions/{target} names no fuzz target"
        );
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(entry.path())
            .expect("a readable directory")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        for input in inputs {
            count += 1;
            let bytes = std::fs::read(&input).expect("a readable input");
            if let Err(e) = replay(&target, bytes) {
                failures.push(format!("{target}: {}: {e}", input.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} regression inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_target_runs_its_seeds() {
    let mut failures = Vec::new();
    for (target, _) in TARGETS {
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "no seeds for {target}");
        for (i, input) in seeds.into_iter().enumerate() {
            if let Err(e) = replay(target, input) {
                failures.push(format!("{target}: seed {i}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

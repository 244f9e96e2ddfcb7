//! Test-only stage kinds, registered (hidden from the schema) when `BURNISH_TEST_KINDS` is set.
//! They exercise the engine's contracts: checkpoints in the scratch directory that survive a
//! SIGKILL, one computation under concurrent runs, and large artifacts for the cached-rerun
//! benchmark.

use std::collections::BTreeMap;
use std::io::Write;

use burnish_engine::cache::write_atomic;
use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, Input, OutputDecl, Registry, RunContext, Sensitivity,
    Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub fn register(r: &mut Registry) {
    r.register_hidden::<Steps>();
    r.register_hidden::<Blob>();
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("{0}")]
#[diagnostic(code(burnish::test))]
struct TestError(String);

fn err(e: impl std::fmt::Display) -> StageError {
    Box::new(TestError(e.to_string()))
}

/// `test.steps`: a stage that works in steps and checkpoints after each one.
pub struct Steps;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepsParams {
    /// Number of steps.
    pub steps: u32,
    /// Milliseconds each step sleeps.
    #[serde(default)]
    pub step_ms: u64,
    /// Mixed into the result, so different values give different outputs.
    #[serde(default)]
    pub salt: String,
    /// Upstream artifact folded into the result.
    #[serde(default)]
    pub data: Option<StageRef>,
    /// A file to append one line to each time the stage body starts (not hashed: it is an
    /// observation channel for tests).
    #[serde(default, skip_serializing)]
    pub count_file: Option<String>,
    /// Fail at this step (after checkpointing the previous ones).
    #[serde(default)]
    pub fail_at: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    step: u32,
    acc: String,
}

impl Stage for Steps {
    const KIND: &'static str = "test.steps";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "test-only: checkpointed steps";
    type Params = StepsParams;

    fn inputs(p: &StepsParams) -> Vec<Input> {
        p.data
            .iter()
            .map(|d| Input {
                field: "data".into(),
                reference: d.clone(),
                accepts: Accepts::kinds(&[ArtifactKind::File, ArtifactKind::Dataset]),
            })
            .collect()
    }

    fn outputs(_: &StepsParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::File))]
    }

    fn sensitivity(_: &StepsParams) -> Sensitivity {
        Sensitivity {
            seed: true,
            backend: false,
            names: false,
        }
    }

    fn run(p: &StepsParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        if let Some(f) = &p.count_file {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .map_err(err)?;
            writeln!(file, "{}", cx.stage_name()).map_err(err)?;
        }
        let ckpt_path = cx.scratch_dir().join("checkpoint.json");
        let mut state = match std::fs::read(&ckpt_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(err)?,
            Err(_) => {
                let upstream = match &p.data {
                    Some(_) => cx.input("data")?.digest.clone(),
                    None => String::new(),
                };
                Checkpoint {
                    step: 0,
                    acc: blake3::hash(format!("{}:{}:{upstream}", p.salt, cx.seed()).as_bytes())
                        .to_hex()
                        .to_string(),
                }
            }
        };
        if state.step > 0 {
            cx.log(format!("resumed at step {}", state.step));
        }
        cx.progress().set_total(p.steps as u64);
        while state.step < p.steps {
            if cx.cancelled() {
                return Err(err("cancelled"));
            }
            if p.fail_at == Some(state.step) {
                return Err(err(format!("asked to fail at step {}", state.step)));
            }
            std::thread::sleep(std::time::Duration::from_millis(p.step_ms));
            state.step += 1;
            state.acc = blake3::hash(format!("{}:{}", state.acc, state.step).as_bytes())
                .to_hex()
                .to_string();
            write_atomic(&ckpt_path, &serde_json::to_vec(&state).map_err(err)?).map_err(err)?;
            cx.progress().set_position(state.step as u64);
        }
        let out = cx.output_dir(None)?.join("result.txt");
        std::fs::write(&out, format!("{}\n", state.acc)).map_err(err)?;
        Ok(StageOutcome::default().metric("steps", p.steps))
    }
}

/// `test.blob`: writes `mb` MiB of deterministic bytes (benchmark artifacts).
pub struct Blob;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlobParams {
    pub mb: u32,
    #[serde(default)]
    pub data: Option<StageRef>,
}

impl Stage for Blob {
    const KIND: &'static str = "test.blob";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "test-only: a large artifact";
    type Params = BlobParams;

    fn inputs(p: &BlobParams) -> Vec<Input> {
        p.data
            .iter()
            .map(|d| Input {
                field: "data".into(),
                reference: d.clone(),
                accepts: Accepts::kind(ArtifactKind::File),
            })
            .collect()
    }

    fn outputs(_: &BlobParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::File))]
    }

    fn run(p: &BlobParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let seed = match &p.data {
            Some(_) => cx.input("data")?.digest.clone(),
            None => "root".into(),
        };
        let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
        let path = cx.output_dir(None)?.join("blob.bin");
        let cannot = |e: std::io::Error| err(format!("cannot write {}: {e}", path.display()));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(cannot)?);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..p.mb {
            xof.fill(&mut buf);
            f.write_all(&buf).map_err(cannot)?;
        }
        f.flush().map_err(cannot)?;
        f.get_ref().sync_all().map_err(cannot)?;
        Ok(StageOutcome::default().metric("mb", p.mb))
    }
}

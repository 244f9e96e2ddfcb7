//! Small stage kinds for exercising the engine without the real stages crate.

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, DatasetFamily, FieldProblem, FileInput, Input,
    ManifestPath, OutputDecl, Registry, RunContext, Sensitivity, Stage, StageError, StageOutcome,
    StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("{0}")]
#[diagnostic(code(test::error))]
pub struct E(pub String);

fn err(e: impl std::fmt::Display) -> StageError {
    Box::new(E(e.to_string()))
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register::<Src>()
        .register::<Map>()
        .register::<Split>()
        .register::<Train>();
    r
}

/// `src`: copies a file.
pub struct Src;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SrcParams {
    pub path: ManifestPath,
    #[serde(default)]
    pub format: Format,
}
#[derive(Serialize, Deserialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Text,
    Alpaca,
}
impl Stage for Src {
    const KIND: &'static str = "src";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "copies a file";
    type Params = SrcParams;
    fn inputs(_: &SrcParams) -> Vec<Input> {
        vec![]
    }
    fn files(p: &SrcParams) -> Vec<FileInput> {
        vec![FileInput {
            field: "path".into(),
            path: p.path.clone(),
        }]
    }
    fn outputs(p: &SrcParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        let fam = match p.format {
            Format::Text => DatasetFamily::Text,
            Format::Alpaca => DatasetFamily::Chat,
        };
        vec![OutputDecl::main(ArtifactType::dataset(fam))]
    }
    fn sensitivity(_: &SrcParams) -> Sensitivity {
        Sensitivity::default()
    }
    fn run(_: &SrcParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let text = std::fs::read_to_string(cx.file("path")?).map_err(err)?;
        std::fs::write(cx.output_dir(None)?.join("data.txt"), &text).map_err(err)?;
        Ok(StageOutcome::default().metric("lines", text.lines().count()))
    }
}

/// `map`: uppercases its input `factor` times.
pub struct Map;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MapParams {
    pub data: StageRef,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default)]
    pub lora: Option<Lora>,
}
fn one() -> f64 {
    1.0
}
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    pub rank: u32,
    #[serde(default)]
    pub alpha: Option<f64>,
}
impl Stage for Map {
    const KIND: &'static str = "map";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "transforms a dataset";
    type Params = MapParams;
    fn inputs(p: &MapParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: p.data.clone(),
            accepts: Accepts::any_dataset(),
        }]
    }
    fn outputs(_: &MapParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(inputs["data"])]
    }
    fn check(p: &MapParams) -> Vec<FieldProblem> {
        let mut v = vec![];
        if let Some(l) = &p.lora
            && l.rank < 1
        {
            v.push(FieldProblem::new(
                "lora.rank",
                format!("rank must be at least 1, got {}", l.rank),
            ));
        }
        v
    }
    fn run(p: &MapParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let input = cx.input("data")?;
        let mut s = String::new();
        for f in std::fs::read_dir(&input.dir).map_err(err)? {
            s.push_str(&std::fs::read_to_string(f.map_err(err)?.path()).map_err(err)?);
        }
        let out = format!("{}x{}", s.to_uppercase(), p.factor);
        std::fs::write(cx.output_dir(None)?.join("data.txt"), out).map_err(err)?;
        Ok(StageOutcome::default().metric("factor", p.factor))
    }
}

/// `split`: two named outputs.
pub struct Split;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    pub data: StageRef,
    pub eval_fraction: f64,
}
impl Stage for Split {
    const KIND: &'static str = "split";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "splits";
    type Params = SplitParams;
    fn inputs(p: &SplitParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: p.data.clone(),
            accepts: Accepts::any_dataset(),
        }]
    }
    fn outputs(_: &SplitParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        let t = inputs["data"];
        vec![OutputDecl::named("train", t), OutputDecl::named("eval", t)]
    }
    fn check(p: &SplitParams) -> Vec<FieldProblem> {
        if !(p.eval_fraction > 0.0 && p.eval_fraction < 1.0) {
            vec![FieldProblem::new(
                "eval_fraction",
                format!("must be in (0, 1), got {}", p.eval_fraction),
            )]
        } else {
            vec![]
        }
    }
    fn run(p: &SplitParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        std::fs::write(
            cx.output_dir(Some("train"))?.join("t.txt"),
            format!("train {}", p.eval_fraction),
        )
        .map_err(err)?;
        std::fs::write(
            cx.output_dir(Some("eval"))?.join("e.txt"),
            format!("eval {}", p.eval_fraction),
        )
        .map_err(err)?;
        Ok(StageOutcome::default())
    }
}

/// `train`: needs a model.
pub struct Train;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub model: StageRef,
    pub data: StageRef,
    #[serde(default)]
    pub lr: Option<f64>,
}
impl Stage for Train {
    const KIND: &'static str = "train";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "trains";
    type Params = TrainParams;
    fn inputs(p: &TrainParams) -> Vec<Input> {
        vec![
            Input {
                field: "model".into(),
                reference: p.model.clone(),
                accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
            },
            Input {
                field: "data".into(),
                reference: p.data.clone(),
                accepts: Accepts::datasets(&[DatasetFamily::Chat]),
            },
        ]
    }
    fn outputs(_: &TrainParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::Model))]
    }
    fn run(_: &TrainParams, _: &mut RunContext) -> Result<StageOutcome, StageError> {
        Ok(StageOutcome::default())
    }
}

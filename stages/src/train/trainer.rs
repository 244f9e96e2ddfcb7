//! One `impl Stage` for every trainer.
//!
//! A trainer kind (`train.cpt`, `train.sft`, `train.dpo`, …) is a [`Trainer`]: its name and
//! version, the dataset families its `data` accepts, the inputs, notes and checks of its own
//! fields, and how it runs. [`TrainerStage`] turns it into a stage kind, adding what every
//! trainer shares: the `model`/`data`/`eval_data` inputs, the Model-or-Adapter output, the
//! range checks of the shared fields ([`super::trainer_params!`]) and the training sensitivity
//! (seed and backend enter the fingerprint).

use std::collections::BTreeMap;
use std::marker::PhantomData;

use burnish_engine::stage::{
    Accepts, ArtifactType, DatasetFamily, FieldProblem, FileInput, Input, OutputDecl, RunContext,
    Sensitivity, Stage, StageError, StageOutcome,
};
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{TrainerParams, trainer_check, trainer_inputs, trainer_outputs};

/// A trainer kind; register it as `TrainerStage<Self>`.
pub trait Trainer: 'static {
    /// Kind name as written in manifests.
    const KIND: &'static str;
    /// Implementation version (see [`Stage::VERSION`]).
    const VERSION: u32;
    const ABOUT: &'static str;
    /// The dataset families `data` and `eval_data` accept.
    const DATA: &'static [DatasetFamily];
    type Params: TrainerParams + DeserializeOwned + Serialize + JsonSchema + Send + Sync + 'static;

    /// Inputs beyond `model`, `data` and `eval_data` (a reference model, cached log-probs).
    fn more_inputs(_p: &Self::Params) -> Vec<Input> {
        Vec::new()
    }
    /// Files the trainer reads (a `command` reward's program), hashed into its fingerprint.
    fn files(_p: &Self::Params) -> Vec<FileInput> {
        Vec::new()
    }
    /// What `plan` says about the stage (see [`Stage::notes`]).
    fn notes(_p: &Self::Params, _inputs: &BTreeMap<String, ArtifactType>) -> Vec<String> {
        Vec::new()
    }
    /// Problems with the trainer's own fields; the shared ones are checked already.
    fn check(_p: &Self::Params) -> Vec<FieldProblem> {
        Vec::new()
    }
    fn run(p: &Self::Params, cx: &mut RunContext) -> Result<StageOutcome, StageError>;
}

/// Seed and backend change a trainer's numbers; stage names do not.
const TRAINING: Sensitivity = Sensitivity {
    seed: true,
    backend: true,
    names: false,
};

/// The stage kind of a [`Trainer`].
pub struct TrainerStage<T>(PhantomData<fn() -> T>);

impl<T: Trainer> Stage for TrainerStage<T> {
    const KIND: &'static str = T::KIND;
    const VERSION: u32 = T::VERSION;
    const ABOUT: &'static str = T::ABOUT;
    type Params = T::Params;

    fn inputs(p: &T::Params) -> Vec<Input> {
        let mut v = trainer_inputs(&p.common(), Accepts::datasets(T::DATA));
        v.extend(T::more_inputs(p));
        v
    }
    fn files(p: &T::Params) -> Vec<FileInput> {
        T::files(p)
    }
    fn outputs(p: &T::Params, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        trainer_outputs(&p.common(), inputs)
    }
    fn notes(p: &T::Params, inputs: &BTreeMap<String, ArtifactType>) -> Vec<String> {
        T::notes(p, inputs)
    }
    fn check(p: &T::Params) -> Vec<FieldProblem> {
        let mut v = trainer_check(&p.common());
        v.extend(T::check(p));
        v
    }
    fn sensitivity(_: &T::Params) -> Sensitivity {
        TRAINING
    }
    fn run(p: &T::Params, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        T::run(p, cx)
    }
}

//! The stage kinds: `export.gguf` (a GGUF file for llama.cpp and an Ollama Modelfile) and
//! `export.hf` (a Hugging Face model or PEFT adapter directory).

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, FieldProblem, Input, OutputDecl, RunContext, Sensitivity,
    Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hf::{HfKind, export_hf};
use super::llama::{GgufOptions, Quant};
use super::stream::{StreamProgress, gguf_tensor_count, write_gguf};
use super::vocab::{self, GgufVocab, PRE_TOKENIZERS};
use super::{ExportError, ollama};
use crate::model::checkpoint::Checkpoint;
use crate::text::{ChatTemplate, TemplateChoice, TextTokenizer};

fn model_input(model: &StageRef) -> Vec<Input> {
    vec![Input {
        field: "model".into(),
        reference: model.clone(),
        accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
    }]
}

/// A name safe in file names: ASCII letters, digits, `.`, `_`, `-`; runs of anything else become
/// one `_` (a matrix cell `export[quant=q4_0]` → `export_quant_q4_0`).
pub fn file_safe(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let trimmed = out.trim_matches(|c| c == '_' || c == '.');
    if trimmed.is_empty() {
        "model".into()
    } else {
        trimmed.to_owned()
    }
}

/// `<pipeline>-<stage>-<quant>.gguf`, each part made [`file_safe`].
pub fn gguf_file_name(pipeline: &str, stage: &str, quant: Quant) -> String {
    format!("{}-{}-{quant}.gguf", file_safe(pipeline), file_safe(stage))
}

// ---------------------------------------------------------------------------------------------
// export.gguf

/// Parameters of `export.gguf`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GgufParams {
    /// A Model, or an Adapter (merged into its base first).
    pub model: StageRef,
    /// File type: `f32`, `f16`, `bf16`, `q8_0` (default), `q4_0`, `q4_k`, `q6_k` or `q4_k_m`
    /// (llama.cpp's mix: Q4_K with Q6_K for the output and some attn_v/ffn_down layers).
    #[serde(default)]
    pub quant: Quant,
    /// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`, e.g. `gpt-2`, `llama-bpe`, `qwen2`,
    /// `smollm`); default: recognised from tokenizer.json's pre-tokenizer.
    #[serde(default)]
    pub pre_tokenizer: Option<String>,
    /// Chat template written into the file and the Modelfile: `auto` (the checkpoint's, else
    /// chatml, as train.sft), `checkpoint`, `chatml`, `llama3` or `alpaca`.
    #[serde(default)]
    pub chat_template: TemplateChoice,
}

/// `export.gguf`: a GGUF file (`<pipeline>-<stage>-<quant>.gguf`) llama.cpp, Ollama and candle
/// load, and an Ollama `Modelfile` beside it.
pub struct GgufStage;

impl Stage for GgufStage {
    const KIND: &'static str = "export.gguf";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "Export a model or adapter (merged) as a GGUF file for llama.cpp/Ollama, f32 to q4_k_m";
    type Params = GgufParams;

    fn inputs(p: &GgufParams) -> Vec<Input> {
        model_input(&p.model)
    }
    fn outputs(_: &GgufParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::File))]
    }
    fn check(p: &GgufParams) -> Vec<FieldProblem> {
        let mut v = Vec::new();
        if let Some(pre) = &p.pre_tokenizer
            && !PRE_TOKENIZERS.contains(&pre.as_str())
        {
            let mut problem = FieldProblem::new(
                "pre_tokenizer",
                format!("`{pre}` is not a pre-tokenizer llama.cpp knows"),
            );
            problem = match burnish_engine::diag::suggest(pre, PRE_TOKENIZERS.iter().copied()) {
                Some(s) => problem.help(format!("did you mean `{s}`?")),
                None => problem.help("e.g. `gpt-2`, `llama-bpe`, `qwen2`, `smollm`, `default`"),
            };
            v.push(problem);
        }
        v
    }
    fn sensitivity(_: &GgufParams) -> Sensitivity {
        // The file name holds the pipeline and stage names; the numbers depend on nothing else.
        Sensitivity {
            seed: false,
            backend: false,
            names: true,
        }
    }
    fn run(p: &GgufParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let dir = cx.input("model")?.dir.clone();
        // Headers only: the weights are read tensor by tensor as the file is written.
        let ck = Checkpoint::open(&dir).map_err(ExportError::from)?;
        if ck.adapter().is_some() {
            cx.log(match ck.base_quant {
                Some(q) => format!(
                    "merging the adapter into the {} base it trained on",
                    q.name()
                ),
                None => "merging the adapter into its base".to_owned(),
            });
        }
        let (vocab, template) = gguf_vocab(&ck, p.pre_tokenizer.as_deref(), p.chat_template)?;
        cx.log(format!("chat template: {}", template.name()));
        for note in &vocab.notes {
            cx.log(note);
        }
        if let Some(pre) = &vocab.pre {
            cx.log(format!("tokenizer.ggml.pre = {pre}"));
        }
        let name = format!(
            "{}-{}",
            file_safe(cx.pipeline_name()),
            file_safe(cx.stage_name())
        );
        let file = gguf_file_name(cx.pipeline_name(), cx.stage_name(), p.quant);
        let out = cx.output_dir(None)?.to_path_buf();
        let path = out.join(&file);
        let opts = GgufOptions {
            quant: p.quant,
            name,
        };
        cx.progress().set_total(gguf_tensor_count(&ck) as u64);
        cx.progress().set_message("writing the header");
        let export = write_gguf(&ck, &vocab, &opts, &path, &mut |s| report(cx, s))?;
        let file_bytes = std::fs::metadata(&path)
            .map_err(|e| ExportError::io(&path, e))?
            .len();

        let modelfile = ollama::modelfile(&file, Some(template.source()), vocab.token(vocab.eos));
        let mf = out.join("Modelfile");
        std::fs::write(&mf, modelfile).map_err(|e| ExportError::io(&mf, e))?;

        let bpw = (export.bits_per_weight() * 1000.0).round() / 1000.0;
        Ok(StageOutcome::default()
            .metric("quant", p.quant.name())
            .metric("arch", export.arch)
            .metric("file", file)
            .metric("file_bytes", file_bytes)
            .metric("tensors", export.tensors.len())
            .metric("params", export.params)
            .metric("bits_per_weight", bpw))
    }
}

/// The tokenizer metadata and chat template `export.gguf` writes for the checkpoint `ck`.
pub fn gguf_vocab(
    ck: &Checkpoint,
    pre_tokenizer: Option<&str>,
    chat_template: TemplateChoice,
) -> Result<(GgufVocab, ChatTemplate), ExportError> {
    let tok = TextTokenizer::from_dir(&ck.model_dir)?;
    let template = ChatTemplate::resolve(chat_template, &tok)?;
    let tok_path = ck.model_dir.join(crate::text::tokenizer::TOKENIZER_FILE);
    let tok_json: Value = std::fs::read(&tok_path)
        .map_err(|e| ExportError::io(&tok_path, e))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| ExportError::Tokenizer {
                path: tok_path.display().to_string(),
                message: e.to_string(),
                help: None,
            })
        })?;
    let vocab = vocab::build(
        &tok,
        &tok_json,
        &ck.raw_config,
        ck.config.vocab_size,
        pre_tokenizer,
        Some(template.source().to_owned()),
    )?;
    Ok((vocab, template))
}

/// One tensor written: its line in the log, tensors done / total and MB/s on the progress bar;
/// a cancellation (Ctrl-C) stops the export between tensors.
fn report(cx: &mut RunContext, s: &StreamProgress) -> Result<(), ExportError> {
    let t = s.tensor;
    cx.log(format!(
        "{:<28} {:>14} {:<5} {} bytes",
        t.name,
        format!("{:?}", t.shape),
        t.ty.name(),
        t.bytes
    ));
    let bar = cx.progress();
    bar.set_position(s.done as u64);
    bar.set_message(&format!(
        "{}/{} tensors, {:.0} MB/s",
        s.done,
        s.total,
        s.mb_per_s()
    ));
    if s.done == s.total {
        cx.log(format!(
            "{} tensors, {:.1} MB read in {:.2} s ({:.0} MB/s)",
            s.total,
            s.read_bytes as f64 / 1e6,
            s.seconds,
            s.mb_per_s()
        ));
    }
    if cx.cancelled() {
        return Err(ExportError::Cancelled {
            done: s.done,
            total: s.total,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// export.hf

/// Parameters of `export.hf`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HfParams {
    /// A Model or an Adapter.
    pub model: StageRef,
    /// With an Adapter: fold it into its base and write a full model (by default the adapter
    /// stays a PEFT adapter directory).
    #[serde(default)]
    pub merge: bool,
    /// For a model directory: split the weights into files of at most this size, with
    /// `model.safetensors.index.json`, as transformers' `save_pretrained(max_shard_size=)`
    /// (default "50GB", transformers' own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<crate::model::shard::ShardSize>,
}

/// `export.hf`: a Hugging Face model directory, or a PEFT adapter directory.
pub struct HfStage;

impl Stage for HfStage {
    const KIND: &'static str = "export.hf";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "Export a model (or a PEFT adapter, or an adapter merged) as a Hugging Face directory";
    type Params = HfParams;

    fn inputs(p: &HfParams) -> Vec<Input> {
        model_input(&p.model)
    }
    fn outputs(p: &HfParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        let adapter_in = inputs
            .get("model")
            .is_some_and(|t| t.kind == ArtifactKind::Adapter);
        let kind = if adapter_in && !p.merge {
            ArtifactKind::Adapter
        } else {
            ArtifactKind::Model
        };
        vec![OutputDecl::main(ArtifactType::of(kind))]
    }
    fn sensitivity(_: &HfParams) -> Sensitivity {
        Sensitivity {
            seed: false,
            backend: false,
            names: false,
        }
    }
    fn run(p: &HfParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let dir = cx.input("model")?.dir.clone();
        let out = cx.output_dir(None)?.to_path_buf();
        let max_shard = p
            .max_shard_size
            .as_ref()
            .map_or(crate::model::shard::DEFAULT_SHARD_BYTES, |s| s.bytes());
        let s = export_hf(&dir, p.merge, max_shard, &out)?;
        let mut outcome = StageOutcome::default()
            .metric(
                "format",
                match s.kind {
                    HfKind::Model => "model",
                    HfKind::Adapter => "peft_adapter",
                },
            )
            .metric("params", s.params);
        if s.adapter_params > 0 {
            outcome = outcome.metric("adapter_params", s.adapter_params);
        }
        Ok(outcome)
    }
}

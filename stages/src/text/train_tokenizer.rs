//! `tokenizer.train`: learn a byte-level BPE tokenizer from a text or chat dataset.
//!
//! The artifact is a tokenizer directory like a checkpoint's: `tokenizer.json` (ByteLevel
//! pre-tokenizer without prefix space, ByteLevel decoder, no post-processor, the special tokens
//! first with ids 0..n, then the 256 byte tokens, then the merges) and `tokenizer_config.json`
//! (eos, pad = the first special token, no bos, the chatml template). The same data gives the
//! same bytes, and the same `tokenizer.json` as Python `tokenizers`' `BpeTrainer` with
//! `initial_alphabet=ByteLevel.alphabet()` (the fixture tokenizers are checked against it).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::Path;

use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, DatasetFamily, FieldProblem, Input, OutputDecl,
    RunContext, Sensitivity, Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Model, Tokenizer};

use super::error::TextError;
use super::template::CHATML;
use super::tokenizer::{CONFIG_FILE, TOKENIZER_FILE};
use crate::data::{DETERMINISTIC, empty, load_input, require_family};

/// Number of byte tokens every byte-level vocabulary starts with.
pub const BYTE_TOKENS: usize = 256;

fn default_min_frequency() -> u64 {
    2
}

fn default_special_tokens() -> Vec<String> {
    vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ]
}

fn default_eos_token() -> String {
    "<|im_end|>".into()
}

/// Parameters of `tokenizer.train`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainTokenizerParams {
    /// The dataset to learn from: text records, or chat records (each message's content).
    pub data: StageRef,
    /// Size of the vocabulary: the special tokens, the 256 byte tokens and the merges. At least
    /// 256 + the number of special tokens + 1; training stops earlier when no pair is frequent
    /// enough.
    pub vocab_size: usize,
    /// A pair of tokens is merged only when it occurs at least this often.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    /// Special tokens, given ids 0, 1, … in this order. The first one is the padding token.
    #[serde(default = "default_special_tokens")]
    pub special_tokens: Vec<String>,
    /// The end-of-sequence (end-of-turn) token; one of `special_tokens`.
    #[serde(default = "default_eos_token")]
    pub eos_token: String,
}

/// The `tokenizer.train` stage kind.
pub struct TrainTokenizerStage;

impl Stage for TrainTokenizerStage {
    const KIND: &'static str = "tokenizer.train";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Train a byte-level BPE tokenizer (with a chatml template) on a text or chat dataset";

    type Params = TrainTokenizerParams;

    fn inputs(params: &TrainTokenizerParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: params.data.clone(),
            accepts: Accepts::datasets(&[DatasetFamily::Text, DatasetFamily::Chat]),
        }]
    }

    fn outputs(
        _params: &TrainTokenizerParams,
        _inputs: &BTreeMap<String, ArtifactType>,
    ) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::Tokenizer))]
    }

    fn check(params: &TrainTokenizerParams) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        let n = params.special_tokens.len();
        let min = BYTE_TOKENS + n + 1;
        if params.vocab_size < min {
            problems.push(
                FieldProblem::new(
                    "vocab_size",
                    format!(
                        "vocab_size must be at least {min} (256 byte tokens + {n} special tokens + 1 merge), found {}",
                        params.vocab_size
                    ),
                )
                .help("byte-level BPE starts from all 256 bytes; e.g. 8000 for a small model"),
            );
        }
        let mut seen = HashSet::new();
        for (i, t) in params.special_tokens.iter().enumerate() {
            if t.is_empty() {
                problems.push(FieldProblem::new(
                    format!("special_tokens[{i}]"),
                    "a special token cannot be empty",
                ));
            } else if !seen.insert(t.as_str()) {
                problems.push(FieldProblem::new(
                    format!("special_tokens[{i}]"),
                    format!("special token `{t}` is listed twice"),
                ));
            }
        }
        if !params.special_tokens.contains(&params.eos_token) {
            problems.push(
                FieldProblem::new(
                    "eos_token",
                    format!(
                        "eos_token `{}` is not one of special_tokens",
                        params.eos_token
                    ),
                )
                .help(format!(
                    "special_tokens: {}",
                    params
                        .special_tokens
                        .iter()
                        .map(|t| format!("`{t}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
        }
        problems
    }

    fn sensitivity(_params: &TrainTokenizerParams) -> Sensitivity {
        DETERMINISTIC
    }

    fn run(params: &TrainTokenizerParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let ds = load_input(cx, "data")?;
        require_family("data", &ds, &[DatasetFamily::Text, DatasetFamily::Chat])?;
        let mut texts: Vec<&str> = Vec::new();
        for rec in &ds.records {
            rec.visit_text(&mut |_, _, s| {
                if !s.is_empty() {
                    texts.push(s)
                }
            });
        }
        if texts.is_empty() {
            return Err(empty(
                "tokenizer.train",
                "the dataset holds no text to learn from",
            ));
        }
        cx.progress().set_message("training tokenizer");
        let tokenizer = train_bpe(&texts, params)?;

        let dir = cx.output_dir(None)?;
        write_tokenizer(&tokenizer, params, dir)?;

        let chars: usize = texts.iter().map(|t| t.chars().count()).sum();
        let tokens: usize = tokenizer
            .encode_batch(texts.clone(), false)
            .map_err(|e| TextError::Train {
                message: format!("encoding the training data: {e}"),
            })?
            .iter()
            .map(|e| e.len())
            .sum();
        let merges = match tokenizer.get_model() {
            ModelWrapper::BPE(bpe) => bpe.get_vocab_size() - params.special_tokens.len(),
            _ => 0,
        };
        let merges = merges.saturating_sub(BYTE_TOKENS);
        let tokens_per_char = (tokens as f64 / chars.max(1) as f64 * 1e4).round() / 1e4;
        cx.log(format!(
            "vocab {} ({} merges), {tokens} tokens for {chars} characters",
            tokenizer.get_vocab_size(true),
            merges
        ));
        Ok(StageOutcome::default()
            .metric("vocab_size", tokenizer.get_vocab_size(true))
            .metric("merges", merges)
            .metric("tokens_per_char", tokens_per_char))
    }
}

/// Learn the BPE merges of `texts`.
pub fn train_bpe(texts: &[&str], params: &TrainTokenizerParams) -> Result<Tokenizer, TextError> {
    let specials: Vec<AddedToken> = params
        .special_tokens
        .iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(params.vocab_size)
        .min_frequency(params.min_frequency)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tokenizer = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    // As Python's `pre_tokenizers.ByteLevel(add_prefix_space=False)` and `decoders.ByteLevel()`.
    let pre = ByteLevel::default().add_prefix_space(false);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(pre)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| TextError::Train {
            message: e.to_string(),
        })?;
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}

/// Write `tokenizer.json` and `tokenizer_config.json` into `dir`.
pub fn write_tokenizer(
    tokenizer: &Tokenizer,
    params: &TrainTokenizerParams,
    dir: &Path,
) -> Result<(), TextError> {
    let tok_path = dir.join(TOKENIZER_FILE);
    let mut text = tokenizer.to_string(true).map_err(|e| TextError::Train {
        message: format!("serializing the tokenizer: {e}"),
    })?;
    text.push('\n');
    fs::write(&tok_path, text).map_err(|e| TextError::io("write", &tok_path, e))?;

    let config = tokenizer_config(params);
    let cfg_path = dir.join(CONFIG_FILE);
    let mut bytes = serde_json::to_vec_pretty(&config).map_err(|e| TextError::Train {
        message: format!("serializing the tokenizer config: {e}"),
    })?;
    bytes.push(b'\n');
    fs::write(&cfg_path, bytes).map_err(|e| TextError::io("write", &cfg_path, e))?;
    Ok(())
}

/// transformers' `tokenizer_config.json` for a trained tokenizer (keys sorted).
fn tokenizer_config(params: &TrainTokenizerParams) -> Value {
    let added: BTreeMap<String, Value> = params
        .special_tokens
        .iter()
        .enumerate()
        .map(|(id, t)| {
            (
                id.to_string(),
                json!({
                    "content": t,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                }),
            )
        })
        .collect();
    let config: BTreeMap<&str, Value> = BTreeMap::from([
        ("add_bos_token", json!(false)),
        ("add_eos_token", json!(false)),
        ("added_tokens_decoder", json!(added)),
        ("bos_token", Value::Null),
        ("chat_template", json!(CHATML)),
        ("clean_up_tokenization_spaces", json!(false)),
        ("eos_token", json!(params.eos_token)),
        ("model_max_length", json!(1_000_000_000_000_000_000_u64)),
        ("pad_token", json!(params.special_tokens.first())),
        ("tokenizer_class", json!("PreTrainedTokenizerFast")),
        ("unk_token", Value::Null),
    ]);
    json!(config)
}

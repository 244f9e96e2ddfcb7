//! `tokenizer.train`: learn a byte-level BPE tokenizer from a text or chat dataset.
//!
//! The artifact is a tokenizer directory like a checkpoint's: `tokenizer.json` (the
//! `pre_tokenizer:` pipeline, ByteLevel decoder, no post-processor, the special tokens first with
//! ids 0..n, then the 256 byte tokens, then the merges) and `tokenizer_config.json` (eos, pad =
//! the first special token, no bos, the chatml template). The same data gives the same bytes, and
//! the same `tokenizer.json` as Python `tokenizers`' `BpeTrainer` with
//! `initial_alphabet=ByteLevel.alphabet()` on the same pipeline (the fixture tokenizers, trained
//! with `pre_tokenizer: gpt2`, are checked against it).
//!
//! # Loading the same in transformers
//! A model directory written with this tokenizer (`model` with `init:`, then `export.hf`,
//! `merge`, trainers) is read back with `AutoTokenizer.from_pretrained`, which picks the class
//! from `config.json`'s `model_type` and `tokenizer_config.json`'s `tokenizer_class`:
//! - transformers 4 honours `tokenizer_class: PreTrainedTokenizerFast` for every model type and
//!   loads `tokenizer.json` as it is;
//! - transformers 5 (checked on 5.25) loads `llama` and `mistral` directories as
//!   `TokenizersBackend` (the 5.x name of `PreTrainedTokenizerFast`, `tokenizer.json` as it is),
//!   but `qwen2` is on its list of model types whose Hub `tokenizer_class` it distrusts
//!   (`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` in `tokenization_auto.py`): whatever the config
//!   says, it builds `Qwen2Tokenizer`, which keeps only the vocabulary, merges and added tokens of
//!   `tokenizer.json` and puts its own pipeline around them (NFC, Qwen2's split regex, ByteLevel
//!   without its regex). No key of `tokenizer_config.json` avoids that (an `auto_map` would,
//!   until someone passes `trust_remote_code=True`).
//!
//! So the default pipeline, `pre_tokenizer: qwen2`, *is* that pipeline: transformers rebuilds it
//! identically under `qwen2` and reads it as written under the other types, and the ids are
//! burnish's everywhere. `pre_tokenizer: gpt2` (GPT-2's ByteLevel regex, no normalizer) matches
//! transformers 4 everywhere and transformers 5 for llama and mistral, not for a `qwen2`
//! `config.json` (`model` warns when it initialises one).

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
use tokenizers::normalizers::{NFC, NormalizerWrapper};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior, Tokenizer};

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

/// Qwen2's split regex, as transformers' `Qwen2Tokenizer` (`PRETOKENIZE_REGEX`) and Qwen2's
/// `tokenizer.json` spell it: contractions, a letter run with at most one leading non-letter,
/// single digits, punctuation runs with their newlines, newline runs, spaces.
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How text becomes words before the merges are learned (and applied).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PreTokenizer {
    /// Qwen2's: NFC normalization, a split on Qwen2's regex (contractions, letter runs, single
    /// digits, punctuation runs, newlines, spaces), then ByteLevel without its own regex. It is
    /// the pipeline transformers 5 rebuilds for a `qwen2` checkpoint, so `AutoTokenizer` gives
    /// burnish's ids under every architecture (llama, mistral, qwen2) and transformers version.
    #[default]
    Qwen2,
    /// GPT-2's: ByteLevel with its own regex, no normalizer. transformers 5 replaces it with
    /// Qwen2's pipeline in a `qwen2` checkpoint (other ids there); llama and mistral load it as
    /// it is.
    Gpt2,
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
    /// How text is split before byte-level BPE: `qwen2` (default: what transformers rebuilds for
    /// every architecture, so checkpoints load with the same ids everywhere) or `gpt2`.
    #[serde(default)]
    pub pre_tokenizer: PreTokenizer,
}

/// The `tokenizer.train` stage kind.
pub struct TrainTokenizerStage;

impl Stage for TrainTokenizerStage {
    const KIND: &'static str = "tokenizer.train";
    // 2: `pre_tokenizer:`, Qwen2's pipeline by default.
    const VERSION: u32 = 2;
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
    match params.pre_tokenizer {
        PreTokenizer::Qwen2 => {
            tokenizer.with_normalizer(Some(NormalizerWrapper::NFC(NFC)));
            tokenizer.with_pre_tokenizer(Some(qwen2_pre_tokenizer()?));
        }
        PreTokenizer::Gpt2 => {
            // As Python's `pre_tokenizers.ByteLevel(add_prefix_space=False)`.
            let pre = ByteLevel::default().add_prefix_space(false);
            tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(pre)));
        }
    }
    // As Python's `decoders.ByteLevel()`.
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| TextError::Train {
            message: e.to_string(),
        })?;
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}

/// Qwen2's pre-tokenizer as transformers' `Qwen2Tokenizer` builds it:
/// `Sequence([Split(Regex(..), behavior="isolated"), ByteLevel(add_prefix_space=False,
/// use_regex=False)])` (after `normalizers.NFC()`).
fn qwen2_pre_tokenizer() -> Result<PreTokenizerWrapper, TextError> {
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| TextError::Train {
        message: format!("compiling the qwen2 split regex: {e}"),
    })?;
    let bytes = ByteLevel::default()
        .add_prefix_space(false)
        .use_regex(false);
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(bytes),
    ])))
}

/// Whether transformers 5 tokenizes `tokenizer` as it is in a `qwen2` checkpoint: its
/// `Qwen2Tokenizer` keeps the vocabulary, merges, added tokens and post-processor and replaces the
/// rest with NFC, Qwen2's split and ByteLevel without regex, so that pipeline (and the ByteLevel
/// decoder) must already be the tokenizer's. True for `pre_tokenizer: qwen2` and for Qwen2's own
/// tokenizers.
pub fn survives_qwen2_rebuild(tokenizer: &Tokenizer) -> bool {
    let json = |v: Result<Value, serde_json::Error>| v.ok();
    let Ok(pre) = qwen2_pre_tokenizer() else {
        return false;
    };
    let is_bpe = matches!(tokenizer.get_model(), ModelWrapper::BPE(_));
    let normalizer = tokenizer.get_normalizer().map(serde_json::to_value);
    let decoder = tokenizer.get_decoder().map(serde_json::to_value);
    let ours = tokenizer.get_pre_tokenizer().map(serde_json::to_value);
    is_bpe
        && normalizer.and_then(json) == json(serde_json::to_value(NormalizerWrapper::NFC(NFC)))
        && ours.and_then(json) == json(serde_json::to_value(&pre))
        && decoder.and_then(json)
            == json(serde_json::to_value(DecoderWrapper::ByteLevel(
                ByteLevel::default(),
            )))
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
///
/// `tokenizer_class: PreTrainedTokenizerFast` makes transformers 4 read `tokenizer.json` as it
/// is under any `model_type` rather than build the model type's own class; transformers 5 maps
/// the name to `TokenizersBackend` (as it is) for llama and mistral and ignores it for qwen2
/// (see the module doc). The special tokens are named once each (`added_tokens_decoder` with their ids; `bos`,
/// `unk` explicitly null, so that no class falls back on its own default token).
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

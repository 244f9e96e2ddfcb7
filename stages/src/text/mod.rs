//! Text: tokenizers, chat templates, encoding records into token sequences with loss masks,
//! packing, and the `tokenizer.train` stage kind.
//!
//! - [`TextTokenizer`]: a Hugging Face tokenizer directory (`tokenizer.json`,
//!   `tokenizer_config.json`, `chat_template.jinja`) with its special tokens resolved.
//! - [`ChatTemplate`]: the checkpoint's Jinja chat template or a built-in one ([`TemplateChoice`]),
//!   rendered in a sandboxed minijinja environment.
//! - [`encode_sft`], [`encode_chat`], [`encode_cpt`], [`encode_documents`], [`pack_bfd`],
//!   [`pack_wrapped`]: records → [`Example`]s.
//! - [`TrainTokenizerStage`]: `tokenizer.train`, a byte-level BPE tokenizer learned from a dataset.

pub mod encode;
pub mod error;
pub mod template;
pub mod tokenizer;
pub mod train_tokenizer;

use burnish_engine::stage::Registry;

pub use encode::{
    Conversation, CptPacking, Encoded, Example, MaskRule, encode_chat, encode_chat_from,
    encode_conversation, encode_cpt, encode_documents, encode_sft, pack_bfd, pack_wrapped,
};
pub use error::TextError;
pub use template::{
    ChatTemplate, DEFAULT_DATE, Rendered, TemplateChoice, TemplateDate, TemplateOptions,
    TemplateSpec, TemplateVars,
};
pub use tokenizer::TextTokenizer;
pub use train_tokenizer::{TrainTokenizerParams, TrainTokenizerStage};

/// Register the text stage kinds (`tokenizer.train`).
pub fn register_text(reg: &mut Registry) {
    reg.register::<TrainTokenizerStage>();
}

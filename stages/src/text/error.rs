//! What goes wrong with tokenizers, chat templates and encoding, said with the file and the line.

use std::path::Path;

use miette::Diagnostic;
use thiserror::Error;

/// A tokenizer, chat template or encoding failure.
#[derive(Debug, Error, Diagnostic)]
pub enum TextError {
    #[error("cannot {action} {path}: {source}")]
    #[diagnostic(code(burnish::text::io))]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid tokenizer: {message}")]
    #[diagnostic(
        code(burnish::text::tokenizer_json),
        help(
            "tokenizer.json must be a Hugging Face `tokenizers` file (the fast-tokenizer format), as saved by `tokenizer.save_pretrained`"
        )
    )]
    TokenizerJson { path: String, message: String },

    #[error("{path}: {message}")]
    #[diagnostic(code(burnish::text::tokenizer_config))]
    Config {
        path: String,
        message: String,
        #[help]
        help: Option<String>,
    },

    #[error("{path}: {field} `{token}` is not in the tokenizer's vocabulary")]
    #[diagnostic(
        code(burnish::text::unknown_token),
        help("special tokens named in tokenizer_config.json must be tokens of tokenizer.json")
    )]
    UnknownToken {
        path: String,
        field: &'static str,
        token: String,
    },

    #[error("cannot {action} with the tokenizer from {dir}: {message}")]
    #[diagnostic(code(burnish::text::tokenize))]
    Tokenize {
        action: &'static str,
        dir: String,
        message: String,
    },

    #[error("{dir}: the tokenizer has no chat template")]
    #[diagnostic(
        code(burnish::text::no_template),
        help(
            "neither chat_template.jinja nor tokenizer_config.json's `chat_template` is there; set `chat_template:` to chatml, llama3 or alpaca to use a built-in template"
        )
    )]
    NoTemplate { dir: String },

    #[error("chat template {at}: {message}")]
    #[diagnostic(code(burnish::text::template_syntax))]
    TemplateSyntax { at: String, message: String },

    #[error("chat template {at}: {message}")]
    #[diagnostic(code(burnish::text::template_render))]
    TemplateRender {
        at: String,
        message: String,
        #[help]
        help: Option<String>,
    },

    #[error("chat template {at} raised an exception: {message}")]
    #[diagnostic(
        code(burnish::text::template_raised),
        help("the template rejected the conversation (raise_exception); check the record's roles")
    )]
    TemplateRaised { at: String, message: String },

    #[error(
        "chat template {template}: rendering messages 0..{upto} {what} is not a prefix of the whole conversation, so the assistant turn at message {index} cannot be located"
    )]
    #[diagnostic(
        code(burnish::text::template_prefix),
        help(
            "the template renders earlier turns differently once later ones follow (e.g. it strips reasoning); choose a built-in template with `chat_template: chatml`"
        )
    )]
    TemplatePrefix {
        template: String,
        index: usize,
        upto: usize,
        what: &'static str,
    },

    #[error("seq_len must be at least 2, found {seq_len}")]
    #[diagnostic(code(burnish::text::seq_len))]
    SeqLen { seq_len: usize },

    #[error("record {index}: {error}")]
    #[diagnostic(code(burnish::text::record))]
    Record {
        index: usize,
        error: Box<TextError>,
        #[help]
        help: Option<String>,
    },

    #[error("training the tokenizer failed: {message}")]
    #[diagnostic(code(burnish::text::train))]
    Train { message: String },
}

impl TextError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        TextError::Io {
            action,
            path: path.display().to_string(),
            source,
        }
    }

    /// This error, said of record `index` (1-based, as a line number is) of a dataset, keeping
    /// its help.
    pub fn in_record(self, index: usize) -> Self {
        let help = self.help().map(|h| h.to_string());
        TextError::Record {
            index,
            error: Box::new(self),
            help,
        }
    }
}

//! `burnish generate MODEL_DIR --prompt TEXT`: completions from any model directory.

use std::path::PathBuf;
use std::process::ExitCode;

use burnish_stages::generate::Sampling;
use burnish_stages::generate::quick::{self, Quick};
use burnish_stages::text::TemplateChoice;
use miette::{IntoDiagnostic, Result};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A model directory: a checkpoint, or a stage's Model or Adapter output
    model: PathBuf,
    /// The prompt
    #[arg(long)]
    prompt: String,
    /// Render the prompt as a user turn with this chat template (auto, checkpoint, chatml,
    /// llama3, alpaca); without it the raw text is continued
    #[arg(long, value_name = "TEMPLATE")]
    chat_template: Option<String>,
    /// New tokens at most
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Completions to draw (with --do-sample)
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Sample instead of greedy decoding
    #[arg(long)]
    do_sample: bool,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// 0 keeps every token
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// A string that ends a completion (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, wgpu or cuda
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Print {"completions": [{"text", "token_ids", "finish_reason"}]}
    #[arg(long)]
    json: bool,
}

pub fn generate(args: &GenerateArgs) -> Result<ExitCode> {
    let chat_template = match &args.chat_template {
        Some(name) => Some(
            serde_json::from_value::<TemplateChoice>(serde_json::Value::String(name.clone()))
                .map_err(|_| {
                    miette::miette!(
                        "--chat-template: unknown template `{name}` (auto, checkpoint, chatml, llama3, alpaca)"
                    )
                })?,
        ),
        None => None,
    };
    let q = Quick {
        prompt: args.prompt.clone(),
        chat_template,
        sampling: Sampling {
            do_sample: args.do_sample,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
        },
        max_new_tokens: args.max_new_tokens,
        n: args.n,
        seed: args.seed,
        stop: args.stop.clone(),
        backend: args.backend.clone(),
    };
    let done = quick::run(&args.model, &q)?;
    if args.json {
        let out = serde_json::json!({ "completions": done });
        println!("{}", serde_json::to_string_pretty(&out).into_diagnostic()?);
    } else {
        for (i, c) in done.iter().enumerate() {
            if done.len() > 1 {
                println!("--- completion {} ({:?}) ---", i + 1, c.finish_reason);
            }
            // Raw text is shown continued; a chat reply on its own.
            match args.chat_template {
                Some(_) => println!("{}", c.text),
                None => println!("{}{}", args.prompt, c.text),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

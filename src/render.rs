//! `burnish render MODEL_DIR --data FILE`: each example as SFT sees it, its target tokens marked,
//! so a template and its masks can be checked before a run (Axolotl's `preprocess --debug`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use burnish_engine::stage::DatasetFamily;
use burnish_stages::data::formats::{Format, normalize};
use burnish_stages::data::records::Record;
use burnish_stages::data::resolve_hf;
use burnish_stages::data::source::read_rows;
use burnish_stages::text::{
    ChatTemplate, Conversation, Example, MaskRule, TemplateChoice, TextTokenizer,
    encode_conversation,
};
use miette::{IntoDiagnostic, Result, miette};

#[derive(clap::Args)]
pub struct RenderArgs {
    /// A model directory (a checkpoint, or a stage's Model output): its tokenizer and template
    model: PathBuf,
    /// A data file (JSONL, JSON, CSV, Parquet, …) or an hf:// path in the local hub cache
    #[arg(long, value_name = "FILE")]
    data: String,
    /// How its rows are laid out: chat, sharegpt, alpaca, prompt_completion
    #[arg(long, default_value = "chat")]
    format: String,
    /// A canonical field read from another column (`messages=conversations`); repeatable
    #[arg(long = "column", value_name = "FIELD=COLUMN")]
    columns: Vec<String>,
    /// Examples to show, from the first record
    #[arg(long, default_value_t = 3)]
    n: usize,
    /// auto, checkpoint, chatml, llama3, alpaca, plain, or a .jinja file
    #[arg(long, value_name = "TEMPLATE", default_value = "auto")]
    chat_template: String,
    /// Train on every token, as `train_on_prompt: true` does
    #[arg(long)]
    train_on_prompt: bool,
    /// Print {"examples": [{"record", "text", "ids", "targets"}]} (`{"record", "error"}` for a
    /// record the template cannot render)
    #[arg(long)]
    json: bool,
}

pub fn render(args: &RenderArgs) -> Result<ExitCode> {
    let tok = TextTokenizer::from_dir(&args.model)?;
    let template = template(&args.chat_template, &tok)?;
    let format: Format = serde_json::from_value(serde_json::Value::String(args.format.clone()))
        .map_err(|_| miette!("--format: unknown format `{}`", args.format))?;
    if format.family() != DatasetFamily::Chat {
        return Err(miette!(
            "--format {}: render shows chat datasets (chat, sharegpt, alpaca, prompt_completion), \
             and a {} dataset is not one",
            args.format,
            format.name()
        ));
    }
    let columns = columns(&args.columns)?;
    let path = match args.data.strip_prefix("hf://") {
        Some(_) => resolve_hf(&args.data)?,
        None => PathBuf::from(&args.data),
    };
    let mut rows = read_rows(&path)?;
    rows.truncate(args.n);
    let records = normalize(format, &columns, &rows)?;
    let rule = MaskRule::of(&template, args.train_on_prompt);
    let mut shown = Vec::new();
    for (row, rec) in rows.iter().zip(&records) {
        let Record::Chat(rec) = rec else { continue };
        let ex = encode_conversation(
            &tok,
            &template,
            Conversation::of(rec),
            args.train_on_prompt,
            0,
        );
        shown.push((row.at.to_string(), ex));
    }
    // A record the template cannot render is shown with its error, and the exit code is 1.
    let code = if shown.iter().any(|(_, ex)| ex.is_err()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    };
    if args.json {
        let examples: Vec<serde_json::Value> = shown
            .iter()
            .map(|(at, ex)| match ex {
                Ok(ex) => Ok(serde_json::json!({
                    "record": at,
                    "text": tok.decode(&ex.ids)?,
                    "ids": ex.ids,
                    "targets": ex.targets,
                })),
                Err(e) => Ok(serde_json::json!({"record": at, "error": e.to_string()})),
            })
            .collect::<Result<_, burnish_stages::text::TextError>>()?;
        let out = serde_json::json!({ "examples": examples });
        println!("{}", serde_json::to_string_pretty(&out).into_diagnostic()?);
        return Ok(code);
    }
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    println!(
        "template: {} ({}); targets: {}",
        template.name(),
        template.origin(),
        rule.describe()
    );
    if !color {
        println!("target tokens are shown between [[ and ]]");
    }
    for (at, ex) in &shown {
        let ex = match ex {
            Ok(ex) => ex,
            Err(e) => {
                println!("\n--- {at}: not rendered ---\n{e}");
                continue;
            }
        };
        println!(
            "\n--- {at}: {} tokens, {} targets ---",
            ex.len(),
            ex.target_count()
        );
        println!("{}", marked(&tok, ex, color)?);
    }
    Ok(code)
}

/// The template `--chat-template` names: a built-in choice, or a file.
fn template(name: &str, tok: &TextTokenizer) -> Result<ChatTemplate> {
    match serde_json::from_value::<TemplateChoice>(serde_json::Value::String(name.to_owned())) {
        Ok(choice) => Ok(ChatTemplate::resolve(choice, tok)?),
        Err(_) if std::path::Path::new(name).is_file() => {
            Ok(ChatTemplate::from_file("file", std::path::Path::new(name))?)
        }
        Err(_) => Err(miette!(
            "--chat-template: `{name}` is neither a template name (auto, checkpoint, chatml, \
             llama3, alpaca, plain) nor a file"
        )),
    }
}

/// `--column field=column` pairs.
fn columns(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((field, column)) if !field.is_empty() && !column.is_empty() => {
                Ok((field.to_owned(), column.to_owned()))
            }
            _ => Err(miette!("--column `{p}`: expected FIELD=COLUMN")),
        })
        .collect()
}

/// The example's text, its target runs marked (green, or between `[[` and `]]`).
fn marked(tok: &TextTokenizer, ex: &Example, color: bool) -> Result<String> {
    let (open, close) = if color {
        ("\x1b[32m", "\x1b[0m")
    } else {
        ("[[", "]]")
    };
    let mut out = String::new();
    let mut start = 0;
    while start < ex.len() {
        let target = ex.targets[start];
        let end = (start..ex.len())
            .find(|&i| ex.targets[i] != target)
            .unwrap_or(ex.len());
        let text = tok.decode(&ex.ids[start..end])?;
        if target {
            out.push_str(open);
            out.push_str(&text);
            out.push_str(close);
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}

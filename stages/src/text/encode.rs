//! Records → token sequences with loss masks: chat/instruction data for supervised fine-tuning
//! ([`encode_sft`]), raw text for continued pretraining ([`encode_cpt`]), and packing ([`pack`]).
//!
//! Masking works for any template: the whole conversation is rendered once; the assistant turn
//! at message `i` starts where the rendering of `messages[..i]` with the generation prompt ends,
//! and ends where the rendering of `messages[..=i]` ends (trailing whitespace trimmed), so the
//! turn's content and its end-of-turn token are targets while the template's scaffolding and
//! the newline after the end-of-turn token are not. A token is a target when its byte span starts
//! inside an assistant turn: a token that straddles the end of a turn (an end-of-turn marker the
//! tokenizer does not know as a special token, merged with the next turn's first characters) is
//! still learned, so the model learns to end its turn.

use std::ops::Range;

use super::error::TextError;
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;
use crate::data::records::{ChatRecord, Message, Role, TextRecord};

/// One training sequence. `targets[i]` is true when token `i` is a loss target (predicted from
/// `ids[..i]`); `targets[0]` is always false.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
    /// Where each document after the first starts, increasing, each in `1..len`: empty when the
    /// example is one document. Attention stays inside a document and positions restart at its
    /// start; the first token of a document is never a target.
    pub doc_starts: Vec<usize>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of target tokens.
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }

    /// The target token ids, in order.
    pub fn target_ids(&self) -> Vec<u32> {
        self.ids
            .iter()
            .zip(&self.targets)
            .filter(|(_, t)| **t)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Encoded records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub examples: Vec<Example>,
    /// Records cut to `seq_len`, plus records dropped because no target was left (each record
    /// counted once).
    pub truncated: usize,
    /// Tokens over all examples.
    pub tokens: usize,
    /// Target tokens over all examples.
    pub target_tokens: usize,
}

impl Encoded {
    fn new(examples: Vec<Example>, truncated: usize) -> Self {
        let tokens = examples.iter().map(Example::len).sum();
        let target_tokens = examples.iter().map(Example::target_count).sum();
        Encoded {
            examples,
            truncated,
            tokens,
            target_tokens,
        }
    }
}

fn check_seq_len(seq_len: usize) -> Result<(), TextError> {
    if seq_len < 2 {
        return Err(TextError::SeqLen { seq_len });
    }
    Ok(())
}

/// The byte ranges of the rendered conversation that are assistant turns (content and
/// end-of-turn token).
fn assistant_spans(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    full: &str,
) -> Result<Vec<Range<usize>>, TextError> {
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let mismatch = |upto: usize, what: &'static str| TextError::TemplatePrefix {
            template: template.origin().to_owned(),
            index: i,
            upto,
            what,
        };
        let before = template.render(&messages[..i], true, tok)?;
        if !full.starts_with(&before) {
            return Err(mismatch(i, "with the generation prompt"));
        }
        let through = template.render(&messages[..=i], false, tok)?;
        let through = through.trim_end();
        if !full.starts_with(through) {
            return Err(mismatch(i + 1, "(trailing whitespace trimmed)"));
        }
        if through.len() < before.len() {
            return Err(mismatch(i + 1, "ends before the generation prompt and"));
        }
        spans.push(before.len()..through.len());
    }
    Ok(spans)
}

/// One conversation → one example. Prompt tokens (system, user and tool messages, and the
/// template's scaffolding such as `<|im_start|>assistant\n`) are masked unless
/// `train_on_prompt`; each assistant message's content and end-of-turn token are targets. With
/// `train_on_prompt` every token but the first is a target.
///
/// When the tokenizer adds a bos token (`add_bos`) and the rendering does not start with it, it
/// is put first (not a target).
pub fn encode_chat(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    train_on_prompt: bool,
) -> Result<Example, TextError> {
    let full = template.render(messages, false, tok)?;
    let spans = if train_on_prompt {
        Vec::new()
    } else {
        assistant_spans(tok, template, messages, &full)?
    };
    let (mut ids, offsets) = tok.encode_with_offsets(&full)?;
    let mut inside: Vec<bool> = offsets
        .iter()
        .map(|&(start, _)| spans.iter().any(|sp| sp.contains(&start)))
        .collect();
    if tok.add_bos()
        && let Some((_, bos)) = tok.bos()
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
        inside.insert(0, false);
    }
    let targets = inside
        .iter()
        .enumerate()
        .map(|(i, &t)| i > 0 && (train_on_prompt || t))
        .collect();
    Ok(Example {
        ids,
        targets,
        doc_starts: Vec::new(),
    })
}

/// Chat records (alpaca, prompt/completion, chat and sharegpt datasets all load as
/// [`ChatRecord`]) → examples, one per record, cut to `seq_len` tokens. A record whose example
/// has no target left (cut before its first assistant turn, or without one) is dropped; both
/// count in `truncated`. With `pack`, the examples are then concatenated in order and cut into
/// blocks of exactly `seq_len` tokens (the last one shorter); a block's first token is never a
/// target, and blocks without targets are dropped.
pub fn encode_sft(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    records: &[ChatRecord],
    seq_len: usize,
    train_on_prompt: bool,
    pack: bool,
) -> Result<Encoded, TextError> {
    check_seq_len(seq_len)?;
    let mut examples = Vec::with_capacity(records.len());
    let mut truncated = 0;
    for (index, rec) in records.iter().enumerate() {
        let mut ex = encode_chat(tok, template, &rec.messages, train_on_prompt)
            .map_err(|e| e.in_record(index))?;
        let cut = ex.ids.len() > seq_len;
        if cut {
            ex.ids.truncate(seq_len);
            ex.targets.truncate(seq_len);
        }
        if ex.target_count() == 0 || cut {
            truncated += 1;
        }
        if ex.target_count() > 0 {
            examples.push(ex);
        }
    }
    if pack {
        examples = self::pack(examples, seq_len);
    }
    Ok(Encoded::new(examples, truncated))
}

/// Concatenate examples in order and cut the stream into blocks of exactly `seq_len` tokens
/// (the last block shorter). Each block's first token is not a target; blocks left without
/// targets are dropped. A `seq_len` of 0 returns the examples unchanged.
pub fn pack(examples: Vec<Example>, seq_len: usize) -> Vec<Example> {
    if seq_len == 0 {
        return examples;
    }
    let total: usize = examples.iter().map(Example::len).sum();
    let mut blocks = Vec::with_capacity(total.div_ceil(seq_len));
    let mut cur = Example::default();
    for ex in examples {
        for (id, target) in ex.ids.into_iter().zip(ex.targets) {
            cur.ids.push(id);
            cur.targets.push(target);
            if cur.ids.len() == seq_len {
                blocks.push(std::mem::take(&mut cur));
            }
        }
    }
    if !cur.ids.is_empty() {
        blocks.push(cur);
    }
    for b in &mut blocks {
        b.targets[0] = false;
    }
    blocks.retain(|b| b.target_count() > 0);
    blocks
}

/// Raw text for continued pretraining: each non-empty text encoded (after the bos token when
/// the tokenizer adds one), followed by eos when the tokenizer has one, all concatenated and cut
/// into blocks of `seq_len` tokens (a final partial block is kept when it has at least 2
/// tokens). Every token but each block's first is a target.
pub fn encode_cpt(
    tok: &TextTokenizer,
    records: &[TextRecord],
    seq_len: usize,
) -> Result<Encoded, TextError> {
    check_seq_len(seq_len)?;
    let texts: Vec<&str> = records
        .iter()
        .map(|r| r.text.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let encoded = tok.encode_batch(&texts)?;
    let bos = if tok.add_bos() {
        tok.bos().map(|(_, id)| id)
    } else {
        None
    };
    let eos = tok.eos().map(|(_, id)| id);
    let mut stream = Vec::with_capacity(encoded.iter().map(|e| e.len() + 2).sum());
    for ids in encoded {
        stream.extend(bos);
        stream.extend(ids);
        stream.extend(eos);
    }
    let examples = stream
        .chunks(seq_len)
        .filter(|c| c.len() >= 2)
        .map(|c| Example {
            ids: c.to_vec(),
            targets: (0..c.len()).map(|i| i > 0).collect(),
            doc_starts: Vec::new(),
        })
        .collect();
    Ok(Encoded::new(examples, 0))
}

//! Records → token sequences with loss masks: chat/instruction data for supervised fine-tuning
//! ([`encode_sft`]), raw text for continued pretraining ([`encode_cpt`]) and for scoring it one
//! document at a time ([`encode_documents`]), and packing ([`pack_bfd`], [`pack_wrapped`]).
//!
//! **Packing.** A packed example holds several documents back to back and says where each one
//! starts ([`Example::doc_starts`]): the model then restarts positions at each start and lets a
//! token attend only to the earlier tokens of its own document, so a packed document is scored
//! as it would be alone (what transformers calls padding-free packing with `position_ids`).
//! [`pack_wrapped`] instead cuts one long stream into blocks that are each one sequence.
//!
//! Masking works for any template: the whole conversation is rendered once; the assistant turn
//! at message `i` starts where the rendering of `messages[..i]` with the generation prompt ends,
//! and ends where the rendering of `messages[..=i]` ends (trailing whitespace trimmed), so the
//! turn's content and its end-of-turn token are targets while the template's scaffolding and
//! the newline after the end-of-turn token are not. A token is a target when its byte span starts
//! inside an assistant turn: a token that straddles the end of a turn (an end-of-turn marker the
//! tokenizer does not know as a special token, merged with the next turn's first characters) is
//! still learned, so the model learns to end its turn.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
/// end-of-turn token), found by rendering prefixes of the conversation.
fn assistant_spans(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    conv: Conversation<'_>,
    first: usize,
    full: &str,
) -> Result<Vec<Range<usize>>, TextError> {
    let messages = conv.messages;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if !m.is_target() || i < first {
            continue;
        }
        let mismatch = |upto: usize, what: &'static str| TextError::TemplatePrefix {
            template: template.origin().to_owned(),
            index: i,
            upto,
            what,
        };
        let before = template
            .render_spans(&messages[..i], conv.tools, true, tok)?
            .text;
        if !full.starts_with(&before) {
            return Err(mismatch(i, "with the generation prompt"));
        }
        let through = template
            .render_spans(&messages[..=i], conv.tools, false, tok)?
            .text;
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

/// The `{% generation %}` spans that are targets: all of them, unless some assistant turns are
/// context (before `first`, or `weight: 0`); then the template must mark one span per assistant
/// turn, so the n-th span is the n-th assistant turn's.
fn generation_targets(
    template: &ChatTemplate,
    messages: &[Message],
    first: usize,
    spans: Vec<Range<usize>>,
) -> Result<Vec<Range<usize>>, TextError> {
    let assistant: Vec<(usize, &Message)> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == Role::Assistant)
        .collect();
    if assistant.iter().all(|(i, m)| m.is_target() && *i >= first) {
        return Ok(spans);
    }
    if assistant.len() != spans.len() {
        return Err(TextError::TemplateRender {
            at: template.origin().to_owned(),
            message: format!(
                "the template marks {} {{% generation %}} spans for {} assistant turns, so the turns that are context (weight 0, or the prompt's) cannot be told apart",
                spans.len(),
                assistant.len()
            ),
            help: Some("drop the `weight` keys, or use a template without {% generation %}".into()),
        });
    }
    Ok(spans
        .into_iter()
        .zip(assistant)
        .filter(|(_, (i, m))| m.is_target() && *i >= first)
        .map(|(sp, _)| sp)
        .collect())
}

/// A conversation and the tools it may call.
#[derive(Clone, Copy, Debug)]
pub struct Conversation<'a> {
    pub messages: &'a [Message],
    /// The record's tools (empty: the manifest's, if any).
    pub tools: &'a [serde_json::Value],
}

impl<'a> Conversation<'a> {
    pub fn new(messages: &'a [Message]) -> Self {
        Conversation {
            messages,
            tools: &[],
        }
    }

    pub fn of(rec: &'a ChatRecord) -> Self {
        Conversation {
            messages: &rec.messages,
            tools: &rec.tools,
        }
    }
}

/// Which tokens of a conversation are SFT targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskRule {
    /// Every token but the first (`train_on_prompt`).
    Everything,
    /// The template's `{% generation %}` spans (TRL's `assistant_only_loss`).
    Generation,
    /// Each assistant turn, located by rendering the conversation's prefixes.
    AssistantTurns,
}

impl MaskRule {
    /// The rule `template` gives.
    pub fn of(template: &ChatTemplate, train_on_prompt: bool) -> Self {
        if train_on_prompt {
            MaskRule::Everything
        } else if template.has_generation() {
            MaskRule::Generation
        } else {
            MaskRule::AssistantTurns
        }
    }

    /// How a log line says it.
    pub fn describe(self) -> &'static str {
        match self {
            MaskRule::Everything => "every token (train_on_prompt)",
            MaskRule::Generation => "the template's {% generation %} spans",
            MaskRule::AssistantTurns => "assistant turns (found by rendering prefixes)",
        }
    }
}

/// One conversation → one example. Prompt tokens (system, user and tool messages, and the
/// template's scaffolding such as `<|im_start|>assistant\n`) are masked unless
/// `train_on_prompt`; each assistant message's content and end-of-turn token are targets
/// (unless its `weight` is 0). A template with `{% generation %}` blocks says itself what the
/// targets are: exactly its spans. With `train_on_prompt` every token but the first is a target.
///
/// When the tokenizer adds a bos token (`add_bos`) and the rendering does not start with it, it
/// is put first (not a target).
pub fn encode_chat(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    train_on_prompt: bool,
) -> Result<Example, TextError> {
    encode_conversation(
        tok,
        template,
        Conversation::new(messages),
        train_on_prompt,
        0,
    )
}

/// [`encode_chat`] with only the assistant messages from index `first` on as targets: a
/// preference completion after a prompt that holds earlier assistant turns (those are context,
/// as TRL scores the completion alone).
pub fn encode_chat_from(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    train_on_prompt: bool,
    first: usize,
) -> Result<Example, TextError> {
    encode_conversation(
        tok,
        template,
        Conversation::new(messages),
        train_on_prompt,
        first,
    )
}

/// [`encode_chat_from`] of a conversation with its tools.
pub fn encode_conversation(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    conv: Conversation<'_>,
    train_on_prompt: bool,
    first: usize,
) -> Result<Example, TextError> {
    let rendered = template.render_spans(conv.messages, conv.tools, false, tok)?;
    let full = rendered.text;
    let rule = MaskRule::of(template, train_on_prompt);
    let spans = match rule {
        MaskRule::Everything => Vec::new(),
        MaskRule::Generation => {
            generation_targets(template, conv.messages, first, rendered.generation)?
        }
        MaskRule::AssistantTurns => assistant_spans(tok, template, conv, first, &full)?,
    };
    let (mut ids, offsets) = tok.encode_with_offsets(&full)?;
    // A generation span takes every token overlapping it (transformers' assistant_masks); an
    // assistant turn, the tokens starting inside it.
    let mut inside: Vec<bool> = offsets
        .iter()
        .map(|&(start, end)| match rule {
            MaskRule::Generation => spans.iter().any(|sp| end > sp.start && start < sp.end),
            _ => spans.iter().any(|sp| sp.contains(&start)),
        })
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
/// count in `truncated`. With `pack`, the examples are then packed into rows of at most
/// `seq_len` tokens by best-fit decreasing ([`pack_bfd`]), each example whole and its own
/// document.
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
        let mut ex = encode_conversation(tok, template, Conversation::of(rec), train_on_prompt, 0)
            .map_err(|e| e.in_record(index + 1))?;
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
        examples = pack_bfd(examples, seq_len);
    }
    Ok(Encoded::new(examples, truncated))
}

/// Best-fit-decreasing packing, TRL's `pack_dataset(..., strategy="bfd")` (`_pack_bfd`): the
/// examples, longest first (a stable sort: equal lengths keep their order), each go into the
/// open row with the least room that still holds it, or start a new row; among rows with the
/// same room, the one that got that room first. Rows come out in the order they were started,
/// their documents in the order they were put in; each example becomes one document
/// ([`Example::doc_starts`]) and is never split. An example longer than `seq_len` is cut to it
/// (callers cut and count them before). Empty examples are dropped; a `seq_len` of 0 returns
/// the examples unchanged.
///
/// TRL packs within each `datasets.map` batch (1000 examples unless `map_kwargs` says
/// otherwise); this packs all the examples at once, so on more than one such batch the rows
/// can differ (they are never worse filled).
pub fn pack_bfd(examples: Vec<Example>, seq_len: usize) -> Vec<Example> {
    if seq_len == 0 {
        return examples;
    }
    let mut examples: Vec<Example> = examples.into_iter().filter(|e| !e.is_empty()).collect();
    for e in &mut examples {
        e.ids.truncate(seq_len);
        e.targets.truncate(seq_len);
        e.doc_starts.retain(|&s| s < seq_len);
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    // Open rows by their room left (> 0), each list in the order the rows reached that room.
    let mut by_room: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    let mut rows: Vec<(Vec<usize>, usize)> = Vec::new(); // (examples, tokens)
    for i in order {
        let len = examples[i].len();
        let best = by_room
            .range_mut(len..)
            .next()
            .map(|(&room, q)| (room, q.pop_front()));
        let row = match best {
            Some((room, Some(row))) => {
                if by_room.get(&room).is_some_and(VecDeque::is_empty) {
                    by_room.remove(&room);
                }
                row
            }
            _ => {
                rows.push((Vec::new(), 0));
                rows.len() - 1
            }
        };
        rows[row].0.push(i);
        rows[row].1 += len;
        let room = seq_len - rows[row].1;
        if room > 0 {
            by_room.entry(room).or_default().push_back(row);
        }
    }
    let mut slots: Vec<Option<Example>> = examples.into_iter().map(Some).collect();
    rows.into_iter()
        .map(|(members, tokens)| {
            let mut row = Example {
                ids: Vec::with_capacity(tokens),
                targets: Vec::with_capacity(tokens),
                doc_starts: Vec::new(),
            };
            for i in members {
                let Some(e) = slots[i].take() else { continue };
                let at = row.ids.len();
                if at > 0 {
                    row.doc_starts.push(at);
                }
                row.doc_starts.extend(e.doc_starts.iter().map(|s| at + s));
                row.ids.extend(e.ids);
                row.targets.extend(e.targets);
                row.targets[at] = false;
            }
            row
        })
        .collect()
}

/// Concatenate examples in order and cut the stream into blocks of exactly `seq_len` tokens
/// (the last block shorter), each block one sequence that attends across the examples it holds
/// (TRL's `wrapped` strategy). Each block's first token is not a target; blocks left without
/// targets are dropped. A `seq_len` of 0 returns the examples unchanged.
pub fn pack_wrapped(examples: Vec<Example>, seq_len: usize) -> Vec<Example> {
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

/// How `train.cpt` lays raw text into `seq_len` blocks (manifest parameter `packing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CptPacking {
    /// Each document is its own segment of its block: attention stays inside it, positions
    /// restart at 0 at its start, and its first token is not a target. A document continued
    /// from the previous block starts again at position 0, without the part that block holds.
    #[default]
    Documents,
    /// Every block is one sequence: tokens attend across document boundaries, positions run
    /// 0…seq_len−1 and every token but the block's first is a target (standard for some
    /// pretraining setups).
    Wrapped,
}

/// Each non-empty text's tokens: after the bos token when the tokenizer adds one, followed by
/// eos when the tokenizer has one.
fn documents(tok: &TextTokenizer, records: &[TextRecord]) -> Result<Vec<Vec<u32>>, TextError> {
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
    Ok(encoded
        .into_iter()
        .map(|ids| {
            let mut doc = Vec::with_capacity(ids.len() + 2);
            doc.extend(bos);
            doc.extend(ids);
            doc.extend(eos);
            doc
        })
        .collect())
}

/// Raw text for continued pretraining: the documents (each non-empty text encoded after the
/// bos token when the tokenizer adds one, followed by eos when the tokenizer has one)
/// concatenated and cut into blocks of `seq_len` tokens (a final partial block is kept when it
/// has at least 2 tokens).
///
/// With [`CptPacking::Documents`] each block records where its documents start
/// ([`Example::doc_starts`]) and a document's first token is not a target; with
/// [`CptPacking::Wrapped`] every token but each block's first is a target.
pub fn encode_cpt(
    tok: &TextTokenizer,
    records: &[TextRecord],
    seq_len: usize,
    packing: CptPacking,
) -> Result<Encoded, TextError> {
    check_seq_len(seq_len)?;
    let docs = documents(tok, records)?;
    let total = docs.iter().map(Vec::len).sum();
    let mut stream = Vec::with_capacity(total);
    let mut starts = Vec::with_capacity(docs.len());
    for doc in docs {
        starts.push(stream.len());
        stream.extend(doc);
    }
    let mut next_start = starts.iter().copied().peekable();
    let examples = stream
        .chunks(seq_len)
        .enumerate()
        .filter(|(_, c)| c.len() >= 2)
        .map(|(k, c)| {
            let (lo, hi) = (k * seq_len, k * seq_len + c.len());
            let mut doc_starts = Vec::new();
            while let Some(s) = next_start.next_if(|&s| s < hi) {
                if s > lo && packing == CptPacking::Documents {
                    doc_starts.push(s - lo);
                }
            }
            let mut targets: Vec<bool> = (0..c.len()).map(|i| i > 0).collect();
            for &s in &doc_starts {
                targets[s] = false;
            }
            Example {
                ids: c.to_vec(),
                targets,
                doc_starts,
            }
        })
        .collect();
    Ok(Encoded::new(examples, 0))
}

/// Raw text scored one document at a time, for evaluation: each document (encoded as in
/// [`encode_cpt`]) alone, never with context from another one. A document of up to `seq_len`
/// tokens is one example; a longer one is scored in lm-evaluation-harness's rolling windows
/// (`loglikelihood_rolling`, `context_len = 1`): the first window is its first `seq_len`
/// tokens, each next one predicts the following `seq_len − 1` tokens from the one before them,
/// and the last window ends at the document's end and reaches back a full `seq_len` tokens,
/// its earlier tokens context only. Every token but the document's first is a target exactly
/// once. A document of one token has no target and is left out.
pub fn encode_documents(
    tok: &TextTokenizer,
    records: &[TextRecord],
    seq_len: usize,
) -> Result<Encoded, TextError> {
    check_seq_len(seq_len)?;
    let mut examples = Vec::new();
    for doc in documents(tok, records)? {
        examples.extend(rolling_windows(&doc, seq_len));
    }
    Ok(Encoded::new(examples, 0))
}

/// The rolling windows of [`encode_documents`] over one document (`seq_len ≥ 2`).
fn rolling_windows(doc: &[u32], seq_len: usize) -> Vec<Example> {
    let n = doc.len();
    let mut out = Vec::new();
    if n < 2 {
        return out;
    }
    let first = n.min(seq_len);
    out.push(Example {
        ids: doc[..first].to_vec(),
        targets: (0..first).map(|i| i > 0).collect(),
        doc_starts: Vec::new(),
    });
    let mut predicted = first; // tokens `..predicted` are scored (or the first)
    while predicted < n {
        let end = (predicted + seq_len - 1).min(n);
        let start = end - seq_len;
        out.push(Example {
            ids: doc[start..end].to_vec(),
            targets: (start..end).map(|i| i >= predicted).collect(),
            doc_starts: Vec::new(),
        });
        predicted = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, tag: u32) -> Example {
        Example {
            ids: vec![tag; n],
            targets: (0..n).map(|i| i > 0).collect(),
            doc_starts: Vec::new(),
        }
    }

    #[test]
    fn rolling_windows_score_every_token_once_with_full_windows() {
        let doc: Vec<u32> = (0..10).collect();
        let w = rolling_windows(&doc, 4);
        let ids: Vec<&[u32]> = w.iter().map(|e| e.ids.as_slice()).collect();
        // [0..4) scores 1, 2, 3; [3..7) scores 4, 5, 6 from 3; [6..10) scores 7, 8, 9;
        assert_eq!(ids, [&[0, 1, 2, 3][..], &[3, 4, 5, 6], &[6, 7, 8, 9]]);
        assert_eq!(w[1].targets, [false, true, true, true]);
        // 11 tokens: the last window reaches back to 6 and scores only 10.
        let doc: Vec<u32> = (0..11).collect();
        let w = rolling_windows(&doc, 4);
        assert_eq!(w.len(), 4);
        assert_eq!(w[3].ids, [7, 8, 9, 10]);
        assert_eq!(w[3].targets, [false, false, false, true]);
        let scored: Vec<u32> = w.iter().flat_map(|e| e.target_ids()).collect();
        assert_eq!(scored, (1..11).collect::<Vec<u32>>());
        assert!(rolling_windows(&[5], 4).is_empty());
        assert_eq!(rolling_windows(&[5, 6], 4)[0].targets, [false, true]);
    }

    #[test]
    fn bfd_rows_keep_their_documents_whole() {
        let rows = pack_bfd(vec![ex(3, 1), ex(9, 2), ex(0, 3), ex(5, 4)], 8);
        let got: Vec<(&[u32], &[usize])> = rows
            .iter()
            .map(|r| (r.ids.as_slice(), r.doc_starts.as_slice()))
            .collect();
        // 9 is cut to 8 and fills a row; 5 starts the second row and 3 fills it; 0 is dropped.
        assert_eq!(
            got,
            [
                (&[2; 8][..], &[][..]),
                (&[4, 4, 4, 4, 4, 1, 1, 1][..], &[5][..])
            ]
        );
        assert_eq!(
            rows[1].targets,
            [false, true, true, true, true, false, true, true]
        );
    }
}

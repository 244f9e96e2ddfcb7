//! Writes the data fixtures under `fixtures/data/`: tiny files in every source format the
//! `dataset` stage reads, and a `bad/` folder of broken ones. Deterministic: running it again
//! rewrites the same bytes.
//!
//! `cargo run -p burnish-stages --example make_data_fixtures`

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data");
    fs::create_dir_all(out.join("bad"))?;

    write_jsonl(&out.join("code.jsonl"), &code_rows())?;

    let alpaca = alpaca_rows();
    write_jsonl(&out.join("alpaca.jsonl"), &alpaca)?;
    fs::write(
        out.join("alpaca.json"),
        serde_json::to_string_pretty(&Value::Array(alpaca.clone()))? + "\n",
    )?;
    write_alpaca_csv(&out.join("alpaca.csv"), &alpaca)?;
    write_alpaca_parquet(&out.join("alpaca.parquet"), &alpaca)?;

    write_jsonl(
        &out.join("prompt_completion.jsonl"),
        &prompt_completion_rows(),
    )?;
    let chat = chat_rows();
    write_jsonl(&out.join("chat.jsonl"), &chat)?;
    write_chat_parquet(&out.join("chat.parquet"), &chat)?;
    write_jsonl(&out.join("sharegpt.jsonl"), &sharegpt_rows())?;
    write_jsonl(&out.join("prefs.jsonl"), &pref_rows())?;
    write_jsonl(&out.join("orca_prefs.jsonl"), &orca_rows())?;
    write_jsonl(&out.join("hh_prefs.jsonl"), &hh_rows())?;
    write_jsonl(&out.join("kto.jsonl"), &kto_rows())?;
    write_jsonl(
        &out.join("claudesidian.jsonl"),
        &claudesidian_rows(40, |i| i % 4 == 3),
    )?;
    // The seeds' shape at full size: 1,000 transcripts, 746 desirable / 254 undesirable
    // (i·254 mod 1000 < 254 picks exactly 254, spread through the file).
    write_jsonl(
        &out.join("claudesidian_1k.jsonl"),
        &claudesidian_rows(1000, |i| (i * 254) % 1000 < 254),
    )?;
    write_jsonl(&out.join("ranking.jsonl"), &ranking_rows())?;
    write_jsonl(&out.join("gsm8k.jsonl"), &gsm8k_rows())?;
    write_jsonl(&out.join("scored.jsonl"), &scored_rows())?;
    write_jsonl(&out.join("dedup.jsonl"), &dedup_rows())?;
    write_bad(&out.join("bad"))?;
    println!("wrote fixtures into {}", out.display());
    Ok(())
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    fs::write(path, s)?;
    Ok(())
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------------
// text: code snippets

fn code_rows() -> Vec<Value> {
    let names = ["alpha", "bravo", "carol", "delta", "echo", "fox"];
    let mut rows = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let n = i + 2;
        rows.push(json!({"text": format!(
            "fn add_{name}(x: i64) -> i64 {{\n    x + {n}\n}}\n", ), "language": "rust"}));
        rows.push(json!({"text": format!(
            "def scale_{name}(values):\n    return [v * {n} for v in values]\n"), "language": "python"}));
        rows.push(json!({"text": format!(
            "pub struct {cap} {{\n    pub id: u32,\n    pub weight: f32,\n}}\n\nimpl {cap} {{\n    pub fn new(id: u32) -> Self {{\n        {cap} {{ id, weight: {n}.0 }}\n    }}\n}}\n",
            cap = capitalize(name)), "language": "rust"}));
        rows.push(json!({"text": format!(
            "function {name}Sum(xs) {{\n  let total = 0;\n  for (const x of xs) {{\n    total += x * {n};\n  }}\n  return total;\n}}\n"), "language": "javascript"}));
        rows.push(json!({"text": format!(
            "def is_{name}_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return n != {n}\n"), "language": "python"}));
        rows.push(json!({"text": format!(
            "fn count_{name}(s: &str) -> usize {{\n    s.chars().filter(|c| *c == '{c}').count()\n}}\n",
            c = name.chars().next().unwrap()), "language": "rust"}));
        rows.push(json!({"text": format!(
            "#[test]\nfn {name}_works() {{\n    let v: Vec<i32> = (0..{n}).collect();\n    assert_eq!(v.len(), {n});\n}}\n"), "language": "rust"}));
        rows.push(json!({"text": format!(
            "class {cap}Queue:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop(0) if self.items else None\n",
            cap = capitalize(name)), "language": "python"}));
    }
    rows
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// alpaca: instruction / input / output (same 40 rows as jsonl, json, csv, parquet)

const CAPITALS: [(&str, &str); 10] = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Vietnam", "Hanoi"),
    ("Chile", "Santiago"),
    ("Ghana", "Accra"),
];

const WORDS: [&str; 10] = [
    "burnish",
    "gradient",
    "tensor",
    "adapter",
    "tokenizer",
    "lantern",
    "harbor",
    "meadow",
    "compass",
    "orchard",
];

fn alpaca_rows() -> Vec<Value> {
    let mut rows = Vec::new();
    for i in 0..40usize {
        let k = i / 5;
        let row = match i % 5 {
            0 => {
                let (a, b) = (3 * i + 1, 7 * k + 2);
                json!({"instruction": "Add the two numbers.", "input": format!("{a} and {b}"), "output": format!("{a} + {b} = {}", a + b)})
            }
            1 => {
                let w = WORDS[k];
                json!({"instruction": "Reverse the letters of the word.", "input": w, "output": w.chars().rev().collect::<String>()})
            }
            2 => {
                let (country, capital) = CAPITALS[k];
                json!({"instruction": format!("What is the capital of {country}?"), "input": "", "output": format!("The capital of {country} is {capital}.")})
            }
            3 => {
                let c = 5 * k as i64 - 10;
                let f = c * 9 / 5 + 32;
                json!({"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": format!("{c}°C"), "output": format!("{c}°C is {f}°F.")})
            }
            _ => {
                let w = WORDS[(k + 3) % 8];
                json!({"instruction": "Write a short list, separated by commas, of \"facts\" about the word.", "input": w, "output": format!("\"{w}\" has {} letters,\nstarts with '{}',\nand ends with '{}'.", w.len(), w.chars().next().unwrap(), w.chars().last().unwrap())})
            }
        };
        rows.push(row);
    }
    rows
}

fn write_alpaca_csv(path: &Path, rows: &[Value]) -> Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["instruction", "input", "output"])?;
    for r in rows {
        w.write_record([s(r, "instruction"), s(r, "input"), s(r, "output")])?;
    }
    w.flush()?;
    Ok(())
}

fn props() -> Arc<WriterProperties> {
    Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by("burnish fixtures".into())
            .build(),
    )
}

fn bytes(values: impl IntoIterator<Item = String>) -> Vec<ByteArray> {
    values
        .into_iter()
        .map(|v| ByteArray::from(v.as_str()))
        .collect()
}

fn write_alpaca_parquet(path: &Path, rows: &[Value]) -> Result<()> {
    let schema = Arc::new(parse_message_type(
        "message alpaca {
            REQUIRED BYTE_ARRAY instruction (UTF8);
            REQUIRED BYTE_ARRAY input (UTF8);
            REQUIRED BYTE_ARRAY output (UTF8);
        }",
    )?);
    let file = fs::File::create(path)?;
    let mut writer = SerializedFileWriter::new(file, schema, props())?;
    let mut group = writer.next_row_group()?;
    for key in ["instruction", "input", "output"] {
        let mut col = group.next_column()?.expect("three columns");
        let values = bytes(rows.iter().map(|r| s(r, key)));
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)?;
        col.close()?;
    }
    group.close()?;
    writer.close()?;
    Ok(())
}

/// `messages` as a Parquet LIST of {role, content} structs, as Hugging Face datasets store them.
fn write_chat_parquet(path: &Path, rows: &[Value]) -> Result<()> {
    let schema = Arc::new(parse_message_type(
        "message chat {
            REQUIRED GROUP messages (LIST) {
                REPEATED GROUP list {
                    REQUIRED GROUP element {
                        REQUIRED BYTE_ARRAY role (UTF8);
                        REQUIRED BYTE_ARRAY content (UTF8);
                    }
                }
            }
        }",
    )?);
    let file = fs::File::create(path)?;
    let mut writer = SerializedFileWriter::new(file, schema, props())?;
    let mut group = writer.next_row_group()?;
    for key in ["role", "content"] {
        let mut col = group.next_column()?.expect("two columns");
        let mut values = Vec::new();
        let mut defs = Vec::new();
        let mut reps = Vec::new();
        for r in rows {
            for (j, m) in r["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .enumerate()
            {
                values.push(s(m, key));
                defs.push(1i16);
                reps.push(if j == 0 { 0i16 } else { 1 });
            }
        }
        col.typed::<ByteArrayType>()
            .write_batch(&bytes(values), Some(&defs), Some(&reps))?;
        col.close()?;
    }
    group.close()?;
    writer.close()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// prompt / completion

fn prompt_completion_rows() -> Vec<Value> {
    (0..20usize)
        .map(|i| {
            let start = i + 1;
            let step = i % 4 + 1;
            let seq: Vec<String> = (0..3).map(|j| (start + j * step).to_string()).collect();
            let next: Vec<String> = (3..6).map(|j| (start + j * step).to_string()).collect();
            json!({"prompt": format!("Continue the sequence: {},", seq.join(", ")), "completion": format!(" {}", next.join(", "))})
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// chat: OpenAI messages

fn chat_rows() -> Vec<Value> {
    let mut rows = Vec::new();
    for i in 0..24usize {
        let w = WORDS[i % 8];
        let (country, capital) = CAPITALS[i % 8];
        let mut messages = Vec::new();
        if i % 3 == 0 {
            messages.push(json!({"role": "system", "content": "You are a concise assistant."}));
        }
        match i % 4 {
            0 => {
                messages.push(
                    json!({"role": "user", "content": format!("How many letters are in \"{w}\"?")}),
                );
                messages.push(json!({"role": "assistant", "content": format!("\"{w}\" has {} letters.", w.len())}));
            }
            1 => {
                messages.push(json!({"role": "user", "content": format!("What is the capital of {country}?")}));
                messages.push(json!({"role": "assistant", "content": format!("{capital}.")}));
                messages.push(json!({"role": "user", "content": "Spell it backwards."}));
                messages.push(json!({"role": "assistant", "content": capital.chars().rev().collect::<String>()}));
            }
            2 => {
                messages.push(json!({"role": "user", "content": format!("Write a Rust function that returns {i} squared.")}));
                messages.push(json!({"role": "assistant", "content": format!("```rust\nfn square() -> u64 {{\n    {i} * {i}\n}}\n```")}));
            }
            _ => {
                messages.push(json!({"role": "user", "content": format!("Translate \"{w}\" into uppercase.")}));
                messages.push(json!({"role": "assistant", "content": w.to_uppercase()}));
            }
        }
        rows.push(json!({"messages": messages}));
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// sharegpt: conversations of {from, value}

fn sharegpt_rows() -> Vec<Value> {
    (0..20usize)
        .map(|i| {
            let a = i * 3 + 4;
            let b = i + 9;
            let mut conv = Vec::new();
            if i % 5 == 0 {
                conv.push(json!({"from": "system", "value": "You are a careful math tutor."}));
            }
            conv.push(json!({"from": "human", "value": format!("What is {a} times {b}?")}));
            conv.push(json!({"from": "gpt", "value": format!("{a} × {b} = {}.", a * b)}));
            if i % 2 == 1 {
                conv.push(json!({"from": "human", "value": "And half of that?"}));
                conv.push(json!({"from": "gpt", "value": format!("Half of {} is {}.", a * b, (a * b) as f64 / 2.0)}));
            }
            json!({"id": format!("sg-{i:03}"), "conversations": conv})
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// preference: prompt / chosen / rejected (text)

fn pref_rows() -> Vec<Value> {
    (0..30usize)
        .map(|i| {
            // Ten of each shape, all distinct.
            let k = i / 3;
            let w = WORDS[k];
            let (country, capital) = CAPITALS[k];
            match i % 3 {
                0 => json!({
                    "prompt": format!("What is the capital of {country}?"),
                    "chosen": format!("The capital of {country} is {capital}."),
                    "rejected": format!("I think it might be {}, but I am not sure.", CAPITALS[(k + 1) % 10].1),
                }),
                1 => json!({
                    "prompt": format!("Reverse the word \"{w}\"."),
                    "chosen": w.chars().rev().collect::<String>(),
                    "rejected": w.to_owned(),
                }),
                _ => {
                    let (a, b) = (i * 2 + 3, i + 5);
                    json!({
                        "prompt": format!("Compute {a} + {b}."),
                        "chosen": format!("{a} + {b} = {}.", a + b),
                        "rejected": format!("{a} + {b} = {}.", a + b + 1),
                    })
                }
            }
        })
        .collect()
}

// Orca DPO pairs: system / question / chosen / rejected (mapped with `columns: {prompt: question}`)
fn orca_rows() -> Vec<Value> {
    (0..20usize)
        .map(|i| {
            let system = match i % 3 {
                0 => "",
                1 => "You are an AI assistant. Provide a detailed answer so the user does not need to search elsewhere.",
                _ => "You are a helpful assistant who always explains step by step.",
            };
            let (a, b) = (i + 12, 3 * i + 1);
            json!({
                "system": system,
                "question": format!("A shop sells {a} apples in the morning and {b} in the afternoon. How many apples does it sell in total?"),
                "chosen": format!("In the morning it sells {a} apples and in the afternoon {b}. In total: {a} + {b} = {} apples.", a + b),
                "rejected": format!("{} apples.", a * b),
            })
        })
        .collect()
}

// Anthropic HH: chosen / rejected as whole transcripts, no prompt column
fn hh_rows() -> Vec<Value> {
    (0..20usize)
        .map(|i| {
            let w = WORDS[i % 8];
            let first = format!("\n\nHuman: Can you help me with the word \"{w}\"?\n\nAssistant: Of course. What would you like to know about it?");
            let (q, good, bad) = match i % 4 {
                0 => ("How many letters does it have?".to_owned(), format!("It has {} letters.", w.len()), "It has a lot of letters.".to_owned()),
                1 => ("Can you use it in a sentence?".to_owned(), format!("Sure: \"The {w} was the first thing she noticed.\""), "No.".to_owned()),
                2 => ("What does it rhyme with?".to_owned(), format!("Few English words rhyme exactly with \"{w}\", but near rhymes exist."), format!("\"{w}\" rhymes with \"{w}\".")),
                _ => ("Is it a noun?".to_owned(), format!("\"{w}\" is usually used as a noun."), "Why do you care?".to_owned()),
            };
            if i % 2 == 0 {
                json!({
                    "chosen": format!("{first}\n\nHuman: {q}\n\nAssistant: {good}"),
                    "rejected": format!("{first}\n\nHuman: {q}\n\nAssistant: {bad}"),
                })
            } else {
                json!({
                    "chosen": format!("\n\nHuman: {q} (the word is \"{w}\")\n\nAssistant: {good}"),
                    "rejected": format!("\n\nHuman: {q} (the word is \"{w}\")\n\nAssistant: {bad}"),
                })
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// kto: prompt / completion / label

fn kto_rows() -> Vec<Value> {
    (0..30usize)
        .map(|i| {
            let (a, b) = (i + 2, i + 7);
            let good = i % 3 != 2;
            let answer = if good { a * b } else { a * b + i + 1 };
            json!({
                "prompt": format!("What is {a} × {b}?"),
                "completion": format!("{a} × {b} = {answer}."),
                "label": good,
            })
        })
        .collect()
}

// Claudesidian-style tool-use transcripts: {"conversations": [{role, content}], "label": bool}
fn claudesidian_rows(n: usize, undesirable: impl Fn(usize) -> bool) -> Vec<Value> {
    const SYSTEM: &str = "You are a note-taking assistant for an Obsidian vault. Tools: search_notes(query), read_note(path), create_note(path, content), append_to_note(path, content). Call a tool by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>; results come back as <tool_result>...</tool_result>.";
    const TOPICS: [(&str, &str); 10] = [
        ("meeting notes from Monday", "Meetings/2024-03-04.md"),
        ("my reading list", "Lists/Reading.md"),
        ("the garden plan", "Projects/Garden.md"),
        ("recipe ideas", "Cooking/Ideas.md"),
        ("the tax checklist", "Admin/Taxes.md"),
        ("travel plans for June", "Travel/June.md"),
        ("book notes on Dune", "Books/Dune.md"),
        ("the weekly review", "Reviews/Weekly.md"),
        ("workout log", "Health/Workouts.md"),
        ("project ideas", "Projects/Ideas.md"),
    ];
    let mut rows = Vec::new();
    for i in 0..n {
        let (topic, path) = TOPICS[i % 10];
        // 40 rows: every fourth transcript is undesirable (30 desirable, 10 undesirable).
        let good = !undesirable(i);
        let conv = match (i % 2, good) {
            (0, true) => vec![
                json!({"role": "system", "content": SYSTEM}),
                json!({"role": "user", "content": format!("Find {topic} and tell me what's in it.")}),
                json!({"role": "assistant", "content": format!("<tool_call>{{\"name\": \"search_notes\", \"arguments\": {{\"query\": \"{topic}\"}}}}</tool_call>")}),
                json!({"role": "user", "content": format!("<tool_result>[\"{path}\"]</tool_result>")}),
                json!({"role": "assistant", "content": format!("<tool_call>{{\"name\": \"read_note\", \"arguments\": {{\"path\": \"{path}\"}}}}</tool_call>")}),
                json!({"role": "user", "content": format!("<tool_result># {topic}\n- item {i}\n- item {}</tool_result>", i + 1)}),
                json!({"role": "assistant", "content": format!("{path} lists two items: item {i} and item {}.", i + 1)}),
            ],
            (1, true) => vec![
                json!({"role": "system", "content": SYSTEM}),
                json!({"role": "user", "content": format!("Add \"follow up #{i}\" to {topic}.")}),
                json!({"role": "assistant", "content": format!("<tool_call>{{\"name\": \"append_to_note\", \"arguments\": {{\"path\": \"{path}\", \"content\": \"- follow up #{i}\"}}}}</tool_call>")}),
                json!({"role": "user", "content": "<tool_result>ok</tool_result>"}),
                json!({"role": "assistant", "content": format!("Added \"follow up #{i}\" to {path}.")}),
            ],
            (0, false) => vec![
                json!({"role": "system", "content": SYSTEM}),
                json!({"role": "user", "content": format!("Find {topic} and tell me what's in it.")}),
                json!({"role": "assistant", "content": format!("Your {topic} mention a dentist appointment and three unread books.")}),
            ],
            _ => vec![
                json!({"role": "system", "content": SYSTEM}),
                json!({"role": "user", "content": format!("Add \"follow up #{i}\" to {topic}.")}),
                json!({"role": "assistant", "content": format!("<tool_call>{{\"name\": \"create_note\", \"arguments\": {{\"path\": \"{path}\", \"content\": \"\"}}}}</tool_call>")}),
                json!({"role": "user", "content": "<tool_result>error: note exists</tool_result>"}),
                json!({"role": "assistant", "content": "Done! I added it."}),
            ],
        };
        rows.push(json!({"conversations": conv, "label": good}));
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// ranking: prompt + responses [{text, rank}] (12 with 3 responses, 3 with 4; not in rank order)

fn ranking_rows() -> Vec<Value> {
    (0..15usize)
        .map(|i| {
            let w = WORDS[i % 8];
            let mut responses = vec![
                json!({"text": format!("\"{w}\" is spelled {}.", w.chars().map(|c| c.to_string()).collect::<Vec<_>>().join("-")), "rank": 2}),
                json!({"text": format!("It is spelled {w}."), "rank": 1}),
                json!({"text": "I don't know how to spell it.", "rank": 3}),
            ];
            if i >= 12 {
                responses.push(json!({"text": "Spelling is not important.", "rank": 4}));
            }
            json!({"prompt": format!("How do you spell \"{w}\"?"), "responses": responses})
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// reasoning: GSM8K-style question / answer with the final answer after ####

fn gsm8k_rows() -> Vec<Value> {
    (0..25usize)
        .map(|i| {
            let (a, b, c) = (i + 3, 2 * i + 5, i % 4 + 2);
            let sum = a + b;
            let total = sum * c;
            json!({
                "question": format!("Mia has {a} marbles and finds {b} more. She then buys {c} times as many as she has. How many marbles did she buy?"),
                "answer": format!("Mia has {a} + {b} = <<{a}+{b}={sum}>>{sum} marbles.\nShe buys {sum} * {c} = <<{sum}*{c}={total}>>{total} marbles.\n#### {total}"),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// scored text for data.select, and a small file for data.dedup

fn scored_rows() -> Vec<Value> {
    (0..20usize)
        .map(|i| {
            let score = ((i * 37) % 100) as f64 / 100.0;
            let source = if i % 2 == 0 { "web" } else { "books" };
            json!({"text": format!("Sample passage {i} about {}.", WORDS[i % 8]), "score": score, "source": source})
        })
        .collect()
}

fn dedup_rows() -> Vec<Value> {
    [
        "Hello world",
        "Hello world",
        "hello, world!",
        "Hello   World",
        "Goodbye world",
        "Goodbye world.",
        "Something else entirely",
    ]
    .iter()
    .map(|t| json!({"text": t}))
    .collect()
}

// ---------------------------------------------------------------------------------------------
// bad data

fn write_bad(dir: &Path) -> Result<()> {
    let ok = |i: usize| {
        json!({"instruction": format!("Say {i}."), "input": "", "output": format!("{i}")})
            .to_string()
    };
    // Line 3 is cut off mid-object.
    fs::write(
        dir.join("malformed.jsonl"),
        format!(
            "{}\n{}\n{{\"instruction\": \"Say 3.\", \"input\": \"\", \"output\": \n{}\n",
            ok(1),
            ok(2),
            ok(4)
        ),
    )?;
    // Line 2 has no `output`.
    fs::write(
        dir.join("missing_field.jsonl"),
        format!(
            "{}\n{}\n{}\n",
            ok(1),
            json!({"instruction": "Say 2.", "input": ""}),
            ok(3)
        ),
    )?;
    // Line 4 has a number where `output` should be text.
    fs::write(
        dir.join("mistyped_field.jsonl"),
        format!(
            "{}\n{}\n{}\n{}\n",
            ok(1),
            ok(2),
            ok(3),
            json!({"instruction": "Say 4.", "input": "", "output": 4})
        ),
    )?;
    // Line 2 has a role no format knows.
    fs::write(
        dir.join("bad_role.jsonl"),
        format!(
            "{}\n{}\n",
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "she waved"}]}),
        ),
    )?;
    // Line 3 has a string label.
    fs::write(
        dir.join("bad_label.jsonl"),
        format!(
            "{}\n{}\n{}\n",
            json!({"prompt": "a", "completion": "b", "label": true}),
            json!({"prompt": "c", "completion": "d", "label": false}),
            json!({"prompt": "e", "completion": "f", "label": "yes"}),
        ),
    )?;
    // Line 3 (the second data row) has one field too many.
    fs::write(
        dir.join("ragged.csv"),
        "instruction,input,output\nSay 1.,,1\nSay 2.,,2,extra\n",
    )?;
    Ok(())
}

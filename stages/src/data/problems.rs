//! `data.generate`: seeded synthetic problems with known answers, as reasoning records
//! (`prompt` a user turn, `reasoning` a worked solution, `answer` the final answer).
//!
//! - `arithmetic`: `a op b` with `digits`-digit operands, `op` drawn from `ops` (addition,
//!   subtraction with `a ≥ b`, multiplication). Styles: `question` ("What is 37 + 45?"),
//!   `compact` (the bare `37+45=`, operands zero-padded to `digits` — a character-level task
//!   whose every completion is digits), and `star` (addition only: the input and the
//!   digit-by-digit scratchpad of Nye et al. 2021, as STaR trains on, the answer spaced after
//!   `</scratch>`). The problems of one stage are distinct while the task has enough of them.
//! - `word_problems`: GSM8K-shaped two-step problems: the question, a worked answer with
//!   GSM8K's `<<a+b=c>>` calculator annotations, and the final number, as GSM8K's
//!   `answer` field holds after `####`.
//! - `countdown`: TinyZero's task: reach the target with each of the numbers used once and
//!   `+ − × ÷`; `meta.numbers` holds the numbers, `meta.solution` one equation that reaches the
//!   target (the answer is the target; an equation's correctness needs a `command` reward that
//!   evaluates it).
//!
//! Each problem is a function of the seed and its index alone: `count: 200` is the first 200
//! problems of `count: 1000` with the same seed.

use std::collections::{BTreeMap, HashSet};

use burnish_engine::stage::{
    ArtifactType, DatasetFamily, FieldProblem, Input, OutputDecl, RunContext, Sensitivity, Stage,
    StageError, StageOutcome,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::records::{Dataset, Message, Meta, ReasoningRecord, Record};
use super::rng::Rng;

/// Which problems to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Arithmetic,
    WordProblems,
    Countdown,
}

/// An arithmetic operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Add,
    Sub,
    Mul,
}

impl Op {
    fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }
    fn apply(self, a: u64, b: u64) -> u64 {
        match self {
            Op::Add => a + b,
            Op::Sub => a - b,
            Op::Mul => a * b,
        }
    }
}

/// How an arithmetic problem is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// "What is 37 + 45?"; the reasoning restates the sum.
    #[default]
    Question,
    /// "07+45=": operands zero-padded to `digits`, no reasoning.
    Compact,
    /// STaR's scratchpad (addition only).
    Star,
}

/// Parameters of `data.generate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProblemsParams {
    /// `arithmetic`, `word_problems` or `countdown`.
    pub task: Task,
    /// Problems to make.
    pub count: usize,
    /// Seed of the problems; when absent, the pipeline seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// `arithmetic`: digits per operand, 1–9 (default 2).
    #[serde(default)]
    pub digits: Option<usize>,
    /// `arithmetic`: the operations drawn from (default `[add]`).
    #[serde(default)]
    pub ops: Option<Vec<Op>>,
    /// `arithmetic`: `question` (default), `compact` or `star`.
    #[serde(default)]
    pub style: Option<Style>,
    /// `countdown`: numbers per problem, 3–6 (default 4).
    #[serde(default)]
    pub numbers: Option<usize>,
}

/// The `data.generate` stage kind.
pub struct ProblemsStage;

impl Stage for ProblemsStage {
    const KIND: &'static str = "data.generate";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Make seeded synthetic problems with known answers (arithmetic, \
                                 GSM8K-shaped word problems, countdown) as reasoning records";

    type Params = ProblemsParams;

    fn inputs(_: &ProblemsParams) -> Vec<Input> {
        Vec::new()
    }

    fn outputs(_: &ProblemsParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::dataset(
            DatasetFamily::Reasoning,
        ))]
    }

    fn check(p: &ProblemsParams) -> Vec<FieldProblem> {
        let mut v = Vec::new();
        if p.count == 0 {
            v.push(FieldProblem::new(
                "count",
                "count must be at least 1, found 0",
            ));
        }
        const MAX_COUNT: usize = 10_000_000;
        if p.count > MAX_COUNT {
            v.push(FieldProblem::new(
                "count",
                format!("count must be at most {MAX_COUNT}, found {}", p.count),
            ));
        }
        let only = |field: &str, set: bool, task: &str, v: &mut Vec<FieldProblem>| {
            if set {
                v.push(FieldProblem::new(
                    field,
                    format!("`{field}` applies to task `{task}` only"),
                ));
            }
        };
        if p.task != Task::Arithmetic {
            only("digits", p.digits.is_some(), "arithmetic", &mut v);
            only("ops", p.ops.is_some(), "arithmetic", &mut v);
            only("style", p.style.is_some(), "arithmetic", &mut v);
        }
        if p.task != Task::Countdown {
            only("numbers", p.numbers.is_some(), "countdown", &mut v);
        }
        if let Some(d) = p.digits
            && !(1..=9).contains(&d)
        {
            v.push(FieldProblem::new(
                "digits",
                format!("digits must be in 1..=9, found {d}"),
            ));
        }
        if let Some(n) = p.numbers
            && !(3..=6).contains(&n)
        {
            v.push(FieldProblem::new(
                "numbers",
                format!("numbers must be in 3..=6, found {n}"),
            ));
        }
        if p.ops.as_ref().is_some_and(Vec::is_empty) {
            v.push(FieldProblem::new("ops", "ops is empty").help("e.g. [add, sub, mul]"));
        }
        if p.style == Some(Style::Star) && ops(p).iter().any(|&o| o != Op::Add) {
            v.push(
                FieldProblem::new("ops", "the `star` scratchpad is for addition only")
                    .help("use `ops: [add]`, or `style: question`"),
            );
        }
        if v.is_empty() && p.task == Task::Arithmetic {
            let space = arithmetic_space(p);
            if (p.count as f64) > space {
                v.push(
                    FieldProblem::new(
                        "count",
                        format!(
                            "{} distinct problems were asked for, and these settings have {space}",
                            p.count
                        ),
                    )
                    .help("raise `digits` or add `ops`"),
                );
            }
        }
        v
    }

    fn sensitivity(p: &ProblemsParams) -> Sensitivity {
        Sensitivity {
            seed: p.seed.is_none(),
            backend: false,
            names: false,
        }
    }

    fn run(p: &ProblemsParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let seed = p.seed.unwrap_or(cx.seed());
        let records = make(p, seed);
        let ds = Dataset::new(DatasetFamily::Reasoning, records);
        super::write_output(cx, None, &ds)?;
        Ok(StageOutcome::default().metric("records", ds.len()))
    }
}

fn ops(p: &ProblemsParams) -> Vec<Op> {
    p.ops.clone().unwrap_or_else(|| vec![Op::Add])
}

fn style(p: &ProblemsParams) -> Style {
    p.style.unwrap_or_default()
}

/// The operand range `lo..hi` of `digits`-digit numbers in `style`.
fn operand_range(digits: usize, style: Style) -> (u64, u64) {
    let hi = 10u64.pow(digits as u32);
    match style {
        Style::Compact => (0, hi),
        _ if digits == 1 => (0, hi),
        _ => (hi / 10, hi),
    }
}

/// How many distinct arithmetic problems the settings have (subtraction counts pairs a ≥ b).
fn arithmetic_space(p: &ProblemsParams) -> f64 {
    let (lo, hi) = operand_range(p.digits.unwrap_or(2), style(p));
    let n = (hi - lo) as f64;
    let mut distinct: Vec<Op> = ops(p);
    distinct.sort_by_key(|o| o.symbol());
    distinct.dedup();
    distinct
        .iter()
        .map(|o| match o {
            Op::Sub => n * (n + 1.0) / 2.0,
            _ => n * n,
        })
        .sum()
}

/// The problems of `p` with `seed` (see the module doc).
pub fn make(p: &ProblemsParams, seed: u64) -> Vec<Record> {
    match p.task {
        Task::Arithmetic => arithmetic(p, seed),
        Task::WordProblems => (0..p.count)
            .map(|i| word_problem(&mut stream(seed, i)))
            .collect(),
        Task::Countdown => (0..p.count)
            .map(|i| countdown(&mut stream(seed, i), p.numbers.unwrap_or(4)))
            .collect(),
    }
}

/// Problem `i`'s own random stream.
fn stream(seed: u64, i: usize) -> Rng {
    Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn record(question: String, reasoning: String, answer: String, meta: Meta) -> Record {
    Record::Reasoning(ReasoningRecord {
        prompt: vec![Message::user(question)],
        reasoning,
        answer,
        meta,
    })
}

fn arithmetic(p: &ProblemsParams, seed: u64) -> Vec<Record> {
    let digits = p.digits.unwrap_or(2);
    let style = style(p);
    let ops = ops(p);
    let (lo, hi) = operand_range(digits, style);
    let mut seen = HashSet::with_capacity(p.count);
    let mut out = Vec::with_capacity(p.count);
    let mut i = 0;
    // Draws repeat a problem less than half the time while `count` is at most the space (checked
    // at validation), so this ends; each draw is a function of (seed, i).
    while out.len() < p.count {
        let mut r = stream(seed, i);
        i += 1;
        let op = ops[r.below(ops.len())];
        let (mut a, mut b) = (
            lo + r.below((hi - lo) as usize) as u64,
            lo + r.below((hi - lo) as usize) as u64,
        );
        if op == Op::Sub && a < b {
            std::mem::swap(&mut a, &mut b);
        }
        if !seen.insert((op, a, b)) {
            continue;
        }
        out.push(arithmetic_record(a, b, op, digits, style));
    }
    out
}

fn arithmetic_record(a: u64, b: u64, op: Op, digits: usize, style: Style) -> Record {
    let c = op.apply(a, b);
    let s = op.symbol();
    let mut meta = Meta::new();
    meta.insert("task".into(), Value::from("arithmetic"));
    match style {
        Style::Question => record(
            format!("What is {a} {s} {b}?"),
            format!("{a} {s} {b} = {c}"),
            c.to_string(),
            meta,
        ),
        Style::Compact => record(
            format!("{a:0digits$}{s}{b:0digits$}="),
            String::new(),
            c.to_string(),
            meta,
        ),
        Style::Star => {
            let (input, scratch) = star_scratchpad(a, b);
            record(
                format!("Input:\n{input}\nTarget:"),
                scratch,
                c.to_string(),
                meta,
            )
        }
    }
}

/// Digits of `n`, most significant first, space-separated.
fn spaced(n: &[u8]) -> String {
    n.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn digits_of(mut n: u64) -> Vec<u8> {
    let mut d = vec![(n % 10) as u8];
    n /= 10;
    while n > 0 {
        d.push((n % 10) as u8);
        n /= 10;
    }
    d.reverse();
    d
}

/// The addition `a + b` as Nye et al.'s scratchpad: the spaced input, and the lines from
/// `<scratch>` to the spaced sum. Each line shows the digits left of both operands, the sum's
/// digits so far and the carry; the last line inside is the carry then the digits.
pub fn star_scratchpad(a: u64, b: u64) -> (String, String) {
    let (da, db) = (digits_of(a), digits_of(b));
    let input = format!("{} + {}", spaced(&da), spaced(&db));
    let mut lines = vec!["<scratch>".to_owned(), format!("{input} , C: 0")];
    let (mut ra, mut rb) = (da.clone(), db.clone());
    let mut sum: Vec<u8> = Vec::new();
    let mut carry = 0u8;
    while !ra.is_empty() || !rb.is_empty() {
        let x = ra.pop().unwrap_or(0) + rb.pop().unwrap_or(0) + carry;
        sum.insert(0, x % 10);
        carry = x / 10;
        let left = match (ra.is_empty(), rb.is_empty()) {
            (true, true) => String::new(),
            _ => format!("{} + {} ", spaced(&ra), spaced(&rb)),
        };
        lines.push(format!("{left}, {} C: {carry}", spaced(&sum)));
    }
    let mut last = vec![carry];
    last.extend(&sum);
    lines.push(spaced(&last));
    lines.push("</scratch>".to_owned());
    let total = digits_of(a + b);
    lines.push(spaced(&total));
    (input, lines.join("\n"))
}

/// Names and things of the word problems.
const NAMES: [&str; 8] = ["Mia", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi"];
const THINGS: [&str; 6] = ["marbles", "apples", "stickers", "books", "coins", "shells"];

fn word_problem(r: &mut Rng) -> Record {
    let name = NAMES[r.below(NAMES.len())];
    let thing = THINGS[r.below(THINGS.len())];
    let a = 2 + r.below(30) as u64;
    let b = 2 + r.below(30) as u64;
    let k = 2 + r.below(4) as u64;
    let s = a + b;
    let mut meta = Meta::new();
    meta.insert("task".into(), Value::from("word_problems"));
    let (question, steps, answer) = match r.below(3) {
        0 => (
            format!(
                "{name} has {a} {thing} and finds {b} more. {name} then buys {k} times as many as \
                 {name} has. How many {thing} did {name} buy?"
            ),
            format!(
                "{name} has {a} + {b} = <<{a}+{b}={s}>>{s} {thing}.\n{name} buys {s} * {k} = \
                 <<{s}*{k}={p}>>{p} {thing}.",
                p = s * k
            ),
            s * k,
        ),
        1 => {
            let (big, small) = (a.max(b) + 10, a.min(b));
            let left = big - small;
            (
                format!(
                    "{name} had {big} {thing} and gave away {small}. {name} shares the rest \
                     equally with {k} friends, {name} included: how many does each get, \
                     rounded down?"
                ),
                format!(
                    "{name} has {big} - {small} = <<{big}-{small}={left}>>{left} {thing} left.\n\
                     Each gets {left} / {k} = <<{left}/{k}={q}>>{q} {thing}, rounded down.",
                    q = left / k
                ),
                left / k,
            )
        }
        _ => (
            format!(
                "A box holds {k} rows of {a} {thing}. {name} adds {b} loose {thing}. How many \
                 {thing} are there in all?"
            ),
            format!(
                "The rows hold {k} * {a} = <<{k}*{a}={m}>>{m} {thing}.\nWith the loose ones: \
                 {m} + {b} = <<{m}+{b}={t}>>{t} {thing}.",
                m = k * a,
                t = k * a + b
            ),
            k * a + b,
        ),
    };
    record(question, steps, answer.to_string(), meta)
}

/// An expression over some of the numbers and its value.
#[derive(Clone)]
struct Expr {
    text: String,
    value: i64,
    /// Whether it is a sum or difference at its top (needs brackets under `*` and `/`).
    additive: bool,
}

fn countdown(r: &mut Rng, n: usize) -> Record {
    loop {
        let numbers: Vec<i64> = (0..n).map(|_| 1 + r.below(99) as i64).collect();
        let mut terms: Vec<Expr> = numbers
            .iter()
            .map(|&v| Expr {
                text: v.to_string(),
                value: v,
                additive: false,
            })
            .collect();
        // Combine two random terms until one is left; every number is used once.
        let mut ok = true;
        while terms.len() > 1 {
            let i = r.below(terms.len());
            let x = terms.swap_remove(i);
            let j = r.below(terms.len());
            let y = terms.swap_remove(j);
            let Some(z) = combine(&x, &y, r.below(4)) else {
                ok = false;
                break;
            };
            terms.push(z);
        }
        if !ok || !(1..=999).contains(&terms[0].value) {
            continue;
        }
        let target = terms[0].value;
        let list = numbers
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let question = format!(
            "Using the numbers [{list}], create an equation that equals {target}. You can use \
             basic arithmetic operations (+, -, *, /) and each number can only be used once. Show \
             your work in <think> </think> tags. And return the final answer in <answer> \
             </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
        );
        let mut meta = Meta::new();
        meta.insert("task".into(), Value::from("countdown"));
        meta.insert("numbers".into(), Value::from(numbers.clone()));
        meta.insert("solution".into(), Value::from(terms[0].text.clone()));
        return record(
            question,
            format!("{} = {target}", terms[0].text),
            target.to_string(),
            meta,
        );
    }
}

/// `x op y` for op 0..4 = + − × ÷, when it stays a positive integer.
fn combine(x: &Expr, y: &Expr, op: usize) -> Option<Expr> {
    let wrap = |e: &Expr| {
        if e.additive {
            format!("({})", e.text)
        } else {
            e.text.clone()
        }
    };
    let (a, b) = if x.value >= y.value { (x, y) } else { (y, x) };
    Some(match op {
        0 => Expr {
            text: format!("{} + {}", a.text, b.text),
            value: a.value + b.value,
            additive: true,
        },
        1 if a.value > b.value => Expr {
            text: format!(
                "{} - {}",
                a.text,
                if b.additive { wrap(b) } else { b.text.clone() }
            ),
            value: a.value - b.value,
            additive: true,
        },
        2 => Expr {
            text: format!("{} * {}", wrap(a), wrap(b)),
            value: a.value * b.value,
            additive: false,
        },
        3 if b.value > 0 && a.value % b.value == 0 => Expr {
            text: format!(
                "{} / {}",
                wrap(a),
                if b.additive || b.text.contains(['*', '/']) {
                    format!("({})", b.text)
                } else {
                    b.text.clone()
                }
            ),
            value: a.value / b.value,
            additive: false,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(task: Task) -> ProblemsParams {
        ProblemsParams {
            task,
            count: 50,
            seed: None,
            digits: None,
            ops: None,
            style: None,
            numbers: None,
        }
    }

    fn reasoning(r: &Record) -> &ReasoningRecord {
        match r {
            Record::Reasoning(r) => r,
            _ => panic!("not a reasoning record"),
        }
    }

    #[test]
    fn star_scratchpad_is_nye_et_al_s() {
        // The example of Nye et al. 2021, figure 2 (its comments left out).
        let (input, scratch) = star_scratchpad(29, 57);
        assert_eq!(input, "2 9 + 5 7");
        assert_eq!(
            scratch,
            "<scratch>\n2 9 + 5 7 , C: 0\n2 + 5 , 6 C: 1\n, 8 6 C: 0\n0 8 6\n</scratch>\n8 6"
        );
        let (_, s) = star_scratchpad(624, 259);
        assert_eq!(
            s,
            "<scratch>\n6 2 4 + 2 5 9 , C: 0\n6 2 + 2 5 , 3 C: 1\n6 + 2 , 8 3 C: 0\n, 8 8 3 C: 0\n\
             0 8 8 3\n</scratch>\n8 8 3"
        );
        let (_, s) = star_scratchpad(95, 87);
        assert!(s.ends_with(", 8 2 C: 1\n1 8 2\n</scratch>\n1 8 2"), "{s}");
    }

    #[test]
    fn arithmetic_answers_are_right_distinct_and_prefix_stable() {
        let mut p = params(Task::Arithmetic);
        p.ops = Some(vec![Op::Add, Op::Sub, Op::Mul]);
        p.style = Some(Style::Compact);
        let recs = make(&p, 3);
        let mut seen = HashSet::new();
        for r in &recs {
            let r = reasoning(r);
            let q = &r.prompt[0].text().into_owned();
            assert_eq!(q.len(), 6, "{q}");
            let (a, op, b) = (&q[0..2], &q[2..3], &q[3..5]);
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            let want = match op {
                "+" => a + b,
                "-" => a - b,
                _ => a * b,
            };
            assert_eq!(r.answer, want.to_string());
            assert!(seen.insert(q.clone()), "{q} twice");
        }
        p.count = 10;
        assert_eq!(make(&p, 3), recs[..10].to_vec());
        assert_ne!(make(&p, 4), recs[..10].to_vec());
    }

    #[test]
    fn every_one_digit_sum_once_when_all_are_asked_for() {
        let mut p = params(Task::Arithmetic);
        p.digits = Some(1);
        p.count = 100;
        let recs = make(&p, 1);
        let distinct: HashSet<String> = recs
            .iter()
            .map(|r| reasoning(r).prompt[0].text().into_owned())
            .collect();
        assert_eq!(distinct.len(), 100);
        p.count = 101;
        let problems = ProblemsStage::check(&p);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].message,
            "101 distinct problems were asked for, and these settings have 100"
        );
    }

    #[test]
    fn word_problems_are_gsm8k_shaped_and_consistent() {
        for r in make(&params(Task::WordProblems), 9) {
            let r = reasoning(&r);
            // The final calculator annotation's result is the answer.
            let last = r.reasoning.rsplit("<<").next().unwrap();
            let (expr, rest) = last.split_once('=').unwrap();
            let result: u64 = rest.split(">>").next().unwrap().parse().unwrap();
            assert_eq!(result.to_string(), r.answer);
            let (x, op, y) = expr
                .split_once(['+', '-', '*', '/'])
                .map(|(x, y)| (x, &expr[x.len()..x.len() + 1], y))
                .unwrap();
            let (x, y): (u64, u64) = (x.parse().unwrap(), y.parse().unwrap());
            let want = match op {
                "+" => x + y,
                "-" => x - y,
                "*" => x * y,
                _ => x / y,
            };
            assert_eq!(want, result, "{}", r.reasoning);
        }
    }

    /// Evaluate a countdown solution (integers, + − × ÷, brackets).
    fn eval(s: &str) -> i64 {
        fn expr(t: &[char], i: &mut usize) -> i64 {
            let mut v = term(t, i);
            while *i < t.len() && (t[*i] == '+' || t[*i] == '-') {
                let op = t[*i];
                *i += 1;
                let w = term(t, i);
                v = if op == '+' { v + w } else { v - w };
            }
            v
        }
        fn term(t: &[char], i: &mut usize) -> i64 {
            let mut v = atom(t, i);
            while *i < t.len() && (t[*i] == '*' || t[*i] == '/') {
                let op = t[*i];
                *i += 1;
                let w = atom(t, i);
                v = if op == '*' { v * w } else { v / w };
            }
            v
        }
        fn atom(t: &[char], i: &mut usize) -> i64 {
            if t[*i] == '(' {
                *i += 1;
                let v = expr(t, i);
                *i += 1;
                return v;
            }
            let start = *i;
            while *i < t.len() && t[*i].is_ascii_digit() {
                *i += 1;
            }
            t[start..*i].iter().collect::<String>().parse().unwrap()
        }
        let t: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
        expr(&t, &mut 0)
    }

    #[test]
    fn countdown_solutions_reach_the_target_with_each_number_once() {
        let mut p = params(Task::Countdown);
        p.numbers = Some(5);
        for r in make(&p, 2) {
            let r = reasoning(&r);
            let solution = r.meta["solution"].as_str().unwrap();
            assert_eq!(eval(solution).to_string(), r.answer, "{solution}");
            let mut used: Vec<i64> = solution
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let mut numbers: Vec<i64> = r.meta["numbers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            used.sort();
            numbers.sort();
            assert_eq!(used, numbers);
        }
    }

    #[test]
    fn settings_of_another_task_are_refused() {
        let mut p = params(Task::Countdown);
        p.digits = Some(3);
        p.style = Some(Style::Star);
        let fields: Vec<String> = ProblemsStage::check(&p)
            .into_iter()
            .map(|f| f.field)
            .collect();
        assert_eq!(fields, ["digits", "style"]);
        let mut p = params(Task::Arithmetic);
        p.style = Some(Style::Star);
        p.ops = Some(vec![Op::Mul]);
        assert_eq!(
            ProblemsStage::check(&p)[0].message,
            "the `star` scratchpad is for addition only"
        );
    }
}

//! Rewards: numbers for completions, from rules a manifest lists (a closed set) and combined by
//! their weights, `r = Σ_k w_k · r_k` (TRL's `reward_weights`).
//!
//! - `exact_answer`: the answer extracted from the completion — the text after `answer_after`
//!   (GSM8K's `####`), inside the last `<answer_tag>…</answer_tag>`, the first capture group of
//!   `answer_regex`, or by default the last number — equals the record's answer: 1, else 0.
//!   Numbers compare as numbers once commas, `$` and a trailing `.0` are gone ("1,000.0" = "1000");
//!   other answers compare as trimmed strings.
//! - `format`: 1 when `regex` matches the whole completion, `.` matching newlines too (the
//!   Unsloth notebooks' patterns without DOTALL score every multi-line answer 0).
//! - `contains` / `not_contains`: 1 when `text` is (is not) in the completion.
//! - `length`: `−penalty · max(0, tokens − budget)` with `budget`, or
//!   `−penalty · |tokens − target|` with `target`.
//! - `tag_count`: the share of the markers `<t>` and `</t>` of each of `tags` that occur exactly
//!   once (Unsloth's `xmlcount` gives 0.125 per marker for its four; its small penalty for text
//!   after `</answer>` is not reproduced).
//! - `command`: an external program reads JSONL `{prompt, completion, answer}` on stdin and
//!   writes one number per line. Its file's digest is part of the stage's fingerprint. It is
//!   the only code a manifest can run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burnish_engine::stage::{FieldProblem, FileInput, ManifestPath};
use miette::Diagnostic;
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The kinds of reward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    ExactAnswer,
    Format,
    Contains,
    NotContains,
    Length,
    TagCount,
    Command,
}

impl RewardKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RewardKind::ExactAnswer => "exact_answer",
            RewardKind::Format => "format",
            RewardKind::Contains => "contains",
            RewardKind::NotContains => "not_contains",
            RewardKind::Length => "length",
            RewardKind::TagCount => "tag_count",
            RewardKind::Command => "command",
        }
    }
}

/// One reward of a manifest's `rewards:` list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// `exact_answer`, `format`, `contains`, `not_contains`, `length`, `tag_count` or `command`.
    pub kind: RewardKind,
    /// Its name in metrics and records (`rewards/<name>/mean`); default the kind.
    #[serde(default)]
    pub name: Option<String>,
    /// Its weight in the total reward.
    #[serde(default = "one")]
    pub weight: f64,
    /// `exact_answer`: the answer is the text after the last occurrence of this (`"####"`).
    #[serde(default)]
    pub answer_after: Option<String>,
    /// `exact_answer`: the answer is inside the last `<tag>…</tag>` (`answer`).
    #[serde(default)]
    pub answer_tag: Option<String>,
    /// `exact_answer`: the answer is the first capture group (or the match) of this regex's
    /// last match. `format`: the regex the whole completion must match.
    #[serde(default)]
    pub regex: Option<String>,
    /// `contains` / `not_contains`: the text.
    #[serde(default)]
    pub text: Option<String>,
    /// `length`: tokens allowed before the penalty starts.
    #[serde(default)]
    pub budget: Option<usize>,
    /// `length`: the length aimed at; the penalty counts the distance to it.
    #[serde(default)]
    pub target: Option<usize>,
    /// `length`: reward lost per token (default 0.001).
    #[serde(default)]
    pub penalty: Option<f64>,
    /// `tag_count`: tags that must each be opened and closed exactly once.
    #[serde(default)]
    pub tags: Vec<String>,
    /// `command`: the program, a path relative to the manifest (its content is part of the
    /// fingerprint).
    #[serde(default)]
    pub program: Option<ManifestPath>,
    /// `command`: its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// `command`: seconds it may run per batch (default 60).
    #[serde(default)]
    pub timeout: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl RewardSpec {
    /// A reward of `kind` with every option at its default.
    pub fn of(kind: RewardKind) -> Self {
        RewardSpec {
            kind,
            name: None,
            weight: 1.0,
            answer_after: None,
            answer_tag: None,
            regex: None,
            text: None,
            budget: None,
            target: None,
            penalty: None,
            tags: Vec::new(),
            program: None,
            args: Vec::new(),
            timeout: None,
        }
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.kind.as_str())
    }
}

/// What a reward sees of one sample.
#[derive(Clone, Debug, Serialize)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    pub answer: Option<&'a str>,
    /// New tokens (for `length`).
    #[serde(skip)]
    pub tokens: usize,
}

/// What goes wrong computing rewards.
#[derive(Debug, Error, Diagnostic)]
pub enum RewardError {
    #[error("reward `{name}`: sample {sample} has no answer to compare with")]
    #[diagnostic(
        code(burnish::reward::no_answer),
        help("exact_answer needs reasoning records, or records with `meta.answer`")
    )]
    NoAnswer { name: String, sample: usize },

    #[error("reward `{name}`: {program} {problem}\n{stderr}")]
    #[diagnostic(
        code(burnish::reward::command),
        help(
            "the program reads JSONL {{prompt, completion, answer}} on stdin and prints one number per line"
        )
    )]
    Command {
        name: String,
        program: String,
        problem: String,
        stderr: String,
    },

    #[error("reward `{name}`: {message}")]
    #[diagnostic(code(burnish::reward::spec))]
    Spec { name: String, message: String },
}

/// The programs of `command` rewards, as the stage's file inputs (`field[i].program`).
pub fn files(field: &str, specs: &[RewardSpec]) -> Vec<FileInput> {
    specs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.program.clone().map(|path| FileInput {
                field: format!("{field}[{i}].program"),
                path,
            })
        })
        .collect()
}

/// The problems of `specs` at validation, located at `field[i].<name>` (all of them).
pub fn check(field: &str, specs: &[RewardSpec]) -> Vec<FieldProblem> {
    let mut out = Vec::new();
    let mut names = BTreeMap::new();
    for (i, s) in specs.iter().enumerate() {
        let at = |f: &str| format!("{field}[{i}].{f}");
        let mut need = |f: &str, present: bool| {
            if !present {
                out.push(FieldProblem::new(
                    at(f),
                    format!("a `{}` reward needs `{f}`", s.kind.as_str()),
                ));
            }
        };
        match s.kind {
            RewardKind::Format => need("regex", s.regex.is_some()),
            RewardKind::Contains | RewardKind::NotContains => need("text", s.text.is_some()),
            RewardKind::Length => need("budget", s.budget.is_some() || s.target.is_some()),
            RewardKind::TagCount => need("tags", !s.tags.is_empty()),
            RewardKind::Command => need("program", s.program.is_some()),
            RewardKind::ExactAnswer => {}
        }
        if let Some(re) = &s.regex
            && let Err(e) = compile(re)
        {
            out.push(FieldProblem::new(
                at("regex"),
                format!("the regex does not compile: {}", last_line(&e.to_string())),
            ));
        }
        if !s.weight.is_finite() {
            out.push(FieldProblem::new(
                at("weight"),
                format!("weight must be finite, got {}", s.weight),
            ));
        }
        if let Some(t) = s.timeout
            && !(t > 0.0 && t.is_finite())
        {
            out.push(FieldProblem::new(
                at("timeout"),
                format!("timeout must be above 0 seconds, got {t}"),
            ));
        }
        if let Some(prev) = names.insert(s.name().to_owned(), i) {
            out.push(
                FieldProblem::new(at("name"), format!("two rewards are named `{}`", s.name()))
                    .help(format!(
                        "rewards[{prev}] has the same name; give one a `name:`"
                    )),
            );
        }
    }
    out
}

/// The regex crate's message ends with the reason on its last line; the lines above repeat the
/// pattern with a caret.
fn last_line(s: &str) -> String {
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_owned()
}

/// `regex` with `.` matching newlines.
fn compile(regex: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(regex)
        .dot_matches_new_line(true)
        .build()
}

/// Whether `path` is a file this user may execute.
fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A reward ready to score: its regex compiled, its program resolved.
#[derive(Clone)]
pub struct Reward {
    pub spec: RewardSpec,
    regex: Option<Regex>,
    program: Option<PathBuf>,
}

impl Reward {
    /// `program` is where the engine resolved a `command` reward's program.
    pub fn new(spec: RewardSpec, program: Option<&Path>) -> Result<Self, RewardError> {
        let bad = |message: String| RewardError::Spec {
            name: spec.name().to_owned(),
            message,
        };
        let regex = match &spec.regex {
            Some(r) => Some(compile(r).map_err(|e| bad(e.to_string()))?),
            None => None,
        };
        let program = match (program, spec.kind) {
            (Some(p), RewardKind::Command) if executable(p) => Some(p.to_path_buf()),
            (Some(p), RewardKind::Command) => {
                return Err(bad(format!("{} is not an executable file", p.display())));
            }
            (None, RewardKind::Command) => return Err(bad("no program".into())),
            _ => None,
        };
        Ok(Reward {
            spec,
            regex,
            program,
        })
    }

    /// The reward of every sample.
    pub fn score(&self, samples: &[RewardInput]) -> Result<Vec<f64>, RewardError> {
        let s = &self.spec;
        if s.kind == RewardKind::Command {
            return self.run_command(samples);
        }
        samples
            .iter()
            .enumerate()
            .map(|(i, x)| {
                Ok(match s.kind {
                    RewardKind::ExactAnswer => {
                        let gold = x.answer.ok_or_else(|| RewardError::NoAnswer {
                            name: s.name().to_owned(),
                            sample: i + 1,
                        })?;
                        let got = self.extract(x.completion);
                        f64::from(got.is_some_and(|g| same_answer(&g, gold)))
                    }
                    RewardKind::Format => f64::from(
                        self.regex
                            .as_ref()
                            .and_then(|r| r.find(x.completion))
                            .is_some_and(|m| m.start() == 0 && m.end() == x.completion.len()),
                    ),
                    RewardKind::Contains => f64::from(x.completion.contains(text(s))),
                    RewardKind::NotContains => f64::from(!x.completion.contains(text(s))),
                    RewardKind::Length => {
                        let p = s.penalty.unwrap_or(0.001);
                        let t = x.tokens as f64;
                        match (s.budget, s.target) {
                            (Some(b), _) => -p * (t - b as f64).max(0.0),
                            (None, Some(g)) => -p * (t - g as f64).abs(),
                            (None, None) => 0.0,
                        }
                    }
                    RewardKind::TagCount => tag_count(x.completion, &s.tags),
                    RewardKind::Command => unreachable!("handled above"),
                })
            })
            .collect()
    }

    /// The answer in a completion (see the module doc).
    pub fn extract(&self, completion: &str) -> Option<String> {
        let s = &self.spec;
        if let Some(after) = &s.answer_after {
            let at = completion.rfind(after.as_str())?;
            return Some(completion[at + after.len()..].trim().to_owned());
        }
        if let Some(tag) = &s.answer_tag {
            let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
            let start = completion.rfind(&open)? + open.len();
            let end = completion[start..]
                .find(&close)
                .map_or(completion.len(), |e| start + e);
            return Some(completion[start..end].trim().to_owned());
        }
        if let Some(re) = &self.regex {
            let caps = re.captures_iter(completion).last()?;
            let m = caps.get(1).or_else(|| caps.get(0))?;
            return Some(m.as_str().trim().to_owned());
        }
        last_number(completion)
    }

    fn run_command(&self, samples: &[RewardInput]) -> Result<Vec<f64>, RewardError> {
        let s = &self.spec;
        let program = self.program.clone().unwrap_or_default();
        let fail = |problem: String, stderr: String| RewardError::Command {
            name: s.name().to_owned(),
            program: program.display().to_string(),
            problem,
            stderr,
        };
        let mut input = Vec::new();
        for x in samples {
            serde_json::to_writer(&mut input, x).map_err(|e| fail(e.to_string(), String::new()))?;
            input.push(b'\n');
        }
        let mut child = Command::new(&program)
            .args(&s.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start: {e}"), String::new()))?;
        let mut stdin = child.stdin.take();
        let writer = std::thread::spawn(move || {
            if let Some(w) = stdin.as_mut() {
                let _ = w.write_all(&input);
            }
        });
        // Read both pipes on threads so a chatty program cannot block on a full pipe.
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = read(child.stdout.take().map(|p| Box::new(p) as _));
        let err = read(child.stderr.take().map(|p| Box::new(p) as _));
        let limit = Duration::from_secs_f64(s.timeout.unwrap_or(60.0));
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if started.elapsed() > limit => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr =
                        String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
                    return Err(fail(
                        format!(
                            "ran past its timeout of {} s and was killed",
                            limit.as_secs_f64()
                        ),
                        stderr,
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(fail(format!("cannot be waited for: {e}"), String::new())),
            }
        };
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        if !status.success() {
            return Err(fail(format!("exited with {status}"), stderr));
        }
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != samples.len() {
            return Err(fail(
                format!(
                    "printed {} lines for {} samples",
                    lines.len(),
                    samples.len()
                ),
                stderr,
            ));
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| !v.is_infinite())
                    .ok_or_else(|| {
                        fail(
                            format!("line {}: `{}` is not a number", i + 1, l.trim()),
                            stderr.clone(),
                        )
                    })
            })
            .collect()
    }
}

fn text(s: &RewardSpec) -> &str {
    s.text.as_deref().unwrap_or("")
}

/// The last number in `text` (digits with an optional sign, commas and decimal point).
pub fn last_number(text: &str) -> Option<String> {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"-?\$?\d[\d,]*(?:\.\d+)?")
            .unwrap_or_else(|e| unreachable!("a fixed regex: {e}"))
    });
    re.find_iter(text).last().map(|m| m.as_str().to_owned())
}

/// `answer` as a number when it is one: commas, `$`, spaces and a trailing `.` dropped.
fn number(answer: &str) -> Option<f64> {
    let cleaned: String = answer
        .trim()
        .trim_end_matches('.')
        .chars()
        .filter(|c| !matches!(c, ',' | '$' | ' '))
        .collect();
    cleaned.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Whether an extracted answer equals the gold one (numerically when both are numbers).
pub fn same_answer(got: &str, gold: &str) -> bool {
    match (number(got), number(gold)) {
        (Some(a), Some(b)) => a == b,
        _ => got.trim() == gold.trim(),
    }
}

/// The share of the markers `<t>`, `</t>` of `tags` that occur exactly once in `text`.
pub fn tag_count(text: &str, tags: &[String]) -> f64 {
    if tags.is_empty() {
        return 0.0;
    }
    let once = |m: &str| text.matches(m).count() == 1;
    let hits: usize = tags
        .iter()
        .map(|t| usize::from(once(&format!("<{t}>"))) + usize::from(once(&format!("</{t}>"))))
        .sum();
    hits as f64 / (2 * tags.len()) as f64
}

/// Every reward of every sample and the weighted totals: (`per_reward[k][i]`, `total[i]`).
pub fn score_all(
    rewards: &[Reward],
    samples: &[RewardInput],
) -> Result<(Vec<Vec<f64>>, Vec<f64>), RewardError> {
    let per: Vec<Vec<f64>> = rewards
        .iter()
        .map(|r| r.score(samples))
        .collect::<Result<_, _>>()?;
    let total = (0..samples.len())
        .map(|i| {
            rewards
                .iter()
                .zip(&per)
                .map(|(r, v)| r.spec.weight * v[i])
                .filter(|v| !v.is_nan())
                .sum()
        })
        .collect();
    Ok((per, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: RewardKind) -> RewardSpec {
        RewardSpec::of(kind)
    }

    fn input<'a>(completion: &'a str, answer: Option<&'a str>) -> RewardInput<'a> {
        RewardInput {
            prompt: "p",
            completion,
            answer,
            tokens: completion.split_whitespace().count(),
        }
    }

    fn score(s: RewardSpec, completions: &[(&str, Option<&str>)]) -> Vec<f64> {
        let r = Reward::new(s, None).unwrap();
        let inputs: Vec<_> = completions.iter().map(|(c, a)| input(c, *a)).collect();
        r.score(&inputs).unwrap()
    }

    #[test]
    fn exact_answer_extracts_after_hashes_from_tags_and_the_last_number() {
        let mut after = spec(RewardKind::ExactAnswer);
        after.answer_after = Some("####".into());
        assert_eq!(
            score(
                after,
                &[
                    ("3 + 5 = 8\nso 8 * 2 = 16\n#### 16", Some("16")),
                    ("#### 1,000.0", Some("1000")),
                    ("#### $16.", Some("16")),
                    ("16", Some("16")), // no marker: no answer
                    ("#### 15", Some("16")),
                ]
            ),
            [1.0, 1.0, 1.0, 0.0, 0.0]
        );
        let mut tag = spec(RewardKind::ExactAnswer);
        tag.answer_tag = Some("answer".into());
        assert_eq!(
            score(
                tag,
                &[
                    (
                        "<reasoning>\n2+2\n</reasoning>\n<answer>\n4\n</answer>",
                        Some("4")
                    ),
                    ("<answer>3</answer> then <answer>4</answer>", Some("4")),
                    ("<answer>four</answer>", Some("4")),
                ]
            ),
            [1.0, 1.0, 0.0]
        );
        assert_eq!(
            score(
                spec(RewardKind::ExactAnswer),
                &[
                    ("the total is 12, not 13, it is 14", Some("14")),
                    ("answer: -7", Some("-7")),
                    ("no number", Some("1")),
                ]
            ),
            [1.0, 1.0, 0.0]
        );
        let r = Reward::new(spec(RewardKind::ExactAnswer), None).unwrap();
        assert!(matches!(
            r.score(&[input("1", None)]),
            Err(RewardError::NoAnswer { sample: 1, .. })
        ));
    }

    #[test]
    fn format_matches_the_whole_completion_across_lines() {
        let mut f = spec(RewardKind::Format);
        f.regex = Some(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$".into());
        assert_eq!(
            score(
                f,
                &[
                    (
                        "<reasoning>\nline one\nline two\n</reasoning>\n<answer>\n4\n</answer>\n",
                        None
                    ),
                    (
                        "<reasoning>\nx\n</reasoning>\n<answer>\n4\n</answer>\ntrailing",
                        None
                    ),
                    ("<answer>\n4\n</answer>", None),
                ]
            ),
            [1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn contains_length_and_tag_count() {
        let mut c = spec(RewardKind::Contains);
        c.text = Some("because".into());
        assert_eq!(
            score(c.clone(), &[("yes because", None), ("no", None)]),
            [1.0, 0.0]
        );
        c.kind = RewardKind::NotContains;
        assert_eq!(score(c, &[("yes because", None), ("no", None)]), [0.0, 1.0]);

        let mut l = spec(RewardKind::Length);
        l.budget = Some(2);
        l.penalty = Some(0.5);
        assert_eq!(
            score(l.clone(), &[("a b", None), ("a b c d", None)]),
            [0.0, -1.0]
        );
        l.budget = None;
        l.target = Some(3);
        assert_eq!(score(l, &[("a", None), ("a b c d", None)]), [-1.0, -0.5]);

        let mut t = spec(RewardKind::TagCount);
        t.tags = vec!["reasoning".into(), "answer".into()];
        assert_eq!(
            score(
                t,
                &[
                    ("<reasoning>x</reasoning><answer>1</answer>", None),
                    ("<reasoning>x</reasoning>", None),
                    ("<answer>1</answer><answer>2</answer> <reasoning>", None),
                ]
            ),
            [1.0, 0.5, 0.25]
        );
    }

    #[test]
    fn weights_combine_and_abstentions_are_skipped() {
        let mut a = spec(RewardKind::Contains);
        a.text = Some("x".into());
        a.weight = 2.0;
        let mut b = spec(RewardKind::NotContains);
        b.text = Some("y".into());
        b.weight = 0.5;
        let rewards = [Reward::new(a, None).unwrap(), Reward::new(b, None).unwrap()];
        let (per, total) = score_all(&rewards, &[input("x", None), input("y", None)]).unwrap();
        assert_eq!(per, [vec![1.0, 0.0], vec![1.0, 0.0]]);
        assert_eq!(total, [2.5, 0.0]);
    }

    #[test]
    fn check_names_every_problem() {
        let mut bad = spec(RewardKind::Format);
        bad.regex = Some("(unclosed".into());
        let mut dup = spec(RewardKind::Format);
        dup.regex = Some("ok".into());
        let problems = check("rewards", &[bad, dup, spec(RewardKind::TagCount)]);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["rewards[0].regex", "rewards[1].name", "rewards[2].tags"]
        );
        assert!(problems[0].message.contains("does not compile"));
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("score.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn command(dir: &Path, body: &str, timeout: Option<f64>) -> Result<Vec<f64>, RewardError> {
        let p = script(dir, body);
        let mut s = spec(RewardKind::Command);
        s.program = Some(ManifestPath("score.sh".into()));
        s.timeout = timeout;
        let r = Reward::new(s, Some(&p))?;
        r.score(&[input("a", Some("1")), input("b", None)])
    }

    #[test]
    fn command_reads_jsonl_and_fails_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        // One number per line: the completion's length in bytes of its JSON line.
        let ok = command(tmp.path(), "while read -r l; do echo ${#l}; done", None).unwrap();
        assert_eq!(ok, [44.0, 45.0]);
        let err =
            |body: &str, t: Option<f64>| command(tmp.path(), body, t).unwrap_err().to_string();
        assert!(err("echo 1", None).contains("printed 1 lines for 2 samples"));
        assert!(err("echo 1; echo x", None).contains("line 2: `x` is not a number"));
        let crash = err("cat >/dev/null; echo boom >&2; exit 3", None);
        assert!(
            crash.contains("exited with exit status: 3") && crash.contains("boom"),
            "{crash}"
        );
        assert!(err("sleep 5", Some(0.2)).contains("ran past its timeout of 0.2 s"));
    }
}

//! Manifest diagnostics: every problem found while loading and validating a manifest, each with
//! a code, the file, a label on the offending YAML span and, where we can guess it, help.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};

use crate::yaml::{Sources, Span};

/// The kinds of manifest problem. Each is a stable diagnostic code (`burnish::manifest::…`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The file could not be read.
    Io,
    /// Not YAML, or YAML over the parser's budget (depth, aliases, size).
    Syntax,
    /// The document (or a part of it) is not the shape a manifest needs.
    Shape,
    /// A key the type does not have.
    UnknownField,
    /// A value of the wrong type.
    WrongType,
    /// A name outside an enumeration (format, backend, loss…).
    BadValue,
    /// A required field is absent.
    MissingField,
    /// The same key twice in one mapping.
    DuplicateKey,
    /// `kind:` names no stage kind.
    UnknownKind,
    /// A stage name outside `[a-z0-9_-]+`.
    BadStageName,
    /// A reference to a stage that does not exist, or to an output it does not have.
    UnknownReference,
    /// A reference to a stage whose artifact has the wrong kind.
    WrongArtifact,
    /// Stages that depend on each other in a loop.
    Cycle,
    /// A `matrix:` key that names no field, or has no values.
    BadMatrix,
    /// `extends:` points at a missing file or loops.
    Extends,
    /// A referenced file does not exist.
    MissingFile,
    /// A number or combination of parameters out of range.
    OutOfRange,
}

impl Code {
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::Io => "burnish::manifest::io",
            Code::Syntax => "burnish::manifest::syntax",
            Code::Shape => "burnish::manifest::shape",
            Code::UnknownField => "burnish::manifest::unknown_field",
            Code::WrongType => "burnish::manifest::wrong_type",
            Code::BadValue => "burnish::manifest::bad_value",
            Code::MissingField => "burnish::manifest::missing_field",
            Code::DuplicateKey => "burnish::manifest::duplicate_key",
            Code::UnknownKind => "burnish::manifest::unknown_kind",
            Code::BadStageName => "burnish::manifest::bad_stage_name",
            Code::UnknownReference => "burnish::manifest::unknown_reference",
            Code::WrongArtifact => "burnish::manifest::wrong_artifact",
            Code::Cycle => "burnish::manifest::cycle",
            Code::BadMatrix => "burnish::manifest::bad_matrix",
            Code::Extends => "burnish::manifest::extends",
            Code::MissingFile => "burnish::manifest::missing_file",
            Code::OutOfRange => "burnish::manifest::out_of_range",
        }
    }
}

/// One problem in a manifest.
#[derive(Clone, Debug)]
pub struct Problem {
    pub code: Code,
    pub message: String,
    /// Where: the file and span, when the problem is about a place in a file.
    pub at: Option<(NamedSource<Arc<String>>, Span)>,
    /// Text of the label on the span.
    pub label: String,
    /// Further places (e.g. the first definition of a duplicate).
    pub related_spans: Vec<(Span, String)>,
    pub help: Option<String>,
    /// 1-based line and column of `at`, for plain-text renderings.
    pub line_col: Option<(usize, usize)>,
    /// File name of `at`.
    pub file: Option<String>,
}

impl Problem {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Problem {
            code,
            message: message.into(),
            at: None,
            label: "here".into(),
            related_spans: Vec::new(),
            help: None,
            line_col: None,
            file: None,
        }
    }

    pub fn at(mut self, sources: &Sources, span: Span, label: impl Into<String>) -> Self {
        self.at = Some((sources.named(span.file), span));
        self.line_col = Some(sources.line_col(span));
        self.file = Some(sources.get(span.file).name.clone());
        self.label = label.into();
        self
    }

    pub fn also(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related_spans.push((span, label.into()));
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn maybe_help(mut self, help: Option<String>) -> Self {
        if help.is_some() {
            self.help = help;
        }
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code.as_str()))
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.at.as_ref().map(|(src, _)| src as &dyn SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let (_, span) = self.at.as_ref()?;
        let primary = LabeledSpan::new_primary_with_span(Some(self.label.clone()), span.miette());
        // Related spans in the same file only: miette renders one source per diagnostic.
        let others = self
            .related_spans
            .iter()
            .filter(|(s, _)| s.file == span.file)
            .map(|(s, l)| LabeledSpan::new_with_span(Some(l.clone()), s.miette()));
        Some(Box::new(std::iter::once(primary).chain(others)))
    }
}

/// All problems found in one manifest, in source order.
#[derive(Clone, Debug)]
pub struct ManifestErrors {
    /// The manifest as named on the command line.
    pub manifest: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{} has {n} problem{}",
            self.manifest,
            if n == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for ManifestErrors {}

impl Diagnostic for ManifestErrors {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new("burnish::manifest::invalid"))
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(self.problems.iter().map(|p| p as &dyn Diagnostic)))
    }
}

impl ManifestErrors {
    /// Render every problem with miette's graphical handler (no colour, fixed width): what the
    /// CLI prints and what the snapshot tests hold.
    pub fn render(&self, width: usize, color: bool) -> String {
        let theme = if color {
            miette::GraphicalTheme::unicode()
        } else {
            miette::GraphicalTheme::unicode_nocolor()
        };
        let handler = miette::GraphicalReportHandler::new_themed(theme).with_width(width);
        let mut out = String::new();
        for p in &self.problems {
            let _ = handler.render_report(&mut out, p);
            out.push('\n');
        }
        out.push_str(&format!("error: {self}\n"));
        out
    }
}

/// "did you mean `format`?" when `got` is close to one of `candidates`.
pub fn suggest<'a>(got: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(got, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Help text for a name that is not one of `candidates`.
pub fn choices_help(got: &str, candidates: &[&str], what: &str) -> String {
    let list = candidates
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match suggest(got, candidates.iter().copied()) {
        Some(s) => format!("did you mean `{s}`? valid {what}: {list}"),
        None => format!("valid {what}: {list}"),
    }
}

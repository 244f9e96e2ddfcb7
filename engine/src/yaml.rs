//! YAML as a spanned node tree.
//!
//! Manifests are parsed with serde-saphyr into [`Node`]s that remember, for every key and value,
//! the source file and byte span they came from. `extends` merging and `matrix` expansion work on
//! this tree, so a diagnostic about a merged or expanded value still points at the line where the
//! user wrote it. Typed parameters are then read out of the tree by [`crate::de`].

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Index of a source file in a [`Sources`] table.
pub type FileId = usize;

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    pub file: FileId,
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub fn miette(&self) -> miette::SourceSpan {
        (self.offset, self.len).into()
    }
}

/// The text of every file a manifest was assembled from (itself and the files it extends).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Name as shown in diagnostics (the path as given on the command line or in `extends`).
    pub name: String,
    pub text: Arc<String>,
    /// The file's absolute path, when it was read from disk: paths written in it are relative
    /// to its directory.
    pub path: Option<std::path::PathBuf>,
}

impl Sources {
    /// The files' names, in the order added (a manifest, then its `extends` bases).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|f| f.name.as_str())
    }

    pub fn add(&mut self, name: String, text: String) -> FileId {
        self.files.push(SourceFile {
            name,
            text: Arc::new(text),
            path: None,
        });
        self.files.len() - 1
    }

    /// [`Sources::add`] for a file read from `path`.
    pub fn add_file(&mut self, name: String, text: String, path: &std::path::Path) -> FileId {
        let id = self.add(name, text);
        self.files[id].path = Some(path.to_path_buf());
        id
    }

    /// The directory of the file a span lies in, when it was read from disk.
    pub fn dir_of(&self, span: Span) -> Option<&std::path::Path> {
        self.files.get(span.file)?.path.as_deref()?.parent()
    }

    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id]
    }

    /// A miette source for a file, to attach to a diagnostic.
    pub fn named(&self, id: FileId) -> miette::NamedSource<Arc<String>> {
        let f = &self.files[id];
        miette::NamedSource::new(f.name.clone(), f.text.clone()).with_language("yaml")
    }

    /// 1-based line and column of a span start.
    pub fn line_col(&self, span: Span) -> (usize, usize) {
        let text = &self.files[span.file].text;
        let upto = &text[..span.offset.min(text.len())];
        let line = upto.matches('\n').count() + 1;
        let col = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

/// A YAML value with its span.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub span: Span,
}

/// A mapping key with its span.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

impl Value {
    /// What the value is, for messages ("expected a mapping, found a string").
    pub fn describe(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl Node {
    pub fn new(value: Value, span: Span) -> Self {
        Node { value, span }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The entry for `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }

    pub fn get_key(&self, key: &str) -> Option<&Key> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(k, _)| k)
    }

    /// Follow a field path (`lora.rank`, `sources[1].data`); returns the node, or the deepest
    /// node reached.
    pub fn lookup(&self, path: &str) -> Result<&Node, &Node> {
        let mut cur = self;
        for seg in split_path(path) {
            let next = match seg {
                PathSeg::Key(k) => cur.get(k),
                PathSeg::Index(i) => match &cur.value {
                    Value::Seq(items) => items.get(i),
                    _ => None,
                },
            };
            match next {
                Some(n) => cur = n,
                None => return Err(cur),
            }
        }
        Ok(cur)
    }

    /// Convert to JSON, dropping spans.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::UInt(u) => J::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(m) => J::Object(
                m.iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// A short rendering of a scalar for cell names and messages (`0.1`, `cosine`).
    pub fn scalar_text(&self) -> String {
        match &self.value {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(f) => format_float(*f),
            Value::Str(s) => s.clone(),
            _ => serde_json::to_string(&self.to_json()).unwrap_or_default(),
        }
    }
}

/// Floats print as YAML users write them: `0.1`, `2e-4`, `3.0`.
pub fn format_float(f: f64) -> String {
    let s = format!("{f}");
    if s.len() > 8 && f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e6) {
        format!("{f:e}")
    } else {
        s
    }
}

pub enum PathSeg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Split `a.b[2].c` into segments.
pub fn split_path(path: &str) -> Vec<PathSeg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            if i > 0 {
                out.push(PathSeg::Key(&rest[..i]));
            }
            rest = &rest[i..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(end) = stripped.find(']') else { break };
                if let Ok(n) = stripped[..end].parse() {
                    out.push(PathSeg::Index(n));
                }
                rest = &stripped[end + 1..];
            }
        } else if !rest.is_empty() {
            out.push(PathSeg::Key(rest));
        }
    }
    out
}

/// A YAML syntax (or budget) error.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub message: String,
    pub span: Option<Span>,
}

/// Parse one YAML document into a node tree. An empty document is `Null`.
pub fn parse(text: &str, file: FileId) -> Result<Node, SyntaxError> {
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(Node::new(
            Value::Null,
            Span {
                file,
                offset: 0,
                len: 0,
            },
        ));
    }
    let options = serde_saphyr::options! {
        // Duplicates reach the validator, which reports both places.
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::PassThrough,
        // YAML 1.2 booleans only: under YAML 1.1 the key `n` (generate's sample count) and values
        // such as `no` or `off` would silently read as `false`.
        strict_booleans: true,
        budget: serde_saphyr::budget! {
            max_depth: 24,
            max_nodes: 200_000,
            max_aliases: 1_000,
            max_documents: 1,
        },
    };
    let raw: Result<Spanned<Raw>, _> = serde_saphyr::from_str_with_options(text, options);
    match raw {
        Ok(raw) => Ok(into_node(raw, file, text)),
        Err(e) => {
            let span = e.location().map(|loc| span_of(&loc, file, text));
            let message = first_line(&e.to_string());
            Err(SyntaxError { message, span })
        }
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    // Positions are in the label; drop "line N column M: " prefixes.
    let line = match line.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map_or(line, |(_, msg)| msg),
        None => line,
    };
    if let Some(budget) = line.strip_prefix("budget breached: ") {
        let n = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
        return if budget.starts_with("Depth") {
            format!("nested deeper than 24 levels ({})", n(budget))
        } else if budget.starts_with("Nodes") {
            "expands to more than 200000 nodes (aliases multiplying?)".to_owned()
        } else if budget.starts_with("Documents") {
            "a manifest holds one YAML document; found a second `---`".to_owned()
        } else if budget.starts_with("Aliases") {
            "uses more than 1000 aliases".to_owned()
        } else {
            format!("too large to read ({budget})")
        };
    }
    // serde-saphyr appends " at line N column M"; the label carries the position.
    let line = match line.find(" at line ") {
        Some(i) => &line[..i],
        None => line,
    };
    line.trim_end_matches('.').to_owned()
}

fn span_of(loc: &serde_saphyr::Location, file: FileId, text: &str) -> Span {
    let s = loc.span();
    let offset = match s.byte_offset() {
        Some(o) => o as usize,
        None => offset_of_line_col(text, loc.line() as usize, loc.column() as usize),
    };
    let len = s.byte_len().unwrap_or(0) as usize;
    let offset = offset.min(text.len());
    let len = len.min(text.len() - offset);
    Span { file, offset, len }
}

fn offset_of_line_col(text: &str, line: usize, col: usize) -> usize {
    let mut off = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return off
                + l.char_indices()
                    .nth(col.saturating_sub(1))
                    .map_or(l.len(), |(b, _)| b);
        }
        off += l.len();
    }
    text.len()
}

/// What serde-saphyr hands us: values with locations, converted to [`Node`] afterwards (the
/// conversion needs the file id and text, which a `Deserialize` impl cannot carry).
enum Raw {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<String>, Spanned<Raw>)>),
}

fn into_node(raw: Spanned<Raw>, file: FileId, text: &str) -> Node {
    let mut span = span_of(&raw.referenced, file, text);
    let value = match raw.value {
        Raw::Null => Value::Null,
        Raw::Bool(b) => Value::Bool(b),
        Raw::Int(i) => Value::Int(i),
        Raw::UInt(u) => Value::UInt(u),
        Raw::Float(f) => Value::Float(f),
        Raw::Str(s) => Value::Str(s),
        Raw::Seq(items) => Value::Seq(
            items
                .into_iter()
                .map(|n| into_node(n, file, text))
                .collect(),
        ),
        Raw::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let kspan = span_of(&k.referenced, file, text);
                    let kspan = Span {
                        len: if kspan.len == 0 {
                            k.value.len()
                        } else {
                            kspan.len
                        },
                        ..kspan
                    };
                    (
                        Key {
                            name: k.value,
                            span: kspan,
                        },
                        into_node(v, file, text),
                    )
                })
                .collect(),
        ),
    };
    if span.len == 0 {
        // Collections come with a start only; label a single character.
        span.len = text[span.offset..]
            .chars()
            .next()
            .map_or(0, |c| c.len_utf8());
    }
    Node { value, span }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        match i64::try_from(v) {
            Ok(i) => Ok(Raw::Int(i)),
            Err(_) => Ok(Raw::UInt(v)),
        }
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
        i64::try_from(v)
            .map(Raw::Int)
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
        u64::try_from(v)
            .map(|u| self.visit_u64::<E>(u).unwrap_or(Raw::UInt(u)))
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Raw, E> {
        String::from_utf8(v.to_vec())
            .map(Raw::Str)
            .map_err(|_| E::custom("binary values are not supported"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = map.next_value::<Spanned<Raw>>()?;
            entries.push((
                Spanned::new(key.value.0, key.referenced, key.defined),
                value,
            ));
        }
        Ok(Raw::Map(entries))
    }
}

/// Mapping keys: any scalar, as text (`1: x` is the key "1").
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<KeyText, E> {
                Ok(KeyText(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText("null".into()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_values() {
        let text = "a: 1\nb:\n  c: hello\n";
        let n = parse(text, 0).unwrap();
        let c = n.lookup("b.c").unwrap();
        assert_eq!(c.as_str(), Some("hello"));
        assert_eq!(&text[c.span.offset..c.span.offset + c.span.len], "hello");
        let k = n.get("b").unwrap().get_key("c").unwrap();
        assert_eq!(&text[k.span.offset..k.span.offset + k.span.len], "c");
    }

    #[test]
    fn only_yaml_1_2_spellings_are_booleans() {
        let n = parse("n: 2\ny: no\nc: off\nd: True\ne: FALSE", 0).unwrap();
        let keys: Vec<&str> = n
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.name.as_str())
            .collect();
        assert_eq!(keys, ["n", "y", "c", "d", "e"]);
        assert_eq!(n.get("y").unwrap().value, Value::Str("no".into()));
        assert_eq!(n.get("c").unwrap().value, Value::Str("off".into()));
        assert_eq!(n.get("d").unwrap().value, Value::Bool(true));
        assert_eq!(n.get("e").unwrap().value, Value::Bool(false));
    }

    #[test]
    fn scalars_are_typed() {
        let n = parse(
            "a: 1\nb: 0.5\nc: true\nd: x\ne: ~\nf: 18446744073709551615",
            0,
        )
        .unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Int(1));
        assert_eq!(n.get("b").unwrap().value, Value::Float(0.5));
        assert_eq!(n.get("c").unwrap().value, Value::Bool(true));
        assert_eq!(n.get("d").unwrap().value, Value::Str("x".into()));
        assert_eq!(n.get("e").unwrap().value, Value::Null);
        assert_eq!(n.get("f").unwrap().value, Value::UInt(u64::MAX));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("a: [1, 2\nb: 3\n", 0).unwrap_err();
        assert!(e.span.is_some(), "{e:?}");
    }
}

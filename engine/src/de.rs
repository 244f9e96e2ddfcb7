//! Reading typed values out of a [`Node`] tree with serde, keeping the span of whatever went
//! wrong.
//!
//! serde's derived code reports problems through `de::Error` constructors (`unknown_field`,
//! `invalid_type`, `missing_field`…) that know nothing of positions. [`NodeDeserializer`] attaches
//! the span of the key or value being read when such an error passes through it, and keeps the
//! structured parts (the unknown name and the valid alternatives) so the diagnostic can suggest a
//! fix.

use std::fmt;

use serde::de::{self, DeserializeSeed, Error as _, IntoDeserializer, Visitor};

use crate::yaml::{Key, Node, Span, Value};

/// What went wrong while reading typed values.
#[derive(Clone, Debug, PartialEq)]
pub enum DeErrorKind {
    UnknownField {
        field: String,
        expected: Vec<&'static str>,
    },
    UnknownVariant {
        variant: String,
        expected: Vec<&'static str>,
    },
    MissingField(&'static str),
    DuplicateField(&'static str),
    Other,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeError {
    pub kind: DeErrorKind,
    pub message: String,
    pub span: Option<Span>,
    /// Field path from the deserialized root, e.g. `lora.rank`.
    pub path: Vec<String>,
}

impl DeError {
    fn with_span(mut self, span: Span) -> Self {
        if self.span.is_none() {
            self.span = Some(span);
        }
        self
    }
    fn with_segment(mut self, seg: String) -> Self {
        self.path.insert(0, seg);
        self
    }

    /// The same error, read from under field `name` of the mapping it was reported for.
    pub fn at_field(self, name: &str) -> Self {
        self.with_segment(name.to_owned())
    }

    /// The dotted field path (`lora.rank`, `sources[1].weight`).
    pub fn path_string(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            if seg.starts_with('[') || s.is_empty() {
                s.push_str(seg);
            } else {
                s.push('.');
                s.push_str(seg);
            }
        }
        s
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            kind: DeErrorKind::Other,
            message: msg.to_string(),
            span: None,
            path: Vec::new(),
        }
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError {
            kind: DeErrorKind::UnknownField {
                field: field.to_owned(),
                expected: expected.to_vec(),
            },
            message: format!("unknown field `{field}`"),
            span: None,
            path: Vec::new(),
        }
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError {
            kind: DeErrorKind::UnknownVariant {
                variant: variant.to_owned(),
                expected: expected.to_vec(),
            },
            message: format!("unknown value `{variant}`"),
            span: None,
            path: Vec::new(),
        }
    }
    fn missing_field(field: &'static str) -> Self {
        DeError {
            kind: DeErrorKind::MissingField(field),
            message: format!("missing field `{field}`"),
            span: None,
            path: Vec::new(),
        }
    }
    fn duplicate_field(field: &'static str) -> Self {
        DeError {
            kind: DeErrorKind::DuplicateField(field),
            message: format!("duplicate field `{field}`"),
            span: None,
            path: Vec::new(),
        }
    }
    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        DeError::custom(format_args!(
            "expected {}, found {}",
            plain_expected(&exp.to_string()),
            describe_unexpected(&unexp)
        ))
    }
    fn invalid_value(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        DeError::custom(format_args!(
            "expected {}, found {}",
            plain_expected(&exp.to_string()),
            describe_unexpected(&unexp)
        ))
    }
}

/// serde names Rust types ("f64", "u32"); users wrote YAML.
fn plain_expected(exp: &str) -> String {
    match exp {
        "f64" | "f32" => "a number".into(),
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".into(),
        "a boolean" | "bool" => "`true` or `false`".into(),
        other => other.to_owned(),
    }
}

fn describe_unexpected(u: &de::Unexpected) -> String {
    use de::Unexpected as U;
    match u {
        U::Bool(b) => format!("boolean `{b}`"),
        U::Unsigned(n) => format!("integer `{n}`"),
        U::Signed(n) => format!("integer `{n}`"),
        U::Float(f) => format!("number `{f}`"),
        U::Str(s) => format!("string \"{s}\""),
        U::Unit => "null".into(),
        U::Seq => "a list".into(),
        U::Map => "a mapping".into(),
        other => other.to_string(),
    }
}

/// A serde deserializer over one node.
pub struct NodeDeserializer<'a> {
    node: &'a Node,
}

impl<'a> NodeDeserializer<'a> {
    pub fn new(node: &'a Node) -> Self {
        NodeDeserializer { node }
    }
}

macro_rules! forward_to_any {
    ($($m:ident)*) => {
        $(fn $m<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
            self.deserialize_any(v)
        })*
    };
}

impl<'de, 'a> de::Deserializer<'de> for NodeDeserializer<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let span = self.node.span;
        let r = match &self.node.value {
            Value::Null => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Int(i) => v.visit_i64(*i),
            Value::UInt(u) => v.visit_u64(*u),
            Value::Float(f) => v.visit_f64(*f),
            Value::Str(s) => v.visit_str(s),
            Value::Seq(items) => v.visit_seq(SeqDe {
                items: items.iter(),
                index: 0,
            }),
            Value::Map(entries) => v.visit_map(MapDe {
                entries: entries.iter(),
                current: None,
            }),
        };
        r.map_err(|e| e.with_span(span))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        let span = self.node.span;
        match &self.node.value {
            Value::Str(s) => v
                .visit_enum(s.as_str().into_deserializer())
                .map_err(|e: DeError| e.with_span(span)),
            Value::Map(entries) if entries.len() == 1 => {
                let (key, value) = &entries[0];
                v.visit_enum(EnumDe { key, value })
                    .map_err(|e| e.with_span(span))
            }
            other => Err(DeError::custom(format!(
                "expected one of the allowed names, found {}",
                other.describe()
            ))
            .with_span(span)),
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        // Integers are fine where a float is wanted (`lr: 1`).
        let span = self.node.span;
        match &self.node.value {
            Value::Int(i) => v.visit_f64(*i as f64),
            Value::UInt(u) => v.visit_f64(*u as f64),
            _ => self.deserialize_any(v),
        }
        .map_err(|e| e.with_span(span))
    }

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(v)
    }

    forward_to_any! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_char deserialize_str deserialize_string deserialize_bytes
        deserialize_byte_buf deserialize_unit deserialize_seq deserialize_map
        deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }
}

struct SeqDe<'a> {
    items: std::slice::Iter<'a, Node>,
    index: usize,
}

impl<'de, 'a> de::SeqAccess<'de> for SeqDe<'a> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let i = self.index;
        self.index += 1;
        seed.deserialize(NodeDeserializer::new(node))
            .map(Some)
            .map_err(|e| e.with_span(node.span).with_segment(format!("[{i}]")))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe<'a> {
    entries: std::slice::Iter<'a, (Key, Node)>,
    current: Option<&'a (Key, Node)>,
}

impl<'de, 'a> de::MapAccess<'de> for MapDe<'a> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.current = Some(entry);
        let key = &entry.0;
        seed.deserialize(key.name.as_str().into_deserializer())
            .map(Some)
            .map_err(|e: DeError| e.with_span(key.span).with_segment(key.name.clone()))
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((key, node)) = self.current.take() else {
            return Err(DeError::custom("value requested before key"));
        };
        seed.deserialize(NodeDeserializer::new(node))
            .map_err(|e| e.with_span(node.span).with_segment(key.name.clone()))
    }
}

struct EnumDe<'a> {
    key: &'a Key,
    value: &'a Node,
}

impl<'de, 'a> de::EnumAccess<'de> for EnumDe<'a> {
    type Error = DeError;
    type Variant = VariantDe<'a>;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, VariantDe<'a>), DeError> {
        let key = self.key;
        let v = seed
            .deserialize(key.name.as_str().into_deserializer())
            .map_err(|e: DeError| e.with_span(key.span))?;
        Ok((v, VariantDe { node: self.value }))
    }
}

struct VariantDe<'a> {
    node: &'a Node,
}

impl<'de, 'a> de::VariantAccess<'de> for VariantDe<'a> {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        match self.node.value {
            Value::Null => Ok(()),
            _ => Err(DeError::custom("this value takes no parameters").with_span(self.node.span)),
        }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(NodeDeserializer::new(self.node))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(NodeDeserializer::new(self.node), v)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(NodeDeserializer::new(self.node), v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Lora {
        rank: u32,
        #[serde(default)]
        alpha: Option<f64>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    #[allow(dead_code)]
    enum Format {
        Text,
        Alpaca,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        format: Format,
        lora: Lora,
        lr: f64,
    }

    #[allow(clippy::result_large_err)] // the deserializer's own error type, as callers get it
    fn read(text: &str) -> Result<P, DeError> {
        let n = parse(text, 0).unwrap();
        P::deserialize(NodeDeserializer::new(&n))
    }

    fn at(text: &str, e: &DeError) -> String {
        let s = e.span.unwrap();
        text[s.offset..s.offset + s.len].to_owned()
    }

    #[test]
    fn unknown_field_points_at_key() {
        let t = "format: text\nlora: {rank: 2, alhpa: 3}\nlr: 1\n";
        let e = read(t).unwrap_err();
        assert_eq!(at(t, &e), "alhpa");
        assert_eq!(e.path_string(), "lora.alhpa");
        assert!(matches!(e.kind, DeErrorKind::UnknownField { ref field, .. } if field == "alhpa"));
    }

    #[test]
    fn wrong_type_points_at_value() {
        let t = "format: text\nlora: {rank: many}\nlr: 1\n";
        let e = read(t).unwrap_err();
        assert_eq!(at(t, &e), "many");
        assert_eq!(
            e.message,
            "expected a non-negative integer, found string \"many\""
        );
    }

    #[test]
    fn bad_enum_value_lists_choices() {
        let t = "format: alpacca\nlora: {rank: 2}\nlr: 1\n";
        let e = read(t).unwrap_err();
        assert_eq!(at(t, &e), "alpacca");
        match e.kind {
            DeErrorKind::UnknownVariant { expected, .. } => {
                assert_eq!(expected, ["text", "alpaca"])
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn integers_read_as_floats() {
        let p = read("format: text\nlora: {rank: 2}\nlr: 1\n").unwrap();
        assert_eq!(p.lr, 1.0);
    }
}

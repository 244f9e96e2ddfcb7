//! Metadata values: the thirteen GGUF value types, arrays of any of them but arrays.

use std::fmt::Write as _;

/// A metadata value. The variant is the GGUF value type, which llama.cpp checks exactly: a key it
/// reads as `u32` fails to load when written as `u64` or `i32`.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(MetaArray),
}

/// A homogeneous array. GGUF allows arrays of arrays; llama.cpp does not read them, and neither
/// does burnish.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// GGUF value type ids.
pub(crate) mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The lowercase name of a value type id ("u32", "string", …).
pub(crate) fn type_id_name(id: u32) -> &'static str {
    const NAMES: [&str; 13] = [
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
        "f64",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// How many elements [`MetaValue::summary`] shows of an array.
const SUMMARY_ELEMS: usize = 6;
/// How many characters of a string [`MetaValue::summary`] shows.
const SUMMARY_CHARS: usize = 80;

impl MetaValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => type_id::U8,
            MetaValue::I8(_) => type_id::I8,
            MetaValue::U16(_) => type_id::U16,
            MetaValue::I16(_) => type_id::I16,
            MetaValue::U32(_) => type_id::U32,
            MetaValue::I32(_) => type_id::I32,
            MetaValue::F32(_) => type_id::F32,
            MetaValue::Bool(_) => type_id::BOOL,
            MetaValue::String(_) => type_id::STRING,
            MetaValue::U64(_) => type_id::U64,
            MetaValue::I64(_) => type_id::I64,
            MetaValue::F64(_) => type_id::F64,
            MetaValue::Array(_) => type_id::ARRAY,
        }
    }

    /// "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "u64", "i64", "f64" or
    /// "array" (see [`MetaArray::elem_type_name`] for an array's elements).
    pub fn type_name(&self) -> &'static str {
        type_id_name(self.type_id())
    }

    /// The value of a `U32` (only: llama.cpp does not convert between integer types either).
    pub fn as_u32(&self) -> Option<u32> {
        match self {
            MetaValue::U32(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_i32(&self) -> Option<i32> {
        match self {
            MetaValue::I32(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::U64(v) => Some(*v),
            _ => None,
        }
    }

    /// The value of an `F32` (only).
    pub fn as_f32(&self) -> Option<f32> {
        match self {
            MetaValue::F32(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetaValue::Bool(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A one-line rendering for `burnish inspect`: numbers as written, strings quoted (cut at 80
    /// characters), arrays as `[string × 512] "<unk>", "<s>", "</s>", …`.
    pub fn summary(&self) -> String {
        match self {
            MetaValue::U8(v) => v.to_string(),
            MetaValue::I8(v) => v.to_string(),
            MetaValue::U16(v) => v.to_string(),
            MetaValue::I16(v) => v.to_string(),
            MetaValue::U32(v) => v.to_string(),
            MetaValue::I32(v) => v.to_string(),
            MetaValue::F32(v) => format!("{v:?}"),
            MetaValue::Bool(v) => v.to_string(),
            MetaValue::String(s) => quote(s),
            MetaValue::U64(v) => v.to_string(),
            MetaValue::I64(v) => v.to_string(),
            MetaValue::F64(v) => format!("{v:?}"),
            MetaValue::Array(a) => a.summary(),
        }
    }
}

impl std::fmt::Display for MetaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

fn quote(s: &str) -> String {
    let mut cut: String = s.chars().take(SUMMARY_CHARS).collect();
    let more = cut.len() < s.len();
    cut = format!("{cut:?}");
    if more {
        let _ = write!(cut, "… ({} bytes)", s.len());
    }
    cut
}

impl MetaArray {
    /// The GGUF value type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        match self {
            MetaArray::U8(_) => type_id::U8,
            MetaArray::I8(_) => type_id::I8,
            MetaArray::U16(_) => type_id::U16,
            MetaArray::I16(_) => type_id::I16,
            MetaArray::U32(_) => type_id::U32,
            MetaArray::I32(_) => type_id::I32,
            MetaArray::F32(_) => type_id::F32,
            MetaArray::Bool(_) => type_id::BOOL,
            MetaArray::String(_) => type_id::STRING,
            MetaArray::U64(_) => type_id::U64,
            MetaArray::I64(_) => type_id::I64,
            MetaArray::F64(_) => type_id::F64,
        }
    }

    pub fn elem_type_name(&self) -> &'static str {
        type_id_name(self.elem_type_id())
    }

    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[string × 512] "<unk>", "<s>", …` — the element type and count, then the first six.
    pub fn summary(&self) -> String {
        fn first<T>(v: &[T], show: impl Fn(&T) -> String) -> Vec<String> {
            v.iter().take(SUMMARY_ELEMS).map(show).collect()
        }
        let shown = match self {
            MetaArray::U8(v) => first(v, |x| x.to_string()),
            MetaArray::I8(v) => first(v, |x| x.to_string()),
            MetaArray::U16(v) => first(v, |x| x.to_string()),
            MetaArray::I16(v) => first(v, |x| x.to_string()),
            MetaArray::U32(v) => first(v, |x| x.to_string()),
            MetaArray::I32(v) => first(v, |x| x.to_string()),
            MetaArray::F32(v) => first(v, |x| format!("{x:?}")),
            MetaArray::Bool(v) => first(v, |x| x.to_string()),
            MetaArray::String(v) => first(v, |x| quote(x)),
            MetaArray::U64(v) => first(v, |x| x.to_string()),
            MetaArray::I64(v) => first(v, |x| x.to_string()),
            MetaArray::F64(v) => first(v, |x| format!("{x:?}")),
        };
        let mut out = format!("[{} × {}]", self.elem_type_name(), self.len());
        if !shown.is_empty() {
            out.push(' ');
            out.push_str(&shown.join(", "));
            if self.len() > SUMMARY_ELEMS {
                out.push_str(", …");
            }
        }
        out
    }
}

impl From<MetaArray> for MetaValue {
    fn from(a: MetaArray) -> Self {
        MetaValue::Array(a)
    }
}

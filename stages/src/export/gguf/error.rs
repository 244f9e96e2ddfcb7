//! What goes wrong reading, writing and quantizing GGUF: every error names the file (where there
//! is one), the key or tensor, and the numbers that disagree.

use std::fmt;
use std::path::{Path, PathBuf};

use miette::Diagnostic;
use thiserror::Error;

use super::GgmlType;

/// The file an error is about, printed as a suffix: ` in `model.gguf`` (nothing when the bytes
/// came from memory, as with [`GgufFile::parse`](super::GgufFile::parse)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InFile(pub Option<PathBuf>);

impl InFile {
    pub fn path(&self) -> Option<&Path> {
        self.0.as_deref()
    }
}

impl fmt::Display for InFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(p) => write!(f, " in `{}`", p.display()),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Error, Diagnostic)]
pub enum GgufError {
    #[error("cannot {op} `{}`: {source}", path.display())]
    #[diagnostic(code(burnish::gguf::io))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A read that runs past the end: the header, a key, a value, a string or array whose length
    /// field is larger than what is left of the file.
    #[error("{what} needs {need} bytes at offset {offset}, only {remaining} remaining{file}")]
    #[diagnostic(
        code(burnish::gguf::truncated),
        help("the file is truncated or a length field is corrupt")
    )]
    Truncated {
        what: String,
        need: u64,
        offset: u64,
        remaining: u64,
        file: InFile,
    },

    #[error("not a GGUF file{file}: it starts with {found:?}, expected \"GGUF\"")]
    #[diagnostic(code(burnish::gguf::magic))]
    Magic { found: String, file: InFile },

    #[error("unsupported GGUF version {version}{file}")]
    #[diagnostic(
        code(burnish::gguf::version),
        help("burnish reads little-endian GGUF versions 2 and 3, and writes 3")
    )]
    Version { version: u32, file: InFile },

    #[error("key `{key}` has unknown value type {type_id}{file}")]
    #[diagnostic(
        code(burnish::gguf::value_type),
        help(
            "value types are 0..=12 (u8, i8, u16, i16, u32, i32, f32, bool, string, array, u64, i64, f64)"
        )
    )]
    ValueType {
        key: String,
        type_id: u32,
        file: InFile,
    },

    #[error("key `{key}` holds an array of arrays{file}, which llama.cpp does not read")]
    #[diagnostic(code(burnish::gguf::nested_array))]
    NestedArray { key: String, file: InFile },

    #[error("{what} at offset {offset} is not valid UTF-8{file}")]
    #[diagnostic(code(burnish::gguf::utf8))]
    Utf8 {
        what: String,
        offset: u64,
        file: InFile,
    },

    #[error("key `{key}` appears twice{file}")]
    #[diagnostic(code(burnish::gguf::duplicate_key))]
    DuplicateKey { key: String, file: InFile },

    #[error("tensor `{name}` appears twice{file}")]
    #[diagnostic(code(burnish::gguf::duplicate_tensor))]
    DuplicateTensor { name: String, file: InFile },

    #[error("key `{key}` is {found}, expected {expected}{file}")]
    #[diagnostic(code(burnish::gguf::key_type))]
    KeyType {
        key: String,
        expected: &'static str,
        found: &'static str,
        file: InFile,
    },

    #[error("alignment {alignment} is not a power of two{file}")]
    #[diagnostic(code(burnish::gguf::alignment))]
    Alignment { alignment: u64, file: InFile },

    #[error("tensor name `{name}` is {len} bytes, the limit is 63{file}")]
    #[diagnostic(code(burnish::gguf::tensor_name))]
    TensorName {
        name: String,
        len: usize,
        file: InFile,
    },

    #[error("tensor `{name}` has {n_dims} dimensions, the limit is 4{file}")]
    #[diagnostic(code(burnish::gguf::tensor_dims))]
    TensorDims {
        name: String,
        n_dims: u64,
        file: InFile,
    },

    #[error(
        "tensor `{name}` has ggml type {type_id} ({type_name}){file}, which burnish does not read"
    )]
    #[diagnostic(
        code(burnish::gguf::tensor_type),
        help("burnish reads F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q4_K and Q6_K tensors")
    )]
    TensorType {
        name: String,
        type_id: u32,
        type_name: &'static str,
        file: InFile,
    },

    /// `ne` is innermost first (the GGUF order); `reason` says what is wrong with it.
    #[error("tensor `{name}` has ne {ne:?}: {reason}{file}")]
    #[diagnostic(code(burnish::gguf::shape))]
    Shape {
        name: String,
        ne: Vec<u64>,
        reason: String,
        file: InFile,
    },

    /// `offset` is absolute (from the start of the file).
    #[error(
        "tensor `{name}` needs {need} bytes at offset {offset}, only {remaining} remaining{file}"
    )]
    #[diagnostic(code(burnish::gguf::tensor_bounds))]
    TensorBounds {
        name: String,
        need: u64,
        offset: u64,
        remaining: u64,
        file: InFile,
    },

    #[error("tensor `{name}` has data offset {offset}, expected {expected}{file}")]
    #[diagnostic(
        code(burnish::gguf::not_packed),
        help(
            "llama.cpp requires tensor data packed in tensor-info order, each tensor padded to the alignment ({alignment} bytes)"
        )
    )]
    NotPacked {
        name: String,
        offset: u64,
        expected: u64,
        alignment: u32,
        file: InFile,
    },

    #[error("tensor `{name}` ({ty} {shape:?}) needs {expected} bytes of data, got {found}")]
    #[diagnostic(code(burnish::gguf::data_length))]
    DataLength {
        name: String,
        ty: GgmlType,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },

    #[error(
        "{ty} needs rows that are a whole number of {block_size}-value blocks, got rows of {row_len}"
    )]
    #[diagnostic(
        code(burnish::gguf::row_length),
        help(
            "llama-quantize falls back Q4_K → Q5_0 and Q6_K → Q8_0, then F16 when rows are not a multiple of 32"
        )
    )]
    RowLength {
        ty: GgmlType,
        row_len: usize,
        block_size: usize,
    },

    #[error("tensor `{name}` has no data: it was declared for a streamed write")]
    #[diagnostic(
        code(burnish::gguf::no_data),
        help("write a file with declared tensors through `GgufWriter::stream`")
    )]
    NoData { name: String },

    #[error("writing `{}`: {message}", path.display())]
    #[diagnostic(code(burnish::gguf::stream))]
    Stream { path: PathBuf, message: String },

    #[error("{n} values are not a whole number of rows of {row_len}")]
    #[diagnostic(code(burnish::gguf::value_count))]
    ValueCount { n: usize, row_len: usize },

    #[error("{n} {ty} values take {expected} bytes, got {found}")]
    #[diagnostic(code(burnish::gguf::byte_length))]
    ByteLength {
        ty: GgmlType,
        n: usize,
        expected: usize,
        found: usize,
    },

    #[error("no tensor named `{name}`{file}")]
    #[diagnostic(code(burnish::gguf::missing_tensor))]
    MissingTensor { name: String, file: InFile },
}

impl GgufError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        GgufError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

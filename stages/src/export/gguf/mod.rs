//! GGUF, the file format of llama.cpp, and the GGML quantizers — in pure Rust, with no burn types:
//! the exporter hands this module f32 rows and gets bytes back.
//!
//! - [`GgufWriter`] lays out a file; [`GgufFile`] reads and checks one (`burnish inspect`, tests).
//!   A writer whose tensors are only declared (name, shape, type) writes the header first and
//!   takes the data tensor by tensor through a [`GgufStream`]: the offsets follow from the sizes,
//!   so a file far larger than memory is written with one tensor (or less) in memory.
//! - [`quantize`] / [`dequantize`] convert whole tensors between f32 and a [`GgmlType`].
//! - [`MetaValue`] / [`MetaArray`] are the typed metadata values.
//!
//! # Layout (little-endian)
//!
//! ```text
//! header       u32 magic "GGUF" | u32 version (3) | u64 tensor_count | u64 kv_count
//! metadata     kv_count × (string key | u32 value type | value)
//!              string = u64 byte length + UTF-8 bytes; array = u32 element type | u64 count | elements
//! tensor infos tensor_count × (string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset)
//! padding      zeros up to a multiple of the alignment (general.alignment, u32, default 32)
//! data         each tensor's bytes in tensor-info order, each padded to the alignment
//! ```
//!
//! `ne[0]` is the innermost (row) dimension: `ne` is the PyTorch shape reversed. A tensor's offset
//! is relative to the data section.
//!
//! # What llama.cpp demands, and this module checks both ways
//!
//! llama.cpp's loader (`gguf.cpp`) is stricter than the format and than the Python `gguf` reader,
//! and the reader here is as strict as llama.cpp, so that a file it accepts loads:
//!
//! - version 2 or 3 (little-endian); keys unique; tensor names unique and ≤ 63 bytes; ≤ 4 dims;
//! - the row length `ne[0]` a multiple of the type's block size;
//! - `general.alignment`, when present, a u32 power of two;
//! - tensor data packed: tensor *i*'s offset is exactly the sum of the sizes of tensors 0..*i*, each
//!   rounded up to the alignment (the Python reader accepts other offsets; llama.cpp does not);
//! - every tensor inside the file.
//!
//! Arrays of arrays (allowed by the format, read by neither llama.cpp nor this module) are
//! rejected. No length or count field is trusted: before anything is allocated, the bytes it
//! claims are checked against what is left of the file, so a corrupt file gives a [`GgufError`]
//! with the offset and the numbers, never a panic or a huge allocation. [`GgufFile::read`] reads
//! the header only and never the tensor data.
//!
//! The writer lays files out as ggml's `gguf_write` does: padding after the info block and after
//! every tensor (the last one included), `general.alignment` written only when it is not 32.
//! [`GgufWriter::write`] and [`GgufStream::finish`] write `<file>.tmp<pid>` and rename it into
//! place.
//!
//! # Quantizers
//!
//! Ports of ggml's reference quantizers (`quantize_row_*_ref` in `ggml-quants.c`), which are what
//! `llama-quantize` runs when it has no importance matrix. The port is bit-exact: f32 arithmetic
//! in C's operation order, ggml's round-half-even `nearest_int` (the `12582912.f` trick), C's
//! truncating and wrapping conversions, f16 rounded to nearest even. Rust never fuses `a*b + c`
//! into an FMA, and neither does ggml's reference code as llama.cpp builds it on x86-64
//! (`ggml-base` gets no `-march` flags); a build that lets the C compiler contract (aarch64, or
//! x86 with `-mfma` on ggml-base) may differ in the last bit of a k-quant scale.
//!
//! | type | block | bytes | layout | reference |
//! |------|-------|-------|--------|-----------|
//! | F32  | 1   | 4   | f32 | — |
//! | F16  | 1   | 2   | IEEE half, round to nearest even, NaN → 0x7e00 | `ggml_compute_fp32_to_fp16` |
//! | BF16 | 1   | 2   | top half of the f32, round to nearest even, NaN quieted | `ggml_compute_fp32_to_bf16` |
//! | Q8_0 | 32  | 34  | f16 d, i8 q\[32\]; d = amax/127, q = round(x/d) | `quantize_row_q8_0_ref` |
//! | Q4_0 | 32  | 18  | f16 d, nibbles\[16\]; d = max/−8 | `quantize_row_q4_0_ref` |
//! | Q5_0 | 32  | 22  | f16 d, u32 qh, nibbles\[16\]; d = max/−16 | `quantize_row_q5_0_ref` |
//! | Q4_K | 256 | 144 | f16 d, f16 dmin, 6-bit scales/mins\[12\], nibbles\[128\] | `quantize_row_q4_K_ref` |
//! | Q6_K | 256 | 210 | ql\[128\], qh\[64\], i8 scales\[16\], f16 d | `quantize_row_q6_K_ref` |
//!
//! `stages/tests/gguf.rs` holds every type against bytes that ggml's own C produced
//! (`fixtures/gguf/make_golden.py` calls `libggml-base` through ctypes), and Q8_0, Q4_0, Q5_0,
//! BF16 and F16 also against the Python `gguf` package's quantizers; dequantization is held
//! against both.
//!
//! Worst-case errors per value (amax is the block's largest |x|; the 32-value types add the f16
//! rounding of d, up to q_max · max(|d|·2⁻¹¹, 2⁻²⁵)); `stages/tests/gguf.rs` asserts them:
//!
//! - F16: relative 2⁻¹¹ (normal range), absolute 2⁻²⁵ below; BF16: relative 2⁻⁸.
//! - Q8_0: amax/254 (half a step). Q4_0: amax/8 and Q5_0: amax/16 — a full step, not half: the
//!   scale maps the block's extreme value to level −8 (−16), so a value of the opposite sign and
//!   the same magnitude lands on +8 (+16) and clamps to 7 (15).
//! - Q4_K and Q6_K optimize their scales and have no simple per-value bound. Measured relative RMS
//!   error (RMS of the error over RMS of the values) on Gaussian, Laplace and uniform rows of 512:
//!   Q4_K 0.056–0.085, Q6_K 0.014–0.022 (Q4_0 0.066–0.108, Q5_0 0.031–0.051, Q8_0 ≈ 0.005).
//!   The tests assert < 0.09 and < 0.023.

mod error;
mod format;
mod meta;
mod quant;
mod types;

pub use error::{GgufError, InFile};
pub use format::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GgufFile, GgufStream, GgufWriter,
    MAX_DIMS, MAX_TENSOR_NAME, TensorInfo,
};
pub use meta::{MetaArray, MetaValue};
pub use quant::{dequantize, quantize};
pub use types::GgmlType;

//! Exporters: models out of burnish, for the tools that run them.
//!
//! - [`gguf`]: the GGUF container (reader, writer) and the GGML quantizers.

pub mod gguf;

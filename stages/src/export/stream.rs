//! A checkpoint on disk → a GGUF file, one tensor at a time: what `export.gguf` runs, so that
//! exporting a model needs memory for a tensor, not for the model.
//!
//! The file's layout is known before any weight is read: the metadata comes from the
//! configuration and the tokenizer, and each tensor's GGUF name, shape and type from its
//! checkpoint name and shape alone ([`super::llama::tensor_type`]), so the header and the tensor
//! table (whose offsets follow from the sizes) are written first ([`GgufWriter::stream`]). Then
//! each tensor is read, converted and quantized, and its bytes appended, in table order:
//!
//! - a tensor stored as is (everything but an adapter's targets and an NF4 base's projections)
//!   is read in bands of whole rows, about [`BAND_VALUES`] values each — whole heads for Llama's
//!   Q and K, whose rows [`permute_rope_rows`] reorders within each head — so even the
//!   embedding is never held whole;
//! - a projection an adapter merges into (or whose base goes through NF4) is read whole and
//!   merged for that tensor only ([`Checkpoint::read`]);
//! - a tied output head is the embedding read again.
//!
//! The quantizers work block by block, rows are independent, and the permutation stays within a
//! head, so the bytes are those [`to_gguf`](super::llama::to_gguf) gives for the loaded (and
//! merged) model; `stages/tests/export.rs` holds the two equal at every quant, for models,
//! adapters and QLoRA adapters. Peak memory is one band (or one merged projection) as f32 plus its
//! quantized bytes, besides the vocabulary's metadata.

use std::path::Path;
use std::time::Instant;

use super::ExportError;
use super::gguf::{GgmlType, GgufStream, quantize};
use super::llama::{
    GgufOptions, Role, TensorChoice, arch_name, bits_per_weight, gguf_header, gguf_name,
    permute_rope_rows, rope_heads, tensor_type,
};
use super::vocab::GgufVocab;
use crate::model::checkpoint::{Checkpoint, CheckpointTensor};

/// Values per band of rows read, converted and quantized at a time (4 MiB of f32): enough work
/// to spread over the threads, little next to a real model's largest tensor.
pub const BAND_VALUES: usize = 1 << 20;

/// One tensor of the file: where its values come from and how they are written.
struct Planned {
    /// The checkpoint tensor it is made from (the embedding for a tied output).
    source: CheckpointTensor,
    choice: TensorChoice,
    /// Heads whose rows are permuted for llama.cpp's RoPE.
    heads: Option<usize>,
}

/// Where an export stands after a tensor, for progress reports.
#[derive(Clone, Copy, Debug)]
pub struct StreamProgress<'a> {
    /// The tensor just written.
    pub tensor: &'a TensorChoice,
    /// Tensors written so far, of `total`.
    pub done: usize,
    pub total: usize,
    /// Bytes read from the checkpoint so far (as stored: bf16 counts 2 per value).
    pub read_bytes: u64,
    /// Seconds since the first tensor started.
    pub seconds: f64,
}

impl StreamProgress<'_> {
    /// Checkpoint megabytes (10⁶ bytes) read per second.
    pub fn mb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.read_bytes as f64 / 1e6 / self.seconds
        } else {
            0.0
        }
    }
}

/// What [`write_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct GgufWritten {
    pub tensors: Vec<TensorChoice>,
    /// Values in all tensors (the output counted again when tied).
    pub weights: usize,
    /// Bytes of tensor data (without alignment padding).
    pub data_bytes: usize,
    /// Parameters of the (merged) model.
    pub params: usize,
    pub arch: &'static str,
}

impl GgufWritten {
    /// Bits per stored weight over all tensors.
    pub fn bits_per_weight(&self) -> f64 {
        bits_per_weight(self.data_bytes, self.weights)
    }
}

/// How many tensors the GGUF file of `ck` holds (a tied output head counts).
pub fn gguf_tensor_count(ck: &Checkpoint) -> usize {
    ck.tensors().len() + usize::from(ck.config.tie_word_embeddings)
}

/// Every tensor of the file, in the order [`to_gguf`](super::llama::to_gguf) writes them.
fn plan(ck: &Checkpoint, opts: &GgufOptions) -> Result<Vec<Planned>, ExportError> {
    let cfg = &ck.config;
    let mut out = Vec::with_capacity(ck.tensors().len() + 1);
    let mut embedding = None;
    for t in ck.tensors() {
        let Some((name, role, layer)) = gguf_name(&t.name) else {
            return Err(ExportError::Convert {
                message: format!("tensor `{}` has no GGUF tensor", t.name),
            });
        };
        if role == Role::TokenEmbd {
            embedding = Some(t.clone());
        }
        out.push(planned(ck, opts, t.clone(), name, role, layer));
    }
    if cfg.tie_word_embeddings
        && let Some(e) = embedding
    {
        out.push(planned(
            ck,
            opts,
            e,
            "output.weight".into(),
            Role::Output,
            0,
        ));
    }
    Ok(out)
}

fn planned(
    ck: &Checkpoint,
    opts: &GgufOptions,
    source: CheckpointTensor,
    name: String,
    role: Role,
    layer: usize,
) -> Planned {
    let (_, ty) = tensor_type(&ck.config, opts.quant, role, layer, &source.shape);
    Planned {
        heads: rope_heads(&ck.config, role),
        choice: TensorChoice {
            name,
            shape: source.shape.clone(),
            ty,
            bytes: ty.row_bytes(source.len()),
        },
        source,
    }
}

/// Write the GGUF file of the checkpoint `ck` with tokenizer metadata `vocab` at `path`, tensor
/// by tensor (see the module doc). `progress` hears after every tensor; an error it returns (a
/// cancellation) stops the export, and the unfinished file is removed.
pub fn write_gguf(
    ck: &Checkpoint,
    vocab: &GgufVocab,
    opts: &GgufOptions,
    path: &Path,
    progress: &mut dyn FnMut(&StreamProgress) -> Result<(), ExportError>,
) -> Result<GgufWritten, ExportError> {
    write_gguf_in_bands(ck, vocab, opts, path, BAND_VALUES, progress)
}

/// [`write_gguf`] with bands of about `band_values` values (the tests cross band boundaries
/// inside the fixtures' small tensors with it).
pub fn write_gguf_in_bands(
    ck: &Checkpoint,
    vocab: &GgufVocab,
    opts: &GgufOptions,
    path: &Path,
    band_values: usize,
    progress: &mut dyn FnMut(&StreamProgress) -> Result<(), ExportError>,
) -> Result<GgufWritten, ExportError> {
    let mut writer = gguf_header(&ck.config, vocab, opts)?;
    let planned = plan(ck, opts)?;
    debug_assert_eq!(planned.len(), gguf_tensor_count(ck));
    for p in &planned {
        let c = &p.choice;
        writer.declare_tensor(&c.name, &c.shape, c.ty)?;
    }
    let mut stream = writer.stream(path)?;
    let started = Instant::now();
    let mut read_bytes = 0u64;
    for (i, p) in planned.iter().enumerate() {
        write_tensor(ck, p, band_values, &mut stream)?;
        read_bytes += ck.stored_bytes(&p.source) as u64;
        progress(&StreamProgress {
            tensor: &p.choice,
            done: i + 1,
            total: planned.len(),
            read_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })?;
    }
    stream.finish()?;
    let tensors: Vec<TensorChoice> = planned.into_iter().map(|p| p.choice).collect();
    Ok(GgufWritten {
        weights: tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum(),
        data_bytes: tensors.iter().map(|t| t.bytes).sum(),
        params: ck.num_params(),
        arch: arch_name(&ck.config),
        tensors,
    })
}

/// Read, convert, quantize and append one tensor.
fn write_tensor(
    ck: &Checkpoint,
    p: &Planned,
    band_values: usize,
    stream: &mut GgufStream,
) -> Result<(), ExportError> {
    let shape = &p.source.shape;
    let ty = p.choice.ty;
    if let [rows, cols] = shape[..]
        && ck.is_stored_as_is(&p.source)
    {
        let band = band_rows(rows, cols, p.heads, band_values);
        let mut values = Vec::with_capacity(band.min(rows) * cols);
        let mut start = 0;
        while start < rows {
            let count = band.min(rows - start);
            values.clear();
            ck.read_rows(&p.source, start, count, &mut values)?;
            let heads = p.heads.map(|h| h * count / rows);
            put(stream, ty, &values, count, cols, heads)?;
            start += count;
        }
        return Ok(());
    }
    let values = ck.read(&p.source)?;
    match shape[..] {
        [rows, cols] => put(stream, ty, &values, rows, cols, p.heads),
        // A vector is one row; a bias of Q or K is permuted as a column.
        _ => put(stream, ty, &values, values.len(), 1, p.heads),
    }
}

/// Rows per band of a `rows × cols` tensor: about `band_values` values (at least a row), a whole
/// number of heads when the rows are permuted per head.
fn band_rows(rows: usize, cols: usize, heads: Option<usize>, band_values: usize) -> usize {
    let unit = match heads {
        Some(h) if h > 0 && rows.is_multiple_of(h) => rows / h,
        Some(_) => rows, // not whole heads: permute the tensor at once, as to_gguf does
        None => 1,
    };
    let per = (band_values / cols.max(1)).max(1);
    (per / unit).max(1) * unit
}

/// Permute `values` (`rows × cols`) within `heads` heads if asked, quantize them to `ty` in rows
/// of `cols` (a vector, `cols = 1`, in one row) and append the bytes to the tensor being written.
fn put(
    stream: &mut GgufStream,
    ty: GgmlType,
    values: &[f32],
    rows: usize,
    cols: usize,
    heads: Option<usize>,
) -> Result<(), ExportError> {
    let permuted;
    let values = match heads {
        Some(h) => {
            permuted = permute_rope_rows(values, rows, cols, h);
            &permuted
        }
        None => values,
    };
    let row_len = if cols == 1 { values.len() } else { cols };
    let bytes = quantize(ty, values, row_len)?;
    stream.put(&bytes)?;
    Ok(())
}

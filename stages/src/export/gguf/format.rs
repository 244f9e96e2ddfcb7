//! The container: [`GgufWriter`] lays a file out as llama.cpp's loader demands, [`GgufFile`] reads
//! one back and checks the same rules (see the module doc of [`super`] for the layout).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::error::InFile;
use super::meta::{MetaArray, MetaValue, type_id, type_id_name};
use super::types::ggml_type_name;
use super::{GgmlType, GgufError, dequantize};

/// `GGUF` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// The version burnish writes.
pub const GGUF_VERSION: u32 = 3;
/// The alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// The key that sets the alignment (a u32, a power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's `GGML_MAX_NAME` is 64, including the terminating NUL.
pub const MAX_TENSOR_NAME: usize = 63;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;

fn align_up(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

// =============================================================================================
// Writer

/// Builds a GGUF file: metadata in insertion order, then tensors in insertion order, their data
/// packed in that order, each padded to the alignment.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
    alignment: u32,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    ne: Vec<u64>,
    ty: GgmlType,
    /// Bytes of data the shape and type take.
    nbytes: u64,
    /// The data, or `None` for a tensor declared for [`GgufWriter::stream`].
    data: Option<Vec<u8>>,
}

impl PendingTensor {
    fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Set `key`, replacing its value in place when it is already set (keys are unique).
    ///
    /// `general.alignment` is the alignment: a `U32` sets [`GgufWriter::set_alignment`] (checked
    /// when writing), and it is written only when it is not 32. Any other value type is kept and
    /// makes writing fail, as llama.cpp would fail to read it.
    pub fn set(&mut self, key: &str, value: MetaValue) {
        if key == ALIGNMENT_KEY
            && let MetaValue::U32(a) = value
        {
            self.set_alignment(a);
            self.metadata.retain(|(k, _)| k != ALIGNMENT_KEY);
            return;
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// The metadata set so far, in order (without `general.alignment`).
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Set the data alignment (a power of two; checked when writing).
    pub fn set_alignment(&mut self, alignment: u32) {
        self.alignment = alignment;
    }

    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Add a tensor. `shape` is in PyTorch order (`[out, in]` for a weight) and is stored
    /// reversed as `ne`; `data` holds the already-quantized bytes of `ty`, row-major.
    ///
    /// Checks the name (≤ 63 bytes, unique), the rank (1 to 4), the row length (a multiple of
    /// `ty`'s block size) and that `data` has exactly the bytes the shape needs.
    pub fn add_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let (ne, bytes) = self.check_tensor(name, shape, ty)?;
        if data.len() as u64 != bytes {
            return Err(GgufError::DataLength {
                name: name.to_string(),
                ty,
                shape: shape.to_vec(),
                expected: bytes as usize,
                found: data.len(),
            });
        }
        self.push(name, ne, ty, bytes, Some(data));
        Ok(())
    }

    /// Declare a tensor whose data comes later, through the [`GgufStream`] that
    /// [`GgufWriter::stream`] opens: the header needs only the name, shape and type. The same
    /// checks as [`GgufWriter::add_tensor`]; returns the bytes of data the tensor takes.
    pub fn declare_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: GgmlType,
    ) -> Result<usize, GgufError> {
        let (ne, bytes) = self.check_tensor(name, shape, ty)?;
        self.push(name, ne, ty, bytes, None);
        Ok(bytes as usize)
    }

    fn push(&mut self, name: &str, ne: Vec<u64>, ty: GgmlType, nbytes: u64, data: Option<Vec<u8>>) {
        self.names.insert(name.to_string());
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            ne,
            ty,
            nbytes,
            data,
        });
    }

    /// The tensor's `ne` and bytes of data, or why it cannot be added.
    fn check_tensor(
        &self,
        name: &str,
        shape: &[usize],
        ty: GgmlType,
    ) -> Result<(Vec<u64>, u64), GgufError> {
        if name.len() > MAX_TENSOR_NAME {
            return Err(GgufError::TensorName {
                name: name.to_string(),
                len: name.len(),
                file: InFile::default(),
            });
        }
        if self.names.contains(name) {
            return Err(GgufError::DuplicateTensor {
                name: name.to_string(),
                file: InFile::default(),
            });
        }
        if shape.is_empty() || shape.len() > MAX_DIMS {
            return Err(GgufError::TensorDims {
                name: name.to_string(),
                n_dims: shape.len() as u64,
                file: InFile::default(),
            });
        }
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = tensor_nbytes(ty, &ne).map_err(|reason| GgufError::Shape {
            name: name.to_string(),
            ne: ne.clone(),
            reason,
            file: InFile::default(),
        })?;
        Ok((ne, bytes))
    }

    /// Write the file: to `<name>.tmp<pid>` beside it, then renamed over `path`, so a reader never
    /// sees half a file. Every tensor must have its data ([`GgufWriter::add_tensor`]).
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        self.check()?;
        self.check_data()?;
        let tmp = tmp_path(path);
        let result = (|| {
            let file = File::create(&tmp)?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            self.write_to(&mut w)?;
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(GgufError::io("write", &tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            GgufError::io("write", path, e)
        })
    }

    /// The whole file in memory. Every tensor must have its data.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        self.check()?;
        self.check_data()?;
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec does not fail");
        Ok(out)
    }

    /// Start writing the file at `path` with the data of declared tensors still to come: the
    /// header and the tensor table are written now (the offsets follow from the sizes), then
    /// [`GgufStream::put`] appends each declared tensor's data in order, and
    /// [`GgufStream::finish`] publishes the file. Like [`GgufWriter::write`], it goes to
    /// `<name>.tmp<pid>` and is renamed into place only when complete; a stream dropped unfinished
    /// removes it. Tensors added with their data are written when their turn comes (their data
    /// moves into the stream).
    pub fn stream(mut self, path: &Path) -> Result<GgufStream, GgufError> {
        self.check()?;
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| GgufError::io("write", &tmp, e))?;
        let mut out = Counting {
            inner: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
        };
        if let Err(e) = self.write_header(&mut out) {
            let _ = std::fs::remove_file(&tmp);
            return Err(GgufError::io("write", &tmp, e));
        }
        let data = self.tensors.iter_mut().map(|t| t.data.take()).collect();
        let mut stream = GgufStream {
            out,
            tensors: self.tensors,
            data,
            current: 0,
            written: 0,
            alignment: self.alignment as u64,
            tmp,
            path: path.to_path_buf(),
            finished: false,
        };
        stream.write_ready()?;
        Ok(stream)
    }

    fn check_data(&self) -> Result<(), GgufError> {
        match self.tensors.iter().find(|t| t.data.is_none()) {
            Some(t) => Err(GgufError::NoData {
                name: t.name.clone(),
            }),
            None => Ok(()),
        }
    }

    fn check(&self) -> Result<(), GgufError> {
        if self.alignment == 0 || !self.alignment.is_power_of_two() {
            return Err(GgufError::Alignment {
                alignment: self.alignment as u64,
                file: InFile::default(),
            });
        }
        if let Some(v) = self.get(ALIGNMENT_KEY) {
            return Err(GgufError::KeyType {
                key: ALIGNMENT_KEY.to_string(),
                expected: "u32",
                found: v.type_name(),
                file: InFile::default(),
            });
        }
        Ok(())
    }

    /// Header, metadata, tensor table and the padding after it.
    fn write_header<W: Write>(&self, w: &mut Counting<W>) -> io::Result<()> {
        let alignment = self.alignment as u64;
        let alignment_kv = (self.alignment != DEFAULT_ALIGNMENT)
            .then(|| (ALIGNMENT_KEY.to_string(), MetaValue::U32(self.alignment)));
        let kvs: Vec<&(String, MetaValue)> =
            self.metadata.iter().chain(alignment_kv.as_ref()).collect();

        w.put(&GGUF_MAGIC.to_le_bytes())?;
        w.put(&GGUF_VERSION.to_le_bytes())?;
        w.put(&(self.tensors.len() as u64).to_le_bytes())?;
        w.put(&(kvs.len() as u64).to_le_bytes())?;
        // Straight into the writer: a vocabulary's arrays are megabytes.
        for (key, value) in kvs {
            put_string(w, key)?;
            w.put(&value.type_id().to_le_bytes())?;
            put_value(w, value)?;
        }
        let mut buf = Vec::new();
        let mut offset = 0u64;
        for t in &self.tensors {
            buf.clear();
            put_string(&mut buf, &t.name)?;
            buf.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for &d in &t.ne {
                buf.extend_from_slice(&d.to_le_bytes());
            }
            buf.extend_from_slice(&t.ty.id().to_le_bytes());
            buf.extend_from_slice(&offset.to_le_bytes());
            w.put(&buf)?;
            offset += align_up(t.nbytes, alignment);
        }
        w.pad(alignment)
    }

    fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut w = Counting { inner: w, pos: 0 };
        self.write_header(&mut w)?;
        for t in &self.tensors {
            w.put(t.data.as_deref().unwrap_or_default())?;
            w.pad(self.alignment as u64)?;
        }
        w.inner.flush()
    }
}

/// A GGUF file being written tensor by tensor ([`GgufWriter::stream`]): the header is on disk,
/// and the data of the declared tensors comes through [`GgufStream::put`] in tensor order.
pub struct GgufStream {
    out: Counting<BufWriter<File>>,
    /// Every tensor of the file, in order, without its data.
    tensors: Vec<PendingTensor>,
    /// The data of the tensors added with it ([`GgufWriter::add_tensor`]), taken when written.
    data: Vec<Option<Vec<u8>>>,
    /// The tensor being written, and the bytes of it written so far.
    current: usize,
    written: u64,
    alignment: u64,
    tmp: PathBuf,
    path: PathBuf,
    finished: bool,
}

impl GgufStream {
    /// The path the file is published at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor whose data [`GgufStream::put`] expects next, if any.
    pub fn next_tensor(&self) -> Option<&str> {
        self.tensors.get(self.current).map(|t| t.name.as_str())
    }

    fn fail(&self, message: String) -> GgufError {
        GgufError::Stream {
            path: self.path.clone(),
            message,
        }
    }

    fn io(&self, e: io::Error) -> GgufError {
        GgufError::io("write", &self.tmp, e)
    }

    /// Append `bytes` to the data of the current tensor: a tensor's data may come in several
    /// pieces, and the next tensor starts once it has all its bytes.
    pub fn put(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        let Some(t) = self.tensors.get(self.current) else {
            return Err(self.fail(format!(
                "{} bytes of data after the last of {} tensors",
                bytes.len(),
                self.tensors.len()
            )));
        };
        let total = self.written + bytes.len() as u64;
        if total > t.nbytes {
            return Err(self.fail(format!(
                "tensor `{}` ({} {:?}) takes {} bytes, {total} were given",
                t.name,
                t.ty,
                t.shape(),
                t.nbytes
            )));
        }
        self.out.put(bytes).map_err(|e| self.io(e))?;
        self.written = total;
        self.write_ready()
    }

    /// Close every complete tensor (with the padding after it) and write the tensors that follow
    /// whose data was given up front.
    fn write_ready(&mut self) -> Result<(), GgufError> {
        while let Some(t) = self.tensors.get(self.current) {
            if self.written == 0
                && let Some(data) = self.data[self.current].take()
            {
                self.out.put(&data).map_err(|e| self.io(e))?;
                self.written = data.len() as u64;
            }
            if self.written < t.nbytes {
                break;
            }
            self.out.pad(self.alignment).map_err(|e| self.io(e))?;
            self.current += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Check that every tensor has all its data, then flush, sync and rename the file into place.
    pub fn finish(mut self) -> Result<(), GgufError> {
        if let Some(t) = self.tensors.get(self.current) {
            return Err(self.fail(format!(
                "the data ended in tensor `{}` after {} of its {} bytes (tensor {} of {})",
                t.name,
                self.written,
                t.nbytes,
                self.current + 1,
                self.tensors.len()
            )));
        }
        self.out.inner.flush().map_err(|e| self.io(e))?;
        self.out
            .inner
            .get_ref()
            .sync_all()
            .map_err(|e| self.io(e))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| GgufError::io("write", &self.path, e))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for GgufStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A writer that knows how many bytes it has written, to pad to the alignment.
struct Counting<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(bytes)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.pos += bytes.len() as u64;
        self.inner.write_all(bytes)
    }

    fn pad(&mut self, alignment: u64) -> io::Result<()> {
        const ZEROS: [u8; 256] = [0; 256];
        let mut pad = align_up(self.pos, alignment) - self.pos;
        while pad > 0 {
            let n = pad.min(ZEROS.len() as u64);
            self.put(&ZEROS[..n as usize])?;
            pad -= n;
        }
        Ok(())
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

fn put_string(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Each element of `v` as its little-endian bytes.
fn put_each<T: Copy, const N: usize>(
    w: &mut impl Write,
    v: &[T],
    bytes: impl Fn(T) -> [u8; N],
) -> io::Result<()> {
    v.iter().try_for_each(|&x| w.write_all(&bytes(x)))
}

fn put_value(w: &mut impl Write, value: &MetaValue) -> io::Result<()> {
    match value {
        MetaValue::U8(v) => w.write_all(&[*v]),
        MetaValue::I8(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::U16(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::I16(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::U32(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::I32(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::F32(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::Bool(v) => w.write_all(&[*v as u8]),
        MetaValue::String(s) => put_string(w, s),
        MetaValue::U64(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::I64(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::F64(v) => w.write_all(&v.to_le_bytes()),
        MetaValue::Array(a) => {
            w.write_all(&a.elem_type_id().to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            match a {
                MetaArray::U8(v) => w.write_all(v),
                MetaArray::I8(v) => put_each(w, v, i8::to_le_bytes),
                MetaArray::U16(v) => put_each(w, v, u16::to_le_bytes),
                MetaArray::I16(v) => put_each(w, v, i16::to_le_bytes),
                MetaArray::U32(v) => put_each(w, v, u32::to_le_bytes),
                MetaArray::I32(v) => put_each(w, v, i32::to_le_bytes),
                MetaArray::F32(v) => put_each(w, v, f32::to_le_bytes),
                MetaArray::Bool(v) => put_each(w, v, |x| [x as u8]),
                MetaArray::String(v) => v.iter().try_for_each(|s| put_string(w, s)),
                MetaArray::U64(v) => put_each(w, v, u64::to_le_bytes),
                MetaArray::I64(v) => put_each(w, v, i64::to_le_bytes),
                MetaArray::F64(v) => put_each(w, v, f64::to_le_bytes),
            }
        }
    }
}

/// Bytes of a tensor with dimensions `ne` (innermost first) of type `ty`, or why it has none.
fn tensor_nbytes(ty: GgmlType, ne: &[u64]) -> Result<u64, String> {
    let mut n = 1u64;
    for &d in ne {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| "the element count overflows".to_string())?;
    }
    let row = ne.first().copied().unwrap_or(1);
    let bs = ty.block_size() as u64;
    if !row.is_multiple_of(bs) {
        return Err(format!(
            "rows of {row} values are not a whole number of {ty} blocks of {bs}"
        ));
    }
    (n / bs)
        .checked_mul(ty.type_size() as u64)
        .filter(|&b| b <= i64::MAX as u64 && usize::try_from(b).is_ok())
        .ok_or_else(|| "the byte size overflows".to_string())
}

// =============================================================================================
// Reader

/// A tensor's entry in the file's tensor-info block.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// PyTorch order (`[out, in]` for a weight): `ne` reversed.
    pub shape: Vec<usize>,
    /// GGUF order: `ne[0]` is the innermost (row) dimension.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Relative to the start of the data section ([`GgufFile::data_offset`]).
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        // In `ne` order, the order the reader checked every partial product in: with a zero
        // dimension first, the product in `shape` order could overflow before reaching it.
        self.ne
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
            .unwrap_or(usize::MAX)
    }

    /// Bytes of data.
    pub fn n_bytes(&self) -> usize {
        self.ty.row_bytes(self.n_elements())
    }
}

/// A parsed GGUF header: metadata and tensor infos, checked as llama.cpp's loader checks them.
/// Tensor data stays in the file; [`GgufFile::tensor_bytes`] slices it out of the file's bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub alignment: u32,
    /// In file order (including `general.alignment` when present).
    pub metadata: Vec<(String, MetaValue)>,
    /// In file order, which is data order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section (a multiple of the alignment).
    pub data_offset: u64,
}

impl GgufFile {
    /// Read and check the header of the file at `path`. Reads no tensor data, but checks that
    /// every tensor lies inside the file.
    pub fn read(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|e| GgufError::io("read", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| GgufError::io("read", path, e))?
            .len();
        let mut r = Reader {
            inner: BufReader::with_capacity(1 << 16, file),
            pos: 0,
            len,
            file: InFile(Some(path.to_path_buf())),
        };
        parse(&mut r)
    }

    /// Parse a whole file held in memory.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader {
            inner: bytes,
            pos: 0,
            len: bytes.len() as u64,
            file: InFile::default(),
        };
        parse(&mut r)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data of `t`, sliced out of the bytes of the whole file.
    pub fn tensor_bytes<'a>(
        &self,
        file_bytes: &'a [u8],
        t: &TensorInfo,
    ) -> Result<&'a [u8], GgufError> {
        let start = self.data_offset.saturating_add(t.offset);
        let need = t.n_bytes() as u64;
        let remaining = (file_bytes.len() as u64).saturating_sub(start);
        // An empty tensor past the end is out of bounds too (its slice would start there).
        if need > remaining || start > file_bytes.len() as u64 {
            return Err(GgufError::TensorBounds {
                name: t.name.clone(),
                need,
                offset: start,
                remaining,
                file: InFile::default(),
            });
        }
        Ok(&file_bytes[start as usize..(start + need) as usize])
    }

    /// The tensor `name`, dequantized to f32 (row-major, PyTorch shape `shape`).
    pub fn tensor_f32(&self, file_bytes: &[u8], name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            name: name.to_string(),
            file: InFile::default(),
        })?;
        dequantize(t.ty, self.tensor_bytes(file_bytes, t)?, t.n_elements())
    }
}

/// A bounds-checked little-endian reader: no read, and no allocation, larger than what is left of
/// the file.
struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
    file: InFile,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn need(&self, n: u64, what: impl FnOnce() -> String) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                need: n,
                offset: self.pos,
                remaining: self.remaining(),
                file: self.file.clone(),
            });
        }
        Ok(())
    }

    fn io_error(&self, e: io::Error) -> GgufError {
        match self.file.path() {
            Some(p) => GgufError::io("read", p, e),
            // A byte slice cannot fail a read that `need` allowed.
            None => GgufError::Truncated {
                what: e.to_string(),
                need: 0,
                offset: self.pos,
                remaining: self.remaining(),
                file: InFile::default(),
            },
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<(), GgufError> {
        self.need(buf.len() as u64, what)?;
        self.inner.read_exact(buf).map_err(|e| self.io_error(e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn bytes(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<Vec<u8>, GgufError> {
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut v)
            .map_err(|e| self.io_error(e))?;
        self.pos += n;
        Ok(v)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let start = self.pos;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes).map_err(|_| GgufError::Utf8 {
            what: what(),
            offset: start,
            file: self.file.clone(),
        })
    }

    /// `count` fixed-size elements, read in one go once the file is known to hold them.
    fn elems<const N: usize, T>(
        &mut self,
        count: u64,
        what: impl FnOnce() -> String,
        conv: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        let bytes = self.bytes(count.saturating_mul(N as u64), what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| conv(c.try_into().expect("chunks_exact gives N bytes")))
            .collect())
    }

    fn value(&mut self, key: &str, ty: u32) -> Result<MetaValue, GgufError> {
        let what = || format!("value of `{key}`");
        Ok(match ty {
            type_id::U8 => MetaValue::U8(self.array(what).map(u8::from_le_bytes)?),
            type_id::I8 => MetaValue::I8(self.array(what).map(i8::from_le_bytes)?),
            type_id::U16 => MetaValue::U16(self.array(what).map(u16::from_le_bytes)?),
            type_id::I16 => MetaValue::I16(self.array(what).map(i16::from_le_bytes)?),
            type_id::U32 => MetaValue::U32(self.array(what).map(u32::from_le_bytes)?),
            type_id::I32 => MetaValue::I32(self.array(what).map(i32::from_le_bytes)?),
            type_id::F32 => MetaValue::F32(self.array(what).map(f32::from_le_bytes)?),
            type_id::BOOL => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            type_id::STRING => MetaValue::String(self.string(&what)?),
            type_id::U64 => MetaValue::U64(self.array(what).map(u64::from_le_bytes)?),
            type_id::I64 => MetaValue::I64(self.array(what).map(i64::from_le_bytes)?),
            type_id::F64 => MetaValue::F64(self.array(what).map(f64::from_le_bytes)?),
            type_id::ARRAY => MetaValue::Array(self.meta_array(key)?),
            _ => {
                return Err(GgufError::ValueType {
                    key: key.to_string(),
                    type_id: ty,
                    file: self.file.clone(),
                });
            }
        })
    }

    fn meta_array(&mut self, key: &str) -> Result<MetaArray, GgufError> {
        let et = self.u32(|| format!("element type of `{key}`"))?;
        let count = self.u64(|| format!("length of `{key}`"))?;
        let what = || format!("array `{key}` ({count} × {})", type_id_name(et));
        Ok(match et {
            type_id::U8 => MetaArray::U8(self.elems(count, what, u8::from_le_bytes)?),
            type_id::I8 => MetaArray::I8(self.elems(count, what, i8::from_le_bytes)?),
            type_id::U16 => MetaArray::U16(self.elems(count, what, u16::from_le_bytes)?),
            type_id::I16 => MetaArray::I16(self.elems(count, what, i16::from_le_bytes)?),
            type_id::U32 => MetaArray::U32(self.elems(count, what, u32::from_le_bytes)?),
            type_id::I32 => MetaArray::I32(self.elems(count, what, i32::from_le_bytes)?),
            type_id::F32 => MetaArray::F32(self.elems(count, what, f32::from_le_bytes)?),
            type_id::BOOL => MetaArray::Bool(self.elems(count, what, |b: [u8; 1]| b[0] != 0)?),
            type_id::U64 => MetaArray::U64(self.elems(count, what, u64::from_le_bytes)?),
            type_id::I64 => MetaArray::I64(self.elems(count, what, i64::from_le_bytes)?),
            type_id::F64 => MetaArray::F64(self.elems(count, what, f64::from_le_bytes)?),
            type_id::STRING => {
                // Each string takes at least its 8-byte length.
                self.need(count.saturating_mul(8), || {
                    format!("array `{key}` ({count} × string, at least 8 bytes each)")
                })?;
                let mut v = Vec::with_capacity(count as usize);
                for i in 0..count {
                    v.push(self.string(&|| format!("element {i} of `{key}`"))?);
                }
                MetaArray::String(v)
            }
            type_id::ARRAY => {
                return Err(GgufError::NestedArray {
                    key: key.to_string(),
                    file: self.file.clone(),
                });
            }
            _ => {
                return Err(GgufError::ValueType {
                    key: key.to_string(),
                    type_id: et,
                    file: self.file.clone(),
                });
            }
        })
    }
}

fn parse<R: Read>(r: &mut Reader<R>) -> Result<GgufFile, GgufError> {
    let header = || "header".to_string();
    let magic = r.array::<4>(header)?;
    if u32::from_le_bytes(magic) != GGUF_MAGIC {
        return Err(GgufError::Magic {
            found: String::from_utf8_lossy(&magic).into_owned(),
            file: r.file.clone(),
        });
    }
    let version = r.u32(header)?;
    if version != 2 && version != 3 {
        return Err(GgufError::Version {
            version,
            file: r.file.clone(),
        });
    }
    let n_tensors = r.u64(header)?;
    let n_kv = r.u64(header)?;

    // Each key-value takes at least 8 (key length) + 4 (type) + 1 bytes: a corrupt count fails
    // here instead of reserving memory for it.
    r.need(n_kv.saturating_mul(13), || {
        format!("{n_kv} key-value pairs (at least 13 bytes each)")
    })?;
    let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(n_kv as usize);
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("key #{i}"))?;
        let ty = r.u32(|| format!("value type of `{key}`"))?;
        let value = r.value(&key, ty)?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey {
                key,
                file: r.file.clone(),
            });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => *a,
        Some((_, MetaValue::U32(a))) => {
            return Err(GgufError::Alignment {
                alignment: *a as u64,
                file: r.file.clone(),
            });
        }
        Some((_, v)) => {
            return Err(GgufError::KeyType {
                key: ALIGNMENT_KEY.to_string(),
                expected: "u32",
                found: v.type_name(),
                file: r.file.clone(),
            });
        }
    };

    // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    r.need(n_tensors.saturating_mul(24), || {
        format!("{n_tensors} tensor infos (at least 24 bytes each)")
    })?;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = r.string(&|| format!("name of tensor #{i}"))?;
        if name.len() > MAX_TENSOR_NAME {
            return Err(GgufError::TensorName {
                len: name.len(),
                name,
                file: r.file.clone(),
            });
        }
        let what = || format!("tensor info of `{name}`");
        let n_dims = r.u32(what)?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TensorDims {
                name,
                n_dims: n_dims as u64,
                file: r.file.clone(),
            });
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.u64(what)?);
        }
        let type_id = r.u32(what)?;
        let offset = r.u64(what)?;
        let Some(ty) = GgmlType::from_id(type_id) else {
            return Err(GgufError::TensorType {
                name,
                type_id,
                type_name: ggml_type_name(type_id),
                file: r.file.clone(),
            });
        };
        if let Err(reason) = tensor_nbytes(ty, &ne) {
            return Err(GgufError::Shape {
                name,
                ne,
                reason,
                file: r.file.clone(),
            });
        }
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor {
                name,
                file: r.file.clone(),
            });
        }
        let shape = ne.iter().rev().map(|&d| d as usize).collect();
        tensors.push(TensorInfo {
            name,
            shape,
            ne,
            ty,
            offset,
        });
    }

    let data_offset = align_up(r.pos, alignment as u64);
    let mut expected = 0u64;
    for t in &tensors {
        if t.offset != expected {
            return Err(GgufError::NotPacked {
                name: t.name.clone(),
                offset: t.offset,
                expected,
                alignment,
                file: r.file.clone(),
            });
        }
        let need = t.n_bytes() as u64;
        let start = data_offset.saturating_add(t.offset);
        let remaining = r.len.saturating_sub(start);
        if need > remaining {
            return Err(GgufError::TensorBounds {
                name: t.name.clone(),
                need,
                offset: start,
                remaining,
                file: r.file.clone(),
            });
        }
        expected += align_up(need, alignment as u64);
    }

    Ok(GgufFile {
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
    })
}

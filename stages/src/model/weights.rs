//! Reading and writing weights: Hugging Face safetensors checkpoints (single file or sharded
//! index) in, safetensors out, and a walk over a module's parameters by their checkpoint names.
//!
//! [`TensorFiles`] reads only the headers when it opens a checkpoint and each tensor's bytes when
//! it is asked for them, converting them to f32 a piece at a time: loading a model holds the
//! model, not the model and its files, and an exporter can walk a checkpoint larger than memory
//! one tensor (or one band of rows, [`TensorFiles::read_f32_range`]) at a time. Tensors are read
//! with plain positioned reads rather than a memory map: the resident size then counts only what
//! is being converted, and a file truncated under a reader is an I/O error naming the file and
//! tensor, not a signal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::Dtype;
use safetensors::tensor::Metadata;

use super::error::ModelError;

/// The largest header a safetensors file may have (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes read from disk per piece while converting a tensor to f32.
const READ_PIECE: usize = 1 << 20;

/// One safetensors file: its parsed header, and the file to read tensors from.
struct Shard {
    path: PathBuf,
    file: Mutex<File>,
    header: Metadata,
    /// Where the data section starts: after the 8-byte header length and the header.
    data_start: u64,
}

/// Where a checked tensor's bytes are.
struct Located<'a> {
    shard: &'a Shard,
    dtype: Dtype,
    /// Absolute offset of the tensor's first byte.
    start: u64,
    len: usize,
}

/// The tensors of a checkpoint, from `model.safetensors` or the shards an index names.
pub struct TensorFiles {
    shards: Vec<Shard>,
    /// tensor name → index into `shards`
    index: BTreeMap<String, usize>,
    used: Mutex<BTreeSet<String>>,
}

fn element_bytes(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Append the values of `bytes` (whole elements of `dtype`, one of F32, F16, BF16) to `out`.
fn extend_f32(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
}

impl Shard {
    /// Open `path` and read its header, checking that the file holds exactly the data the header
    /// describes (a truncated file fails here, before anything else is read).
    fn open(path: &Path) -> Result<Shard, ModelError> {
        let bad = |message: String| ModelError::Safetensors {
            file: path.display().to_string(),
            message,
        };
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        if len < 8 {
            return Err(bad(format!(
                "the file is {len} bytes, too short for the 8-byte header length"
            )));
        }
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|e| ModelError::io(path, e))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len - 8 {
            return Err(bad(format!(
                "the header claims {n} bytes, the file holds {} after the header length \
                 (and a header may have at most {MAX_HEADER_BYTES})",
                len - 8
            )));
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text)
            .map_err(|e| ModelError::io(path, e))?;
        let header: Metadata = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("the header is not a valid safetensors header: {e}")))?;
        let data_start = 8 + n;
        let data = header.data_len() as u64;
        if data_start.checked_add(data) != Some(len) {
            return Err(bad(format!(
                "the header describes {data} bytes of tensor data, the file holds {} \
                 (truncated or padded)",
                len - data_start
            )));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            header,
            data_start,
        })
    }

    /// Read `len` bytes at `start` in pieces of at most [`READ_PIECE`] whole elements, converting
    /// each into `out`.
    fn read_into(
        &self,
        name: &str,
        dtype: Dtype,
        start: u64,
        len: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let elem = element_bytes(dtype).unwrap_or(4);
        let piece = READ_PIECE - READ_PIECE % elem;
        let mut buf = vec![0u8; piece.min(len)];
        // A File has no state a panic elsewhere could leave half-changed.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let failed = |e: std::io::Error| ModelError::Safetensors {
            file: self.path.display().to_string(),
            message: format!("reading tensor `{name}` ({len} bytes at offset {start}): {e}"),
        };
        file.seek(SeekFrom::Start(start)).map_err(failed)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            file.read_exact(&mut buf[..n]).map_err(failed)?;
            extend_f32(dtype, &buf[..n], out);
            left -= n;
        }
        Ok(())
    }
}

impl TensorFiles {
    /// Open `model.safetensors` or `model.safetensors.index.json` in `dir`.
    pub fn open_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            Self::open(&[single])
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Safetensors {
                    file: index.display().to_string(),
                    message: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Safetensors {
                    file: index.display().to_string(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut shards: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            shards.sort();
            shards.dedup();
            Self::open(&shards)
        } else {
            Err(ModelError::Layout {
                dir: dir.display().to_string(),
                message: "neither model.safetensors nor model.safetensors.index.json exists".into(),
            })
        }
    }

    /// Open the given safetensors files (their headers are read; tensors are read on demand).
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let shard = Shard::open(path)?;
            for name in shard.header.offset_keys() {
                index.insert(name, i);
            }
            shards.push(shard);
        }
        Ok(TensorFiles {
            shards,
            index,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.index.get(name)?;
        self.shards[i].header.info(name).map(|t| t.shape.clone())
    }

    fn file_of(&self, name: &str) -> String {
        match self.index.get(name) {
            Some(&i) => self.shards[i].path.display().to_string(),
            None => self
                .shards
                .first()
                .map(|f| f.path.display().to_string())
                .unwrap_or_default(),
        }
    }

    /// Where tensor `name` is, checked against `expected` and for a dtype we read.
    fn locate(&self, name: &str, expected: &[usize]) -> Result<Located<'_>, ModelError> {
        let file = self.file_of(name);
        let missing = || ModelError::MissingTensor {
            file: file.clone(),
            name: name.to_owned(),
        };
        let &i = self.index.get(name).ok_or_else(missing)?;
        let shard = &self.shards[i];
        let info = shard.header.info(name).ok_or_else(missing)?;
        if info.shape != expected {
            return Err(ModelError::Shape {
                file,
                name: name.to_owned(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        if element_bytes(info.dtype).is_none() {
            return Err(ModelError::Dtype {
                file,
                name: name.to_owned(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        let (s, e) = info.data_offsets;
        Ok(Located {
            shard,
            dtype: info.dtype,
            start: shard.data_start + s as u64,
            len: e - s,
        })
    }

    fn mark_used(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_owned());
        }
    }

    /// Check that tensor `name` exists with shape `expected` in a dtype that can be read, without
    /// reading it, and count it as used (see [`TensorFiles::unused`]).
    pub fn expect(&self, name: &str, expected: &[usize]) -> Result<(), ModelError> {
        self.locate(name, expected)?;
        self.mark_used(name);
        Ok(())
    }

    /// The bytes tensor `name` takes in its file (its stored dtype), if present.
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        let &i = self.index.get(name)?;
        let (s, e) = self.shards[i].header.info(name)?.data_offsets;
        Some(e - s)
    }

    /// A tensor's values as f32 with its shape, checked against `expected`.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        let n = expected.iter().product();
        let mut out = Vec::with_capacity(n);
        self.read_f32_range(name, expected, 0, n, &mut out)?;
        Ok(out)
    }

    /// Values `start..start + count` (row-major) of tensor `name`, checked against `expected`,
    /// converted to f32 and appended to `out`: a band of rows of a tensor too large to hold.
    pub fn read_f32_range(
        &self,
        name: &str,
        expected: &[usize],
        start: usize,
        count: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let t = self.locate(name, expected)?;
        let elem = element_bytes(t.dtype).unwrap_or(4);
        let n = t.len / elem;
        if start.checked_add(count).is_none_or(|end| end > n) {
            return Err(ModelError::Safetensors {
                file: t.shard.path.display().to_string(),
                message: format!(
                    "tensor `{name}` has {n} values, values {start}..{} were asked for",
                    start.saturating_add(count)
                ),
            });
        }
        out.reserve(count);
        t.shard.read_into(
            name,
            t.dtype,
            t.start + (start * elem) as u64,
            count * elem,
            out,
        )?;
        self.mark_used(name);
        Ok(())
    }

    /// A tensor on `device`, checked against `shape`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ModelError> {
        let values = self.read_f32(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// A trainable parameter on `device`, checked against `shape`.
    pub fn param<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>, ModelError> {
        Ok(Param::from_tensor(self.tensor(name, shape, device)?))
    }

    /// Tensors present in the files that nothing read, minus the ones `ignore` accepts.
    pub fn unused(&self, ignore: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        self.index
            .keys()
            .filter(|n| !used.contains(*n) && !ignore(n))
            .map(|n| (self.file_of(n), n.clone()))
            .collect()
    }
}

/// One parameter of a module: its checkpoint name, shape, values (flattened) and whether it is
/// being trained.
pub struct ParamEntry<B: Backend> {
    pub name: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub value: Tensor<B, 1>,
    pub trainable: bool,
}

struct Collect<'a, B: Backend, F: FnMut(&str, &[usize], ParamEntry<B>)> {
    path: Vec<String>,
    f: &'a mut F,
    _b: std::marker::PhantomData<B>,
}

impl<B: Backend, F: FnMut(&str, &[usize], ParamEntry<B>)> ModuleVisitor<B> for Collect<'_, B, F> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = self.path.join(".");
        let value = param.val();
        let shape = value.dims().to_vec();
        let n = shape.iter().product::<usize>();
        let entry = ParamEntry {
            name: name.clone(),
            id: param.id,
            shape: shape.clone(),
            trainable: value.is_require_grad(),
            value: value.reshape([n]),
        };
        (self.f)(&name, &shape, entry);
    }
}

/// Call `f(name, shape, entry)` for every float parameter of `module`, in module order, with the
/// dotted path of field names as its name (which mirrors the checkpoint's names).
pub fn for_each_param<B: Backend, M: Module<B>>(
    module: &M,
    mut f: impl FnMut(&str, &[usize], ParamEntry<B>),
) {
    let mut visitor = Collect {
        path: Vec::new(),
        f: &mut f,
        _b: std::marker::PhantomData,
    };
    module.visit(&mut visitor);
}

/// Every parameter of `module` as (name, shape, f32 values).
pub fn params_f32<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for_each_param(module, |name, shape, entry| {
        out.push((name.to_owned(), shape.to_vec(), tensor_f32(entry.value)));
    });
    out
}

/// A tensor's values as f32, whatever its element type.
pub fn tensor_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let data = t.into_data();
    match data.to_vec::<f32>() {
        Ok(v) => v,
        Err(_) => data.convert::<f32>().to_vec::<f32>().unwrap_or_default(),
    }
}

/// Write `(name, shape, values)` as an f32 safetensors file, with string metadata, atomically
/// (a temporary file renamed into place).
/// A tensor written by [`write_safetensors_streamed`]: its bytes are made only when the writer
/// reaches it (safetensors' `serialize_to_file` asks each view for its data once, in header
/// order), so one tensor is held at a time. A read error is kept and reported after the write.
struct LazyTensor<'a, F> {
    shape: Vec<usize>,
    index: usize,
    read: &'a F,
    error: &'a std::cell::RefCell<Option<ModelError>>,
}

impl<F: Fn(usize) -> Result<Vec<f32>, ModelError>> safetensors::View for LazyTensor<'_, F> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let n = self.data_len();
        match (self.read)(self.index) {
            Ok(v) if v.len() * 4 == n => {
                let mut b = Vec::with_capacity(n);
                for x in v {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                b.into()
            }
            Ok(v) => {
                self.error
                    .borrow_mut()
                    .get_or_insert(ModelError::Safetensors {
                        file: String::new(),
                        message: format!(
                            "tensor {} gave {} values for {}",
                            self.index,
                            v.len(),
                            n / 4
                        ),
                    });
                vec![0; n].into()
            }
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                vec![0; n].into()
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Write f32 tensors named and shaped by `layout` to `path` as [`write_safetensors`] does (the
/// same bytes), asking `read(i)` for tensor `i`'s values only when it is written: memory for
/// one tensor, not the model. The file appears atomically; on any error no file is left.
pub fn write_safetensors_streamed(
    path: &Path,
    layout: &[(String, Vec<usize>)],
    metadata: Option<HashMap<String, String>>,
    read: impl Fn(usize) -> Result<Vec<f32>, ModelError>,
) -> Result<(), ModelError> {
    let error = std::cell::RefCell::new(None);
    let views: Vec<(String, LazyTensor<'_, _>)> = layout
        .iter()
        .enumerate()
        .map(|(index, (name, shape))| {
            let view = LazyTensor {
                shape: shape.clone(),
                index,
                read: &read,
                error: &error,
            };
            (name.clone(), view)
        })
        .collect();
    let tmp = path.with_extension(format!("safetensors.tmp.{}", std::process::id()));
    let written = safetensors::serialize_to_file(views, metadata, &tmp).map_err(|e| {
        ModelError::Safetensors {
            file: path.display().to_string(),
            message: e.to_string(),
        }
    });
    let synced = written.and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| ModelError::io(path, e))
    });
    let result = match (synced, error.into_inner()) {
        (Err(e), _) | (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e)),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let mut b = Vec::with_capacity(v.len() * 4);
            for x in v {
                b.extend_from_slice(&x.to_le_bytes());
            }
            (n.clone(), s.clone(), b)
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (n, s, b) in &bytes {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| {
            ModelError::Safetensors {
                file: path.display().to_string(),
                message: format!("tensor `{n}`: {e}"),
            }
        })?;
        views.push((n.clone(), view));
    }
    let out = safetensors::serialize(views, metadata).map_err(|e| ModelError::Safetensors {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    burnish_engine::cache::write_atomic(path, &out).map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_raw(path: &Path, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn bands_read_what_the_whole_tensor_holds_and_no_further() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_safetensors(&path, &[("w".into(), vec![6, 4], values.clone())], None).unwrap();
        let files = TensorFiles::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(files.read_f32("w", &[6, 4]).unwrap(), values);
        let mut band = Vec::new();
        files
            .read_f32_range("w", &[6, 4], 8, 12, &mut band)
            .unwrap();
        assert_eq!(band, values[8..20]);
        let e = files
            .read_f32_range("w", &[6, 4], 20, 5, &mut band)
            .unwrap_err();
        assert!(
            e.to_string().contains("has 24 values, values 20..25"),
            "{e}"
        );
        let e = files.read_f32("w", &[4, 6]).unwrap_err();
        assert!(matches!(e, ModelError::Shape { .. }), "{e}");
    }

    #[test]
    fn a_header_claiming_more_than_the_file_holds_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        // Eight u8 tensors of 2^61 − 1 bytes each: offsets that almost fill a u64.
        let n = (1u64 << 61) - 1;
        let tensors: Vec<String> = (0..8)
            .map(|i| {
                format!(
                    r#""t{i}":{{"dtype":"U8","shape":[{n}],"data_offsets":[{},{}]}}"#,
                    i * n,
                    (i + 1) * n
                )
            })
            .collect();
        write_raw(&path, &format!("{{{}}}", tensors.join(",")), &[0; 16]);
        let e = TensorFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap();
        assert!(e.to_string().contains("the file holds 16"), "{e}");

        write_raw(&path, "{not json", &[]);
        let e = TensorFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("not a valid safetensors header"),
            "{e}"
        );
    }
}

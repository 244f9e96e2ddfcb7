//! Reading and writing weights: Hugging Face safetensors checkpoints (single file or sharded
//! index) in, safetensors out, and a walk over a module's parameters by their checkpoint names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::error::ModelError;

/// The tensors of a checkpoint, from `model.safetensors` or the shards an index names.
pub struct TensorFiles {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name → index into `files`
    index: BTreeMap<String, usize>,
    used: Mutex<BTreeSet<String>>,
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

    /// Open the given safetensors files.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
                file: path.display().to_string(),
                message: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_owned(), i);
            }
            files.push((path.clone(), bytes));
        }
        Ok(TensorFiles {
            files,
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
        let st = SafeTensors::deserialize(&self.files[i].1).ok()?;
        st.tensor(name).ok().map(|v| v.shape().to_vec())
    }

    fn file_of(&self, name: &str) -> String {
        match self.index.get(name) {
            Some(&i) => self.files[i].0.display().to_string(),
            None => self
                .files
                .first()
                .map(|f| f.0.display().to_string())
                .unwrap_or_default(),
        }
    }

    /// A tensor's values as f32 with its shape, checked against `expected`.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        let file = self.file_of(name);
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                file: file.clone(),
                name: name.to_owned(),
            })?;
        let st =
            SafeTensors::deserialize(&self.files[i].1).map_err(|e| ModelError::Safetensors {
                file: file.clone(),
                message: e.to_string(),
            })?;
        let view = st.tensor(name).map_err(|e| ModelError::Safetensors {
            file: file.clone(),
            message: e.to_string(),
        })?;
        if view.shape() != expected {
            return Err(ModelError::Shape {
                file,
                name: name.to_owned(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Dtype {
                    file,
                    name: name.to_owned(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_owned());
        }
        Ok(values)
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

//! burn backends: which are built in, how `auto` picks one, and how a stage runs generic code on
//! the one the plan resolved.
//!
//! | name   | burn backend        | built                         |
//! |--------|---------------------|-------------------------------|
//! | `cpu`  | `Autodiff<Flex>`    | always (the embedded default) |
//! | `wgpu` | `Autodiff<Wgpu>`    | feature `wgpu` (default)      |
//! | `cuda` | `Autodiff<Cuda>`    | feature `cuda` (default)      |
//!
//! Parameters are f32 on every backend; trainers multiply matrices in bf16 when asked (`dtype`),
//! where the backend can ([`has_bf16`]). The resolved name enters the fingerprint of every stage
//! whose numbers depend on it.

use burn::backend::Autodiff;
use burn::backend::flex::{Flex, FlexDevice};
use burn::tensor::backend::AutodiffBackend;

use crate::train::TrainError;

/// Generic work to run on whichever backend is chosen at run time.
pub trait BackendTask {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output;
}

/// The backend names compiled into this build.
pub fn available() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}

/// What `backend: auto` becomes on this machine, and why: CUDA when an NVIDIA driver answers,
/// else wgpu when an adapter that is not a CPU exists, else the CPU backend.
pub fn resolve_auto() -> (&'static str, String) {
    if cfg!(feature = "cuda") && nvidia_driver_present() {
        return ("cuda", "an NVIDIA driver is loaded".into());
    }
    #[cfg(feature = "wgpu")]
    if let Some(name) = gpu_adapter() {
        return ("wgpu", format!("wgpu adapter `{name}`"));
    }
    ("cpu", "no GPU found".into())
}

fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::env::var_os("BURNISH_ASSUME_CUDA").is_some()
}

#[cfg(feature = "wgpu")]
fn gpu_adapter() -> Option<String> {
    use wgpu::{Backends, DeviceType, Instance, InstanceDescriptor};
    // On Linux a GPU shows up as a DRM render node (or an NVIDIA device). Without one, only CPU
    // adapters can exist: skip the enumeration, which is slow and makes Mesa's software driver
    // print warnings.
    if cfg!(target_os = "linux") && !linux_gpu_device_present() {
        return None;
    }
    let instance = Instance::new(InstanceDescriptor::new_without_display_handle());
    let adapters = block_on(instance.enumerate_adapters(Backends::all()));
    adapters.into_iter().find_map(|a| {
        let info = a.get_info();
        (info.device_type != DeviceType::Cpu).then_some(info.name)
    })
}

/// Every wgpu adapter this machine offers, as `(name, device type)` (CPU ones included, such as
/// Mesa's lavapipe).
#[cfg(feature = "wgpu")]
pub fn wgpu_adapters() -> Vec<(String, String)> {
    use wgpu::{Backends, Instance, InstanceDescriptor};
    let instance = Instance::new(InstanceDescriptor::new_without_display_handle());
    block_on(instance.enumerate_adapters(Backends::all()))
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            (info.name, format!("{:?}", info.device_type))
        })
        .collect()
}

#[cfg(feature = "wgpu")]
fn linux_gpu_device_present() -> bool {
    let render_node = std::fs::read_dir("/dev/dri")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
        })
        .unwrap_or(false);
    render_node || std::path::Path::new("/dev/nvidia0").exists()
}

/// Whether the backend called `name` computes matrix products in bf16 (`dtype: bf16`): flex and
/// CUDA do; wgpu's WGSL compiler has no bf16 type (cubecl-wgpu 0.10 panics on one).
pub fn has_bf16(name: &str) -> bool {
    name != "wgpu"
}

/// Run `task` on the backend called `name` (`cpu`, `wgpu` or `cuda`).
pub fn dispatch<T: BackendTask>(name: &str, task: T) -> Result<T::Output, TrainError> {
    match name {
        "cpu" => Ok(task.run::<Autodiff<Flex>>(FlexDevice)),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            Ok(task
                .run::<Autodiff<burn::backend::Wgpu>>(burn::backend::wgpu::WgpuDevice::default()))
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            Ok(task
                .run::<Autodiff<burn::backend::Cuda>>(burn::backend::cuda::CudaDevice::default()))
        }
        other => Err(TrainError::Backend {
            backend: other.to_owned(),
            message: format!("this build has {}", available().join(", ")),
        }),
    }
}

/// Drive a future that native wgpu completes without waiting.
#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

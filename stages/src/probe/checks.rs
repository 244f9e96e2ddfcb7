//! Correctness checks of a backend, one PASS/FAIL/SKIP line each.
//!
//! Two kinds of reference:
//! - **transformers**: the fixture models' logits and perplexity on a fixed text, as
//!   `fixtures/models/make_models.py` wrote them (`reference.safetensors`, `reference.json`).
//!   Independent of this crate; checked on every backend, the CPU one included.
//! - **cpu**: the same computation on the CPU backend (flex) in the same process: one AdamW step
//!   (full and LoRA), one DPO step, a QLoRA forward, a packed batch. The CPU backend is itself
//!   held against transformers and TRL by the test suite, so agreeing with it within the
//!   tolerance is agreeing with them. On `--backend cpu` these compare the backend with itself
//!   and only prove that the checks run.
//!
//! | check                   | measured                                   | tolerance     |
//! |-------------------------|--------------------------------------------|---------------|
//! | `forward/<model>`       | max \|logits − transformers\|              | 1e-4 absolute |
//! | `forward_bf16/<model>`  | perplexity with bf16 products vs f32 ref.  | 5e-3 relative |
//! | `packed/<model>`        | mean NLL of a packed batch vs cpu          | 1e-5 relative |
//! | `train_step/<model>`    | loss, grad norm, loss after 1 AdamW step on a packed and a padded row | 1e-4 relative |
//! | `lora_step/<model>`     | the same with rank-4 adapters on all projs | 1e-4 relative |
//! | `dpo_step/<model>`      | loss (= ln 2 at the start), grad norm, loss after | 1e-4 relative |
//! | `qlora_forward/<model>` | max \|logits − cpu\|, NF4 base + adapters  | 1e-4 absolute |
//!
//! A check that panics (a backend that cannot start, a kernel that fails to compile) is a FAIL
//! carrying the panic message; the checks after it still run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::backend::{self, BackendTask};
use crate::model::weights::{TensorFiles, tensor_f32};
use crate::model::{self, CausalLm, LoraParams, LoraTarget, lora};
use crate::pref::data::PairItem;
use crate::pref::losses::DpoLoss;
use crate::pref::objectives::DpoObjective;
use crate::text::Example;
use crate::train::Objective;
use crate::train::batch::{make_batch, score};
use crate::train::optim::{self, AdamW, Grads, OptimState};

/// The fixture models every check runs on.
pub const MODELS: [&str; 2] = ["tiny-llama", "tiny-qwen2"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckResult {
    pub backend: String,
    pub name: String,
    pub status: Status,
    /// What was compared, in words (`max |logits - transformers|`).
    pub metric: String,
    /// The largest deviation found (absolute or relative, as `metric` says).
    pub measured: Option<f64>,
    pub tolerance: Option<f64>,
    /// `transformers` or `cpu`.
    pub reference: String,
    /// The observed values, a panic message or why the check was skipped.
    pub detail: String,
    pub seconds: f64,
    /// The check panicked (its detail holds the panic's message).
    pub panicked: bool,
}

impl CheckResult {
    /// The report line: `PASS cuda forward/tiny-llama  max |logits - transformers| 3.1e-6 <= 1e-4`.
    pub fn line(&self) -> String {
        let numbers = match (self.measured, self.tolerance) {
            (Some(m), Some(t)) => format!(" {m:.2e} <= {t:.0e}"),
            _ => String::new(),
        };
        let first = self.detail.lines().next().unwrap_or("");
        let detail = if first.is_empty() {
            String::new()
        } else {
            format!(" ({first})")
        };
        format!(
            "{} {:<5} {:<26} {}{}{} [{:.1}s]",
            self.status.as_str(),
            self.backend,
            self.name,
            self.metric,
            numbers,
            detail,
            self.seconds
        )
    }
}

/// What a check computes on a backend: the numbers compared against the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Forward,
    ForwardBf16,
    Packed,
    TrainStep,
    LoraStep,
    DpoStep,
    QloraForward,
    Generate,
}

impl Probe {
    const ALL: [Probe; 8] = [
        Probe::Forward,
        Probe::ForwardBf16,
        Probe::Packed,
        Probe::TrainStep,
        Probe::LoraStep,
        Probe::DpoStep,
        Probe::QloraForward,
        Probe::Generate,
    ];

    fn name(self) -> &'static str {
        match self {
            Probe::Forward => "forward",
            Probe::ForwardBf16 => "forward_bf16",
            Probe::Packed => "packed",
            Probe::TrainStep => "train_step",
            Probe::LoraStep => "lora_step",
            Probe::DpoStep => "dpo_step",
            Probe::QloraForward => "qlora_forward",
            Probe::Generate => "generate",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Probe::Forward => "max |logits - transformers|",
            Probe::ForwardBf16 => "|ppl(bf16) - ppl(transformers f32)| / ppl",
            Probe::Packed => "|mean nll - cpu| / cpu",
            Probe::TrainStep | Probe::LoraStep => "max rel. diff of [loss, grad norm, loss after]",
            Probe::DpoStep => "max rel. diff of [loss, grad norm, loss after]",
            Probe::QloraForward => "max |logits - cpu|",
            Probe::Generate => "greedy tokens differing from transformers' generate",
        }
    }

    fn tolerance(self) -> f64 {
        match self {
            Probe::Forward | Probe::QloraForward => 1e-4,
            Probe::ForwardBf16 => 5e-3,
            Probe::Packed => 1e-5,
            Probe::TrainStep | Probe::LoraStep | Probe::DpoStep => 1e-4,
            Probe::Generate => 0.0,
        }
    }

    /// Whether the reference is the transformers fixture (else the CPU backend).
    fn against_transformers(self) -> bool {
        matches!(self, Probe::Forward | Probe::ForwardBf16 | Probe::Generate)
    }
}

/// The fixed text of a fixture model and what transformers computed on it.
struct Reference {
    ids: Vec<u32>,
    logits: Vec<f32>,
    perplexity: f64,
}

fn read_reference(dir: &Path, vocab: usize) -> Result<Reference, String> {
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let ids = json["input_ids"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<u32>>>()
        })
        .ok_or_else(|| format!("{}: `input_ids` is not a list of token ids", path.display()))?;
    let perplexity = json["perplexity"]
        .as_f64()
        .ok_or_else(|| format!("{}: `perplexity` is not a number", path.display()))?;
    let tensors = dir.join("reference.safetensors");
    let logits = TensorFiles::open(std::slice::from_ref(&tensors))
        .and_then(|f| f.read_f32("logits", &[1, ids.len(), vocab]))
        .map_err(|e| format!("{}: {e}", tensors.display()))?;
    Ok(Reference {
        ids,
        logits,
        perplexity,
    })
}

/// The reference text as one example (every token after the first a target).
fn whole(ids: &[u32]) -> Example {
    Example {
        ids: ids.to_vec(),
        targets: (0..ids.len()).map(|i| i > 0).collect(),
        doc_starts: Vec::new(),
    }
}

/// Two rows: three documents of the reference text packed in one, and a fourth alone (padded).
fn packed_batch(ids: &[u32]) -> Vec<Example> {
    let doc = |r: std::ops::Range<usize>| whole(&ids[r]);
    let (a, b, c, d) = (doc(0..5), doc(5..12), doc(12..16), doc(16..22));
    let row = Example {
        ids: [&b, &a, &c].map(|e| e.ids.as_slice()).concat(),
        targets: [&b, &a, &c].map(|e| e.targets.as_slice()).concat(),
        doc_starts: vec![7, 12],
    };
    vec![row, d]
}

/// Preference pairs cut from the reference text: the prompt is a prefix, chosen and rejected
/// continue it differently (targets on the continuation only).
fn pairs(ids: &[u32]) -> Vec<PairItem> {
    let seq = |prompt: std::ops::Range<usize>, completion: std::ops::Range<usize>| {
        let ids: Vec<u32> = [&ids[prompt.clone()], &ids[completion]].concat();
        Example {
            targets: (0..ids.len()).map(|i| i >= prompt.len()).collect(),
            ids,
            doc_starts: Vec::new(),
        }
    };
    vec![
        PairItem {
            index: 0,
            chosen: seq(0..8, 8..20),
            rejected: seq(0..8, 40..47),
            reference: None,
        },
        PairItem {
            index: 1,
            chosen: seq(20..30, 30..45),
            rejected: seq(20..30, 60..80),
            reference: None,
        },
    ]
}

/// AdamW with the hyperparameters of the step checks.
const STEP_LR: f64 = 1e-3;
const ADAMW: AdamW = AdamW {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
};

/// `[loss, grad norm]` of one backward pass of `loss`, and the model after one AdamW step.
fn step<B: AutodiffBackend>(model: CausalLm<B>, loss: Tensor<B, 1>) -> ([f64; 2], CausalLm<B>) {
    let value = f64::from(tensor_f32(loss.clone())[0]);
    let g = loss.backward();
    let mut grads = Grads::default();
    grads.accumulate::<B, _>(&model, &g);
    let norm = grads.global_norm();
    let mut state = OptimState::default();
    let model = optim::step(model, &mut grads, &mut state, ADAMW, STEP_LR, 1.0);
    ([value, norm], model)
}

/// Mean next-token loss of `examples` as one padded batch (with gradients).
fn lm_loss<B: AutodiffBackend>(model: &CausalLm<B>, examples: &[Example]) -> Tensor<B, 1> {
    let device = model.model.embed_tokens.weight.val().device();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = make_batch::<B>(&refs, 0, &device);
    let (nll, w) = model.token_nll_with(batch.ids, batch.targets, batch.docs.as_ref());
    let n: usize = examples
        .iter()
        .map(|e| e.targets.iter().skip(1).filter(|&&t| t).count())
        .sum();
    (nll * w).sum() / n as f64
}

fn ids_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), device)
}

fn lora_params() -> LoraParams {
    LoraParams {
        rank: 4,
        alpha: None,
        dropout: 0.0,
        targets: LoraTarget::ALL.to_vec(),
    }
}

/// Adapters whose `B` is not zero (as after some training), so that they change the output.
fn with_trained_adapters<B: Backend>(model: CausalLm<B>) -> CausalLm<B> {
    let mut model = lora::inject(model, &lora_params(), 7);
    for layer in model.model.layers.iter_mut() {
        for t in LoraTarget::ALL {
            if let Some(l) = t.linear_mut(layer).lora.as_mut() {
                let b = l.b.val();
                let device = b.device();
                let dims = b.dims();
                let n = dims[0] * dims[1];
                let v: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 1e-3).collect();
                l.b = burn::module::Param::from_tensor(Tensor::from_data(
                    TensorData::new(v, dims),
                    &device,
                ));
            }
        }
    }
    model
}

/// Runs one probe on one model on whichever backend [`backend::dispatch`] picks.
struct Observe<'a> {
    probe: Probe,
    dir: &'a Path,
}

/// What a probe computed, and the transformers values it is held against (`None`: the CPU
/// backend's values are the reference).
struct Observed {
    values: Vec<f64>,
    transformers: Option<Vec<f64>>,
}

impl BackendTask for Observe<'_> {
    type Output = Result<Observed, String>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let loaded = model::load_model_dir::<B>(self.dir, &device).map_err(|e| e.to_string())?;
        let net = loaded.model;
        let r = read_reference(self.dir, net.config.vocab_size)?;
        let values = match self.probe {
            Probe::Forward => {
                let logits = tensor_f32(net.valid().forward(ids_tensor(&r.ids, &device)));
                return Ok(Observed {
                    values: logits.into_iter().map(f64::from).collect(),
                    transformers: Some(r.logits.into_iter().map(f64::from).collect()),
                });
            }
            Probe::ForwardBf16 => {
                let s = score(&net.valid().set_bf16(true), &[whole(&r.ids)], 1, 0);
                return Ok(Observed {
                    values: vec![s.perplexity()],
                    transformers: Some(vec![r.perplexity]),
                });
            }
            Probe::Packed => vec![score(&net.valid(), &packed_batch(&r.ids), 2, 0).mean_nll()],
            Probe::TrainStep | Probe::LoraStep => {
                let net = if self.probe == Probe::LoraStep {
                    lora::inject(net, &lora_params(), 7)
                } else {
                    net
                };
                // Full: a packed row beside a padded one (documents masked, positions
                // restarting); LoRA: the text in two halves.
                let data = match self.probe {
                    Probe::TrainStep => packed_batch(&r.ids),
                    _ => vec![whole(&r.ids[..48]), whole(&r.ids[48..])],
                };
                let ([loss, norm], net) = step(net.clone(), lm_loss(&net, &data));
                let after = score(&net.valid(), &data, 2, 0).mean_nll();
                vec![loss, norm, after]
            }
            Probe::DpoStep => {
                let objective = DpoObjective {
                    beta: 0.1,
                    loss: DpoLoss::Sigmoid,
                    label_smoothing: 0.0,
                    pad: 0,
                };
                let mut items = pairs(&r.ids);
                objective.prepare(&net.valid(), &mut items, 4);
                let refs: Vec<&PairItem> = items.iter().collect();
                let (loss, _) = objective.loss(&net, &refs);
                let ([loss, norm], net) = step(net, loss / items.len() as f64);
                let (after, _) = objective.eval(&net.valid(), &items, 4);
                vec![loss, norm, after]
            }
            Probe::Generate => {
                let (got, want) = greedy_tokens(&net.valid(), self.dir)?;
                return Ok(Observed {
                    values: got,
                    transformers: Some(want),
                });
            }
            Probe::QloraForward => {
                let (net, _) = lora::quantize_base_nf4(net.valid());
                let net = with_trained_adapters(net);
                tensor_f32(net.forward(ids_tensor(&r.ids, &device)))
                    .into_iter()
                    .map(f64::from)
                    .collect()
            }
        };
        Ok(Observed {
            values,
            transformers: None,
        })
    }
}

/// Greedy, KV-cached decoding of `generation.json`'s prompts, each alone and all as one
/// left-padded batch: the new tokens of every completion in order, beside transformers'.
fn greedy_tokens<B: Backend>(
    net: &CausalLm<B>,
    dir: &Path,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    use crate::generate::{DecodeOptions, Request, Sampling, generate};
    let path = dir.join("generation.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let ids = |v: &serde_json::Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    };
    let lists = |key: &str| -> Result<Vec<Vec<u32>>, String> {
        json[key]
            .as_array()
            .and_then(|a| a.iter().map(ids).collect())
            .ok_or_else(|| format!("{}: `{key}` is not a list of id lists", path.display()))
    };
    let prompts = lists("prompt_ids")?;
    let (alone, batched) = (lists("alone")?, lists("batched")?);
    let eos =
        ids(&json["eos"]).ok_or_else(|| format!("{}: `eos` is not a list", path.display()))?;
    let max_new = json["max_new_tokens"]
        .as_u64()
        .ok_or_else(|| format!("{}: `max_new_tokens` is not a number", path.display()))?;
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            prompt_index: i,
            sample_index: 0,
        })
        .collect();
    let opts = |batch_size| DecodeOptions {
        sampling: Sampling::default(),
        max_new_tokens: max_new as usize,
        eos: eos.clone(),
        pad: 0,
        seed: 0,
        batch_size,
    };
    let mut got = Vec::new();
    for r in &requests {
        let c = generate(
            net,
            std::slice::from_ref(r),
            &opts(1),
            &|_| false,
            &mut |_, _| true,
        );
        got.extend(c.into_iter().flat_map(|c| c.tokens));
    }
    let c = generate(
        net,
        &requests,
        &opts(requests.len()),
        &|_| false,
        &mut |_, _| true,
    );
    got.extend(c.into_iter().flat_map(|c| c.tokens));
    let want = alone.into_iter().chain(batched).flatten();
    Ok((
        got.into_iter().map(f64::from).collect(),
        want.map(f64::from).collect(),
    ))
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(0.0, f64::max)
}

fn fmt_values(v: &[f64]) -> String {
    let shown: Vec<String> = v.iter().take(3).map(|x| format!("{x:.6}")).collect();
    shown.join(", ")
}

/// The panics seen while guarded checks run, first first (a backend's worker thread often
/// panics with the cause before the caller panics on the broken channel), and how many guards
/// are active. Panics while none is active go to the hook that was there before.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static GUARDS: AtomicUsize = AtomicUsize::new(0);

/// Install, once, a panic hook that records panics while a guard is active and otherwise
/// defers to the previous hook (so the process's own panics still print as they did).
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDS.load(Ordering::SeqCst) == 0 {
                return previous(info);
            }
            let mut text = info.to_string().replace('\n', " ");
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                text.push_str(&format!("\n{}", std::backtrace::Backtrace::force_capture()));
            }
            if let Ok(mut seen) = PANICS.lock() {
                seen.push(text);
            }
        }));
    });
}

/// Run `f`, turning a panic into an error that carries the first panic's message and place
/// (and its backtrace when `RUST_BACKTRACE` is set), and the last one's when it differs.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, Panicked> {
    install_hook();
    let start = PANICS.lock().map(|s| s.len()).unwrap_or(0);
    GUARDS.fetch_add(1, Ordering::SeqCst);
    let out = catch_unwind(AssertUnwindSafe(f));
    GUARDS.fetch_sub(1, Ordering::SeqCst);
    // Only panics are kept, one line each: the list stays as short as the panics were few.
    let seen: Vec<String> = PANICS
        .lock()
        .map(|s| s.get(start..).map(<[String]>::to_vec).unwrap_or_default())
        .unwrap_or_default();
    match out {
        Ok(r) => r.map_err(|message| Panicked {
            message,
            panicked: false,
        }),
        Err(_) => {
            let first = seen.first().cloned().unwrap_or_else(|| "panicked".into());
            let message = match seen.last() {
                Some(last) if seen.len() > 1 && last != &first => {
                    format!("{first}; then {}", last.lines().next().unwrap_or(""))
                }
                _ => first,
            };
            Err(Panicked {
                message,
                panicked: true,
            })
        }
    }
}

/// Why a check could not measure: an error, or a panic (after which the backend's state is not
/// trusted).
struct Panicked {
    message: String,
    panicked: bool,
}

/// What [`run`] checks on.
pub struct Options {
    /// `cpu`, `wgpu` or `cuda`.
    pub backend: String,
    /// The directory holding `tiny-llama/` and `tiny-qwen2/` (the repository's
    /// `fixtures/models`).
    pub models: PathBuf,
    /// Run the wgpu checks on a CPU adapter (Mesa's lavapipe) when no GPU adapter exists.
    pub allow_cpu_adapter: bool,
    /// Start at this check (its index in the order [`run`] reports them).
    pub from: usize,
    /// Stop after a check that panicked: a backend that panicked may be left unusable (a
    /// poisoned lock, a dead worker thread, a sticky CUDA error), so the caller runs the rest in
    /// a fresh process (`burnish selftest --from`).
    pub stop_after_panic: bool,
}

/// Why the backend called `name` cannot run here, if it cannot (`allow_cpu_adapter`: wgpu on
/// a CPU adapter counts).
#[cfg_attr(not(feature = "wgpu"), allow(unused_variables))]
pub fn unavailable(name: &str, allow_cpu_adapter: bool) -> Option<String> {
    if !backend::available().contains(&name) {
        return Some(format!(
            "backend `{name}` is not in this build (it has {})",
            backend::available().join(", ")
        ));
    }
    match name {
        "cuda" if !Path::new("/proc/driver/nvidia/version").exists() => {
            Some("no NVIDIA driver is loaded (/proc/driver/nvidia/version is missing)".into())
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            let adapters = guarded(|| Ok(backend::wgpu_adapters())).unwrap_or_default();
            let gpu = adapters.iter().any(|(_, kind)| kind != "Cpu");
            if adapters.is_empty() {
                Some("no wgpu adapter (no Vulkan loader or driver)".into())
            } else if !gpu && !allow_cpu_adapter {
                let names: Vec<&str> = adapters.iter().map(|(n, _)| n.as_str()).collect();
                Some(format!(
                    "only CPU adapters ({}); --allow-cpu-adapter checks on them",
                    names.join(", ")
                ))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// How many checks [`run`] reports.
pub fn count() -> usize {
    MODELS.len() * Probe::ALL.len()
}

/// The checks on `opts.backend` from `opts.from` on, in order; a check's failure does not stop
/// the next (a panic does when `opts.stop_after_panic`).
pub fn run(opts: &Options, mut on_result: impl FnMut(&CheckResult)) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let skip_all = unavailable(&opts.backend, opts.allow_cpu_adapter);
    let plan = MODELS
        .iter()
        .flat_map(|&name| Probe::ALL.map(|probe| (name, probe)));
    for (index, (name, probe)) in plan.enumerate().skip(opts.from) {
        let no_bf16 = probe == Probe::ForwardBf16 && !backend::has_bf16(&opts.backend);
        let r = match &skip_all {
            Some(why) => result(opts, probe, name, Status::Skip, None, why.clone(), 0.0),
            None if no_bf16 => {
                let why = "no bf16 on this backend: `dtype: bf16` is refused, `auto` is f32";
                result(opts, probe, name, Status::Skip, None, why.into(), 0.0)
            }
            None => check(opts, probe, name, &opts.models.join(name)),
        };
        on_result(&r);
        let stop = r.panicked && opts.stop_after_panic && index + 1 < count();
        out.push(r);
        if stop {
            return out;
        }
    }
    out
}

fn result(
    opts: &Options,
    probe: Probe,
    model: &str,
    status: Status,
    measured: Option<f64>,
    detail: String,
    seconds: f64,
) -> CheckResult {
    CheckResult {
        backend: opts.backend.clone(),
        name: format!("{}/{model}", probe.name()),
        status,
        metric: probe.metric().into(),
        measured,
        tolerance: Some(probe.tolerance()),
        reference: if probe.against_transformers() {
            "transformers"
        } else {
            "cpu"
        }
        .into(),
        detail,
        seconds,
        panicked: false,
    }
}

fn check(opts: &Options, probe: Probe, model: &str, dir: &Path) -> CheckResult {
    let t0 = Instant::now();
    let outcome = guarded(|| {
        let got = backend::dispatch(&opts.backend, Observe { probe, dir })
            .map_err(|e| e.to_string())??;
        compare(probe, dir, got)
    });
    let seconds = t0.elapsed().as_secs_f64();
    match outcome {
        Ok((measured, detail)) => {
            let status = if measured <= probe.tolerance() {
                Status::Pass
            } else {
                Status::Fail
            };
            result(opts, probe, model, status, Some(measured), detail, seconds)
        }
        Err(e) => CheckResult {
            panicked: e.panicked,
            ..result(opts, probe, model, Status::Fail, None, e.message, seconds)
        },
    }
}

/// The deviation of `got` from the probe's reference, and the values to show beside it.
fn compare(probe: Probe, dir: &Path, got: Observed) -> Result<(f64, String), String> {
    let values = &got.values;
    if values.iter().any(|x| !x.is_finite()) {
        return Ok((f64::INFINITY, "non-finite values".into()));
    }
    let (want, source) = match got.transformers {
        Some(want) => (want, "transformers"),
        None => {
            let cpu =
                backend::dispatch("cpu", Observe { probe, dir }).map_err(|e| e.to_string())??;
            (cpu.values, "cpu")
        }
    };
    if want.len() != values.len() {
        return Err(format!(
            "{} values, {source} has {}",
            values.len(),
            want.len()
        ));
    }
    // The DPO loss starts at ln 2 (policy = reference), whatever the backend.
    if probe == Probe::DpoStep && (values[0] - std::f64::consts::LN_2).abs() > 1e-6 {
        return Ok((
            f64::INFINITY,
            format!("initial loss {} is not ln 2", values[0]),
        ));
    }
    let steps = matches!(probe, Probe::TrainStep | Probe::LoraStep | Probe::DpoStep);
    if steps && values[2] >= values[0] {
        return Ok((
            f64::INFINITY,
            format!(
                "the step did not lower the loss: {} -> {}",
                values[0], values[2]
            ),
        ));
    }
    let measured = match probe {
        Probe::Forward | Probe::QloraForward => max_abs(values, &want),
        Probe::Generate => values.iter().zip(&want).filter(|(a, b)| a != b).count() as f64,
        _ => max_rel(values, &want),
    };
    let detail = match probe {
        Probe::Forward | Probe::QloraForward => String::new(),
        Probe::Generate => format!("{} tokens", values.len()),
        _ => format!("{} vs {source} {}", fmt_values(values), fmt_values(&want)),
    };
    Ok((measured, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_an_error_naming_the_first_panic_and_its_place() {
        let e = guarded::<()>(|| panic!("boom {}", 7)).err().unwrap();
        assert!(e.panicked);
        assert!(e.message.contains("boom 7"), "{}", e.message);
        assert!(e.message.contains("checks.rs:"), "{}", e.message);
        // A worker thread panics with the cause, then the caller on the broken channel.
        let e = guarded::<()>(|| {
            let _ = std::thread::spawn(|| panic!("the cause")).join();
            panic!("the channel broke")
        })
        .err()
        .unwrap();
        let first = e.message.find("the cause").unwrap();
        let then = e.message.find("; then").unwrap();
        assert!(
            first < then && e.message.contains("the channel broke"),
            "{}",
            e.message
        );
        // An error is not a panic.
        let e = guarded::<()>(|| Err("no".into())).err().unwrap();
        assert!(!e.panicked && e.message == "no");
    }
}

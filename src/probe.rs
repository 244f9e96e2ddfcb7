//! `burnish selftest` and `burnish bench-train`: the backend probes of
//! `burnish_stages::probe`, for machines without a Rust toolchain (`benches/gpu/run.sh`).

use std::path::PathBuf;
use std::process::ExitCode;

use burnish_stages::probe::{checks, speed};
use miette::{IntoDiagnostic, Result, miette};

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// Backend to check: cpu, wgpu or cuda
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// The directory holding the fixture models (tiny-llama/, tiny-qwen2/)
    #[arg(long, value_name = "DIR", default_value = "fixtures/models")]
    models: PathBuf,
    /// Also write the results as JSON
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Check wgpu on a CPU adapter (lavapipe) when no GPU adapter exists
    #[arg(long)]
    allow_cpu_adapter: bool,
    /// Start at this check (after a panic the rest run in a new process started so)
    #[arg(long, default_value_t = 0, hide = true)]
    from: usize,
}

pub fn selftest(args: &SelftestArgs) -> Result<ExitCode> {
    for name in checks::MODELS {
        let dir = args.models.join(name);
        if !dir.join("config.json").is_file() {
            return Err(miette!(
                "{}: no fixture model here (config.json is missing); --models names the \\
                 repository's fixtures/models",
                dir.display()
            ));
        }
    }
    let opts = checks::Options {
        backend: args.backend.clone(),
        models: args.models.clone(),
        allow_cpu_adapter: args.allow_cpu_adapter,
        from: args.from,
        stop_after_panic: true,
    };
    let mut results = checks::run(&opts, |r| println!("{}", r.line()));
    let next = args.from + results.len();
    if results.last().is_some_and(|r| r.panicked) && next < checks::count() {
        println!(
            "selftest {}: the backend panicked; checks {next}.. run in a new process",
            args.backend
        );
        results.extend(continue_in_new_process(args, next));
    }
    let count = |s: checks::Status| results.iter().filter(|r| r.status == s).count();
    let (pass, fail, skip) = (
        count(checks::Status::Pass),
        count(checks::Status::Fail),
        count(checks::Status::Skip),
    );
    if args.from == 0 {
        println!(
            "selftest {}: {pass} passed, {fail} failed, {skip} skipped",
            args.backend
        );
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results).into_diagnostic()?;
        burnish_engine::cache::write_atomic(path, text.as_bytes())
            .map_err(|e| miette!("{}: {e}", path.display()))?;
    }
    Ok(if fail > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Run checks `from..` in a child `burnish selftest`, which prints its lines as they come, and
/// read back its results.
fn continue_in_new_process(args: &SelftestArgs, from: usize) -> Vec<checks::CheckResult> {
    let json = std::env::temp_dir().join(format!(
        "burnish-selftest-{}-{from}.json",
        std::process::id()
    ));
    let mut cmd = std::process::Command::new(
        std::env::current_exe().unwrap_or_else(|_| PathBuf::from("burnish")),
    );
    cmd.args([
        "selftest",
        "--backend",
        &args.backend,
        "--from",
        &from.to_string(),
    ])
    .arg("--models")
    .arg(&args.models)
    .arg("--json")
    .arg(&json);
    if args.allow_cpu_adapter {
        cmd.arg("--allow-cpu-adapter");
    }
    let status = cmd.status();
    let results = std::fs::read_to_string(&json)
        .ok()
        .and_then(|text| serde_json::from_str::<Vec<checks::CheckResult>>(&text).ok());
    let _ = std::fs::remove_file(&json);
    results.unwrap_or_else(|| {
        let why = match status {
            Ok(s) => format!("the process running checks {from}.. ended with {s}"),
            Err(e) => format!("the process running checks {from}.. did not start: {e}"),
        };
        let r = checks::CheckResult {
            backend: args.backend.clone(),
            name: format!("checks {from}.."),
            status: checks::Status::Fail,
            metric: String::new(),
            measured: None,
            tolerance: None,
            reference: String::new(),
            detail: why,
            seconds: 0.0,
            panicked: true,
        };
        println!("{}", r.line());
        vec![r]
    })
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// cpu, wgpu or cuda
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// fixture, 17m, smollm2-135m or llama-1b
    #[arg(long, default_value = "fixture")]
    preset: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Timed steps
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Matrix products in bf16 (f32 parameters)
    #[arg(long)]
    bf16: bool,
    /// Train rank-R adapters on every projection instead of the full weights
    #[arg(long, value_name = "R")]
    lora: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn bench_train(args: &BenchArgs) -> Result<ExitCode> {
    let shape = speed::shape(&args.preset).ok_or_else(|| {
        let names: Vec<&str> = speed::SHAPES.iter().map(|s| s.name).collect();
        miette!(
            "unknown preset `{}` (known: {})",
            args.preset,
            names.join(", ")
        )
    })?;
    if args.steps == 0 || args.batch == 0 || args.seq < 2 || args.lora == Some(0) {
        return Err(miette!(
            "--steps and --batch must be at least 1, --seq at least 2 and --lora at least 1"
        ));
    }
    if let Some(why) = checks::unavailable(&args.backend, true) {
        return Err(miette!("--backend {}: {why}", args.backend));
    }
    if args.bf16 && !burnish_stages::backend::has_bf16(&args.backend) {
        return Err(miette!(
            "--bf16: the `{}` backend has no bf16 matrix products",
            args.backend
        ));
    }
    let report = speed::run(&speed::Options {
        backend: args.backend.clone(),
        shape,
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        warmup: args.warmup,
        bf16: args.bf16,
        lora: args.lora,
        seed: args.seed,
    })?;
    println!("{}", serde_json::to_string(&report).into_diagnostic()?);
    Ok(ExitCode::SUCCESS)
}

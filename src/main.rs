//! The `burnish` command line: a thin layer over `burnish-engine` and the stage kinds.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use burnish_engine::cache::EntryHealth;
use burnish_engine::lock::LockFile;
use burnish_engine::manifest::{self, BackendChoice, Manifest};
use burnish_engine::plan::{Plan, State, short};
use burnish_engine::stage::Registry;
use burnish_engine::store::{GcOptions, Store};
use burnish_engine::{compare, schema};
use clap::{Parser, Subcommand, ValueEnum};
use miette::{IntoDiagnostic, Result, miette};

mod alloc;
mod generate;
mod probe;
mod remote;
mod render;
mod run;
mod skypilot;
mod testing;

#[derive(Parser)]
#[command(
    name = "burnish",
    version,
    about = "Declarative, cached, resumable fine-tuning pipelines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
pub(crate) struct CacheArgs {
    /// Cache directory (default: $BURNISH_CACHE, else .burnish/ beside the manifest)
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Shared remote cache (default: $BURNISH_REMOTE, else the manifest's `cache.remote`);
    /// without a URL, the configured one (with `gc`: collect the remote too)
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    remote: Option<String>,
    /// Pull and push, or pull only (default: $BURNISH_REMOTE_MODE, else the manifest's)
    #[arg(long, value_enum, value_name = "MODE")]
    remote_mode: Option<remote::ModeArg>,
    /// Use the local cache alone, whatever is configured
    #[arg(long, conflicts_with_all = ["remote", "remote_mode"])]
    no_remote: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum BackendArg {
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Check manifests; exit 0 when all are valid, 2 when any is not
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show each stage as cached, stale (with reasons) or new
    Plan {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Run a pipeline: restore cached stages, run the rest, write the lock file
    Run(run::RunArgs),
    /// Run exactly one cell whose inputs are cached (for launchers that run cells elsewhere)
    #[command(hide = true)]
    RunCell(run::RunCellArgs),
    /// Print the manifest JSON Schema
    Schema,
    /// Print each stage's metrics
    Metrics {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Compare parameters and metrics across manifests (and matrix cells)
    Compare {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, conflicts_with_all = ["md", "csv"])]
        json: bool,
        #[arg(long, conflicts_with = "csv")]
        md: bool,
        #[arg(long)]
        csv: bool,
        /// Show parameters that are equal in every row too
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Print the stage DAG
    Graph {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "mermaid")]
        format: GraphFormat,
    },
    /// Re-hash cache entries and report corrupt ones
    Verify {
        /// A manifest whose cache to check (default: $BURNISH_CACHE or ./.burnish)
        file: Option<PathBuf>,
        /// Evict corrupt and incomplete entries
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Remove cache entries no given lock file and no recent run refers to
    Gc {
        /// Lock files whose entries to keep
        #[arg(long = "lock", value_name = "FILE")]
        locks: Vec<PathBuf>,
        /// Keep entries used by runs in the last N days
        #[arg(long, default_value_t = 7.0)]
        keep_days: f64,
        /// Only list what would be removed
        #[arg(long)]
        dry_run: bool,
        /// A manifest whose cache to collect (default: $BURNISH_CACHE or ./.burnish)
        file: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Send a pipeline's locally cached entries to the remote cache
    Push(remote::TransferArgs),
    /// Fetch a pipeline's entries from the remote cache into the local one
    Pull(remote::TransferArgs),
    /// Write a SkyPilot task that runs the pipeline (or one stage) on a cloud node
    Skypilot(skypilot::SkypilotArgs),
    /// Print a GGUF file's header, metadata and tensor table
    Inspect {
        /// A .gguf file
        file: PathBuf,
    },
    /// Sample completions of a prompt from a model directory
    Generate(generate::GenerateArgs),
    /// Show a dataset's first examples as SFT encodes them, target tokens marked
    Render(render::RenderArgs),
    /// Check a backend against transformers' logits and the CPU backend; exit 1 on any FAIL
    Selftest(probe::SelftestArgs),
    /// Training throughput of a model made from a shape (the GPU lane's speed rows)
    #[command(hide = true)]
    BenchTrain(probe::BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Mermaid,
    Dot,
}

fn registry() -> Registry {
    let mut r = burnish_stages::registry();
    if std::env::var_os("BURNISH_TEST_KINDS").is_some() {
        testing::register(&mut r);
    }
    r
}

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::from(1)
        }
    };
    if std::env::var_os(REPORT_PEAK_RSS).is_some() {
        report_peak_rss();
    }
    code
}

/// Set, the binary prints its peak resident size to stderr as it exits (the streaming export's
/// memory test reads it).
const REPORT_PEAK_RSS: &str = "BURNISH_REPORT_PEAK_RSS";

/// `peak RSS: <kB> kB`: the process's high-water mark of resident memory, or a line saying it
/// is unknown where Linux does not report it.
fn report_peak_rss() {
    match burnish_stages::probe::peak_rss_kb() {
        Some(kb) => eprintln!("peak RSS: {kb} kB"),
        None => eprintln!("peak RSS: unknown (no VmHWM in /proc/self/status)"),
    }
}

/// Exit code for invalid manifests.
pub(crate) const INVALID: u8 = 2;

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let reg = registry();
    match cli.command {
        Command::Validate { files } => {
            let mut ok = true;
            for f in &files {
                match manifest::load(f, &reg) {
                    Ok(m) => println!("{}: valid ({} stages)", f.display(), m.stages.len()),
                    Err(e) => {
                        ok = false;
                        eprint!("{}", e.render(terminal_width(), color()));
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(INVALID)
            })
        }
        Command::Schema => {
            let s = schema::pipeline_schema(&reg);
            println!("{}", serde_json::to_string_pretty(&s).into_diagnostic()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            file,
            json,
            backend,
            cache,
        } => {
            let Some(m) = load(&file, &reg) else {
                return Ok(ExitCode::from(INVALID));
            };
            let (plan, store, _) = plan_and_cache(m, &reg, backend, &cache)?;
            let lock = LockFile::read(&plan.manifest.lock_path())?;
            let mut hasher = store.file_hasher();
            let status = plan.status(&store, lock.as_ref(), &mut hasher)?;
            hasher.save();
            if json {
                let stages: Vec<serde_json::Value> = status
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "stage": s.stage, "kind": s.kind, "state": s.state.as_str(),
                            "fingerprint": s.fingerprint, "reasons": s.reasons,
                            "notes": s.notes,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "stages": stages }))
                        .into_diagnostic()?
                );
            } else {
                let width = status.iter().map(|s| s.stage.len()).max().unwrap_or(0);
                for s in &status {
                    let fp = s
                        .fingerprint
                        .as_deref()
                        .map_or("(pending)".to_owned(), |f| short(f).to_owned());
                    println!(
                        "{:<7} {:<width$}  {:<14} {}",
                        s.state.as_str(),
                        s.stage,
                        s.kind,
                        fp
                    );
                    for r in &s.reasons {
                        println!("        {:<width$}  - {r}", "");
                    }
                    for n in &s.notes {
                        println!("        {:<width$}  · {n}", "");
                    }
                }
                let count = |st: State| status.iter().filter(|s| s.state == st).count();
                println!(
                    "{} cached, {} stale, {} new",
                    count(State::Cached),
                    count(State::Stale),
                    count(State::New)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run::run(&args, &reg),
        Command::RunCell(args) => run::run_cell(&args, &reg),
        Command::Metrics { file, json, cache } => {
            let Some(m) = load(&file, &reg) else {
                return Ok(ExitCode::from(INVALID));
            };
            let (plan, store, _) = plan_and_cache(m, &reg, None, &cache)?;
            let mut hasher = store.file_hasher();
            let status = plan.status(&store, None, &mut hasher)?;
            let mut stages = serde_json::Map::new();
            for s in &status {
                let metrics = match &s.fingerprint {
                    Some(fp) => store
                        .usable_record(fp)?
                        .map(|r| r.metrics)
                        .unwrap_or_default(),
                    None => Default::default(),
                };
                if s.state == State::Cached {
                    stages.insert(
                        s.stage.clone(),
                        serde_json::to_value(metrics).into_diagnostic()?,
                    );
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "stages": stages }))
                        .into_diagnostic()?
                );
            } else {
                for (stage, metrics) in &stages {
                    println!("{stage}");
                    if let Some(m) = metrics.as_object() {
                        for (k, v) in m {
                            println!("  {k}: {v}");
                        }
                    }
                }
                let missing: Vec<&str> = status
                    .iter()
                    .filter(|s| s.state != State::Cached)
                    .map(|s| s.stage.as_str())
                    .collect();
                if !missing.is_empty() {
                    eprintln!("not run yet: {}", missing.join(", "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare {
            files,
            json,
            md,
            csv,
            all,
            cache,
        } => {
            let mut rows = Vec::new();
            let mut invalid = false;
            for f in &files {
                let Some(m) = load(f, &reg) else {
                    invalid = true;
                    continue;
                };
                let (plan, c, _) = plan_and_cache(m, &reg, None, &cache)?;
                let mut hasher = c.file_hasher();
                let status = plan.status(&c, None, &mut hasher)?;
                rows.extend(compare::rows(&plan, &status, &c));
            }
            if invalid {
                return Ok(ExitCode::from(INVALID));
            }
            let table = compare::table(rows, all);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&table).into_diagnostic()?
                );
            } else if md {
                print!("{}", table.to_markdown());
            } else if csv {
                print!("{}", table.to_csv());
            } else {
                print!("{}", table.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph { file, format } => {
            let Some(m) = load(&file, &reg) else {
                return Ok(ExitCode::from(INVALID));
            };
            let plan = Plan::build(Arc::new(m), &reg, "cpu")?;
            match format {
                GraphFormat::Mermaid => print!("{}", compare::mermaid(&plan)),
                GraphFormat::Dot => print!("{}", compare::dot(&plan)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            file,
            repair,
            cache,
        } => {
            let store = open_store(file.as_deref(), &cache)?;
            let cache = store.local();
            let mut bad = 0;
            let entries = cache.entries()?;
            for fp in &entries {
                match cache.verify(fp)? {
                    EntryHealth::Ok => {}
                    EntryHealth::Incomplete => {
                        bad += 1;
                        println!("incomplete {} (no record: an interrupted write)", short(fp));
                        if repair {
                            cache.evict(fp)?;
                        }
                    }
                    EntryHealth::Corrupt(problems) => {
                        bad += 1;
                        println!("corrupt    {}", short(fp));
                        for p in problems {
                            println!("  - {p}");
                        }
                        if repair {
                            cache.evict(fp)?;
                            println!("  evicted");
                        }
                    }
                }
            }
            println!(
                "{} entries checked, {bad} bad{}",
                entries.len(),
                if repair && bad > 0 { ", evicted" } else { "" }
            );
            Ok(if bad > 0 && !repair {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Gc {
            locks,
            keep_days,
            dry_run,
            file,
            cache,
        } => {
            let store = open_store(file.as_deref(), &cache)?;
            // The remote is collected only when asked (`--remote`), with the manifest's URL
            // when it names none.
            let store = match (&cache.remote, &file) {
                (None, _) => store,
                (Some(_), Some(f)) => {
                    let Some(m) = load(f, &reg) else {
                        return Ok(ExitCode::from(INVALID));
                    };
                    remote::attach(store, Some(&m), &cache)?
                }
                (Some(_), None) => remote::attach(store, None, &cache)?,
            };
            println!("{}", gc(&store, &locks, keep_days, dry_run)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Push(args) => remote::push(&args, &reg),
        Command::Pull(args) => remote::pull(&args, &reg),
        Command::Skypilot(args) => skypilot::skypilot(&args, &reg),
        Command::Inspect { file } => {
            print!("{}", inspect(&file)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => generate::generate(&args),
        Command::Render(args) => render::render(&args),
        Command::Selftest(args) => probe::selftest(&args),
        Command::BenchTrain(args) => probe::bench_train(&args),
    }
}

/// `burnish inspect`: the header, every metadata key with its type and a summary of its value,
/// and the tensor table. Reads the header only (no tensor data).
fn inspect(path: &Path) -> Result<String> {
    use burnish_stages::export::gguf::GgufFile;
    use std::fmt::Write as _;
    let f = GgufFile::read(path)?;
    let mut s = String::new();
    let data: u64 = f.tensors.iter().map(|t| t.n_bytes() as u64).sum();
    let _ = writeln!(
        s,
        "{}: GGUF v{}, alignment {}, {} metadata keys, {} tensors, data at byte {} ({} bytes)",
        path.display(),
        f.version,
        f.alignment,
        f.metadata.len(),
        f.tensors.len(),
        f.data_offset,
        data
    );
    let _ = writeln!(s, "\nmetadata:");
    let key_w = f.metadata.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &f.metadata {
        let _ = writeln!(s, "  {k:<key_w$}  {:<6}  {}", v.type_name(), v.summary());
    }
    let _ = writeln!(s, "\ntensors:");
    let rows: Vec<[String; 5]> = f
        .tensors
        .iter()
        .map(|t| {
            let shape = t
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" × ");
            [
                t.name.clone(),
                shape,
                t.ty.name().to_owned(),
                t.offset.to_string(),
                t.n_bytes().to_string(),
            ]
        })
        .collect();
    let head = ["name", "shape", "type", "offset", "bytes"];
    let mut w = head.map(|h| h.chars().count());
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |c: [&str; 5]| {
        format!(
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}\n",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        )
    };
    s.push_str(&line(head));
    for r in &rows {
        s.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
    Ok(s)
}

fn gc(store: &Store, locks: &[PathBuf], keep_days: f64, dry_run: bool) -> Result<String> {
    let mut opts = GcOptions {
        locks: Vec::new(),
        keep_days,
        dry_run,
    };
    for l in locks {
        let lock = LockFile::read(l)?.ok_or_else(|| {
            miette!(
                code = "burnish::gc::no_lock",
                "lock file {} not found",
                l.display()
            )
        })?;
        opts.locks.push(lock);
    }
    let report = store.gc(&opts)?;
    if dry_run {
        for fp in &report.entries {
            println!("would remove {}", short(fp));
        }
        for path in &report.leftovers {
            println!("would remove {}", path.display());
        }
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut out = format!(
        "{verb} {} entries, kept {}",
        report.entries.len(),
        report.kept
    );
    if let Some(r) = store.gc_remote(&opts)? {
        if dry_run {
            for fp in &r.entries {
                println!("would remove {} from the remote", short(fp));
            }
        }
        out.push_str(&format!(
            "\nremote {}: {verb} {} entries and {} blobs ({}), kept {}",
            store.remote().map_or("", |r| r.url()),
            r.entries.len(),
            r.blobs,
            remote::bytes(r.blob_bytes),
            r.kept
        ));
    }
    Ok(out)
}

/// Render any diagnostic the way miette's report handler would, borrowing it.
pub(crate) fn render_diagnostic(d: &dyn miette::Diagnostic) -> String {
    let theme = if color() {
        miette::GraphicalTheme::unicode()
    } else {
        miette::GraphicalTheme::unicode_nocolor()
    };
    let mut out = String::new();
    let _ = miette::GraphicalReportHandler::new_themed(theme)
        .with_width(terminal_width())
        .render_report(&mut out, d);
    out
}

pub(crate) fn load(file: &Path, reg: &Registry) -> Option<Manifest> {
    match manifest::load(file, reg) {
        Ok(m) => Some(m),
        Err(e) => {
            eprint!("{}", e.render(terminal_width(), color()));
            None
        }
    }
}

/// The backend a plan runs on, and for `auto` the reason it was picked.
fn resolve_backend(choice: BackendChoice) -> Result<(&'static str, Option<String>)> {
    let name = match choice {
        BackendChoice::Auto => {
            let (name, why) = burnish_stages::backend::resolve_auto();
            return Ok((name, Some(format!("backend auto → {name} ({why})"))));
        }
        BackendChoice::Cpu => "cpu",
        BackendChoice::Wgpu => "wgpu",
        BackendChoice::Cuda => "cuda",
    };
    let available = burnish_stages::backend::available();
    if !available.contains(&name) {
        return Err(miette!(
            code = "burnish::run::backend",
            help = "rebuild with `--features {name}` (on by default), or use `--backend cpu`",
            "backend `{name}` is not built into this binary (it has {})",
            available.join(", ")
        ));
    }
    Ok((name, None))
}

pub(crate) fn plan_and_cache(
    m: Manifest,
    reg: &Registry,
    backend: Option<BackendArg>,
    args: &CacheArgs,
) -> Result<(Plan, Store, Option<String>)> {
    let choice = match backend {
        Some(BackendArg::Auto) => BackendChoice::Auto,
        Some(BackendArg::Cpu) => BackendChoice::Cpu,
        Some(BackendArg::Wgpu) => BackendChoice::Wgpu,
        Some(BackendArg::Cuda) => BackendChoice::Cuda,
        None => m.header.backend,
    };
    let dir = cache_dir(Some(&m.dir), args);
    let store = remote::attach(Store::open(&dir)?, Some(&m), args)?;
    let (backend, note) = resolve_backend(choice)?;
    let plan = Plan::build(Arc::new(m), reg, backend)?;
    Ok((plan, store, note))
}

/// The cells `name` selects (a stage or a matrix cell), or an error listing the names there are.
pub(crate) fn named_cells(plan: &Plan, name: &str, file: &Path) -> Result<Vec<usize>> {
    let cells = plan.select(name);
    if cells.is_empty() {
        let names: Vec<&str> = plan.cells.iter().map(|c| c.name.as_str()).collect();
        return Err(miette!(
            code = "burnish::run::unknown_stage",
            help = format!("stages: {}", names.join(", ")),
            "no stage or matrix cell named `{name}` in {}",
            file.display()
        ));
    }
    Ok(cells)
}

/// The cells `--until NAME` keeps: NAME and what it depends on (all cells without it).
pub(crate) fn until_cells(plan: &Plan, until: Option<&str>, file: &Path) -> Result<Vec<bool>> {
    Ok(match until {
        Some(name) => plan.ancestors_of(&named_cells(plan, name, file)?),
        None => vec![true; plan.cells.len()],
    })
}

fn cache_dir(manifest_dir: Option<&Path>, args: &CacheArgs) -> PathBuf {
    if let Some(d) = &args.cache_dir {
        return d.clone();
    }
    if let Some(d) = std::env::var_os("BURNISH_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    manifest_dir.unwrap_or(Path::new(".")).join(".burnish")
}

fn open_store(file: Option<&Path>, args: &CacheArgs) -> Result<Store> {
    let dir = match file {
        Some(f) => {
            let abs = std::path::absolute(f).into_diagnostic()?;
            cache_dir(abs.parent(), args)
        }
        None => cache_dir(None, args),
    };
    if !dir.exists() {
        return Err(miette!(
            code = "burnish::cache::missing",
            "no cache at {}",
            dir.display()
        ));
    }
    Ok(Store::open(&dir)?)
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100)
}

fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
}

//! The remote cache on the command line: which remote a command uses, `burnish push` and
//! `burnish pull`, and the summary line of what moved.

use std::path::PathBuf;
use std::process::ExitCode;

use burnish_engine::cache::Lookup;
use burnish_engine::manifest::Manifest;
use burnish_engine::plan::{CellStatus, Plan, short};
use burnish_engine::remote::{Remote, RemoteMode};
use burnish_engine::stage::Registry;
use burnish_engine::store::Store;
use miette::{Result, miette};

use crate::{CacheArgs, INVALID, load, plan_and_cache};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    /// Pull on a miss, push what is computed
    ReadWrite,
    /// Pull only
    ReadOnly,
}

/// `push`/`pull FILE [--until STAGE]`.
#[derive(clap::Args)]
pub struct TransferArgs {
    file: PathBuf,
    /// Only this stage (or matrix cell) and what it depends on
    #[arg(long, value_name = "STAGE")]
    until: Option<String>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// The remote a command uses and its mode: `--no-remote` or `$BURNISH_NO_REMOTE` turn it off;
/// else `--remote URL`, `$BURNISH_REMOTE`, the manifest's `cache.remote`, in that order.
fn configured(m: Option<&Manifest>, args: &CacheArgs) -> Result<Option<(String, RemoteMode)>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if args.no_remote || env("BURNISH_NO_REMOTE").is_some() {
        return Ok(None);
    }
    let from_manifest = m.and_then(|m| m.header.cache.as_ref());
    let (url, manifest_mode) = match args.remote.as_deref().filter(|u| !u.is_empty()) {
        Some(u) => (u.to_owned(), None),
        None => match env("BURNISH_REMOTE") {
            Some(u) => (u, None),
            None => match from_manifest {
                Some(c) => (c.remote.clone(), Some(c.mode)),
                None if args.remote.is_some() => {
                    return Err(miette!(
                        code = "burnish::remote::none",
                        help = "give one: `--remote s3://bucket/prefix`, $BURNISH_REMOTE, or `cache: {{remote: …}}` in the manifest",
                        "`--remote` without a URL, and no remote is configured"
                    ));
                }
                None => return Ok(None),
            },
        },
    };
    let mode = match (args.remote_mode, env("BURNISH_REMOTE_MODE")) {
        (Some(ModeArg::ReadWrite), _) => RemoteMode::ReadWrite,
        (Some(ModeArg::ReadOnly), _) => RemoteMode::ReadOnly,
        (None, Some(v)) if v == "read-write" => RemoteMode::ReadWrite,
        (None, Some(v)) if v == "read-only" => RemoteMode::ReadOnly,
        (None, Some(v)) => {
            return Err(miette!(
                code = "burnish::remote::mode",
                help = "BURNISH_REMOTE_MODE is `read-write` or `read-only`",
                "BURNISH_REMOTE_MODE is `{v}`"
            ));
        }
        (None, None) => manifest_mode.unwrap_or_default(),
    };
    Ok(Some((url, mode)))
}

/// `store` with the configured remote behind it (unchanged when none is).
pub fn attach(store: Store, m: Option<&Manifest>, args: &CacheArgs) -> Result<Store> {
    Ok(match configured(m, args)? {
        Some((url, mode)) => store.with_remote(Remote::open(&url, mode)?),
        None => store,
    })
}

/// What moved to and from the remote, when anything did.
pub fn transfer_line(store: &Store) -> Option<String> {
    let r = store.remote()?;
    let t = r.transfers();
    let mut parts = Vec::new();
    if t.pulled > 0 {
        parts.push(format!(
            "pulled {} ({})",
            entries(t.pulled),
            bytes(t.pulled_bytes)
        ));
    }
    if t.pushed > 0 {
        parts.push(format!(
            "pushed {} ({})",
            entries(t.pushed),
            bytes(t.pushed_bytes)
        ));
    }
    (!parts.is_empty()).then(|| format!("remote {}: {}", r.url(), parts.join(", ")))
}

fn entries(n: u64) -> String {
    format!("{n} {}", if n == 1 { "entry" } else { "entries" })
}

/// A byte count for humans (decimal units, as transfer rates are given).
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

/// The plan, its store (with a remote, else an error) and the cells `--until` selects, with
/// their status.
fn selected(args: &TransferArgs, reg: &Registry) -> Result<Option<(Plan, Store, Vec<CellStatus>)>> {
    let Some(m) = load(&args.file, reg) else {
        return Ok(None);
    };
    let (plan, store, _) = plan_and_cache(m, reg, None, &args.cache)?;
    if store.remote().is_none() {
        return Err(miette!(
            code = "burnish::remote::none",
            help = "give one: `--remote s3://bucket/prefix`, $BURNISH_REMOTE, or `cache: {{remote: …}}` in the manifest",
            "no remote cache is configured for {}",
            args.file.display()
        ));
    }
    let keep = crate::until_cells(&plan, args.until.as_deref(), &args.file)?;
    let mut hasher = store.file_hasher();
    let status = plan.status(&store, None, &mut hasher)?;
    hasher.save();
    let status = status
        .into_iter()
        .zip(keep)
        .filter_map(|(s, k)| k.then_some(s))
        .collect();
    Ok(Some((plan, store, status)))
}

/// `burnish push`: every selected cell computed here goes to the remote.
pub fn push(args: &TransferArgs, reg: &Registry) -> Result<ExitCode> {
    let Some((_, store, status)) = selected(args, reg)? else {
        return Ok(ExitCode::from(INVALID));
    };
    let (mut present, mut missing) = (0, Vec::new());
    for s in &status {
        let Some(fp) = &s.fingerprint else {
            missing.push(s.stage.as_str());
            continue;
        };
        match store.peek(fp)? {
            (Lookup::Hit(_), false) if store.push(fp)? => {
                println!("pushed   {} {}", s.stage, short(fp))
            }
            (Lookup::Hit(_), _) => present += 1,
            _ => missing.push(s.stage.as_str()),
        }
    }
    let t = store.remote().map(|r| r.transfers()).unwrap_or_default();
    println!(
        "pushed {} ({}), {present} already on the remote",
        entries(t.pushed),
        bytes(t.pushed_bytes)
    );
    if !missing.is_empty() {
        eprintln!("not computed here: {}", missing.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `burnish pull`: every selected cell the remote has comes into the local cache.
pub fn pull(args: &TransferArgs, reg: &Registry) -> Result<ExitCode> {
    let Some((_, store, status)) = selected(args, reg)? else {
        return Ok(ExitCode::from(INVALID));
    };
    let (mut present, mut missing) = (0, Vec::new());
    for s in &status {
        let Some(fp) = &s.fingerprint else {
            missing.push(s.stage.as_str());
            continue;
        };
        match store.peek(fp)? {
            (Lookup::Hit(_), false) => present += 1,
            (Lookup::Hit(_), true) => {
                if let Lookup::Hit(_) = store.lookup(fp)? {
                    println!("pulled   {} {}", s.stage, short(fp));
                }
            }
            _ => missing.push(s.stage.as_str()),
        }
    }
    let t = store.remote().map(|r| r.transfers()).unwrap_or_default();
    println!(
        "pulled {} ({}), {present} already here",
        entries(t.pulled),
        bytes(t.pulled_bytes)
    );
    if !missing.is_empty() {
        eprintln!("not on the remote: {}", missing.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test crate uses its own subset

/// Run a Python `script` (`python -c script arg`) under `$BURNISH_PYTHON` (default `python3`)
/// and return its stdout. When Python does not run it, the test is skipped with a printed reason
/// (`None`), or fails when `BURNISH_REQUIRE_PY=1`.
pub fn run_python(script: &str, arg: &str, what: &str) -> Option<String> {
    let python = std::env::var("BURNISH_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args(["-c", script, arg])
        .output();
    match &out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        _ => {
            skip(
                "BURNISH_REQUIRE_PY",
                &format!("{python} failed {what}: {out:?}"),
            );
            None
        }
    }
}

/// Whether `BURNISH_REQUIRE_PY=1`: a Python check must run, not skip.
pub fn require_python() -> bool {
    std::env::var("BURNISH_REQUIRE_PY").is_ok_and(|v| v == "1")
}

/// Skip the running test because `reason`: a failure when `switch` (a `BURNISH_REQUIRE_*`
/// variable) is set to anything but `0`, and otherwise a `skipped: <test>: <reason>` line written
/// straight to stderr. libtest captures only `print!`/`eprint!` output, so the line shows in
/// every `cargo test` run, not only in failing ones.
pub fn skip(switch: &str, reason: &str) {
    let required = std::env::var(switch).is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(!required, "{switch} is set, but {reason}");
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let line = format!("skipped: {test}: {reason} (set {switch}=1 to fail instead)\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

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

mod skip;
#[allow(unused_imports)] // each test crate uses its own subset
pub use skip::skip;

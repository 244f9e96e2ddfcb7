//! `skip`, shared by the test helpers of both packages (`tests/common` includes this file).

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

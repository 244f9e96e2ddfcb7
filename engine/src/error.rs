//! Errors that are not about the manifest: internal invariants and I/O.

use miette::Diagnostic;
use thiserror::Error;

/// A broken internal invariant: a bug in burnish or in a stage kind, never the user's input.
#[derive(Debug, Error, Diagnostic)]
#[error("internal error: {0}")]
#[diagnostic(
    code(burnish::internal),
    help("this is a bug in burnish; please report it with the manifest that triggered it")
)]
pub struct InternalError(pub String);

/// An I/O failure with the path it concerned.
#[derive(Debug, Error, Diagnostic)]
#[error("{action} {path}: {source}")]
#[diagnostic(code(burnish::io))]
pub struct IoError {
    pub action: &'static str,
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    pub fn new(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        IoError {
            action,
            path: path.display().to_string(),
            source,
        }
    }
}

/// Shorthand: map an `io::Result` to an [`IoError`] naming the path.
pub trait IoContext<T> {
    fn io(self, action: &'static str, path: &std::path::Path) -> Result<T, IoError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io(self, action: &'static str, path: &std::path::Path) -> Result<T, IoError> {
        self.map_err(|e| IoError::new(action, path, e))
    }
}

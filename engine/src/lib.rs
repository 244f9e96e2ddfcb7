//! burnish's engine: everything between a manifest file and a finished run, with no knowledge of
//! any particular stage kind and no dependency on burn.
//!
//! The phases, each its own type:
//! - [`yaml`]: text → spanned [`yaml::Node`] tree (serde-saphyr).
//! - [`manifest`]: node tree (after `extends` merging) → validated [`manifest::Manifest`], with
//!   every problem collected into [`diag::ManifestErrors`].
//! - [`plan`]: manifest → immutable [`plan::Plan`]: matrix cells in topological order with a
//!   fingerprint per stage ([`cache`] says what is hashed).
//! - [`exec`]: plan → [`exec::RunReport`]: a scheduler decides each cell's fate, a launcher runs
//!   jobs, entries are published through the [`store`] (the one door to computed results),
//!   which pulls from and pushes to a shared [`remote`] when one is configured.
//! - [`lock`], [`compare`]: records of runs, and comparisons across manifests.
//!
//! Stage kinds plug in through [`stage::Stage`] and a [`stage::Registry`].

pub mod cache;
pub mod compare;
pub mod de;
pub mod diag;
pub mod error;
pub mod exec;
pub(crate) mod lease;
pub mod lock;
pub mod manifest;
pub mod plan;
pub mod remote;
pub mod schema;
pub mod stage;
pub mod store;
pub mod yaml;

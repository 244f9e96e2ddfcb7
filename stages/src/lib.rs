//! burnish's stage kinds. This crate owns everything that computes: the data stages ([`data`])
//! now, and the burn models, trainers and exporters as they land. The engine sees them only
//! through [`burnish_engine::stage::Stage`] and the [`registry`].

pub mod backend;
pub mod data;
pub mod eval;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod model;
pub mod pref;
pub mod probe;
pub mod rl;
pub mod text;
pub mod train;

use burnish_engine::stage::Registry;

pub use data::register_data;

/// A registry holding every stage kind this crate provides, with `hf://` paths resolved from the
/// local Hugging Face cache (never downloaded).
pub fn registry() -> Registry {
    let mut reg = Registry::new();
    data::register_data(&mut reg);
    text::register_text(&mut reg);
    train::register_train(&mut reg);
    eval::register_eval(&mut reg);
    pref::register_pref(&mut reg);
    export::register_export(&mut reg);
    generate::register_generate(&mut reg);
    rl::register_rl(&mut reg);
    reg.set_uri_resolver(|uri| data::resolve_hf(uri).map_err(|e| e.to_string()));
    reg
}

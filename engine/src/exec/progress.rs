//! What a run prints: one line per event, and a progress bar per running cell when stderr is a
//! terminal.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::stage::ProgressSink;

/// Progress and event lines.
pub(crate) struct Reporter {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Reporter {
    pub(crate) fn new(quiet: bool) -> Self {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Reporter { multi, quiet }
    }
    pub(crate) fn line(&self, s: String) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => eprintln!("{s}"),
        }
    }
    pub(crate) fn bar(&self, cell: &str) -> Arc<dyn ProgressSink> {
        match &self.multi {
            Some(m) => {
                let pb = m.add(ProgressBar::new_spinner());
                pb.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {prefix:.bold} {elapsed_precise} {wide_bar} {pos}/{len} {msg} (eta {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                pb.set_prefix(cell.to_owned());
                pb.set_length(0);
                pb.enable_steady_tick(Duration::from_millis(200));
                Arc::new(Bar(pb))
            }
            None => Arc::new(crate::stage::NoProgress),
        }
    }
}

struct Bar(ProgressBar);
impl ProgressSink for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn set_position(&self, pos: u64) {
        self.0.set_position(pos);
    }
    fn set_message(&self, msg: &str) {
        self.0.set_message(msg.to_owned());
    }
}
impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

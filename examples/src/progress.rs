//! Progress of the long operations (replaying dead letters, migrating, the
//! benchmark's phases, the WAL source's initial load), drawn on stderr
//! only when a person watches it: when stderr is not a terminal (a log
//! file, CI) the bars draw nothing and the operations print their usual
//! lines.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn target() -> ProgressDrawTarget {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A bar of `total` steps (events, rows), counting up.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), target());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// A spinner for work of unknown length, with the time it has taken.
pub fn spinner(what: &str) -> ProgressBar {
    let spinner = ProgressBar::with_draw_target(None, target());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]") {
        spinner.set_style(style);
    }
    spinner.set_message(what.to_string());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

/// Whether bars are drawn (stderr is a terminal).
pub fn shown() -> bool {
    !target().is_hidden()
}

//! Progress shown to a person: bars and spinners on stderr, drawn only when
//! stderr is a terminal (indicatif hides them otherwise), so scripts and
//! logs see none of it.

/// A progress bar on stderr, drawn only when stderr is a terminal.
pub fn progress_bar(what: &str) -> (indicatif::ProgressBar, impl FnMut(u64, u64)) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    let handle = bar.clone();
    (bar, move |done, total| {
        handle.set_length(total);
        handle.set_position(done);
    })
}

/// A spinner on stderr for work whose progress cannot be counted (a check
/// walks metadata, a resize may grow tables), drawn only when stderr is a
/// terminal; it ticks on its own thread until dropped or finished.
pub fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

//! Progress as `migrate` and `verify` show it: a live line on a terminal, plain lines in a log.

use std::time::Duration;

/// Progress as an admin sees it: a live line on a terminal (indicatif), a plain line every few
/// seconds otherwise (a log, a pipe, `nohup`).
pub struct Report {
    what: &'static str,
    bar: Option<indicatif::ProgressBar>,
}

impl Report {
    pub fn new(what: &'static str) -> Report {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
                    .expect("valid template"),
            );
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Report { what, bar }
    }

    /// How often `show` is called: often on a terminal, every few seconds in a log.
    pub fn every(&self) -> Duration {
        if self.bar.is_some() {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        }
    }

    pub fn show(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => eprintln!("{}: {line}", self.what),
        }
    }

    /// A message that must not be overwritten by the live line.
    pub fn note(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{}: {line}", self.what),
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

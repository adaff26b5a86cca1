//! `--check-config`: what a binary would run, as a readable summary, without running it.
//!
//! A rendered ConfigMap is checked before the Secrets it names exist (in CI, on an operator's
//! laptop), so a file the config names is reported as present or "not present here", never
//! opened and never a failure. Only paths are printed: key material is never read.

use std::fmt::Display;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::{EXIT_CONFIG, TlsConfig, Validate, load};

/// The `--help` text of every binary's `--check-config` flag.
pub const CHECK_CONFIG_HELP: &str = "Load and validate the configuration, print what would \
run (roles, listeners, sources, peers, upstreams, certificate paths) and exit: 0 when valid, 64 \
naming the file, field and what was expected when not. Files the configuration names \
(certificates, route files) need not exist on this machine: they are reported as \"not present \
here\", so a rendered ConfigMap can be checked before its Secrets exist.";

/// The lines `--check-config` prints, `key: value`, indented by section.
#[derive(Debug, Default)]
pub struct Summary {
    lines: Vec<String>,
    depth: usize,
}

impl Summary {
    /// An empty summary.
    pub fn new() -> Self {
        Self::default()
    }

    /// A `key: value` line.
    pub fn line(&mut self, key: &str, value: impl Display) -> &mut Self {
        self.lines
            .push(format!("{}{key}: {value}", "  ".repeat(self.depth)));
        self
    }

    /// A `key:` heading; the lines `f` adds are indented under it.
    pub fn section(&mut self, key: &str, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.lines
            .push(format!("{}{key}:", "  ".repeat(self.depth)));
        self.depth += 1;
        f(self);
        self.depth -= 1;
        self
    }

    /// A file the configuration names, with whether it exists on this machine.
    pub fn file(&mut self, key: &str, path: &Path) -> &mut Self {
        let status = file_status(path);
        self.line(key, format_args!("{} ({status})", path.display()))
    }

    /// The `tls` section: the three file paths and the reload interval.
    pub fn tls(&mut self, key: &str, tls: &TlsConfig) -> &mut Self {
        self.section(key, |s| {
            s.file("cert", &tls.cert)
                .file("key", &tls.key)
                .file("bundle", &tls.bundle)
                .line("reload_interval", tls.reload_interval);
        })
    }

    /// The summary as printed, one line each, newline-terminated.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

/// `present` or `not present here`; metadata only, the file is never opened.
pub fn file_status(path: &Path) -> &'static str {
    match std::fs::metadata(path) {
        Ok(_) => "present",
        Err(_) => "not present here",
    }
}

/// Loads and validates `path`, prints `binary`'s summary of it and exits 0; on any error prints
/// it (file, field, what was expected) and exits with [`EXIT_CONFIG`].
///
/// For `main` only, like [`super::load_or_exit`].
pub fn check_and_exit<T: DeserializeOwned + Validate>(
    binary: &str,
    path: &Path,
    summarize: impl FnOnce(&T, &mut Summary),
) -> ! {
    match load::<T>(path) {
        Ok(config) => {
            let mut summary = Summary::new();
            summary.line(binary, format_args!("{}: configuration ok", path.display()));
            summarize(&config, &mut summary);
            print!("{}", summary.render());
            std::process::exit(0)
        }
        Err(err) => {
            eprintln!("error: {}", super::report(&err));
            std::process::exit(EXIT_CONFIG)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_reported_present_or_not_present_here() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path().join("cert.pem");
        std::fs::write(&here, "x").unwrap();
        let tls = TlsConfig {
            cert: here.clone(),
            key: dir.path().join("key.pem"),
            bundle: dir.path().join("ca.pem"),
            reload_interval: super::super::HumanDuration::from_millis(500),
        };
        let mut s = Summary::new();
        s.line("role", "ingress").tls("tls", &tls);
        let text = s.render();
        assert!(text.starts_with("role: ingress\ntls:\n  cert: "), "{text}");
        assert!(
            text.contains(&format!("{} (present)", here.display())),
            "{text}"
        );
        assert!(text.contains("key.pem (not present here)"), "{text}");
        assert!(text.contains("  reload_interval: "), "{text}");
    }
}

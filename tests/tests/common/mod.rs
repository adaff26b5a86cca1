//! Shared by the end-to-end tests: one world at a time per test binary (each is a dozen
//! processes), on addresses no other world of this run uses.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use isthmus_tests::world::client::Row;
use isthmus_tests::world::scenario::STEPS;
use isthmus_tests::world::{Options, Say, Transport, World};

static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the one-world-at-a-time lock (a failed test does not poison it for the others).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A runtime for one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// World ids for this binary: `base` + a counter, away from the demo's 42.
pub fn next_id(base: u8) -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    base + NEXT.fetch_add(1, Ordering::Relaxed) % 20
}

/// A world's directory: removed when the test passes, kept (path printed) when it fails, so
/// the component logs can be read.
pub struct Dir(Option<tempfile::TempDir>);

impl Dir {
    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && std::thread::panicking()
        {
            eprintln!("kept for reading: {}", dir.keep().display());
        }
    }
}

/// Starts a world over `transport` in a fresh temporary directory.
pub async fn start(base: u8, transport: Transport, netns: bool) -> (World, Dir) {
    let dir = tempfile::Builder::new()
        .prefix("isthmus-e2e-")
        .tempdir()
        .unwrap();
    eprintln!("world files and logs: {}", dir.path().display());
    let mut opts = Options::new(
        next_id(base),
        dir.path(),
        env!("CARGO_BIN_EXE_isthmus-demo"),
    );
    opts.transport = transport;
    opts.netns = netns;
    match World::start(opts).await {
        Ok(world) => (world, Dir(Some(dir))),
        Err(e) => {
            let kept = dir.keep();
            panic!("world did not start ({}): {e:#}", kept.display())
        }
    }
}

/// Progress lines to the test's output.
pub fn say() -> Say {
    Arc::new(|line| eprintln!("{line}"))
}

/// The row of `caller` in `step`.
pub fn row<'a>(rows: &'a [Row], step: usize, caller: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.step == step && r.caller == caller)
        .unwrap_or_else(|| panic!("no calls from {caller} in step {}", STEPS[step]))
}

/// Asserts every successful call of `caller` in `step` was served by `cluster`, and there
/// were some.
pub fn served_only_by(rows: &[Row], step: usize, caller: &str, cluster: &str) {
    let r = row(rows, step, caller);
    let others: Vec<_> = r.served_by.keys().filter(|k| *k != cluster).collect();
    assert!(
        r.requests > 0 && others.is_empty(),
        "step {}: {caller} should be served only by {cluster}: {:?}",
        STEPS[step],
        r.served_by
    );
}

/// How long a condition may take to show in these tests.
pub const LIMIT: Duration = Duration::from_secs(10);

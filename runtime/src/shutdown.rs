//! Signals and drain.
//!
//! The first SIGTERM or SIGINT cancels a [`CancellationToken`]: servers stop accepting and
//! in-flight work gets to finish. A second one means the operator is done waiting, so the process
//! exits at once with [`EXIT_INTERRUPTED`]. [`drain`] puts one deadline on the finishing.
//!
//! Unix only: Isthmus runs on Linux.

use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Exit status after a second shutdown signal (128 + SIGINT, the shell's convention for Ctrl+C).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Starts listening for SIGTERM and SIGINT: the first cancels `token`, the second exits the
/// process with [`EXIT_INTERRUPTED`].
///
/// Call it inside the runtime, before binding anything: the handlers are installed before this
/// returns, so a signal that arrives while the process is starting up is not lost. Should a
/// handler fail to install, that is logged and the signal keeps its default action, which ends
/// the process without a drain.
pub fn spawn_signal_handler(token: CancellationToken) -> JoinHandle<()> {
    let mut term = install(SignalKind::terminate(), "SIGTERM");
    let mut int = install(SignalKind::interrupt(), "SIGINT");
    tokio::spawn(async move {
        let Some(first) = next_signal(&mut term, &mut int).await else {
            return;
        };
        tracing::info!(
            signal = first,
            "shutdown requested, draining; signal again to exit at once"
        );
        token.cancel();
        let Some(second) = next_signal(&mut term, &mut int).await else {
            return;
        };
        tracing::warn!(
            signal = second,
            "second shutdown signal, exiting without draining"
        );
        std::process::exit(EXIT_INTERRUPTED);
    })
}

fn install(kind: SignalKind, name: &'static str) -> Option<Signal> {
    signal(kind)
        .inspect_err(|error| {
            tracing::error!(signal = name, %error, "cannot install signal handler; this signal will end the process without a drain");
        })
        .ok()
}

/// The name of the next signal received, or `None` once neither stream can deliver any more
/// (the runtime is shutting down).
async fn next_signal(term: &mut Option<Signal>, int: &mut Option<Signal>) -> Option<&'static str> {
    async fn recv(signal: &mut Option<Signal>) -> Option<()> {
        match signal {
            Some(signal) => signal.recv().await,
            None => None,
        }
    }
    loop {
        tokio::select! {
            got = recv(term), if term.is_some() => match got {
                Some(()) => return Some("SIGTERM"),
                None => *term = None,
            },
            got = recv(int), if int.is_some() => match got {
                Some(()) => return Some("SIGINT"),
                None => *int = None,
            },
            else => return None,
        }
    }
}

/// How a [`drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every tracked task finished within the grace period.
    Clean,
    /// The grace period ran out with tasks still running.
    TimedOut {
        /// How many tracked tasks were still running.
        remaining: usize,
    },
}

/// Closes `tracker` and waits at most `grace` for its tasks to finish; logs and returns how that
/// went.
///
/// On [`DrainOutcome::TimedOut`] the remaining tasks are left running: the caller force-closes
/// them by returning from `main`, which drops the runtime.
pub async fn drain(tracker: &TaskTracker, grace: Duration) -> DrainOutcome {
    // Closing is what lets `wait` finish; doing it here means a caller cannot forget.
    tracker.close();
    let started = tokio::time::Instant::now();
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        tracing::info!(elapsed = ?started.elapsed(), "drained cleanly");
        DrainOutcome::Clean
    } else {
        let remaining = tracker.len();
        tracing::warn!(
            ?grace,
            remaining,
            "drain grace period over; abandoning remaining tasks"
        );
        DrainOutcome::TimedOut { remaining }
    }
}

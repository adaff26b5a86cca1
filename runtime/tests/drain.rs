//! `shutdown::drain` under paused tokio time: deterministic, and no real waiting.

use std::future;
use std::time::Duration;

use isthmus_runtime::shutdown::{DrainOutcome, drain};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::task::TaskTracker;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn tasks_that_finish_within_grace_drain_clean() {
    let tracker = TaskTracker::new();
    for ms in [10, 50, 200] {
        tracker.spawn(sleep(Duration::from_millis(ms)));
    }
    let started = Instant::now();
    // The caller did not close the tracker: drain must, or `wait` would never return.
    let outcome = timeout(LIMIT, drain(&tracker, Duration::from_secs(5)))
        .await
        .expect("drain hung");
    assert_eq!(outcome, DrainOutcome::Clean);
    // Returned when the last task finished, not at the end of the grace period.
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert!(tracker.is_closed());
}

#[tokio::test(start_paused = true)]
async fn an_empty_tracker_drains_at_once() {
    let tracker = TaskTracker::new();
    let started = Instant::now();
    let outcome = timeout(LIMIT, drain(&tracker, Duration::from_secs(5)))
        .await
        .expect("drain hung");
    assert_eq!(outcome, DrainOutcome::Clean);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_task_that_never_finishes_times_out_at_grace() {
    let tracker = TaskTracker::new();
    tracker.spawn(sleep(Duration::from_millis(10)));
    tracker.spawn(future::pending::<()>());
    tracker.spawn(future::pending::<()>());
    tracker.close();
    let started = Instant::now();
    let grace = Duration::from_millis(100);
    let outcome = timeout(LIMIT, drain(&tracker, grace))
        .await
        .expect("drain hung");
    assert_eq!(outcome, DrainOutcome::TimedOut { remaining: 2 });
    assert_eq!(started.elapsed(), grace);
}

//! `telemetry::init` installs a process-global subscriber, so this file holds a single test: it
//! runs in its own process and owns that global.

use isthmus_runtime::telemetry::{self, LogFormat, TelemetryError};

#[test]
fn init_rejects_a_bad_filter_then_installs_once() {
    let err = telemetry::init(LogFormat::Json, "isthmus=notalevel").unwrap_err();
    assert!(
        matches!(&err, TelemetryError::InvalidFilter { filter, .. } if filter == "isthmus=notalevel"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("invalid log filter \"isthmus=notalevel\""),
        "{err}"
    );

    // The bad filter installed nothing, so this first real call succeeds...
    telemetry::init(LogFormat::Json, "info").expect("first init");
    tracing::info!(answer = 42, "logging works");
    // ...and a second one reports the existing subscriber instead of panicking.
    let err = telemetry::init(LogFormat::Text, "debug").unwrap_err();
    assert!(
        matches!(err, TelemetryError::AlreadyInitialized { .. }),
        "{err:?}"
    );
}

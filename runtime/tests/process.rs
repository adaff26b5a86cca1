//! Behaviour that ends or signals the whole process: `config::load_or_exit`'s exit status, the
//! signal handler's first and second signal, and where `telemetry::init_or_exit` takes its
//! filter from (`--log`, then `$RUST_LOG`).
//!
//! Each case runs in a child process: the test binary re-runs itself for one `child_*` test, with
//! `CHILD_VAR` set to tell that test it is the child. Without the variable a `child_*` test returns
//! at once, so a plain `cargo test` never signals or exits the test runner itself.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use isthmus_runtime::config::{self, EXIT_CONFIG, FieldError, Validate};
use isthmus_runtime::shutdown::{self, EXIT_INTERRUPTED};
use serde::Deserialize;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const CHILD_VAR: &str = "ISTHMUS_RUNTIME_TEST_CHILD";
const LIMIT: Duration = Duration::from_secs(10);

/// Runs the single test `name` of this binary in a child process, passing `arg` in `CHILD_VAR`.
fn run_child(name: &str, arg: &str) -> Output {
    run_child_with(name, arg, &[])
}

/// As [`run_child`], with `env` added to the child's environment.
fn run_child_with(name: &str, arg: &str, env: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("current test binary");
    let mut command = Command::new(exe);
    command
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, arg)
        .env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run child test process")
}

/// The value of `CHILD_VAR`, if this process is a child started by `run_child`.
fn child_arg() -> Option<String> {
    std::env::var(CHILD_VAR).ok()
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Sends `signal` to this process with the system `kill` command; fails loudly if it is missing.
fn raise(signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &std::process::id().to_string()])
        .status()
        .expect("`kill` command must be available to send signals");
    assert!(status.success(), "kill -{signal} failed: {status}");
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Minimal {
    /// Anything; the test cares only about the failure.
    #[allow(dead_code)]
    name: String,
}

impl Validate for Minimal {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

#[test]
fn load_or_exit_prints_the_reason_and_exits_64() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: edge\nnmae: typo\n").expect("write config");
    let output = run_child("child_load_or_exit", bad.to_str().expect("utf-8 temp path"));
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let want = format!(
        "error: invalid configuration in {}:2:1: field `nmae`: unknown field `nmae`, expected `name`\n",
        bad.display()
    );
    assert!(stderr.contains(&want), "{}", describe(&output));

    let missing = dir.path().join("missing.yaml");
    let output = run_child(
        "child_load_or_exit",
        missing.to_str().expect("utf-8 temp path"),
    );
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let want = format!(
        "error: cannot read configuration file {}: ",
        missing.display()
    );
    assert!(stderr.contains(&want), "{}", describe(&output));
}

#[test]
fn child_load_or_exit() {
    let Some(path) = child_arg() else { return };
    let _: Minimal = config::load_or_exit(Path::new(&path));
    panic!("load_or_exit returned for a bad config");
}

#[test]
fn init_or_exit_takes_the_flag_then_rust_log() {
    // No flag: $RUST_LOG is the filter, so a bad one is refused with status 64.
    let bad = "isthmus=[";
    let output = run_child_with("child_init_or_exit", "", &[("RUST_LOG", bad)]);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        describe(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("invalid log filter {bad:?}")),
        "{}",
        describe(&output)
    );
    // A flag wins over $RUST_LOG.
    let output = run_child_with("child_init_or_exit", "warn", &[("RUST_LOG", bad)]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("logging initialised"),
        "{}",
        describe(&output)
    );
}

#[test]
fn child_init_or_exit() {
    let Some(flag) = child_arg() else { return };
    let flag = (!flag.is_empty()).then_some(flag);
    isthmus_runtime::telemetry::init_or_exit(isthmus_runtime::telemetry::LogFormat::Text, flag);
    println!("logging initialised");
}

#[test]
fn first_signal_cancels_the_token_without_exiting() {
    for signal in ["TERM", "INT"] {
        let output = run_child("child_first_signal", signal);
        assert!(
            output.status.success(),
            "SIG{signal}: {}",
            describe(&output)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("token cancelled"),
            "SIG{signal}: {}",
            describe(&output)
        );
    }
}

#[test]
fn child_first_signal() {
    let Some(signal) = child_arg() else { return };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let token = CancellationToken::new();
            let _handler = shutdown::spawn_signal_handler(token.clone());
            raise(&signal);
            timeout(LIMIT, token.cancelled())
                .await
                .expect("first signal did not cancel the token");
            println!("token cancelled");
        });
}

#[test]
fn second_signal_exits_at_once_with_130() {
    let output = run_child("child_second_signal", "TERM");
    assert_eq!(
        output.status.code(),
        Some(EXIT_INTERRUPTED),
        "{}",
        describe(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("token cancelled"),
        "the first signal must only cancel: {}",
        describe(&output)
    );
}

#[test]
fn child_second_signal() {
    let Some(_) = child_arg() else { return };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let token = CancellationToken::new();
            let handler = shutdown::spawn_signal_handler(token.clone());
            raise("TERM");
            timeout(LIMIT, token.cancelled())
                .await
                .expect("first signal did not cancel the token");
            println!("token cancelled");
            raise("INT");
            // The handler exits the process; reaching the end of this wait means it did not.
            let _ = timeout(LIMIT, handler).await;
            panic!("second signal did not exit the process");
        });
}

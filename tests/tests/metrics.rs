//! Every component's `/metrics` passes `promtool check metrics` and our own naming rules, and
//! shows its certificate's seconds to expiry and reload failures. Scraped from a running world
//! after traffic, so label sets are populated as an operator would see them.
//!
//! promtool comes from the Debian package `prometheus`. Where it is missing and the test runs
//! as root with apt-get (a fresh CI or developer machine), the test installs it first, so the
//! README's one test command needs nothing else; where it still cannot run, the test fails,
//! saying so, rather than passing unchecked.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use isthmus_tests::world::Transport;
use isthmus_tests::world::client::Recorder;
use isthmus_tests::world::scenario::{self, Pace};

/// Installs Debian's `prometheus` package (for promtool) once, when promtool is missing and
/// this process may: root, with apt-get. The package's server is not started.
fn ensure_promtool() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let found = Command::new("promtool")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if found || !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let install = |update: bool| {
            let mut sh = Command::new("sh");
            let script = if update {
                "apt-get update -q && apt-get install -y -q --no-install-recommends prometheus"
            } else {
                "apt-get install -y -q --no-install-recommends prometheus"
            };
            sh.args(["-c", script])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        eprintln!("promtool missing: installing Debian's prometheus package");
        if !install(false) {
            install(true);
        }
    });
}

/// Runs `promtool check metrics` on `text`; `Err` with what it printed.
fn promtool(text: &str) -> Result<(), String> {
    ensure_promtool();
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed and could not be installed here (needs root and \
             apt-get), so metric names cannot be checked: install it with \
             `apt-get install prometheus` (Debian's package)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Conventions promtool cannot see: a metric about bytes or time says its base unit
/// (`_bytes`, `_seconds`, before `_total` on a counter); every metric is ours.
fn naming(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
        let base = name.strip_suffix("_total").unwrap_or(name);
        if !name.starts_with("isthmus_") {
            problems.push(format!("{name}: not under the isthmus_ prefix"));
        }
        if kind == "counter" && !name.ends_with("_total") {
            problems.push(format!("{name}: a counter must end in _total"));
        }
        let words: Vec<&str> = base.split('_').collect();
        if words.contains(&"bytes") && !base.ends_with("_bytes") {
            problems.push(format!("{name}: bytes must be its unit suffix (..._bytes)"));
        }
        let timely = [
            "duration", "latency", "lag", "age", "expiry", "time", "timeout",
        ];
        if words.iter().any(|w| timely.contains(w)) && !base.ends_with("_seconds") {
            problems.push(format!("{name}: a time must be in seconds (..._seconds)"));
        }
        for bad in [
            "milliseconds",
            "ms",
            "microseconds",
            "minutes",
            "kilobytes",
            "kib",
        ] {
            if words.contains(&bad) {
                problems.push(format!("{name}: {bad} is not a base unit"));
            }
        }
    }
    problems
}

/// The value of the first sample of `name` whose labels contain `component`.
fn sample(text: &str, name: &str, component: &str) -> Option<f64> {
    let needle = format!("component=\"{component}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&needle))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[test]
fn every_component_exposes_conventional_metrics_and_certificate_expiry() {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, _dir) = start(130, Transport::Tcp, false).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        // Traffic both ways, so the per-route and per-peer families have samples.
        let recorder = Recorder::new();
        let load = scenario::start_load(&world, &recorder, &Pace::quick());
        let waited = tokio::time::timeout(LIMIT, async {
            while recorder.counts(0).iter().sum::<usize>() < 20 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        load.stop().await;
        assert!(waited.is_ok(), "no traffic: {:?}", recorder.counts(0));

        let mut names = world.proc_names();
        names.sort();
        let mut failures = Vec::new();
        for name in &names {
            let text = world.metrics(name).await.unwrap();
            if let Err(e) = promtool(&text) {
                failures.push(format!("{name}: promtool check metrics:\n{e}"));
            }
            for problem in naming(&text) {
                failures.push(format!("{name}: {problem}"));
            }
            let component = match name.split_once('/').map(|(_, c)| c) {
                Some("route-sync") => "route-sync",
                Some("dns-shim") => "dns-shim",
                _ => "gateway",
            };
            // Leaves are issued for 24 h when the world starts.
            match sample(&text, "isthmus_certificate_expiry_seconds", component) {
                Some(left) if (80_000.0..=86_400.0).contains(&left) => {}
                other => failures.push(format!(
                    "{name}: isthmus_certificate_expiry_seconds{{component=\"{component}\"}} \
                     is {other:?}, expected about 86400"
                )),
            }
            if sample(
                &text,
                "isthmus_certificate_reload_failures_total",
                component,
            ) != Some(0.0)
            {
                failures.push(format!(
                    "{name}: no isthmus_certificate_reload_failures_total of 0"
                ));
            }
        }
        world.shutdown().await;
        assert!(
            names.iter().any(|n| n.ends_with("/dns-shim"))
                && names.iter().any(|n| n.ends_with("/route-sync"))
                && names.iter().any(|n| n.ends_with("/egress")),
            "the world has no shim, route-sync or egress: {names:?}"
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

#[test]
fn the_naming_rules_catch_what_promtool_does_not() {
    let text = "# TYPE isthmus_gateway_bytes_to_backend_total counter\n\
                # TYPE isthmus_x_propagation_lag gauge\n\
                # TYPE isthmus_x_latency_ms histogram\n\
                # TYPE isthmus_gateway_to_backend_bytes_total counter\n\
                # TYPE isthmus_route_sync_propagation_lag_seconds histogram\n";
    assert_eq!(
        naming(text),
        [
            "isthmus_gateway_bytes_to_backend_total: bytes must be its unit suffix (..._bytes)",
            "isthmus_x_propagation_lag: a time must be in seconds (..._seconds)",
            "isthmus_x_latency_ms: a time must be in seconds (..._seconds)",
            "isthmus_x_latency_ms: ms is not a base unit",
        ]
    );
    // promtool alone lets the first two through.
    let ok = "# HELP isthmus_x_propagation_lag Lag.\n# TYPE isthmus_x_propagation_lag gauge\n\
              isthmus_x_propagation_lag 1\n";
    assert_eq!(promtool(ok), Ok(()));
}

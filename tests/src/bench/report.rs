//! What a run found: per-path results, the targets with verdicts, the printed tables
//! and the JSON document. Pure: no sockets, no clock.
//!
//! The per-path results also deserialize, leniently (a missing figure is `None`), so that the
//! combined report of `tests/bench/all.sh` judges a written run with these same [`targets`].

use serde::{Deserialize, Serialize};

use super::stats::ratio;
use super::table::num;

/// The four ways from the client to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// Client straight to the backend: the floor every other path is compared with.
    Direct,
    /// Isthmus egress to ingress over HTTP/2 CONNECT on TLS 1.3 over TCP.
    IsthmusTcp,
    /// Isthmus egress to ingress over QUIC streams.
    IsthmusQuic,
    /// HAProxy egress to HAProxy ingress, mode tcp, one TLS connection per app connection.
    Haproxy,
}

impl PathKind {
    /// Every path, in table order.
    pub const ALL: [PathKind; 4] = [
        PathKind::Direct,
        PathKind::IsthmusTcp,
        PathKind::IsthmusQuic,
        PathKind::Haproxy,
    ];

    /// The name used in tables, JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::IsthmusTcp => "isthmus-tcp",
            PathKind::IsthmusQuic => "isthmus-quic",
            PathKind::Haproxy => "haproxy",
        }
    }

    /// The path of a name, as [`name`](PathKind::name) spells it.
    pub fn parse(s: &str) -> Option<PathKind> {
        PathKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether the path goes through a pair of gateways (and so has a memory figure).
    pub fn is_tunnel(self) -> bool {
        self != PathKind::Direct
    }
}

/// The new-connection test of one path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnRate {
    /// Completed connections per second.
    pub per_s: f64,
    /// Connections that completed connect, write, echo.
    pub ok: u64,
    /// Connections that failed at any step.
    pub errors: u64,
    /// Wall time of the test.
    pub seconds: f64,
    /// Concurrent client workers.
    pub workers: usize,
    /// The first failure seen, if any.
    pub first_error: Option<String>,
}

/// The ping-pong latency test of one path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median round trip, µs.
    pub p50_us: f64,
    /// 99th percentile round trip, µs.
    pub p99_us: f64,
    /// Slowest round trip, µs.
    pub max_us: f64,
    /// Round trips measured.
    pub samples: usize,
    /// p50 minus the direct path's p50, µs.
    pub added_p50_us: Option<f64>,
    /// p99 minus the direct path's p99, µs.
    pub added_p99_us: Option<f64>,
}

/// Resident memory of the gateway pair around holding idle tunneled connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Connections held open (each carried one byte each way first).
    pub conns: usize,
    /// Egress VmRSS before, KiB.
    pub egress_before_kib: u64,
    /// Ingress VmRSS before, KiB.
    pub ingress_before_kib: u64,
    /// Egress VmRSS with the connections open, KiB.
    pub egress_after_kib: u64,
    /// Ingress VmRSS with the connections open, KiB.
    pub ingress_after_kib: u64,
    /// Growth of egress + ingress RSS per connection, KiB.
    pub kib_per_conn: f64,
}

impl Memory {
    /// Egress + ingress RSS before, KiB.
    pub fn before_kib(&self) -> u64 {
        self.egress_before_kib + self.ingress_before_kib
    }

    /// Egress + ingress RSS with the connections open, KiB.
    pub fn after_kib(&self) -> u64 {
        self.egress_after_kib + self.ingress_after_kib
    }
}

/// Everything measured on one path. A metric that could not be measured is `None` and its
/// reason is in `errors`; a path that could not be set up at all has `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathResult {
    /// Which path.
    pub path: PathKind,
    /// Why the path could not be set up, when it could not.
    pub failed: Option<String>,
    /// One stream, MiB/s.
    pub bulk_1_mib_s: Option<f64>,
    /// Eight parallel streams together, MiB/s.
    pub bulk_8_mib_s: Option<f64>,
    /// Gateway CPU (egress + ingress, user + system) per GiB carried in the bulk tests,
    /// seconds. Robust where wall-clock rates are not: on a shared machine.
    pub cpu_s_per_gib: Option<f64>,
    /// New connections per second.
    pub conn_rate: Option<ConnRate>,
    /// Gateway CPU (egress + ingress) per new connection, µs.
    pub cpu_us_per_conn: Option<f64>,
    /// Ping-pong latency on one connection.
    pub latency: Option<Latency>,
    /// Memory per idle tunneled connection (tunnels only).
    pub memory: Option<Memory>,
    /// Measurements that failed, with why.
    #[serde(default)]
    pub errors: Vec<String>,
    /// What the gateways reported meanwhile: warnings in their logs, failure counters.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl PathResult {
    /// A result with nothing measured yet.
    pub fn new(path: PathKind) -> Self {
        Self {
            path,
            failed: None,
            bulk_1_mib_s: None,
            bulk_8_mib_s: None,
            cpu_s_per_gib: None,
            conn_rate: None,
            cpu_us_per_conn: None,
            latency: None,
            memory: None,
            errors: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// Fills in every path's added latency from the direct path's.
pub fn fill_added_latency(paths: &mut [PathResult]) {
    let direct = paths
        .iter()
        .find(|p| p.path == PathKind::Direct)
        .and_then(|p| p.latency.as_ref())
        .map(|l| (l.p50_us, l.p99_us));
    for p in paths.iter_mut() {
        if let (Some(l), Some((p50, p99))) = (p.latency.as_mut(), direct) {
            l.added_p50_us = Some(l.p50_us - p50);
            l.added_p99_us = Some(l.p99_us - p99);
        }
    }
}

/// The machine the run used.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs available to the process.
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// First line of `haproxy -v`, when HAProxy is there.
    pub haproxy: Option<String>,
    /// File-descriptor hard limit of the run.
    pub nofile_hard: Option<u64>,
    /// Load averages (1, 5, 15 min) when the run started: anything well above zero means
    /// other work shared the CPUs.
    pub loadavg_start: Option<[f64; 3]>,
    /// Load averages when the run ended (the run's own load shows in the 1-minute figure).
    pub loadavg_end: Option<[f64; 3]>,
}

/// The sizes a run used.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// `--quick` was given.
    pub quick: bool,
    /// MiB sent on the one-stream bulk test.
    pub bulk_1_mib: u64,
    /// MiB sent on each of the eight streams of the parallel bulk test.
    pub bulk_8_mib_each: u64,
    /// Length of the new-connection test, seconds.
    pub conn_seconds: u64,
    /// Concurrent workers of the new-connection test.
    pub conn_workers: usize,
    /// Round trips of the latency test (after a warm-up).
    pub latency_iterations: usize,
    /// Bytes per latency message.
    pub latency_message_bytes: usize,
    /// Idle connections held on the Isthmus paths for the memory test.
    pub idle_conns: usize,
    /// Idle connections held on the HAProxy path (lower when the fd limit forces it).
    pub idle_conns_haproxy: usize,
}

/// A target verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// The target is met.
    #[serde(rename = "PASS")]
    Pass,
    /// The target is missed.
    #[serde(rename = "MISS")]
    Miss,
    /// A number it needs was not measured.
    #[serde(rename = "N/A")]
    NotMeasured,
}

impl Verdict {
    /// PASS, MISS or N/A.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::NotMeasured => "N/A",
        }
    }
}

/// One of the targets, judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The goal, as the issue states it.
    pub goal: String,
    /// The unit of [`isthmus`](Target::isthmus) and [`peer`](Target::peer).
    pub unit: String,
    /// The Isthmus figure, when measured.
    pub isthmus: Option<f64>,
    /// The figure it is compared with (HAProxy's, or Isthmus TCP's for QUIC); for the memory
    /// targets, which are absolute, HAProxy's figure for context.
    pub peer: Option<f64>,
    /// The number judged (a ratio, µs or KiB), when measured.
    pub measured: Option<f64>,
    /// The number as printed, with what it was computed from.
    pub shown: String,
    /// PASS, MISS or N/A.
    pub verdict: Verdict,
}

fn judge(measured: Option<f64>, ok: impl Fn(f64) -> bool) -> Verdict {
    match measured {
        Some(v) if ok(v) => Verdict::Pass,
        Some(_) => Verdict::Miss,
        None => Verdict::NotMeasured,
    }
}

fn ratio_target(name: &str, goal: f64, a: Option<f64>, b: Option<f64>, unit: &str) -> Target {
    let r = ratio(a, b);
    let shown = match (r, a, b) {
        (Some(r), Some(a), Some(b)) => format!("{r:.2}x ({} vs {} {unit})", num(a), num(b)),
        _ => "not measured".into(),
    };
    Target {
        name: name.into(),
        goal: format!(">= {goal}x"),
        unit: unit.into(),
        isthmus: a,
        peer: b,
        measured: r,
        shown,
        verdict: judge(r, |r| r >= goal),
    }
}

/// The largest memory per idle tunneled connection the issue allows, KiB.
pub const MEMORY_TARGET_KIB: f64 = 32.0;

/// Judges the targets on these results.
pub fn targets(paths: &[PathResult]) -> Vec<Target> {
    let get = |k: PathKind| paths.iter().find(|p| p.path == k && p.failed.is_none());
    let tcp = get(PathKind::IsthmusTcp);
    let quic = get(PathKind::IsthmusQuic);
    let hap = get(PathKind::Haproxy);
    let bulk1 = |p: Option<&PathResult>| p.and_then(|p| p.bulk_1_mib_s);
    let bulk8 = |p: Option<&PathResult>| p.and_then(|p| p.bulk_8_mib_s);
    let conns = |p: Option<&PathResult>| p.and_then(|p| p.conn_rate.as_ref()).map(|c| c.per_s);
    let added99 = |p: Option<&PathResult>| {
        p.and_then(|p| p.latency.as_ref())
            .and_then(|l| l.added_p99_us)
    };

    let mut out = vec![
        ratio_target(
            "bulk 1 stream: isthmus-tcp / haproxy",
            1.2,
            bulk1(tcp),
            bulk1(hap),
            "MiB/s",
        ),
        ratio_target(
            "bulk 8 streams: isthmus-tcp / haproxy",
            1.2,
            bulk8(tcp),
            bulk8(hap),
            "MiB/s",
        ),
        ratio_target(
            "new conn/s: isthmus-tcp / haproxy",
            8.0,
            conns(tcp),
            conns(hap),
            "conn/s",
        ),
    ];

    let (t, h) = (added99(tcp), added99(hap));
    let measured = t.zip(h).map(|(t, _)| t);
    out.push(Target {
        name: "added p99 latency: isthmus-tcp vs haproxy".into(),
        goal: "<= haproxy's".into(),
        unit: "µs".into(),
        isthmus: t,
        peer: h,
        measured,
        shown: match (t, h) {
            (Some(t), Some(h)) => format!("{} vs {} µs", num(t), num(h)),
            _ => "not measured".into(),
        },
        verdict: match (t, h) {
            (Some(t), Some(h)) if t <= h => Verdict::Pass,
            (Some(_), Some(_)) => Verdict::Miss,
            _ => Verdict::NotMeasured,
        },
    });

    out.push(ratio_target(
        "bulk 1 stream: isthmus-quic / isthmus-tcp",
        0.6,
        bulk1(quic),
        bulk1(tcp),
        "MiB/s",
    ));
    out.push(ratio_target(
        "bulk 8 streams: isthmus-quic / isthmus-tcp",
        0.6,
        bulk8(quic),
        bulk8(tcp),
        "MiB/s",
    ));

    let kib = |p: Option<&PathResult>| p.and_then(|p| p.memory.as_ref()).map(|m| m.kib_per_conn);
    for (kind, p) in [(PathKind::IsthmusTcp, tcp), (PathKind::IsthmusQuic, quic)] {
        let mem = p.and_then(|p| p.memory.as_ref());
        let measured = mem.map(|m| m.kib_per_conn);
        out.push(Target {
            name: format!("memory per idle conn: {}", kind.name()),
            goal: format!("<= {MEMORY_TARGET_KIB} KiB"),
            unit: "KiB".into(),
            isthmus: measured,
            peer: kib(hap),
            measured,
            shown: mem.map_or_else(
                || "not measured".into(),
                |m| {
                    format!(
                        "{} KiB (egress+ingress, {} conns)",
                        num(m.kib_per_conn),
                        m.conns
                    )
                },
            ),
            verdict: judge(measured, |v| v <= MEMORY_TARGET_KIB),
        });
    }
    out
}

/// A whole run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The sizes used.
    pub params: Params,
    /// Per-path results, in table order.
    pub paths: Vec<PathResult>,
    /// The targets.
    pub targets: Vec<Target>,
    /// Where configurations and gateway logs of the run were kept.
    pub workdir: String,
}

/// Results to judge and render in unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn path(kind: PathKind, bulk: f64, conns: f64, p99: f64, kib: f64) -> PathResult {
        let mut p = PathResult::new(kind);
        p.bulk_1_mib_s = Some(bulk);
        p.bulk_8_mib_s = Some(bulk * 2.0);
        p.conn_rate = Some(ConnRate {
            per_s: conns,
            ok: 1,
            errors: 0,
            seconds: 1.0,
            workers: 32,
            first_error: None,
        });
        p.latency = Some(Latency {
            p50_us: p99 / 2.0,
            p99_us: p99,
            max_us: p99,
            samples: 10,
            added_p50_us: None,
            added_p99_us: None,
        });
        if kind.is_tunnel() {
            p.memory = Some(Memory {
                conns: 100,
                egress_before_kib: 1000,
                ingress_before_kib: 1000,
                egress_after_kib: 1000 + (kib * 50.0) as u64,
                ingress_after_kib: 1000 + (kib * 50.0) as u64,
                kib_per_conn: kib,
            });
        }
        p
    }

    pub fn params() -> Params {
        Params {
            quick: true,
            bulk_1_mib: 64,
            bulk_8_mib_each: 16,
            conn_seconds: 2,
            conn_workers: 32,
            latency_iterations: 10,
            latency_message_bytes: 64,
            idle_conns: 100,
            idle_conns_haproxy: 100,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fixtures::path;

    fn verdicts(t: &[Target]) -> Vec<Verdict> {
        t.iter().map(|t| t.verdict).collect()
    }

    #[test]
    fn added_latency_is_relative_to_direct() {
        let mut paths = vec![
            path(PathKind::Direct, 1000.0, 10_000.0, 20.0, 0.0),
            path(PathKind::IsthmusTcp, 500.0, 5_000.0, 50.0, 10.0),
        ];
        fill_added_latency(&mut paths);
        let l = paths[1].latency.as_ref().unwrap();
        assert_eq!(l.added_p99_us, Some(30.0));
        assert_eq!(l.added_p50_us, Some(15.0));
        assert_eq!(paths[0].latency.as_ref().unwrap().added_p99_us, Some(0.0));
    }

    #[test]
    fn targets_pass_and_miss() {
        let mut paths = vec![
            path(PathKind::Direct, 3000.0, 20_000.0, 20.0, 0.0),
            path(PathKind::IsthmusTcp, 600.0, 16_000.0, 60.0, 20.0),
            path(PathKind::IsthmusQuic, 300.0, 12_000.0, 80.0, 40.0),
            path(PathKind::Haproxy, 400.0, 1_000.0, 70.0, 80.0),
        ];
        fill_added_latency(&mut paths);
        let t = targets(&paths);
        assert_eq!(
            verdicts(&t),
            vec![
                Verdict::Pass, // 600 / 400 = 1.5 >= 1.2
                Verdict::Pass,
                Verdict::Pass, // 16x >= 8x
                Verdict::Pass, // 40 µs <= 50 µs added
                Verdict::Miss, // 300 / 600 = 0.5 < 0.6
                Verdict::Miss,
                Verdict::Pass, // 20 KiB <= 32
                Verdict::Miss, // 40 KiB > 32
            ]
        );
        assert_eq!(t[0].measured, Some(1.5));
        assert_eq!((t[0].isthmus, t[0].peer), (Some(600.0), Some(400.0)));
        assert_eq!(t[0].unit, "MiB/s");
        // QUIC is compared with TCP; memory shows HAProxy's figure beside the absolute goal.
        assert_eq!((t[4].isthmus, t[4].peer), (Some(300.0), Some(600.0)));
        assert_eq!((t[7].isthmus, t[7].peer), (Some(40.0), Some(80.0)));
        assert!(
            t[0].shown.starts_with("1.50x (600 vs 400"),
            "{}",
            t[0].shown
        );
    }

    #[test]
    fn path_results_read_back_what_they_write() {
        let p = path(PathKind::IsthmusQuic, 300.0, 12_000.0, 80.0, 40.0);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(serde_json::from_value::<PathResult>(v).unwrap(), p);
        // Missing figures and lists are read as not measured, unknown keys are ignored.
        let v = serde_json::json!({"path": "haproxy", "bulk_1_mib_s": 5.0, "new_figure": 1});
        let p = serde_json::from_value::<PathResult>(v).unwrap();
        assert_eq!(p.bulk_1_mib_s, Some(5.0));
        assert_eq!(p.conn_rate, None);
        assert!(p.errors.is_empty());
    }

    #[test]
    fn path_names_round_trip() {
        for k in PathKind::ALL {
            assert_eq!(PathKind::parse(k.name()), Some(k));
        }
        assert_eq!(PathKind::parse("nginx"), None);
    }

    #[test]
    fn a_failed_path_makes_its_targets_not_measured() {
        let mut hap = PathResult::new(PathKind::Haproxy);
        hap.failed = Some("haproxy is not installed".into());
        let paths = vec![
            path(PathKind::IsthmusTcp, 600.0, 16_000.0, 60.0, 20.0),
            path(PathKind::IsthmusQuic, 400.0, 12_000.0, 80.0, 40.0),
            hap,
        ];
        let t = targets(&paths);
        assert_eq!(t[0].verdict, Verdict::NotMeasured);
        assert_eq!(t[2].verdict, Verdict::NotMeasured);
        // No direct path: no added latency either.
        assert_eq!(t[3].verdict, Verdict::NotMeasured);
        assert_eq!(t[4].verdict, Verdict::Pass);
    }
}

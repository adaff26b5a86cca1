//! The combined report behind `isthmus-bench-report`, which `tests/bench/all.sh` runs after
//! the gateway, DNS shim and route-sync benchmarks: their JSON documents judged against the
//! issues' targets and printed as one table, a group of rows per component.
//!
//! The documents are read leniently. A missing key is a missing figure, printed as `-` and
//! judged "n/a"; unknown keys are ignored, so a benchmark that gains fields does not break the
//! report; and the hand-written JSON of the shell and example benchmarks, which can carry
//! `NaN` or an empty value when a measurement failed, is repaired to `null` rather than
//! refused ([`parse_lenient`]).
//!
//! The gateway's targets are [`report::targets`], judged again from the run's per-path
//! results, so the two reports cannot disagree. The DNS shim's and route-sync's are the
//! constants below, as their benchmarks state them. Pure: JSON values in, rows and text out.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::report::{self, PathResult, Verdict};
use super::stats::ratio;
use super::table::{num, render};

/// A benchmarked component, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    /// The gateway pair, against a HAProxy mTLS pair (`tests/bench/gateway.sh`).
    Gateway,
    /// The DNS shim, against unbound (`dns-shim/bench/dns.sh`).
    Dns,
    /// The route-sync control plane, on its own (`route-sync/examples/bench.rs`).
    RouteSync,
}

impl Component {
    /// Every component, in table order.
    pub const ALL: [Component; 3] = [Component::Gateway, Component::Dns, Component::RouteSync];

    /// The name used in the table, in JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Dns => "dns",
            Component::RouteSync => "route-sync",
        }
    }

    /// The component of a name, as [`name`](Component::name) spells it.
    pub fn parse(s: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == s)
    }

    /// What the peer column holds for this component's rows.
    pub fn peer(self) -> &'static str {
        match self {
            Component::Gateway => "haproxy",
            Component::Dns => "unbound",
            Component::RouteSync => "none",
        }
    }
}

/// The DNS shim's local answers must be at least this fraction of unbound's QPS.
pub const DNS_LOCAL_RATIO: f64 = 1.0;
/// The DNS shim's forwarded answers must be at least this fraction of unbound's QPS.
pub const DNS_FORWARDED_RATIO: f64 = 0.5;
/// The DNS shim's resident memory with 50,000 routes loaded, at most: 100 MB, in MiB.
pub const DNS_RSS_MIB: f64 = 100e6 / MIB_BYTES;
/// route-sync's initial sync of all routes to the other cluster, at most, seconds.
pub const SYNC_INITIAL_S: f64 = 5.0;
/// route-sync's single-change propagation p99, at most, milliseconds.
pub const SYNC_CHANGE_P99_MS: f64 = 200.0;
/// The change rate route-sync must sustain, per second.
pub const SYNC_RATE_PER_S: f64 = 1000.0;
/// The sustained rate passes within this fraction of [`SYNC_RATE_PER_S`], as the route-sync
/// benchmark judges it: its rate is changes over the wall time of a paced 10 s run, so any
/// scheduling delay reads as a slightly lower rate.
pub const SYNC_RATE_SLACK: f64 = 0.01;
/// Lag does not grow: the last 2 s p99 is at most this many times the larger of the first
/// 2 s p99 and [`SYNC_LAG_FLOOR_MS`], as the route-sync benchmark judges it.
pub const SYNC_LAG_GROWTH: f64 = 2.0;
/// The floor under the first 2 s lag p99, milliseconds: a few milliseconds doubling is noise.
pub const SYNC_LAG_FLOOR_MS: f64 = 50.0;
/// Resident memory of one route-sync process, at most: 300 MB, in MiB.
pub const SYNC_RSS_MIB: f64 = 300e6 / MIB_BYTES;
/// The route count route-sync's targets are stated for.
pub const SYNC_FULL_ROUTES: f64 = 250_000.0;

const MIB_BYTES: f64 = 1024.0 * 1024.0;

/// How one row came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The target is met.
    Met,
    /// The target is missed.
    Missed,
    /// A figure the target needs is missing from the document.
    NotMeasured,
    /// A figure the target needs is missing because the benchmark failed.
    Failed,
    /// The row has no target: a figure shown for context.
    Info,
}

impl Outcome {
    /// The label in the result column.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Met => "met",
            Outcome::Missed => "missed",
            Outcome::NotMeasured => "n/a",
            Outcome::Failed => "failed",
            Outcome::Info => "-",
        }
    }
}

impl From<Verdict> for Outcome {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Pass => Outcome::Met,
            Verdict::Miss => Outcome::Missed,
            Verdict::NotMeasured => Outcome::NotMeasured,
        }
    }
}

/// One metric of one component.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// What is measured, with its unit.
    pub metric: String,
    /// The Isthmus figure, when measured.
    pub isthmus: Option<f64>,
    /// The peer's figure (HAProxy's, unbound's, or as the metric names it), when there is one.
    pub peer: Option<f64>,
    /// `isthmus / peer`, when both are there.
    pub ratio: Option<f64>,
    /// The goal, when the row has one.
    pub target: Option<String>,
    /// Met, missed, not measured, failed, or info for a row without a target.
    pub outcome: Outcome,
    /// Whole counts print without decimals.
    #[serde(skip)]
    count: bool,
}

impl Row {
    /// A row without a target.
    fn info(metric: impl Into<String>, isthmus: Option<f64>, peer: Option<f64>) -> Self {
        Row {
            metric: metric.into(),
            isthmus,
            peer,
            ratio: ratio(isthmus, peer),
            target: None,
            outcome: Outcome::Info,
            count: false,
        }
    }

    /// A row judged on `judged` (the Isthmus figure or the ratio): met when `ok` holds.
    fn judged(
        metric: impl Into<String>,
        (isthmus, peer): (Option<f64>, Option<f64>),
        target: impl Into<String>,
        judged: Option<f64>,
        ok: impl Fn(f64) -> bool,
    ) -> Self {
        Row {
            target: Some(target.into()),
            outcome: match judged {
                Some(v) if ok(v) => Outcome::Met,
                Some(_) => Outcome::Missed,
                None => Outcome::NotMeasured,
            },
            ..Row::info(metric, isthmus, peer)
        }
    }

    fn counted(mut self) -> Self {
        self.count = true;
        self.ratio = None;
        self
    }

    fn cell(&self, v: Option<f64>) -> String {
        match v {
            Some(v) if self.count => format!("{v:.0}"),
            Some(v) => num(v),
            None => "-".into(),
        }
    }
}

/// What one benchmark left behind, as the report reads it.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// Where its JSON document was expected.
    pub path: Option<String>,
    /// The document, when it could be read.
    pub doc: Option<Value>,
    /// Why the benchmark failed, when it did: its exit status and log, or why its document
    /// could not be read.
    pub failed: Option<String>,
    /// Remarks on reading the document (a repair, say).
    pub notes: Vec<String>,
}

impl Source {
    /// A source read from `text`, the contents of the file at `path`, or `Err` with why the
    /// file could not be read.
    pub fn from_file(path: &str, text: Result<String, String>) -> Self {
        let mut src = Source {
            path: Some(path.into()),
            ..Source::default()
        };
        match text {
            Err(why) => src.failed = Some(format!("no JSON at {path}: {why}")),
            Ok(text) => match parse_lenient(&text) {
                Ok((doc, repaired)) => {
                    if repaired {
                        src.notes.push(format!(
                            "{path} is not strict JSON (NaN, inf or empty values): read as \
                             missing figures"
                        ));
                    }
                    src.doc = Some(doc);
                }
                Err(e) => src.failed = Some(format!("{path} is not JSON: {e}")),
            },
        }
        src
    }

    /// Adds a failure reason (from the script that ran the benchmark) to any already there.
    pub fn fail(&mut self, why: &str) {
        self.failed = Some(match self.failed.take() {
            Some(old) => format!("{why}; {old}"),
            None => why.to_string(),
        });
    }
}

/// Parses JSON, first strictly and then, when that fails, after turning bare `NaN`, `inf`,
/// `-inf` and `n/a` values and empty values (`"qps": ,`) into `null`: what the benchmarks'
/// hand-formatted JSON holds when a measurement failed. Returns the value and whether it
/// needed that repair.
///
/// # Errors
/// When the text is not JSON even after the repair; the error is the strict parser's.
pub fn parse_lenient(text: &str) -> Result<(Value, bool), serde_json::Error> {
    match serde_json::from_str(text) {
        Ok(v) => Ok((v, false)),
        Err(strict) => serde_json::from_str(&repair(text))
            .map(|v| (v, true))
            .map_err(|_| strict),
    }
}

/// Replaces the bad values [`parse_lenient`] accepts with `null`, outside strings only.
fn repair(text: &str) -> String {
    const BAD: [&str; 8] = [
        "-Infinity",
        "Infinity",
        "-inf",
        "inf",
        "NaN",
        "-nan",
        "nan",
        "n/a",
    ];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                let escaped: String = rest.chars().take(2).collect();
                out.push_str(&escaped);
                rest = &rest[escaped.len()..];
                continue;
            }
            in_string = c != '"';
        } else if c == '"' {
            in_string = true;
        } else if c == ':' || c == '[' || c == ',' {
            out.push(c);
            rest = &rest[1..];
            let value = rest.trim_start();
            out.push_str(&rest[..rest.len() - value.len()]);
            rest = value;
            if let Some(bad) = BAD.iter().find(|b| value.starts_with(*b)) {
                out.push_str("null");
                rest = &value[bad.len()..];
            } else if c == ':' && (value.starts_with(',') || value.starts_with('}')) {
                out.push_str("null");
            }
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// One component's part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    /// Which component.
    pub component: Component,
    /// Where its JSON document was expected.
    pub source: Option<String>,
    /// What ran: the sizes, from the document.
    pub about: String,
    /// Why the benchmark failed, when it did.
    pub failed: Option<String>,
    /// Remarks printed under the table: failed paths, how a figure was chosen.
    pub notes: Vec<String>,
    /// The rows, in table order.
    pub rows: Vec<Row>,
    /// The benchmark's own document, as read.
    pub document: Option<Value>,
}

impl Section {
    /// `about` describes the run from its document; without one, the section says so.
    fn new(component: Component, src: &Source, about: String, rows: Vec<Row>) -> Self {
        let about = match (&src.doc, &src.path) {
            (Some(_), _) => about,
            (None, Some(_)) => "no results".into(),
            (None, None) => "not run".into(),
        };
        let mut rows = rows;
        if src.failed.is_some() {
            for r in &mut rows {
                if r.outcome == Outcome::NotMeasured {
                    r.outcome = Outcome::Failed;
                }
            }
        }
        Section {
            component,
            source: src.path.clone(),
            about,
            failed: src.failed.clone(),
            notes: src.notes.clone(),
            rows,
            document: src.doc.clone(),
        }
    }
}

/// A number at `path` in `doc`: a JSON number, or a string holding one. `None` when missing,
/// null or not finite.
fn number(doc: Option<&Value>, path: &[&str]) -> Option<f64> {
    let mut v = doc?;
    for key in path {
        v = v.get(key)?;
    }
    as_number(v)
}

fn as_number(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str()?.trim().parse().ok())
        .filter(|x: &f64| x.is_finite())
}

fn count_or(v: Option<f64>, fallback: &str) -> String {
    v.map_or_else(|| fallback.into(), |v| format!("{v:.0}"))
}

/// The gateway's rows: its issue's targets, judged again from the per-path results.
pub fn gateway(src: &Source) -> Section {
    let doc = src.doc.as_ref();
    let mut notes = Vec::new();
    let paths: Vec<PathResult> = match doc.and_then(|d| d.get("paths")) {
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|v| match serde_json::from_value::<PathResult>(v.clone()) {
                Ok(p) => Some(p),
                Err(e) => {
                    notes.push(format!("a path could not be read ({e}): its figures are -"));
                    None
                }
            })
            .collect(),
        _ => {
            if doc.is_some() {
                notes.push("no \"paths\" list in the document: every figure is -".into());
            }
            Vec::new()
        }
    };
    for p in &paths {
        let name = p.path.name();
        if let Some(why) = &p.failed {
            notes.push(format!("{name} failed: {why}"));
        }
        notes.extend(p.errors.iter().map(|e| format!("{name}: {e}")));
    }
    let rows = report::targets(&paths)
        .into_iter()
        .map(|t| Row {
            metric: format!("{} ({})", t.name, t.unit),
            isthmus: t.isthmus,
            peer: t.peer,
            ratio: ratio(t.isthmus, t.peer),
            target: Some(t.goal),
            outcome: t.verdict.into(),
            count: false,
        })
        .collect();
    let param = |k: &str| number(doc, &["params", k]);
    let quick = doc
        .and_then(|d| d.pointer("/params/quick"))
        .and_then(Value::as_bool);
    let about = format!(
        "{} sizes: bulk 1 x {} MiB and 8 x {} MiB, new conns {} s, {} idle conns",
        match quick {
            Some(true) => "quick",
            Some(false) => "full",
            None => "unknown",
        },
        count_or(param("bulk_1_mib"), "?"),
        count_or(param("bulk_8_mib_each"), "?"),
        count_or(param("conn_seconds"), "?"),
        count_or(param("idle_conns"), "?"),
    );
    let mut section = Section::new(Component::Gateway, src, about, rows);
    section.notes.extend(notes);
    section
}

/// The DNS shim's rows: QPS against unbound for local and forwarded answers, loss, latency,
/// and the shim's memory.
pub fn dns(src: &Source) -> Section {
    let doc = src.doc.as_ref();
    let get = |kind: &str, server: &str, k: &str| number(doc, &[kind, server, k]);
    let pair = |kind: &str, k: &str| (get(kind, "shim", k), get(kind, "unbound", k));
    // The document's own ratio is rounded to two places: compute it from the QPS when there.
    let qps_ratio = |kind: &str| {
        let (s, u) = pair(kind, "qps");
        ratio(s, u).or_else(|| number(doc, &[kind, "ratio"]))
    };
    let rows = vec![
        Row::judged(
            "local answers (QPS)",
            pair("local", "qps"),
            format!(">= {DNS_LOCAL_RATIO:.1}x"),
            qps_ratio("local"),
            |r| r >= DNS_LOCAL_RATIO,
        ),
        Row::judged(
            "local answers: queries lost",
            pair("local", "lost"),
            "0",
            get("local", "shim", "lost"),
            |lost| lost == 0.0,
        )
        .counted(),
        Row::info(
            "local answers: p99 (ms)",
            pair("local", "p99_ms").0,
            pair("local", "p99_ms").1,
        ),
        Row::judged(
            "forwarded answers (QPS)",
            pair("forwarded", "qps"),
            format!(">= {DNS_FORWARDED_RATIO:.1}x"),
            qps_ratio("forwarded"),
            |r| r >= DNS_FORWARDED_RATIO,
        ),
        Row::info(
            "forwarded answers: p99 (ms)",
            pair("forwarded", "p99_ms").0,
            pair("forwarded", "p99_ms").1,
        ),
        Row::judged(
            "shim RSS after the runs (MiB)",
            (number(doc, &["shim_rss_mb"]), None),
            format!("<= 100 MB ({DNS_RSS_MIB:.1} MiB)"),
            number(doc, &["shim_rss_mb"]),
            |v| v <= DNS_RSS_MIB,
        ),
        Row::info(
            "shim peak RSS, VmHWM (MiB)",
            number(doc, &["shim_peak_rss_mb"]),
            None,
        ),
    ];
    let about = format!(
        "{} routes ({} migrated, answered locally), dnsperf {} s per run",
        count_or(number(doc, &["routes"]), "?"),
        count_or(number(doc, &["migrated"]), "?"),
        count_or(number(doc, &["duration_s"]), "?"),
    );
    Section::new(Component::Dns, src, about, rows)
}

/// One route-sync process's memory, from the route-sync document's `processes`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessMemory {
    /// The process's name in the document (`diego`, `k8s`).
    pub name: String,
    /// The largest VmRSS reported for it (after the initial sync, at the end), MiB.
    pub rss_mib: Option<f64>,
    /// The largest VmHWM (peak) reported for it, MiB.
    pub hwm_mib: Option<f64>,
}

/// Entries of `processes` that are not route-sync nodes: the benchmark process itself.
const NOT_ROUTE_SYNC: [&str; 5] = ["bench", "self", "consumer", "driver", "gateway"];

/// The route-sync processes' memory, when the document has per-process figures: `processes`
/// as an object of name to figures, or a list of objects with a `name`. In each, the largest
/// `rss*` figure is the RSS and the largest `hwm*` or `peak*` the peak; `_kib` keys count KiB,
/// the others MiB. The benchmark process (`bench`) is left out: it holds the consumer.
pub fn route_sync_processes(doc: Option<&Value>) -> Vec<ProcessMemory> {
    let entries: Vec<(String, &Value)> = match doc.and_then(|d| d.get("processes")) {
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let name = v.get("name").and_then(Value::as_str);
                (name.map_or_else(|| format!("#{i}"), str::to_owned), v)
            })
            .collect(),
        _ => Vec::new(),
    };
    entries
        .into_iter()
        .filter(|(name, _)| !NOT_ROUTE_SYNC.contains(&name.to_ascii_lowercase().as_str()))
        .filter_map(|(name, v)| {
            let figures = v.as_object()?;
            let largest = |prefixes: &[&str]| {
                figures
                    .iter()
                    .filter(|(k, _)| {
                        let k = k.to_ascii_lowercase();
                        prefixes.iter().any(|p| k.starts_with(p)) && !k.contains("idle")
                    })
                    .filter_map(|(k, v)| {
                        let scale = if k.to_ascii_lowercase().contains("kib") {
                            1.0 / 1024.0
                        } else {
                            1.0
                        };
                        as_number(v).map(|x| x * scale)
                    })
                    .reduce(f64::max)
            };
            let memory = ProcessMemory {
                name,
                rss_mib: largest(&["rss", "vmrss"]),
                hwm_mib: largest(&["hwm", "vmhwm", "peak"]),
            };
            (memory.rss_mib.is_some() || memory.hwm_mib.is_some()).then_some(memory)
        })
        .collect()
}

/// route-sync's rows: initial sync, one change, sustained changes, and memory per process.
pub fn route_sync(src: &Source) -> Section {
    let doc = src.doc.as_ref();
    let get = |k: &str| number(doc, &[k]);
    let routes = get("routes");
    let (early, late) = (get("lag_p99_first_ms"), get("lag_p99_last_ms"));
    let mut notes = Vec::new();
    let mut rows = vec![
        Row::judged(
            "initial sync, source -> peer route-sync (s)",
            (get("peer_sync_s"), None),
            format!("<= {SYNC_INITIAL_S} s"),
            get("peer_sync_s"),
            |s| s <= SYNC_INITIAL_S,
        ),
        Row::judged(
            "initial sync, source -> remote consumer (s)",
            (get("initial_sync_s"), None),
            format!("<= {SYNC_INITIAL_S} s"),
            get("initial_sync_s"),
            |s| s <= SYNC_INITIAL_S,
        ),
        Row::info("one change: p50 (ms)", get("change_p50_ms"), None),
        Row::judged(
            "one change: p99 (ms)",
            (get("change_p99_ms"), None),
            format!("<= {SYNC_CHANGE_P99_MS} ms"),
            get("change_p99_ms"),
            |ms| ms <= SYNC_CHANGE_P99_MS,
        ),
        Row::judged(
            "sustained changes/s",
            (get("sustained_changes_per_s"), None),
            format!(">= {SYNC_RATE_PER_S} (1% slack)"),
            get("sustained_changes_per_s"),
            |r| r >= SYNC_RATE_PER_S * (1.0 - SYNC_RATE_SLACK),
        ),
        Row::info("lag p99 at 1,000/s: first 2 s (ms)", early, None),
        Row::judged(
            "lag p99 at 1,000/s: last 2 s (ms)",
            (late, None),
            format!("<= {SYNC_LAG_GROWTH}x max(first, {SYNC_LAG_FLOOR_MS} ms)"),
            early.and(late),
            |late| late <= early.unwrap_or(0.0).max(SYNC_LAG_FLOOR_MS) * SYNC_LAG_GROWTH,
        ),
    ];
    let rss_target = format!("<= 300 MB ({SYNC_RSS_MIB:.0} MiB)");
    let processes = route_sync_processes(doc);
    if processes.is_empty() {
        let whole = get("rss_mib");
        rows.push(Row::judged(
            "RSS, whole benchmark process (MiB)",
            (whole, None),
            rss_target,
            whole,
            |v| v <= SYNC_RSS_MIB,
        ));
        if whole.is_some() {
            notes.push(
                "no per-process RSS in the document: judged on the benchmark's rss_mib, which \
                 holds both route-sync nodes and the consumer (an upper bound per process)"
                    .into(),
            );
        }
    } else {
        for p in &processes {
            rows.push(Row::judged(
                format!("RSS, {} route-sync process (MiB)", p.name),
                (p.rss_mib, None),
                rss_target.clone(),
                p.rss_mib,
                |v| v <= SYNC_RSS_MIB,
            ));
            rows.push(Row::info(
                format!("peak RSS, {} route-sync process (MiB)", p.name),
                p.hwm_mib,
                None,
            ));
        }
    }
    if let Some(n) = routes.filter(|n| *n < SYNC_FULL_ROUTES) {
        notes.push(format!(
            "ran with {n:.0} routes; the targets are stated for {SYNC_FULL_ROUTES:.0} (the full \
             run)"
        ));
    }
    let about = format!(
        "{} routes, two route-sync nodes and a consumer over mTLS gRPC on loopback",
        count_or(routes, "?")
    );
    let mut section = Section::new(Component::RouteSync, src, about, rows);
    section.notes.extend(notes);
    section
}

/// Targets met, missed and not judged over all sections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Targets met.
    pub met: usize,
    /// Targets missed.
    pub missed: usize,
    /// Targets that could not be judged: a figure missing, or its benchmark failed.
    pub not_judged: usize,
    /// Components whose benchmark failed.
    pub failed: Vec<Component>,
}

/// Counts the sections' outcomes.
pub fn totals(sections: &[Section]) -> Totals {
    let mut t = Totals::default();
    for s in sections {
        if s.failed.is_some() {
            t.failed.push(s.component);
        }
        for r in &s.rows {
            match r.outcome {
                Outcome::Met => t.met += 1,
                Outcome::Missed => t.missed += 1,
                Outcome::NotMeasured | Outcome::Failed => t.not_judged += 1,
                Outcome::Info => {}
            }
        }
    }
    t
}

/// The whole combined report, as `--json` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct Combined {
    /// One section per component, in table order.
    pub sections: Vec<Section>,
    /// Outcomes over all sections.
    pub totals: Totals,
}

impl Combined {
    /// The report of these sections.
    pub fn new(sections: Vec<Section>) -> Self {
        let totals = totals(&sections);
        Combined { sections, totals }
    }
}

/// The one table: a heading row per component, its rows indented under it; then what each
/// benchmark ran, failures and notes, and the totals.
pub fn table(report: &Combined) -> String {
    let header = ["metric", "isthmus", "peer", "ratio", "target", "result"];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in &report.sections {
        let mut heading = format!("{} (peer: {})", s.component.name(), s.component.peer());
        if s.failed.is_some() {
            heading.push_str(" FAILED");
        }
        rows.push(vec![heading]);
        for r in &s.rows {
            rows.push(vec![
                format!("  {}", r.metric),
                r.cell(r.isthmus),
                r.cell(r.peer),
                r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.2}x")),
                r.target.clone().unwrap_or_else(|| "-".into()),
                r.outcome.label().into(),
            ]);
        }
    }
    let mut out = render(&header, &rows);
    out.push_str(
        "ratio: isthmus / peer; higher is better for rates, lower for time, latency and \
         memory. The QUIC rows compare with isthmus-tcp, not haproxy.\n\n",
    );
    for s in &report.sections {
        let name = s.component.name();
        let _ = writeln!(out, "{name}: {}", s.about);
        if let Some(why) = &s.failed {
            let _ = writeln!(out, "{name} FAILED: {why}");
        }
        for n in &s.notes {
            let _ = writeln!(out, "{name} (note): {n}");
        }
    }
    let t = &report.totals;
    let _ = write!(
        out,
        "\ntargets: {} met, {} missed, {} not judged",
        t.met, t.missed, t.not_judged
    );
    if t.failed.is_empty() {
        out.push('\n');
    } else {
        let names: Vec<&str> = t.failed.iter().map(|c| c.name()).collect();
        let _ = writeln!(out, "; failed: {}", names.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(doc: Value) -> Source {
        Source {
            path: Some("x.json".into()),
            doc: Some(doc),
            ..Source::default()
        }
    }

    fn row<'a>(s: &'a Section, prefix: &str) -> &'a Row {
        s.rows
            .iter()
            .find(|r| r.metric.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?} in {:?}", s.rows))
    }

    /// The printed cells of the line whose metric starts with `prefix`, split on the
    /// two-space column gaps.
    fn printed(table: &str, prefix: &str) -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{table}"));
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn gateway_path(name: &str, bulk: f64, conns: f64, added_p99: f64, kib: f64) -> Value {
        json!({
            "path": name,
            "failed": null,
            "bulk_1_mib_s": bulk,
            "bulk_8_mib_s": bulk,
            "conn_rate": {"per_s": conns, "ok": 10, "errors": 0, "seconds": 2.0, "workers": 32,
                          "first_error": null},
            "latency": {"p50_us": 10.0, "p99_us": added_p99 + 20.0, "max_us": 900.0,
                        "samples": 100, "added_p50_us": 1.0, "added_p99_us": added_p99},
            "memory": {"conns": 100, "egress_before_kib": 1, "ingress_before_kib": 1,
                       "egress_after_kib": 2, "ingress_after_kib": 2, "kib_per_conn": kib},
            "some_future_field": [1, 2, 3],
        })
    }

    fn gateway_doc() -> Value {
        json!({
            "params": {"quick": true, "bulk_1_mib": 64, "bulk_8_mib_each": 16,
                       "conn_seconds": 2, "idle_conns": 2000},
            "paths": [
                gateway_path("isthmus-tcp", 505.0, 5096.0, 177.0, 10.3),
                gateway_path("isthmus-quic", 312.0, 5810.0, 223.0, 11.5),
                gateway_path("haproxy", 544.0, 506.0, 531.0, 60.6),
            ],
        })
    }

    fn dns_doc() -> Value {
        json!({
            "routes": 50000, "migrated": 45000, "duration_s": 5,
            "local": {
                "shim": {"qps": 62301.7, "avg_ms": 2.4, "p99_ms": 7.7, "lost": 0, "sent": 311714},
                "unbound": {"qps": 104451.5, "avg_ms": 1.3, "p99_ms": 6.4, "lost": 8,
                            "sent": 522929},
                "ratio": 0.60
            },
            "forwarded": {
                "shim": {"qps": 20029.6, "p99_ms": 22.4, "lost": 0},
                "unbound": {"qps": 20108.9, "p99_ms": 41.9, "lost": 0},
                "ratio": 1.00
            },
            "shim_rss_mb": 88, "shim_peak_rss_mb": 214
        })
    }

    #[test]
    fn gateway_rows_are_the_gateway_targets_with_both_figures() {
        let s = gateway(&source(gateway_doc()));
        let r = row(&s, "bulk 1 stream: isthmus-tcp / haproxy");
        assert_eq!((r.isthmus, r.peer), (Some(505.0), Some(544.0)));
        assert_eq!(r.outcome, Outcome::Missed, "505 / 544 < 1.2");
        let r = row(&s, "new conn/s");
        assert_eq!(r.outcome, Outcome::Met, "5096 / 506 >= 8");
        assert_eq!(r.target.as_deref(), Some(">= 8x"));
        let r = row(&s, "bulk 1 stream: isthmus-quic / isthmus-tcp");
        assert_eq!((r.isthmus, r.peer), (Some(312.0), Some(505.0)));
        assert_eq!(r.outcome, Outcome::Met, "312 / 505 >= 0.6");
        let r = row(&s, "memory per idle conn: isthmus-tcp");
        assert_eq!((r.isthmus, r.peer), (Some(10.3), Some(60.6)));
        assert_eq!(r.outcome, Outcome::Met);
        assert_eq!(s.rows.len(), report::targets(&[]).len());
        assert!(
            s.about.starts_with("quick sizes: bulk 1 x 64 MiB"),
            "{}",
            s.about
        );
    }

    #[test]
    fn a_missed_target_prints_as_missed_and_a_met_one_as_met() {
        let mut doc = gateway_doc();
        // HAProxy far ahead on bulk: both bulk targets missed; conn/s still met.
        doc["paths"][2]["bulk_1_mib_s"] = json!(5000.0);
        let report = Combined::new(vec![gateway(&source(doc)), dns(&source(dns_doc()))]);
        let text = table(&report);
        assert_eq!(
            printed(&text, "bulk 1 stream: isthmus-tcp"),
            [
                "bulk 1 stream: isthmus-tcp / haproxy (MiB/s)",
                "505",
                "5000",
                "0.10x",
                ">= 1.2x",
                "missed"
            ]
        );
        assert_eq!(
            printed(&text, "new conn/s")[3..],
            ["10.07x", ">= 8x", "met"]
        );
        // The DNS shim answers locally at 0.60x unbound: missed, though nothing was lost.
        assert_eq!(
            printed(&text, "local answers (QPS)")[1..],
            ["62302", "104452", "0.60x", ">= 1.0x", "missed"]
        );
        assert_eq!(
            printed(&text, "local answers: queries lost")[1..],
            ["0", "8", "-", "0", "met"]
        );
        assert_eq!(
            printed(&text, "shim RSS after")[1..],
            ["88.0", "-", "-", "<= 100 MB (95.4 MiB)", "met"]
        );
        assert_eq!(
            printed(&text, "shim peak RSS")[1..],
            ["214", "-", "-", "-", "-"]
        );
        // Gateway: both bulk rows missed (bulk 8 is 505 vs 544 in the fixture), six met; DNS:
        // the local QPS missed; loss, forwarded QPS and RSS met.
        assert!(
            text.contains("\ntargets: 9 met, 3 missed, 0 not judged\n"),
            "{text}"
        );
    }

    #[test]
    fn dns_limits_are_inclusive_and_loss_fails() {
        let mut doc = dns_doc();
        doc["local"]["shim"]["qps"] = json!(104451.5);
        doc["local"]["shim"]["lost"] = json!(3);
        doc["shim_rss_mb"] = json!(96);
        let s = dns(&source(doc));
        assert_eq!(row(&s, "local answers (QPS)").outcome, Outcome::Met);
        assert_eq!(
            row(&s, "local answers: queries lost").outcome,
            Outcome::Missed
        );
        assert_eq!(
            row(&s, "shim RSS after").outcome,
            Outcome::Missed,
            "96 MiB > 100 MB"
        );
    }

    #[test]
    fn missing_figures_print_as_dashes_and_are_not_judged() {
        let s = dns(&source(json!({"local": {"shim": {"qps": 1000}}})));
        let text = table(&Combined::new(vec![s]));
        assert_eq!(
            printed(&text, "local answers (QPS)")[1..],
            ["1000", "-", "-", ">= 1.0x", "n/a"]
        );
        assert!(text.contains("dns: ? routes (? migrated"), "{text}");
        // No document at all: said once, not as a line of question marks.
        let s = dns(&Source::from_file("/r/d.json", Err("gone".into())));
        assert_eq!(s.about, "no results");
        assert_eq!(route_sync(&Source::default()).about, "not run");
        assert!(
            text.contains("targets: 0 met, 0 missed, 4 not judged"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_benchmark_shows_failed_with_its_reason() {
        let mut src = Source::from_file("/r/dns.json", Err("No such file".into()));
        src.fail("exit 1, log /r/dns.log");
        let report = Combined::new(vec![
            gateway(&source(gateway_doc())),
            dns(&src),
            route_sync(&Source::default()),
        ]);
        let text = table(&report);
        assert!(text.contains("dns (peer: unbound) FAILED"), "{text}");
        assert!(
            text.contains(
                "dns FAILED: exit 1, log /r/dns.log; no JSON at /r/dns.json: No such file"
            ),
            "{text}"
        );
        assert_eq!(
            printed(&text, "local answers (QPS)")[1..],
            ["-", "-", "-", ">= 1.0x", "failed"]
        );
        assert_eq!(report.totals.failed, [Component::Dns]);
        // route-sync not run and not failed: not measured.
        assert_eq!(
            row(&report.sections[2], "one change: p99").outcome,
            Outcome::NotMeasured
        );
        assert!(text.contains("; failed: dns\n"), "{text}");
    }

    #[test]
    fn route_sync_with_per_process_memory() {
        let doc = json!({
            "routes": 250000, "initial_sync_s": 4.2, "peer_sync_s": 3.9,
            "change_p50_ms": 0.2, "change_p99_ms": 250.0,
            "sustained_changes_per_s": 995.0,
            "lag_p99_first_ms": 5.5, "lag_p99_last_ms": 101.0,
            "rss_mib": 700.0,
            "processes": {
                "diego": {"rss_synced_mib": 250.0, "hwm_synced_mib": 400.0, "rss_end_mib": 240.0,
                          "hwm_end_mib": 410.0},
                "k8s": {"rss_synced_mib": 290.0, "rss_end_kib": 1024.0},
                "bench": {"rss_synced_mib": 900.0},
            }
        });
        let s = route_sync(&source(doc));
        assert_eq!(
            row(&s, "initial sync, source -> peer").outcome,
            Outcome::Met
        );
        assert_eq!(
            row(&s, "initial sync, source -> remote").outcome,
            Outcome::Met
        );
        assert_eq!(row(&s, "one change: p99").outcome, Outcome::Missed);
        assert_eq!(row(&s, "one change: p50").outcome, Outcome::Info);
        assert_eq!(row(&s, "sustained").outcome, Outcome::Met, "within 1%");
        // 101 > 2 x max(5.5, 50).
        assert_eq!(row(&s, "lag p99 at 1,000/s: last").outcome, Outcome::Missed);
        let diego = row(&s, "RSS, diego");
        assert_eq!((diego.isthmus, diego.outcome), (Some(250.0), Outcome::Met));
        // 290 MiB is over 300 MB (286 MiB).
        let k8s = row(&s, "RSS, k8s");
        assert_eq!((k8s.isthmus, k8s.outcome), (Some(290.0), Outcome::Missed));
        assert_eq!(row(&s, "peak RSS, diego").isthmus, Some(410.0));
        assert!(s.rows.iter().all(|r| !r.metric.contains("bench")));
        assert!(s.notes.is_empty(), "{:?}", s.notes);
    }

    #[test]
    fn route_sync_without_per_process_memory_judges_the_whole_process() {
        let doc = json!({
            "routes": 25000, "initial_sync_s": 0.43, "change_p50_ms": 0.15, "change_p99_ms": 1.9,
            "sustained_changes_per_s": 980.0, "lag_p99_first_ms": 60.0,
            "lag_p99_last_ms": 119.0, "rss_mib": 119.7
        });
        let s = route_sync(&source(doc));
        assert_eq!(row(&s, "sustained").outcome, Outcome::Missed, "980 < 990");
        assert_eq!(row(&s, "lag p99 at 1,000/s: last").outcome, Outcome::Met);
        // An older document without peer_sync_s: that row is not measured.
        assert_eq!(
            row(&s, "initial sync, source -> peer").outcome,
            Outcome::NotMeasured
        );
        let whole = row(&s, "RSS, whole benchmark process");
        assert_eq!((whole.isthmus, whole.outcome), (Some(119.7), Outcome::Met));
        assert!(s.notes.iter().any(|n| n.contains("no per-process RSS")));
        assert!(s.notes.iter().any(|n| n.contains("ran with 25000 routes")));
    }

    #[test]
    fn process_lists_and_names() {
        let doc = json!({"processes": [
            {"name": "diego", "vmrss_kib": 2048},
            {"name": "consumer", "rss_mib": 5},
            {"rss_mib": 7, "rss_idle_mib": 99},
            {"name": "k8s", "other": 1},
        ]});
        assert_eq!(
            route_sync_processes(Some(&doc)),
            [
                ProcessMemory {
                    name: "diego".into(),
                    rss_mib: Some(2.0),
                    hwm_mib: None
                },
                ProcessMemory {
                    name: "#2".into(),
                    rss_mib: Some(7.0),
                    hwm_mib: None
                },
            ]
        );
        assert!(route_sync_processes(Some(&json!({"processes": 3}))).is_empty());
        assert!(route_sync_processes(None).is_empty());
    }

    #[test]
    fn lenient_parse_repairs_what_the_benchmarks_may_write() {
        let (v, repaired) = parse_lenient(r#"{"a": 1, "b": [2]}"#).unwrap();
        assert!(!repaired);
        assert_eq!(v, json!({"a": 1, "b": [2]}));
        let text = r#"{"qps": , "ratio": n/a, "p99":NaN, "x": [inf, -inf, 1],
                      "name": "NaN: n/a, inf", "esc": "a\"b: NaN", "last": }"#;
        let (v, repaired) = parse_lenient(text).unwrap();
        assert!(repaired);
        assert_eq!(
            v,
            json!({"qps": null, "ratio": null, "p99": null, "x": [null, null, 1],
                   "name": "NaN: n/a, inf", "esc": "a\"b: NaN", "last": null})
        );
        assert!(parse_lenient("{\"a\": }}").is_err());
        assert!(parse_lenient("not json").is_err());
    }

    #[test]
    fn a_document_that_is_not_json_fails_its_component() {
        let s = Source::from_file("/r/g.json", Ok("garbage".into()));
        assert!(s.failed.unwrap().starts_with("/r/g.json is not JSON"));
        let s = Source::from_file("/r/g.json", Ok("{\"a\": NaN}".into()));
        assert!(s.failed.is_none());
        assert_eq!(s.notes.len(), 1);
    }

    #[test]
    fn unreadable_gateway_paths_are_noted_not_fatal() {
        let mut doc = gateway_doc();
        doc["paths"][1] = json!({"path": "nginx"});
        doc["paths"][2]["failed"] = json!("haproxy is not installed");
        let s = gateway(&source(doc));
        assert!(
            s.notes.iter().any(|n| n.contains("could not be read")),
            "{:?}",
            s.notes
        );
        assert!(
            s.notes
                .contains(&"haproxy failed: haproxy is not installed".to_string())
        );
        // Without HAProxy and QUIC: the comparisons are not measured, memory still judged.
        assert_eq!(row(&s, "new conn/s").outcome, Outcome::NotMeasured);
        assert_eq!(
            row(&s, "memory per idle conn: isthmus-tcp").outcome,
            Outcome::Met
        );
        assert_eq!(row(&s, "memory per idle conn: isthmus-tcp").peer, None);
    }

    #[test]
    fn component_names_round_trip() {
        for c in Component::ALL {
            assert_eq!(Component::parse(c.name()), Some(c));
        }
        assert_eq!(Component::parse("ntp"), None);
    }
}

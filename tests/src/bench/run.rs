//! One benchmark run: the four paths measured in turn, then the tables and the JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::load;
use super::procs::{self, rss_kib};
use super::report::{
    self, ConnRate, Latency, Machine, Memory, Params, PathKind, PathResult, Report,
};
use super::setup::{self, Running, World};
use super::stats;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Smaller sizes (about a minute in all).
    pub quick: bool,
    /// The paths to measure, in table order.
    pub paths: Vec<PathKind>,
    /// The isthmus-gateway binary.
    pub gateway: PathBuf,
    /// The haproxy binary.
    pub haproxy: String,
    /// This executable, re-run for the backends.
    pub self_exe: PathBuf,
    /// Where certificates, configurations and logs go (kept after the run).
    pub workdir: PathBuf,
}

/// Sizes for a default or a `--quick` run, holding `idle_conns_haproxy` under HAProxy's
/// `maxconn`.
pub fn params(quick: bool, haproxy_maxconn: usize) -> Params {
    let idle_conns = if quick { 2_000 } else { 10_000 };
    Params {
        quick,
        bulk_1_mib: if quick { 64 } else { 512 },
        bulk_8_mib_each: if quick { 16 } else { 128 },
        conn_seconds: if quick { 2 } else { 5 },
        conn_workers: 32,
        latency_iterations: if quick { 5_000 } else { 20_000 },
        latency_message_bytes: 64,
        idle_conns,
        idle_conns_haproxy: setup::haproxy_idle_conns(idle_conns, haproxy_maxconn),
    }
}

/// Unmeasured round trips before the latency series.
const LATENCY_WARMUP: usize = 500;
/// Idle connections opened at a time in the memory test (under the listeners' backlog).
const IDLE_PARALLEL: usize = 64;

/// The machine this runs on.
pub fn machine(haproxy: &str) -> Machine {
    let haproxy = std::process::Command::new(haproxy)
        .arg("-v")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        });
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: procs::cpu_model(),
        kernel: procs::kernel(),
        haproxy,
        nofile_hard: procs::nofile_hard_limit(),
        loadavg_start: procs::loadavg(),
        loadavg_end: None,
    }
}

/// The header printed above the tables.
pub fn header(m: &Machine, p: &Params, workdir: &std::path::Path) -> String {
    format!(
        "Isthmus gateway benchmark ({mode})\n\
         machine: {nproc} CPUs, {cpu}, Linux {kernel}, open files hard limit {nofile}\n\
         haproxy: {haproxy}\n\
         load average at start: {load}{busy}\n\
         note: the {nproc} CPUs are shared by the load generator, both gateways and the backends;\n      \
         absolute numbers are what this box gives all of them together, compare the ratios.\n\
         sizes: bulk 1 x {b1} MiB and 8 x {b8} MiB; new conns {cs}s x {cw} workers; latency {li} x \
         {lb}-byte round trips on one connection; {ic} idle conns{ich}\n\
         logs and configs: {dir}\n",
        mode = if p.quick { "--quick" } else { "default" },
        nproc = m.nproc,
        cpu = m.cpu_model,
        kernel = m.kernel,
        nofile = m
            .nofile_hard
            .map_or_else(|| "unlimited".into(), |n| n.to_string()),
        haproxy = m.haproxy.as_deref().unwrap_or("not installed"),
        load = m.loadavg_start.map_or_else(
            || "unknown".into(),
            |l| format!("{} {} {}", l[0], l[1], l[2])
        ),
        busy = if m.loadavg_start.is_some_and(|l| l[0] > 0.5) {
            " (other work is running: expect lower, noisier numbers)"
        } else {
            ""
        },
        b1 = p.bulk_1_mib,
        b8 = p.bulk_8_mib_each,
        cs = p.conn_seconds,
        cw = p.conn_workers,
        li = p.latency_iterations,
        lb = p.latency_message_bytes,
        ic = p.idle_conns,
        ich = if p.idle_conns_haproxy < p.idle_conns {
            format!(
                " ({} on haproxy: it holds 2 sockets per connection in one process, under the \
                 open files hard limit)",
                p.idle_conns_haproxy
            )
        } else {
            String::new()
        },
        dir = workdir.display(),
    )
}

/// Runs the benchmark. A path that fails is reported as failed; only a failure to set up
/// what all paths share (certificates, backends) is an error.
///
/// # Errors
/// When the work directory, certificates or backends cannot be set up.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let machine = machine(&opts.haproxy);
    let maxconn = setup::haproxy_maxconn(machine.nofile_hard);
    let params = params(opts.quick, maxconn);
    print!("{}", header(&machine, &params, &opts.workdir));
    let world = World::build(
        &opts.workdir,
        &opts.self_exe,
        opts.gateway.clone(),
        opts.haproxy.clone(),
        maxconn,
    )
    .await
    .context("setting up certificates and backends")?;

    let mut paths = Vec::new();
    for &kind in &opts.paths {
        paths.push(measure(&world, kind, &params).await);
    }
    drop(world);
    let mut machine = machine;
    machine.loadavg_end = procs::loadavg();
    report::fill_added_latency(&mut paths);
    let targets = report::targets(&paths);
    Ok(Report {
        machine,
        params,
        paths,
        targets,
        workdir: opts.workdir.display().to_string(),
    })
}

fn say(kind: PathKind, what: &str) {
    eprintln!("[{}] {what}", kind.name());
}

/// Keeps a measurement's value, or its error in `errors`.
fn keep<T>(
    kind: PathKind,
    errors: &mut Vec<String>,
    what: &str,
    r: anyhow::Result<T>,
) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = format!("{what}: {e:#}");
            say(kind, &format!("FAILED {msg}"));
            errors.push(msg);
            None
        }
    }
}

async fn measure(world: &World, kind: PathKind, p: &Params) -> PathResult {
    let mut r = PathResult::new(kind);
    say(kind, "starting");
    match world.start(kind, kind.name()).await {
        Err(e) => {
            say(kind, &format!("FAILED to start: {e:#}"));
            r.failed = Some(format!("{e:#}"));
            return r;
        }
        Ok(mut running) => {
            throughput_and_latency(&mut running, p, &mut r).await;
            gateway_metrics(world, &mut running, "main", &mut r).await;
            let logs = running.logs.clone();
            running.stop();
            log_notes(&logs, "main", &mut r);
        }
    }
    if kind.is_tunnel() {
        // A fresh gateway pair: what the earlier tests allocated does not hide the growth.
        let conns = if kind == PathKind::Haproxy {
            p.idle_conns_haproxy
        } else {
            p.idle_conns
        };
        let tag = format!("{}-memory", kind.name());
        match world.start(kind, &tag).await {
            Err(e) => {
                keep::<()>(kind, &mut r.errors, "memory: starting a fresh pair", Err(e));
            }
            Ok(mut running) => {
                let m = memory(&mut running, conns).await;
                r.memory = keep(kind, &mut r.errors, "memory", m);
                gateway_metrics(world, &mut running, "memory", &mut r).await;
                let logs = running.logs.clone();
                running.stop();
                log_notes(&logs, "memory", &mut r);
            }
        }
    }
    r
}

async fn throughput_and_latency(running: &mut Running, p: &Params, r: &mut PathResult) {
    let kind = running.kind;
    // Long enough for a slow path, short enough to keep the run within its time budget.
    let limit = Duration::from_secs(if p.quick { 30 } else { 90 });

    let cpu_before_bulk = running.gateway_cpu_seconds();
    let b1 = load::bulk(running.sink, 1, p.bulk_1_mib, limit).await;
    r.bulk_1_mib_s = keep(kind, &mut r.errors, "bulk 1 stream", b1);
    if let Some(v) = r.bulk_1_mib_s {
        say(
            kind,
            &format!("bulk 1 x {} MiB: {v:.0} MiB/s", p.bulk_1_mib),
        );
    }

    let b8 = load::bulk(running.sink, 8, p.bulk_8_mib_each, limit).await;
    r.bulk_8_mib_s = keep(kind, &mut r.errors, "bulk 8 streams", b8);
    if let Some(v) = r.bulk_8_mib_s {
        say(
            kind,
            &format!("bulk 8 x {} MiB: {v:.0} MiB/s", p.bulk_8_mib_each),
        );
    }
    if let (Some(t0), Some(t1), Some(_), Some(_)) = (
        cpu_before_bulk,
        running.gateway_cpu_seconds(),
        r.bulk_1_mib_s,
        r.bulk_8_mib_s,
    ) {
        let gib = (p.bulk_1_mib + 8 * p.bulk_8_mib_each) as f64 / 1024.0;
        r.cpu_s_per_gib = Some((t1 - t0) / gib);
    }

    let cpu_before_conns = running.gateway_cpu_seconds();
    let c: ConnRate = load::conn_rate(
        running.echo,
        p.conn_workers,
        Duration::from_secs(p.conn_seconds),
    )
    .await;
    say(
        kind,
        &format!(
            "new connections: {:.0}/s, {} errors{}",
            c.per_s,
            c.errors,
            c.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ),
    );
    if let (Some(t0), Some(t1)) = (cpu_before_conns, running.gateway_cpu_seconds())
        && c.ok > 0
    {
        r.cpu_us_per_conn = Some((t1 - t0) * 1e6 / c.ok as f64);
    }
    if c.errors > 0 {
        r.errors.push(format!(
            "new connections: {} of {} failed; first: {}",
            c.errors,
            c.errors + c.ok,
            c.first_error.as_deref().unwrap_or("?")
        ));
    }
    r.conn_rate = Some(c);

    let lat = load::ping_pong(
        running.echo,
        p.latency_message_bytes,
        LATENCY_WARMUP,
        p.latency_iterations,
    )
    .await
    .and_then(|s| stats::summarise_ns(s).context("no latency samples"));
    r.latency = keep(kind, &mut r.errors, "latency", lat).map(|s| Latency {
        p50_us: s.p50_us,
        p99_us: s.p99_us,
        max_us: s.max_us,
        samples: s.samples,
        added_p50_us: None,
        added_p99_us: None,
    });
    if let Some(l) = &r.latency {
        say(
            kind,
            &format!("latency p50 {:.1} µs, p99 {:.1} µs", l.p50_us, l.p99_us),
        );
    }
}

async fn memory(running: &mut Running, conns: usize) -> anyhow::Result<Memory> {
    let kind = running.kind;
    let (Some(egress), Some(ingress)) = (running.egress_pid, running.ingress_pid) else {
        anyhow::bail!("no gateway processes on this path");
    };
    // A few round trips first, so pooled tunnel connections and TLS state are in `before`.
    for _ in 0..8 {
        load::probe(running.echo).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (eb, ib) = (rss_kib(egress)?, rss_kib(ingress)?);
    let held = load::hold_idle(running.echo, conns, IDLE_PARALLEL).await?;
    // Let deferred work (buffers released after the first echo, timers) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.check_alive()?;
    let (ea, ia) = (rss_kib(egress)?, rss_kib(ingress)?);
    drop(held);
    let delta = (ea + ia) as i64 - (eb + ib) as i64;
    let per = stats::kib_per_conn(delta, conns).context("no connections held")?;
    say(
        kind,
        &format!(
            "{conns} idle conns: RSS egress {eb} -> {ea} KiB, ingress {ib} -> {ia} KiB: \
             {per:.1} KiB/conn"
        ),
    );
    Ok(Memory {
        conns,
        egress_before_kib: eb,
        ingress_before_kib: ib,
        egress_after_kib: ea,
        ingress_after_kib: ia,
        kib_per_conn: per,
    })
}

/// Saves the gateways' metrics beside their logs and notes failure counters, and a gateway
/// that died.
async fn gateway_metrics(world: &World, running: &mut Running, phase: &str, r: &mut PathResult) {
    if let Err(e) = running.check_alive() {
        r.errors.push(format!("{phase}: a gateway died: {e:#}"));
    }
    for (role, admin) in running.admin.clone() {
        match setup::scrape(admin).await {
            Ok(page) => {
                let file = world
                    .logs
                    .join(format!("{}-{phase}-{role}.metrics", running.kind.name()));
                let _ = std::fs::write(&file, &page);
                for counter in setup::failure_counters(&page) {
                    r.notes.push(format!("{phase} {role} metric: {counter}"));
                }
            }
            Err(e) => r.notes.push(format!("{phase} {role}: metrics: {e:#}")),
        }
    }
}

/// Notes warning and error lines of the gateways' logs, read once they stopped so that what
/// shutdown logged counts too.
fn log_notes(logs: &[(&'static str, PathBuf)], phase: &str, r: &mut PathResult) {
    for (role, log) in logs {
        if let Some((count, first)) = setup::log_findings(log) {
            r.notes.push(format!(
                "{phase} {role} log {}: {count} warning/error lines, first: {first}",
                log.display()
            ));
        }
    }
}

//! Building the four paths: certificates, backends, gateway and HAProxy configurations, and
//! the processes behind them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use isthmus_certs::ca::{LeafSpec, MeshCa};
use tokio::time::Instant;

use super::backend::BackendKind;
use super::load;
use super::procs::{Procs, log_tail};
use super::report::PathKind;

/// The mesh trust domain of the run.
const TRUST_DOMAIN: &str = "mesh.local";
/// The routes the paths carry.
const ECHO_ROUTE: &str = "echo.apps.internal:8080";
const SINK_ROUTE: &str = "sink.apps.internal:8080";
/// How long a gateway gets to bind its ports.
const START_LIMIT: Duration = Duration::from_secs(15);
/// How long an end-to-end probe may keep failing after the ports are up.
const PROBE_LIMIT: Duration = Duration::from_secs(10);

/// The backends every path ends at.
#[derive(Debug, Clone, Copy)]
pub struct Backends {
    /// The echo backend.
    pub echo: SocketAddr,
    /// The sink backend.
    pub sink: SocketAddr,
}

/// What every path of a run shares: the work directory, the binaries and the backends.
pub struct World {
    /// Certificates, configurations.
    pub dir: PathBuf,
    /// Child logs and metrics snapshots.
    pub logs: PathBuf,
    /// The isthmus-gateway binary.
    pub gateway: PathBuf,
    /// The haproxy binary.
    pub haproxy: String,
    /// The backends.
    pub backends: Backends,
    /// HAProxy's `maxconn`, per process.
    pub haproxy_maxconn: usize,
    routes: PathBuf,
    _backend_procs: Procs,
}

/// A path up and ready to measure; its processes stop when it is dropped.
pub struct Running {
    /// Which path.
    pub kind: PathKind,
    /// Where the client connects to reach the echo backend.
    pub echo: SocketAddr,
    /// Where the client connects to reach the sink backend.
    pub sink: SocketAddr,
    /// The egress gateway process, when there is one.
    pub egress_pid: Option<u32>,
    /// The ingress gateway process, when there is one.
    pub ingress_pid: Option<u32>,
    /// Admin servers to scrape (`role`, address).
    pub admin: Vec<(&'static str, SocketAddr)>,
    /// Logs of the gateway processes (`role`, file).
    pub logs: Vec<(&'static str, PathBuf)>,
    procs: Procs,
}

impl Running {
    /// Fails if a gateway process of this path has exited.
    ///
    /// # Errors
    /// When one has exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for pid in [self.egress_pid, self.ingress_pid].into_iter().flatten() {
            self.procs.check_alive(pid)?;
        }
        Ok(())
    }

    /// CPU seconds the gateway processes have used so far, egress and ingress together;
    /// `None` on the direct path or if /proc cannot tell.
    pub fn gateway_cpu_seconds(&self) -> Option<f64> {
        let (e, i) = (self.egress_pid?, self.ingress_pid?);
        Some(super::procs::cpu_seconds(e).ok()? + super::procs::cpu_seconds(i).ok()?)
    }

    /// Stops the path's processes now.
    pub fn stop(mut self) {
        self.procs.stop_all();
    }
}

impl World {
    /// Writes certificates and routes into `dir` and starts the backends (this executable
    /// re-run with `--serve-backend`).
    ///
    /// # Errors
    /// When a file cannot be written or a backend does not start.
    pub async fn build(
        dir: &Path,
        self_exe: &Path,
        gateway: PathBuf,
        haproxy: String,
        haproxy_maxconn: usize,
    ) -> anyhow::Result<World> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        write_certs(&dir.join("certs"))?;

        let mut procs = Procs::default();
        let ports = super::procs::free_ports(2, false)?;
        let echo = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let sink = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        for (kind, addr) in [(BackendKind::Echo, echo), (BackendKind::Sink, sink)] {
            let mut cmd = Command::new(self_exe);
            cmd.arg("--serve-backend")
                .arg(kind.name())
                .arg("--port")
                .arg(addr.port().to_string());
            let log = logs.join(format!("backend-{}.log", kind.name()));
            let pid = procs.spawn(&format!("{} backend", kind.name()), cmd, &log)?;
            procs.wait_for_port(pid, addr, START_LIMIT).await?;
        }

        let routes = dir.join("routes.yaml");
        let yaml = format!(
            "routes:\n{}{}",
            route_entry(ECHO_ROUTE, echo),
            route_entry(SINK_ROUTE, sink)
        );
        std::fs::write(&routes, yaml).with_context(|| format!("writing {}", routes.display()))?;
        Ok(World {
            dir: dir.to_owned(),
            logs,
            gateway,
            haproxy,
            backends: Backends { echo, sink },
            haproxy_maxconn,
            routes,
            _backend_procs: procs,
        })
    }

    /// Brings `kind` up under the name `tag` (used for its files) and checks an echo goes
    /// through end to end.
    ///
    /// # Errors
    /// When a process does not start, a port does not open, or the probe fails.
    pub async fn start(&self, kind: PathKind, tag: &str) -> anyhow::Result<Running> {
        let mut running = match kind {
            PathKind::Direct => Running {
                kind,
                echo: self.backends.echo,
                sink: self.backends.sink,
                egress_pid: None,
                ingress_pid: None,
                admin: Vec::new(),
                logs: Vec::new(),
                procs: Procs::default(),
            },
            PathKind::IsthmusTcp => self.start_isthmus(kind, "tcp", tag).await?,
            PathKind::IsthmusQuic => self.start_isthmus(kind, "quic", tag).await?,
            PathKind::Haproxy => self.start_haproxy(tag).await?,
        };
        let deadline = Instant::now() + PROBE_LIMIT;
        loop {
            match load::probe(running.echo).await {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    let mut msg = format!("no echo through {}: {e:#}", kind.name());
                    for (role, log) in &running.logs {
                        let _ =
                            write!(msg, "\n{role} log {}:\n{}", log.display(), log_tail(log, 8));
                    }
                    bail!(msg);
                }
                Err(_) => {
                    running.check_alive()?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(running)
    }

    async fn start_isthmus(
        &self,
        kind: PathKind,
        transport: &str,
        tag: &str,
    ) -> anyhow::Result<Running> {
        // Every port free for UDP too: the ingress takes its port number for QUIC as well.
        let p = super::procs::free_ports(5, true)?;
        let [tunnel, admin_in, admin_out, echo, sink] = [p[0], p[1], p[2], p[3], p[4]];
        let certs = self.dir.join("certs");
        let common = |cluster: &str, admin: u16| {
            let d = certs.join(cluster);
            format!(
                "cluster: {cluster}\ntrust_domain: {TRUST_DOMAIN}\n\
                 tls: {{cert: \"{}\", key: \"{}\", bundle: \"{}\"}}\n\
                 routes: {{file: \"{}\"}}\n\
                 admin: {{listen: \"127.0.0.1:{admin}\"}}\n\
                 drain_timeout: 2s\n",
                d.join("cert.pem").display(),
                d.join("key.pem").display(),
                d.join("ca.pem").display(),
                self.routes.display(),
            )
        };
        let ingress_cfg = format!(
            "{}ingress: {{listen: \"127.0.0.1:{tunnel}\", quic: true}}\n",
            common("k8s", admin_in)
        );
        let egress_cfg = format!(
            "{}egress:\n  \
             peers: [{{cluster: k8s, endpoints: [\"127.0.0.1:{tunnel}\"], transport: {transport}, \
             fallback_to_tcp: false}}]\n  \
             dedicated:\n    \
             - {{listen: \"127.0.0.1:{echo}\", route: \"{ECHO_ROUTE}\"}}\n    \
             - {{listen: \"127.0.0.1:{sink}\", route: \"{SINK_ROUTE}\"}}\n",
            common("diego", admin_out)
        );
        let mut procs = Procs::default();
        let mut logs = Vec::new();
        let mut pids = Vec::new();
        for (role, cfg, admin) in [
            ("ingress", ingress_cfg, admin_in),
            ("egress", egress_cfg, admin_out),
        ] {
            let file = self.dir.join(format!("{tag}-{role}.yaml"));
            std::fs::write(&file, cfg).with_context(|| format!("writing {}", file.display()))?;
            let log = self.logs.join(format!("{tag}-{role}.log"));
            let mut cmd = Command::new(&self.gateway);
            cmd.arg("--config").arg(&file);
            let pid = procs.spawn(&format!("{tag} {role} gateway"), cmd, &log)?;
            // Ready once every listener is bound and serving.
            procs
                .wait_for_http_ok(
                    pid,
                    SocketAddr::from(([127, 0, 0, 1], admin)),
                    "/readyz",
                    START_LIMIT,
                )
                .await?;
            logs.push((role, log));
            pids.push(pid);
        }
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Ok(Running {
            kind,
            echo: local(echo),
            sink: local(sink),
            egress_pid: Some(pids[1]),
            ingress_pid: Some(pids[0]),
            admin: vec![("ingress", local(admin_in)), ("egress", local(admin_out))],
            logs,
            procs,
        })
    }

    async fn start_haproxy(&self, tag: &str) -> anyhow::Result<Running> {
        let version = Command::new(&self.haproxy).arg("-v").output();
        if !version.is_ok_and(|o| o.status.success()) {
            bail!(
                "`{} -v` does not run: HAProxy is not installed (tests/bench/gateway.sh installs \
                 it with apt-get)",
                self.haproxy
            );
        }
        let p = super::procs::free_ports(4, false)?;
        let [in_echo, in_sink, out_echo, out_sink] = [p[0], p[1], p[2], p[3]];
        let certs = self.dir.join("certs");
        let ingress_cfg = haproxy_config(
            self.haproxy_maxconn,
            &[
                (
                    "ingress_echo",
                    format!(
                        "bind 127.0.0.1:{in_echo} ssl {}",
                        haproxy_tls(&certs.join("k8s"))
                    ),
                    format!("server backend {}", self.backends.echo),
                ),
                (
                    "ingress_sink",
                    format!(
                        "bind 127.0.0.1:{in_sink} ssl {}",
                        haproxy_tls(&certs.join("k8s"))
                    ),
                    format!("server backend {}", self.backends.sink),
                ),
            ],
        );
        let egress_cfg = haproxy_config(
            self.haproxy_maxconn,
            &[
                (
                    "egress_echo",
                    format!("bind 127.0.0.1:{out_echo}"),
                    format!(
                        "server ingress 127.0.0.1:{in_echo} ssl {}",
                        haproxy_tls(&certs.join("diego"))
                    ),
                ),
                (
                    "egress_sink",
                    format!("bind 127.0.0.1:{out_sink}"),
                    format!(
                        "server ingress 127.0.0.1:{in_sink} ssl {}",
                        haproxy_tls(&certs.join("diego"))
                    ),
                ),
            ],
        );
        let mut procs = Procs::default();
        let mut logs = Vec::new();
        let mut pids = Vec::new();
        for (role, cfg, wait) in [
            ("ingress", ingress_cfg, in_echo),
            ("egress", egress_cfg, out_echo),
        ] {
            let file = self.dir.join(format!("{tag}-{role}.cfg"));
            std::fs::write(&file, cfg).with_context(|| format!("writing {}", file.display()))?;
            let check = Command::new(&self.haproxy)
                .arg("-c")
                .arg("-f")
                .arg(&file)
                .output()
                .with_context(|| format!("running {} -c", self.haproxy))?;
            if !check.status.success() {
                bail!(
                    "haproxy refuses {}: {}{}",
                    file.display(),
                    String::from_utf8_lossy(&check.stdout),
                    String::from_utf8_lossy(&check.stderr)
                );
            }
            let log = self.logs.join(format!("{tag}-{role}.log"));
            let mut cmd = Command::new(&self.haproxy);
            cmd.arg("-db").arg("-f").arg(&file);
            let pid = procs.spawn(&format!("{tag} {role} haproxy"), cmd, &log)?;
            procs
                .wait_for_port(pid, SocketAddr::from(([127, 0, 0, 1], wait)), START_LIMIT)
                .await?;
            logs.push((role, log));
            pids.push(pid);
        }
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        procs
            .wait_for_port(pids[1], local(out_sink), START_LIMIT)
            .await?;
        Ok(Running {
            kind: PathKind::Haproxy,
            echo: local(out_echo),
            sink: local(out_sink),
            egress_pid: Some(pids[1]),
            ingress_pid: Some(pids[0]),
            admin: Vec::new(),
            logs,
            procs,
        })
    }
}

fn route_entry(route: &str, backend: SocketAddr) -> String {
    let (name, port) = route.split_once(':').unwrap_or((route, "8080"));
    format!(
        "  - {{name: {name}, port: {port}, home_cluster: k8s, exported: true, \
         allowed_peers: [\"cluster:diego\"], backends: [\"{backend}\"]}}\n"
    )
}

/// Issues the k8s and diego gateway identities from one new mesh CA into `dir/<cluster>/`:
/// `cert.pem`, `key.pem`, `ca.pem`, and `haproxy.pem` (certificate and key in one file, as
/// HAProxy's `crt` wants them).
fn write_certs(dir: &Path) -> anyhow::Result<()> {
    let ca = MeshCa::generate(TRUST_DOMAIN).context("generating the mesh CA")?;
    for cluster in ["k8s", "diego"] {
        let leaf = ca
            .issue(&LeafSpec::new(
                cluster,
                "gateway",
                Duration::from_secs(24 * 3600),
            ))
            .with_context(|| format!("issuing the {cluster} gateway certificate"))?;
        let d = dir.join(cluster);
        leaf.write(&d, &ca.cert_pem())
            .with_context(|| format!("writing certificates into {}", d.display()))?;
        let both = d.join("haproxy.pem");
        std::fs::write(&both, format!("{}{}", leaf.cert_pem, leaf.key_pem))
            .with_context(|| format!("writing {}", both.display()))?;
    }
    Ok(())
}

/// HAProxy's TLS options with one cluster's identity: mutual TLS 1.3 against the mesh CA,
/// the same as the Isthmus gateways use. HAProxy checks the chain only, not the SPIFFE ID.
fn haproxy_tls(cluster_dir: &Path) -> String {
    format!(
        "crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
        cluster_dir.join("haproxy.pem").display(),
        cluster_dir.join("ca.pem").display()
    )
}

/// A HAProxy configuration of `mode tcp` proxies, each `(name, bind line, server line)`.
pub fn haproxy_config(maxconn: usize, proxies: &[(&str, String, String)]) -> String {
    let mut cfg = format!(
        "# Generated by isthmus-bench-gateway.\n\
         global\n    \
         nbthread 2\n    \
         maxconn {maxconn}\n    \
         log stderr format short local0 notice\n\
         \n\
         defaults\n    \
         mode tcp\n    \
         log global\n    \
         option dontlognull\n    \
         timeout connect 5s\n    \
         timeout client 10m\n    \
         timeout server 10m\n"
    );
    for (name, bind, server) in proxies {
        let _ = write!(cfg, "\nlisten {name}\n    {bind}\n    {server}\n");
    }
    cfg
}

/// HAProxy's `maxconn` under a file-descriptor hard limit: every proxied connection holds
/// two sockets, and HAProxy refuses to start when `2 * maxconn` plus its own descriptors
/// exceed the limit it can raise itself to.
pub fn haproxy_maxconn(nofile_hard: Option<u64>) -> usize {
    const WANTED: usize = 20_000;
    const OWN_FDS: u64 = 64;
    match nofile_hard {
        Some(limit) => WANTED.min((limit.saturating_sub(OWN_FDS) / 2) as usize),
        None => WANTED,
    }
}

/// Idle connections to hold through HAProxy: `wanted`, or fewer when `maxconn` is lower,
/// rounded down to a hundred with room for the warm-up connections.
pub fn haproxy_idle_conns(wanted: usize, maxconn: usize) -> usize {
    wanted.min(maxconn.saturating_sub(50) / 100 * 100)
}

/// `GET /metrics` from an admin server: the Prometheus text.
///
/// # Errors
/// When the server cannot be reached or does not answer in time.
pub async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let answer = super::procs::http_get(admin, "/metrics")
        .await
        .with_context(|| format!("scraping {admin}"))?;
    Ok(answer
        .split_once("\r\n\r\n")
        .map_or(answer.as_str(), |(_, body)| body)
        .to_owned())
}

/// Nonzero failure counters in a Prometheus text page.
pub fn failure_counters(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.contains("connections_refused")
                || l.contains("connections_failed")
                || l.contains("handshake_failures")
        })
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
        .map(str::to_owned)
        .collect()
}

/// Warning and error lines of a gateway or HAProxy log: how many, and the first.
pub fn log_findings(log: &Path) -> Option<(usize, String)> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut hits = text.lines().filter(|l| {
        l.contains(" WARN ")
            || l.contains(" ERROR ")
            || l.contains("[ALERT]")
            || l.contains("[WARNING]")
    });
    let first = hits.next()?.to_owned();
    Some((1 + hits.count(), first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_fits_the_fd_limit() {
        assert_eq!(haproxy_maxconn(Some(20_000)), 9_968);
        assert_eq!(haproxy_maxconn(Some(1_048_576)), 20_000);
        assert_eq!(haproxy_maxconn(None), 20_000);
        assert_eq!(haproxy_idle_conns(10_000, 9_968), 9_900);
        assert_eq!(haproxy_idle_conns(2_000, 9_968), 2_000);
        assert_eq!(haproxy_idle_conns(10_000, 20_000), 10_000);
    }

    #[test]
    fn haproxy_config_has_every_proxy() {
        let cfg = haproxy_config(
            100,
            &[(
                "a",
                "bind 127.0.0.1:1".into(),
                "server s 127.0.0.1:2".into(),
            )],
        );
        assert!(cfg.contains("maxconn 100\n"));
        assert!(cfg.contains("nbthread 2\n"));
        assert!(cfg.contains("\nlisten a\n    bind 127.0.0.1:1\n    server s 127.0.0.1:2\n"));
    }

    #[test]
    fn finds_nonzero_failure_counters() {
        let page = "# HELP x\n\
                    isthmus_gateway_connections_failed_total{reason=\"stream_error\"} 3\n\
                    isthmus_gateway_connections_refused_total{reason=\"overloaded\"} 0\n\
                    isthmus_gateway_connections_opened_total{route=\"a\"} 9\n";
        assert_eq!(
            failure_counters(page),
            vec!["isthmus_gateway_connections_failed_total{reason=\"stream_error\"} 3"]
        );
    }
}

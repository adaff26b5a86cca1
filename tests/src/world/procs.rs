//! Isthmus components as child processes: the same code as the shipped binaries, run by a
//! multi-call executable (`isthmus-demo component <kind> --config FILE`), so a test can kill
//! one for real.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use isthmus_runtime::config;
use isthmus_runtime::{shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// The components a world runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `isthmus-route-sync`.
    RouteSync,
    /// `isthmus-gateway` (egress or ingress role, by its config).
    Gateway,
    /// `isthmus-dns-shim`.
    DnsShim,
}

impl Kind {
    /// The name on the command line and in SPIFFE IDs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RouteSync => "route-sync",
            Kind::Gateway => "gateway",
            Kind::DnsShim => "dns-shim",
        }
    }
}

/// Runs one component in this process until SIGTERM/SIGINT: what
/// `isthmus-demo component <kind> --config FILE` does.
///
/// # Errors
/// Unknown kind, or the component fails to start (a bad config exits 64 as the binaries do).
pub fn run_component(kind: &str, path: &Path) -> anyhow::Result<()> {
    // A component must not outlive the world that started it (a killed demo or test).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        anyhow::bail!("the world that started this component is gone");
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    telemetry::init(telemetry::LogFormat::Text, &filter)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let kind = kind.to_string();
    let path = path.to_path_buf();
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        shutdown::spawn_signal_handler(stop.clone());
        match kind.as_str() {
            "route-sync" => {
                let cfg: isthmus_route_sync::config::RouteSyncConfig = config::load_or_exit(&path);
                isthmus_route_sync::service::run(cfg, stop).await
            }
            "gateway" => {
                let cfg: isthmus_gateway::config::GatewayConfig = config::load_or_exit(&path);
                let gateway = isthmus_gateway::server::Gateway::build(&cfg).await?;
                gateway.run(stop).await;
                Ok(())
            }
            "dns-shim" => {
                let cfg: isthmus_dns_shim::config::DnsShimConfig = config::load_or_exit(&path);
                let server = isthmus_dns_shim::server::Server::build(&cfg).await?;
                server.run(stop).await;
                Ok(())
            }
            other => anyhow::bail!(
                "unknown component {other:?}: expected route-sync, gateway or dns-shim"
            ),
        }
    })
}

/// A running component.
pub struct Proc {
    /// `k8s/ingress-0`.
    pub name: String,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    kind: Kind,
    config: PathBuf,
    netns: Option<String>,
    exe: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `exe component <kind> --config <config>`, inside `netns` when given.
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn spawn(
        exe: &Path,
        name: &str,
        kind: Kind,
        config: &Path,
        netns: Option<String>,
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let mut p = Proc {
            name: name.to_string(),
            log: log.to_path_buf(),
            kind,
            config: config.to_path_buf(),
            netns,
            exe: exe.to_path_buf(),
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    /// Starts it again after [`kill`](Proc::kill).
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.arg("component")
            .arg(self.kind.as_str())
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,h2=warn,quinn=warn,tonic=warn");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.exe.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no drain, no goodbye, as a crashed VM or an evicted pod.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the process to drain and exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Whether it has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

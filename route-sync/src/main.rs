//! `isthmus-route-sync`: the control plane of one cluster.
//!
//! - `isthmus-route-sync --config FILE` runs the node.
//! - `isthmus-route-sync status --config FILE [--server ADDR]` asks a running node for its
//!   peers, revisions, route counts, staleness, conflicts and trust anchors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use isthmus_certs::{MeshTls, PeerPolicy, PeerRule, TlsFiles};
use isthmus_route_sync::config::RouteSyncConfig;
use isthmus_route_sync::node::{Node, NodeSettings, PeerSpec};
use isthmus_route_sync::source::file::FileSource;
use isthmus_route_sync::{ClusterName, proto};
use isthmus_runtime::admin::{AdminServer, Health};
use isthmus_runtime::{config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Isthmus route-sync: shares internal routes between clusters.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The YAML configuration file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text", global = true)]
    log_format: telemetry::LogFormat,
    /// Log filter; defaults to $RUST_LOG, else `info`.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a running node's status.
    Status {
        /// The node's gRPC address; defaults to the config's `listen` (0.0.0.0 as 127.0.0.1).
        #[arg(long)]
        server: Option<SocketAddr>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(path) = args.config.clone() else {
        eprintln!("error: --config FILE is required");
        std::process::exit(config::EXIT_CONFIG);
    };
    let cfg: RouteSyncConfig = config::load_or_exit(&path);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.command {
        Some(Command::Status { server }) => runtime.block_on(status(&cfg, server)),
        None => {
            let filter = args
                .log
                .or_else(|| std::env::var("RUST_LOG").ok())
                .unwrap_or_else(|| "info".into());
            if let Err(e) = telemetry::init(args.log_format, &filter) {
                eprintln!("error: {e}");
                std::process::exit(config::EXIT_CONFIG);
            }
            tracing::info!(config = %path.display(), effective = ?cfg, "starting isthmus-route-sync");
            runtime.block_on(run(cfg))
        }
    }
}

fn load_tls(cfg: &RouteSyncConfig) -> anyhow::Result<(MeshTls, TlsFiles)> {
    let files = TlsFiles {
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
        bundle: cfg.tls.bundle.clone(),
    };
    let tls = MeshTls::load(&files).context("loading the route-sync certificates")?;
    Ok((tls, files))
}

async fn run(cfg: RouteSyncConfig) -> anyhow::Result<()> {
    let (tls, files) = load_tls(&cfg)?;
    let settings = NodeSettings {
        cluster: ClusterName::parse(&cfg.cluster)?,
        trust_domain: cfg.trust_domain.clone(),
        tls: tls.clone(),
        peers: cfg
            .peers
            .iter()
            .map(|p| {
                Ok(PeerSpec {
                    cluster: ClusterName::parse(&p.cluster)?,
                    endpoints: p.endpoints.clone(),
                })
            })
            .collect::<Result<_, isthmus_route_sync::InvalidRoute>>()?,
        state_dir: cfg.state_dir.clone(),
        handshake_timeout: Duration::from_secs(5),
    };
    let node = Node::bind(settings, cfg.listen)
        .await
        .with_context(|| format!("binding route-sync gRPC on {}", cfg.listen))?;
    let mut registry = prometheus_client::registry::Registry::default();
    node.metrics().register(&mut registry);
    let health = Health::new();
    let admin = AdminServer::bind(cfg.admin.listen, Arc::new(registry), health.clone())
        .await
        .with_context(|| format!("binding the admin server on {}", cfg.admin.listen))?;
    let stop = CancellationToken::new();
    shutdown::spawn_signal_handler(stop.clone());
    let _reload = tls.watch(files, cfg.tls.reload_interval.get(), stop.clone());

    // The local source: first load decides freshness; then the file is watched.
    let source = FileSource::new(&cfg.source.file);
    let handle = node.handle();
    match source.apply(&node.local_store()) {
        Ok(_) => handle.local_loaded(),
        Err(e) => tracing::error!("{e}; serving the last known local routes until it loads"),
    }
    let _watch = source.clone().watch(
        node.local_store(),
        cfg.source.poll_interval.get(),
        stop.clone(),
    );
    {
        // Mark fresh once the file loads, and keep health's stale flag current.
        let handle = handle.clone();
        let health = health.clone();
        let stats = source.stats();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if stats.loads_ok.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    handle.local_loaded();
                }
                health.set_stale(handle.is_stale());
            }
        });
    }
    tracing::info!(addr = %node.local_addr()?, "route-sync serving");
    let admin_task = tokio::spawn(admin.serve(stop.clone()));
    health.set_ready();
    node.run(stop.clone()).await;
    health.set_not_ready("stopped");
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

async fn status(cfg: &RouteSyncConfig, server: Option<SocketAddr>) -> anyhow::Result<()> {
    let (tls, _) = load_tls(cfg)?;
    let mut addr = server.unwrap_or(cfg.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip([127, 0, 0, 1].into());
    }
    let policy = PeerPolicy::new(vec![PeerRule::TrustDomain {
        trust_domain: cfg.trust_domain.clone(),
        path_prefix: format!("/cluster/{}", cfg.cluster),
    }]);
    let channel = isthmus_route_sync::grpc::channel(addr, tls.client_config(policy, &[b"h2"]))?;
    let mut client = proto::route_sync_client::RouteSyncClient::new(channel);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.status(proto::StatusRequest {}),
    )
    .await
    .with_context(|| format!("route-sync at {addr} did not answer within 5 s"))?
    .with_context(|| format!("asking route-sync at {addr} for its status"))?
    .into_inner();
    print!(
        "{}",
        isthmus_route_sync::status::render(&reply, &tls.trust_anchors())
    );
    Ok(())
}

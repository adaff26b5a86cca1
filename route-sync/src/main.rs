//! `isthmus-route-sync`: the control plane of one cluster.
//!
//! - `isthmus-route-sync --config FILE` runs the node.
//! - `isthmus-route-sync status --config FILE [--server ADDR]` asks a running node for its
//!   peers, revisions, route counts, staleness, conflicts and trust anchors.
//! - `isthmus-route-sync --check-config --config FILE` loads and validates the file, prints
//!   what would run and exits (0 or 64) without binding anything or calling an API server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc hands freed memory back to the OS: the transient buffers of a 250,000-route
/// snapshot do not stay resident (the route-sync benchmark's nodes use it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use isthmus_route_sync::config::RouteSyncConfig;
use isthmus_route_sync::service;
use isthmus_runtime::config::check::{CHECK_CONFIG_HELP, Summary, check_and_exit};
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
    /// Check the configuration, print what would run, and exit (0 valid, 64 invalid); files it
    /// names (certificates) may be absent here: reported as "not present here".
    #[arg(long = "check-config", long_help = CHECK_CONFIG_HELP)]
    check_config: bool,
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
    if args.check_config {
        check_and_exit("isthmus-route-sync", &path, summarize);
    }
    let cfg: RouteSyncConfig = config::load_or_exit(&path);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.command {
        Some(Command::Status { server }) => runtime.block_on(async {
            print!("{}", service::status(&cfg, server).await?);
            Ok(())
        }),
        None => {
            telemetry::init_or_exit(args.log_format, args.log);
            tracing::info!(config = %path.display(), effective = ?cfg, "starting isthmus-route-sync");
            runtime.block_on(async move {
                let stop = CancellationToken::new();
                shutdown::spawn_signal_handler(stop.clone());
                service::run(cfg, stop).await
            })
        }
    }
}

/// What `--check-config` prints: identity, listeners, the route source, mirror, peers, state.
fn summarize(cfg: &RouteSyncConfig, s: &mut Summary) {
    s.line("cluster", &cfg.cluster)
        .line("trust_domain", &cfg.trust_domain)
        .tls("tls", &cfg.tls)
        .line(
            "listen",
            format_args!("{} (grpc, peers and local consumers)", cfg.listen),
        )
        .line("admin", format_args!("{} (http)", cfg.admin.listen));
    s.section("source", |s| {
        if let Some(file) = &cfg.source.file {
            s.file("file", file)
                .line("poll_interval", cfg.source.poll_interval);
        }
        if let Some(k) = &cfg.source.kubernetes {
            s.section("kubernetes", |s| {
                if k.namespaces.is_empty() {
                    s.line("namespaces", "all");
                } else {
                    s.line("namespaces", k.namespaces.join(", "));
                }
                match &k.kubeconfig {
                    Some(path) => s.file("kubeconfig", path),
                    None => s.line(
                        "credentials",
                        "in-cluster service account, else $KUBECONFIG or ~/.kube/config",
                    ),
                };
                if let Some(context) = &k.context {
                    s.line("context", context);
                }
            });
        }
    });
    match &cfg.mirror {
        Some(m) => {
            s.section("mirror", |s| {
                let selector: Vec<String> = m
                    .egress_selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let identity = m
                    .lease
                    .identity
                    .as_deref()
                    .unwrap_or("$POD_NAME, else host name");
                s.line("namespace", &m.namespace)
                    .line("egress_selector", selector.join(","))
                    .line("egress_ports", &m.egress_ports)
                    .line(
                        "lease",
                        format_args!(
                            "{} ({}; identity {identity})",
                            m.lease.name, m.lease.duration
                        ),
                    );
            });
        }
        None => {
            s.line("mirror", "none");
        }
    }
    s.section("peers", |s| {
        if cfg.peers.is_empty() {
            s.line("(none)", "this cluster imports nothing");
        }
        for peer in &cfg.peers {
            let endpoints: Vec<String> = peer.endpoints.iter().map(|e| e.to_string()).collect();
            s.line(&peer.cluster, endpoints.join(", "));
        }
    });
    match &cfg.vips {
        Some(v) => s.line("vips", format_args!("{} (hold {})", v.range, v.hold)),
        None => s.line("vips", "none"),
    };
    match &cfg.state_dir {
        Some(dir) => s.file("state_dir", dir),
        None => s.line("state_dir", "none (nothing kept across restarts)"),
    };
}

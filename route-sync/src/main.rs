//! `isthmus-route-sync`: the control plane of one cluster.
//!
//! - `isthmus-route-sync --config FILE` runs the node.
//! - `isthmus-route-sync status --config FILE [--server ADDR]` asks a running node for its
//!   peers, revisions, route counts, staleness, conflicts and trust anchors.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc hands freed memory back to the OS: the transient buffers of a 250,000-route
/// snapshot do not stay resident (the route-sync benchmark's nodes use it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use isthmus_route_sync::config::RouteSyncConfig;
use isthmus_route_sync::service;
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

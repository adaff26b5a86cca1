//! `isthmus-gateway --config FILE`: the egress and/or ingress gateway.

use std::path::PathBuf;

use clap::Parser;
use isthmus_gateway::config::GatewayConfig;
use isthmus_gateway::server::Gateway;
use isthmus_runtime::{config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// The Isthmus gateway: tunnels app connections between clusters over mutual TLS.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The YAML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: telemetry::LogFormat,
    /// Log filter (tracing env-filter syntax); defaults to $RUST_LOG, else `info`.
    #[arg(long)]
    log: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init_or_exit(args.log_format, args.log.clone());
    let cfg: GatewayConfig = config::load_or_exit(&args.config);
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    tracing::info!(config = %args.config.display(), effective = ?cfg, "starting isthmus-gateway");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let gateway = Gateway::build(&cfg).await?;
            let stop = CancellationToken::new();
            shutdown::spawn_signal_handler(stop.clone());
            gateway.run(stop).await;
            Ok(())
        })
}

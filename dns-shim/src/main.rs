//! `isthmus-dns-shim --config FILE`: the DNS shim.

use std::path::PathBuf;

use clap::Parser;
use isthmus_dns_shim::config::DnsShimConfig;
use isthmus_dns_shim::server::Server;
use isthmus_runtime::{config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// mimalloc hands freed memory back to the OS. Loading a route file parses it into a
/// temporary YAML tree (about 100 MB for 50,000 routes) that glibc's allocator would keep
/// resident after it is freed; with mimalloc the RSS falls back to the live data.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Isthmus DNS shim: answers internal names homed in another cluster with the local
/// egress address and forwards the rest to the platform's resolver.
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
    /// Worker threads of the runtime; 0 means one per CPU.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init_or_exit(args.log_format, args.log.clone());
    let cfg: DnsShimConfig = config::load_or_exit(&args.config);
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    tracing::info!(config = %args.config.display(), effective = ?cfg, "starting isthmus-dns-shim");
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        runtime.worker_threads(args.threads);
    }
    runtime.enable_all().build()?.block_on(async move {
        let stop = CancellationToken::new();
        shutdown::spawn_signal_handler(stop.clone());
        let server = Server::build(&cfg).await?;
        server.run(stop).await;
        Ok(())
    })
}

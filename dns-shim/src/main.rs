//! `isthmus-dns-shim --config FILE`: the DNS shim.
//!
//! `--check-config` (alias `--check`) loads and validates the file, prints what would run and
//! exits (0 or 64) without binding anything.

use std::path::PathBuf;

use clap::Parser;
use isthmus_dns_shim::config::{DnsShimConfig, UpstreamConfig};
use isthmus_dns_shim::server::Server;
use isthmus_runtime::config::check::{CHECK_CONFIG_HELP, Summary, check_and_exit};
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
    /// Check the configuration, print what would run, and exit (0 valid, 64 invalid); files it
    /// names (certificates) may be absent here: reported as "not present here".
    #[arg(long = "check-config", visible_alias = "check", long_help = CHECK_CONFIG_HELP)]
    check_config: bool,
    /// Worker threads of the runtime; 0 means one per CPU.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.check_config {
        check_and_exit("isthmus-dns-shim", &args.config, summarize);
    }
    telemetry::init_or_exit(args.log_format, args.log.clone());
    let cfg: DnsShimConfig = config::load_or_exit(&args.config);
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

/// What `--check-config` prints: listeners, domains, answers, the upstream, the route source.
fn summarize(cfg: &DnsShimConfig, s: &mut Summary) {
    let answer = if cfg.answer.vip {
        "each route's vip".to_string()
    } else {
        let egress: Vec<String> = cfg.answer.egress.iter().map(|a| a.to_string()).collect();
        format!("egress {}", egress.join(", "))
    };
    s.line("cluster", &cfg.cluster)
        .line("listen", format_args!("{} udp and tcp (dns)", cfg.listen))
        .line("admin", format_args!("{} (http)", cfg.admin.listen))
        .line("domains", cfg.domains.join(", "))
        .line("answer", answer)
        .line("ttl", cfg.ttl);
    s.section("upstream", |s| {
        s.line("kind", cfg.upstream.kind());
        match &cfg.upstream {
            UpstreamConfig::Dns { servers } => {
                let servers: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
                s.line("servers", servers.join(", "));
            }
            UpstreamConfig::Sdc {
                url, ca, cert, key, ..
            } => {
                s.line("url", url)
                    .file("ca", ca)
                    .file("cert", cert)
                    .file("key", key);
            }
            UpstreamConfig::BoshDnsHttp { url } => {
                s.line("url", url);
            }
        }
        s.line("timeout", cfg.upstream_timeout);
    });
    s.section("routes", |s| {
        if let Some(file) = &cfg.routes.file {
            s.file("file", file)
                .line("poll_interval", cfg.routes.poll_interval);
        }
        if let Some(rs) = &cfg.routes.route_sync {
            let endpoints: Vec<String> = rs.endpoints.iter().map(|e| e.to_string()).collect();
            s.line("route_sync", endpoints.join(", "))
                .line("trust_domain", &rs.trust_domain)
                .tls("tls", &rs.tls);
            if let Some(cache) = &rs.cache {
                s.line("cache", cache.display());
            }
        }
    });
    s.line("drain_timeout", cfg.drain_timeout);
}

//! `isthmus-gateway --config FILE`: the egress and/or ingress gateway.
//!
//! `--check-config` (alias `--check`) loads and validates the file, prints what would run and
//! exits (0 or 64) without binding anything.

use std::path::PathBuf;

use clap::Parser;
use isthmus_gateway::config::{GatewayConfig, Transport};
use isthmus_gateway::server::Gateway;
use isthmus_runtime::config::check::{CHECK_CONFIG_HELP, Summary, check_and_exit};
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
    #[arg(long = "check-config", visible_alias = "check", long_help = CHECK_CONFIG_HELP)]
    /// Check the configuration, print what would run, and exit (0 valid, 64 invalid); files it
    /// names (certificates) may be absent here: reported as "not present here".
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.check_config {
        check_and_exit("isthmus-gateway", &args.config, summarize);
    }
    telemetry::init_or_exit(args.log_format, args.log.clone());
    let cfg: GatewayConfig = config::load_or_exit(&args.config);
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

/// What `--check-config` prints: identity, route source, roles and their listeners, peers.
fn summarize(cfg: &GatewayConfig, s: &mut Summary) {
    let roles: Vec<&str> = [
        cfg.ingress.as_ref().map(|_| "ingress"),
        cfg.egress.as_ref().map(|_| "egress"),
    ]
    .into_iter()
    .flatten()
    .collect();
    s.line("cluster", &cfg.cluster)
        .line("trust_domain", &cfg.trust_domain)
        .line("roles", roles.join(", "))
        .tls("tls", &cfg.tls);
    s.section("routes", |s| {
        if let Some(file) = &cfg.routes.file {
            s.file("file", file)
                .line("poll_interval", cfg.routes.poll_interval);
        }
        if let Some(rs) = &cfg.routes.route_sync {
            s.line("route_sync", join(&rs.endpoints));
            if let Some(cache) = &rs.cache {
                s.line("cache", cache.display());
            }
        }
    });
    s.line("admin", format_args!("{} (http)", cfg.admin.listen))
        .line("drain_timeout", cfg.drain_timeout);
    if let Some(ingress) = &cfg.ingress {
        s.section("ingress", |s| {
            let udp = if ingress.quic { " and udp (quic)" } else { "" };
            s.line("listen", format_args!("{} tcp (h2){udp}", ingress.listen))
                .line(
                    "allowed_callers",
                    join(ingress.allowed_callers.iter().map(|c| &c.0)),
                )
                .line("max_connections", ingress.max_connections);
        });
    }
    if let Some(egress) = &cfg.egress {
        s.section("egress", |s| {
            match egress.listen_address {
                Some(addr) => s.line("listen_address", format_args!("{addr}, every route port")),
                None => s.line("listen_address", "none"),
            };
            s.line("vip_range", egress.vip_range.as_deref().unwrap_or("none"))
                .line("bind_vips", egress.bind_vips);
            for d in &egress.dedicated {
                s.line("dedicated", format_args!("{} -> {}", d.listen, d.route));
            }
            s.section("peers", |s| {
                for peer in &egress.peers {
                    let transport = match (peer.transport, peer.fallback_to_tcp) {
                        (Transport::Tcp, _) => "tcp",
                        (Transport::Quic, true) => "quic, tcp fallback",
                        (Transport::Quic, false) => "quic",
                    };
                    s.line(
                        &peer.cluster,
                        format_args!("{} ({transport})", join(&peer.endpoints)),
                    );
                }
            });
        });
    }
}

fn join<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

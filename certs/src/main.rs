//! `isthmus-certs`: create a mesh CA, issue SPIFFE leaf certificates, inspect certificates and
//! build multi-root trust bundles.
//!
//! A thin shell over the `isthmus_certs` library; errors are reported as `error: …` with their
//! cause chain and exit status 1 (clap's usage errors exit with 2). Private keys are written
//! with mode 0600 and never printed.

mod cli;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use isthmus_certs::TrustBundle;
use isthmus_certs::ca::{
    CA_CERT_FILE, CA_KEY_FILE, LEAF_CERT_FILE, LEAF_KEY_FILE, LeafSpec, MeshCa,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Mesh CA and SPIFFE certificates for Isthmus.
#[derive(Debug, Parser)]
#[command(name = "isthmus-certs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new mesh CA: writes OUT/ca.pem and OUT/ca-key.pem (mode 0600).
    Init {
        /// Trust domain of the mesh, e.g. mesh.example.org (lowercase).
        #[arg(long)]
        trust_domain: String,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing ca-key.pem (every certificate it issued stops being trusted
        /// once peers get the new ca.pem).
        #[arg(long)]
        force: bool,
    },
    /// Issue a leaf for spiffe://<trust-domain>/cluster/<CLUSTER>/<COMPONENT>: writes
    /// OUT/cert.pem, OUT/key.pem (mode 0600) and OUT/ca.pem (the CA as trust bundle).
    Issue {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        /// Cluster name, e.g. k8s or diego.
        #[arg(long)]
        cluster: String,
        /// Component name, e.g. gateway or route-sync.
        #[arg(long)]
        component: String,
        /// Extra DNS SAN (repeatable).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// Extra IP SAN (repeatable).
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Lifetime: a number and a unit s, m, h or d (90s, 30m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = cli::ttl::parse)]
        ttl: Duration,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show every certificate in a PEM file; exits 1 if any is expired or not yet valid.
    Inspect {
        /// PEM file with one or more certificates.
        file: PathBuf,
    },
    /// Build one trust bundle from several CA certificates (duplicates dropped).
    Bundle {
        /// PEM files with CA certificates.
        #[arg(required = true, value_name = "PEM")]
        inputs: Vec<PathBuf>,
        /// Bundle file to write (atomically).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Init {
            trust_domain,
            out,
            force,
        } => init(&trust_domain, out, force),
        Command::Issue {
            ca,
            cluster,
            component,
            dns,
            ips,
            ttl,
            out,
        } => {
            let mut spec = LeafSpec::new(cluster, component, ttl);
            spec.dns = dns;
            spec.ips = ips;
            issue(ca, &spec, out)
        }
        Command::Inspect { file } => inspect(file),
        Command::Bundle { inputs, out } => bundle(&inputs, out),
    }
}

fn init(trust_domain: &str, out: PathBuf, force: bool) -> Result<ExitCode> {
    let key_path = out.join(CA_KEY_FILE);
    if key_path.exists() && !force {
        bail!(
            "{} already exists; refusing to overwrite a CA key (pass --force to replace it; \
             peers will then refuse every certificate the old CA issued)",
            key_path.display()
        );
    }
    let ca = MeshCa::generate(trust_domain).context("cannot create the mesh CA")?;
    ca.write(&out)?;
    println!("created the mesh CA for trust domain {trust_domain}");
    println!("  certificate: {}", out.join(CA_CERT_FILE).display());
    println!("  private key: {} (mode 0600)", key_path.display());
    Ok(ExitCode::SUCCESS)
}

fn issue(ca_dir: PathBuf, spec: &LeafSpec, out: PathBuf) -> Result<ExitCode> {
    let ca = MeshCa::load(&ca_dir)
        .with_context(|| format!("cannot load the mesh CA from {}", ca_dir.display()))?;
    let leaf = ca.issue(spec).context("cannot issue the certificate")?;
    leaf.write(&out, &ca.cert_pem())?;
    println!("issued {}", leaf.id);
    println!("  serial:      {}", leaf.serial);
    println!("  not after:   {}", rfc3339(spec.not_after));
    println!("  certificate: {}", out.join(LEAF_CERT_FILE).display());
    println!(
        "  private key: {} (mode 0600)",
        out.join(LEAF_KEY_FILE).display()
    );
    println!("  trust bundle: {}", out.join(CA_CERT_FILE).display());
    Ok(ExitCode::SUCCESS)
}

fn inspect(file: PathBuf) -> Result<ExitCode> {
    let pem = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let report =
        cli::inspect::report(&pem, &file.display().to_string(), OffsetDateTime::now_utc())?;
    print!("{}", report.text);
    if report.problems.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    for problem in &report.problems {
        println!("NOT VALID: {problem}");
    }
    Ok(ExitCode::FAILURE)
}

fn bundle(inputs: &[PathBuf], out: PathBuf) -> Result<ExitCode> {
    let mut roots = Vec::new();
    for input in inputs {
        let part = TrustBundle::load(input)?;
        roots.extend_from_slice(part.roots());
    }
    let total = roots.len();
    let bundle = TrustBundle::from_roots(roots, "the combined bundle")?;
    bundle.write(&out)?;
    println!(
        "wrote {} root(s) to {} ({} duplicate(s) dropped)",
        bundle.roots().len(),
        out.display(),
        total - bundle.roots().len()
    );
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(t: OffsetDateTime) -> String {
    // Certificates hold whole seconds; so does what we print.
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

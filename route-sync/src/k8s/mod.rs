//! The Kubernetes side of route-sync: one API client shared by the route source, the
//! mirror Services and the Lease, built from the `source.kubernetes` section.

pub mod lease;
pub mod mirror;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::KubernetesConfig;

/// A client as the configuration asks: the kubeconfig named (and its context), else what
/// kube-rs infers (in-cluster service account, then `$KUBECONFIG` or `~/.kube/config`).
///
/// # Errors
/// The kubeconfig cannot be read or names no usable cluster, or nothing can be inferred.
pub async fn client(cfg: &KubernetesConfig) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: cfg.context.clone(),
        ..Default::default()
    };
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("source.kubernetes.kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("source.kubernetes.kubeconfig {}", path.display()))?
        }
        None if cfg.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("source.kubernetes.context: loading the default kubeconfig")?,
        None => kube::Config::infer()
            .await
            .context("source.kubernetes: no in-cluster service account and no kubeconfig")?,
    };
    kube::Client::try_from(config).context("source.kubernetes: building the API client")
}

/// Whether this replica may write to the API (mirror Services, ServiceExport status): it
/// holds the Lease, or no Lease is configured (a single replica writes).
#[derive(Clone, Debug)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Always the writer: no Lease configured.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        // The sender is dropped: the value stays `true` and `changed()` returns an error,
        // which [`Leadership::wait_until_leader`] treats as "no change will come".
        drop(tx);
        Self(rx)
    }

    /// Follows a value that a Lease elector keeps current.
    pub fn from_receiver(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    /// Whether this replica writes now.
    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// The underlying receiver, for `select!` on changes.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}

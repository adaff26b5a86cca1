//! The HTTP layer: TLS accept loop, bearer-token authentication, path routing, and the
//! verbs, over the [`Store`](super::store::Store).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::resources::{self, Gvk, Kind};
use super::selector::{FieldSelector, LabelSelector};
use super::status::{ApiError, Reason};
use super::store::{EventType, ListParams, Part, PatchType, present};
use super::{RequestRecord, Shared, now_rfc3339};

/// The real API server's request body limit (3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

/// Accepts connections until `cancel`; every connection is tracked so `stop` can wait for
/// all of them to be cut.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: keep serving the connections we have.
                eprintln!("kubeapi fixture: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let conn = async {
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                    .ok()?
                    .ok()?;
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(shared, req).await) }
                });
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                    .ok()
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code(), &e.status())
}

/// Percent-decodes a query component (`+` is a space, as Go's url.ParseQuery has it).
fn decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("malformed percent-encoding in query {s:?}"))
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request(format!("query {s:?} is not UTF-8 once decoded")))
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs = Vec::new();
        for part in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((decode(k)?, decode(v)?));
        }
        Ok(Query(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("" | "0" | "false" | "False") => Ok(false),
            Some("1" | "true" | "True") => Ok(true),
            Some(v) => Err(ApiError::bad_request(format!(
                "query parameter {key}={v:?}: expected true or false"
            ))),
        }
    }
}

/// A request for objects of one resource.
struct Target {
    gvk: Gvk,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

enum Route {
    Doc(Value),
    Objects(Target),
}

fn not_found_path() -> ApiError {
    ApiError::new(
        Reason::NotFound,
        "the server could not find the requested resource",
    )
}

fn route(shared: &Shared, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mcs = shared.mcs_versions();
    let doc = |v: Option<Value>| v.map(Route::Doc).ok_or_else(not_found_path);
    match segs.as_slice() {
        ["version"] => Ok(Route::Doc(resources::version_doc())),
        ["api"] => Ok(Route::Doc(resources::core_versions(&shared.address))),
        ["api", "v1"] => doc(resources::resource_list("", "v1", &mcs)),
        ["apis"] => Ok(Route::Doc(resources::group_list(&mcs))),
        ["apis", g] => doc(resources::group(g, &mcs)),
        ["apis", g, v] => doc(resources::resource_list(g, v, &mcs)),
        ["api", v, rest @ ..] => target("", v, rest, &mcs).map(Route::Objects),
        ["apis", g, v, rest @ ..] => target(g, v, rest, &mcs).map(Route::Objects),
        _ => Err(not_found_path()),
    }
}

fn target(
    group: &str,
    version: &str,
    rest: &[&str],
    mcs: &[resources::McsVersion],
) -> Result<Target, ApiError> {
    let namespaced_kind =
        |plural: &str| Kind::by_plural(group, plural).filter(|k| k.meta().namespaced);
    let (ns, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced_kind(plural).is_some() => (
            Some(*ns),
            *plural,
            tail.first().copied(),
            tail.get(1).copied(),
        ),
        [plural, tail @ ..] => (None, *plural, tail.first().copied(), tail.get(1).copied()),
        [] => return Err(not_found_path()),
    };
    if rest.len() > if ns.is_some() { 5 } else { 3 } {
        return Err(not_found_path());
    }
    let kind = Kind::by_plural(group, plural).ok_or_else(not_found_path)?;
    let gvk = resources::resolve(kind, version, mcs).ok_or_else(not_found_path)?;
    // A namespaced resource by name needs its namespace in the path.
    if kind.meta().namespaced && ns.is_none() && name.is_some() {
        return Err(not_found_path());
    }
    let status = match sub {
        None => false,
        Some("status") if kind.meta().status_subresource => true,
        Some(_) => return Err(not_found_path()),
    };
    Ok(Target {
        gvk,
        ns: ns.map(str::to_owned),
        name: name.map(str::to_owned),
        status,
    })
}

fn user_of(shared: &Shared, req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    shared.user_for_token(token)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let Some(user) = user_of(&shared, &req) else {
        return error_response(&ApiError::new(Reason::Unauthorized, "Unauthorized"));
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let verb = match method {
        Method::POST => Some("create"),
        Method::PUT => Some("update"),
        Method::PATCH => Some("patch"),
        Method::DELETE => Some("delete"),
        _ => None,
    };
    let response = match dispatch(&shared, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    if let Some(verb) = verb {
        shared.record(RequestRecord {
            verb: verb.to_owned(),
            path,
            user,
            code: response.status().as_u16(),
        });
    }
    response
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::new(
                Reason::RequestEntityTooLarge,
                format!("the request body is larger than the server's limit of {MAX_BODY} bytes"),
            ))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

fn parse_json(body: &[u8], what: &str) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the {what} body is not valid JSON ({e}); this server accepts JSON bodies only"
        ))
    })
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(req.uri().query())?;
    if query.get("dryRun").is_some() {
        return Err(ApiError::bad_request(
            "dryRun is not supported by this fixture API server",
        ));
    }
    let path = req.uri().path().to_owned();
    if path.starts_with("/openapi/") {
        return Err(not_found_path());
    }
    let t = match route(shared, &path)? {
        Route::Doc(doc) if req.method() == Method::GET => return Ok(json_response(200, &doc)),
        Route::Doc(_) => {
            return Err(ApiError::new(
                Reason::MethodNotAllowed,
                format!("{} is not allowed on {path}", req.method()),
            ));
        }
        Route::Objects(t) => t,
    };
    let ns = t.ns.clone().unwrap_or_default();
    let kind = t.gvk.kind;
    let part = if t.status { Part::Status } else { Part::Main };
    let now = now_rfc3339();
    let method = req.method().clone();
    let out = |shared: &Shared, r: Result<Value, ApiError>, code: u16| {
        let obj = r?;
        shared.changed();
        Ok::<_, ApiError>(json_response(code, &present(&obj, t.gvk)))
    };
    match (&method, &t.name) {
        (&Method::GET, None) if query.flag("watch")? => watch(shared.clone(), &t, &query),
        (&Method::GET, Some(name)) if query.flag("watch")? => {
            let t = Target {
                gvk: t.gvk,
                ns: t.ns.clone(),
                name: None,
                status: false,
            };
            let mut query = query;
            query.0.retain(|(k, _)| k != "fieldSelector");
            query
                .0
                .push(("fieldSelector".into(), format!("metadata.name={name}")));
            watch(shared.clone(), &t, &query)
        }
        (&Method::GET, None) => list(shared, &t, &query),
        (&Method::GET, Some(name)) => {
            let store = shared.lock();
            match store.get(kind, &ns, name) {
                Some(o) => Ok(json_response(200, &present(o, t.gvk))),
                None => Err(ApiError::not_found(
                    kind.meta().plural,
                    kind.meta().group,
                    name,
                )),
            }
        }
        (&Method::POST, None) if !t.status => {
            let body = parse_json(&read_body(req).await?, kind.meta().kind)?;
            let r = shared.lock().create(kind, &ns, body, &now);
            out(shared, r, 201)
        }
        (&Method::PUT, Some(name)) => {
            let body = parse_json(&read_body(req).await?, kind.meta().kind)?;
            let r = shared.lock().replace(kind, &ns, name, body, part, true);
            out(shared, r, 200)
        }
        (&Method::PATCH, Some(name)) => {
            let ct = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            let ty = match ct.as_str() {
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    if query.get("fieldManager").is_none_or(str::is_empty) {
                        return Err(ApiError::new(
                            Reason::Invalid,
                            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                        ));
                    }
                    PatchType::Apply
                }
                other => {
                    return Err(ApiError::new(
                        Reason::UnsupportedMediaType,
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {other:?})"
                        ),
                    ));
                }
            };
            let body = read_body(req).await?;
            let patch = parse_json(&body, "patch")?;
            let existed = shared.lock().get(kind, &ns, name).is_some();
            let r = shared
                .lock()
                .patch(kind, &ns, name, patch, (ty, part), &now);
            out(shared, r, if existed { 200 } else { 201 })
        }
        (&Method::DELETE, Some(name)) if !t.status => {
            let body = read_body(req).await?;
            let options = if body.is_empty() {
                Value::Null
            } else {
                parse_json(&body, "DeleteOptions")?
            };
            let preconditions = options.get("preconditions").cloned().unwrap_or(Value::Null);
            let r = shared.lock().delete(kind, &ns, name, &preconditions);
            out(shared, r, 200)
        }
        _ => Err(ApiError::new(
            Reason::MethodNotAllowed,
            format!("{method} is not supported on {path}"),
        )),
    }
}

fn list_params(query: &Query) -> Result<ListParams, ApiError> {
    let limit = match query.get("limit") {
        None | Some("") => 0,
        Some(l) => l.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("limit={l:?}: expected a non-negative integer"))
        })?,
    };
    Ok(ListParams {
        labels: LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))?,
        limit: usize::try_from(limit.max(0)).unwrap_or(0),
        continue_token: query
            .get("continue")
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        resource_version: query.get("resourceVersion").map(str::to_owned),
        resource_version_match: query
            .get("resourceVersionMatch")
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
    })
}

fn list(shared: &Shared, t: &Target, query: &Query) -> Result<Response<Body>, ApiError> {
    let params = list_params(query)?;
    let result = shared.lock().list(t.gvk.kind, t.ns.as_deref(), &params)?;
    let items: Vec<Value> = result.items.iter().map(|o| present(o, t.gvk)).collect();
    let mut metadata = json!({"resourceVersion": result.resource_version.to_string()});
    if let Some(c) = result.continue_token {
        metadata["continue"] = Value::String(c);
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", t.gvk.kind.meta().kind),
            "apiVersion": t.gvk.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    ))
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": ty, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn bookmark(gvk: Gvk, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": gvk.kind.meta().kind, "apiVersion": gvk.api_version(), "metadata": metadata}),
    )
}

/// Starts a watch: checks the parameters, then streams events from a task that ends when
/// the client goes, the timeout passes, or the history no longer covers it (ERROR 410).
fn watch(shared: Arc<Shared>, t: &Target, query: &Query) -> Result<Response<Body>, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))?;
    let bookmarks = query.flag("allowWatchBookmarks")?;
    let initial_events = query.flag("sendInitialEvents")?;
    let rv_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    if initial_events {
        if rv_match != Some("NotOlderThan") {
            return Err(ApiError::new(
                Reason::Invalid,
                "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !bookmarks {
            return Err(ApiError::new(
                Reason::Invalid,
                "ListOptions.meta.k8s.io \"\" is invalid: allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
    } else if rv_match.is_some() {
        return Err(ApiError::new(
            Reason::Invalid,
            "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let timeout = match query.get("timeoutSeconds") {
        None | Some("") => None,
        Some(s) => Some(Duration::from_secs(s.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "timeoutSeconds={s:?}: expected a non-negative integer"
            ))
        })?)),
    };
    let rv = match query.get("resourceVersion").filter(|r| !r.is_empty()) {
        None | Some("0") => None,
        Some(r) => Some(r.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion={r:?}: expected a decimal resourceVersion this server returned"
            ))
        })?),
    };
    let gvk = t.gvk;
    let kind = gvk.kind;
    let ns = t.ns.clone();
    let in_scope = move |key: &(Kind, String, String)| {
        key.0 == kind && ns.as_deref().is_none_or(|n| key.1 == n)
    };
    let matches = move |o: &Value| labels.matches(o) && fields.matches(o);

    // The start, read under one lock so no change slips between the initial state and the
    // first event.
    let mut first: Vec<Bytes> = Vec::new();
    let (mut cursor, epoch, mut expired) = {
        let store = shared.lock();
        let epoch = store.compactions();
        match rv {
            Some(n) if !initial_events => match store.events_after(n) {
                Ok(_) => (n, epoch, None),
                Err(e) => (n, epoch, Some(e)),
            },
            _ => {
                let params = ListParams::default();
                let state = store.list(kind, t.ns.as_deref(), &params)?;
                for o in state.items.iter().filter(|o| matches(o)) {
                    first.push(line("ADDED", &present(o, gvk)));
                }
                let now = store.resource_version();
                if initial_events {
                    first.push(bookmark(gvk, now, true));
                }
                (now, epoch, None)
            }
        }
    };

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut changes = shared.subscribe();
    let interval = shared.bookmark_interval;
    tokio::spawn(async move {
        let deadline = timeout.map(|d| tokio::time::Instant::now() + d);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut want_bookmark = false;
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        loop {
            let mut batch = Vec::new();
            if expired.is_none() {
                let store = shared.lock();
                if store.compactions() != epoch {
                    expired = Some(ApiError::expired(format!(
                        "too old resource version: {cursor} ({})",
                        store.resource_version()
                    )));
                } else {
                    match store.events_after(cursor) {
                        Err(e) => expired = Some(e),
                        Ok(events) => {
                            for e in events.filter(|e| in_scope(&e.key)) {
                                let was = e.prev.as_ref().is_some_and(&matches);
                                let is = matches(&e.object);
                                let ty = match (e.kind, was, is) {
                                    (EventType::Deleted, true, _) => "DELETED",
                                    (EventType::Deleted, false, _) => continue,
                                    (_, true, true) => "MODIFIED",
                                    (_, false, true) => "ADDED",
                                    (_, true, false) => "DELETED",
                                    (_, false, false) => continue,
                                };
                                batch.push(line(ty, &present(&e.object, gvk)));
                            }
                            cursor = cursor.max(store.resource_version());
                        }
                    }
                }
            }
            if let Some(e) = &expired {
                let _ = tx.send(line("ERROR", &e.status())).await;
                return;
            }
            if want_bookmark {
                batch.push(bookmark(gvk, cursor, false));
                want_bookmark = false;
            }
            for b in batch {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = ticker.tick(), if bookmarks => want_bookmark = true,
                () = sleep => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .map_err(|e| ApiError::bad_request(format!("building the watch response: {e}")))
}

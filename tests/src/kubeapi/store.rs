//! The object store: what etcd plus the generic registry give the real API server. One
//! global resourceVersion counter, a bounded event history (the watch cache), consistent
//! snapshots for paged lists, and the per-kind admission the fixture implements. No sockets
//! and no clock: the caller passes the time.

use std::collections::{BTreeMap, VecDeque};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

use super::resources::{Gvk, Kind};
use super::selector::{FieldSelector, LabelSelector};
use super::services::Allocator;
use super::status::{ApiError, Reason, qualified};

/// Storage key: kind, namespace ("" for cluster-scoped), name. BTreeMap order is the list
/// order, as etcd's key order is the real server's.
pub type Key = (Kind, String, String);

/// A watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted (the object is the last state, with the deletion's resourceVersion).
    Deleted,
}

/// One change in the history.
#[derive(Clone, Debug)]
pub struct Event {
    /// The resourceVersion of this change.
    pub rv: u64,
    /// Which object.
    pub key: Key,
    /// What happened.
    pub kind: EventType,
    /// The object before (None on create): kept so a list can be answered at an older
    /// resourceVersion and a watch can tell when an object starts or stops matching.
    pub prev: Option<Value>,
    /// The object after (for Deleted: the final state).
    pub object: Value,
}

/// How a write treats `status` when the kind has a status subresource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The main resource: `status` in the body is ignored.
    Main,
    /// `/status`: only `status` changes.
    Status,
}

/// The patch types the fixture accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`, applied as a merge patch (`$` directives
    /// dropped; lists replaced, not merged by key).
    Strategic,
    /// `application/apply-patch+yaml` with a JSON body: create, or merge into the existing
    /// object (no field ownership).
    Apply,
}

/// List parameters.
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
    /// `limit` (0 = all).
    pub limit: usize,
    /// `continue`.
    pub continue_token: Option<String>,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
}

/// A list answer.
#[derive(Clone, Debug)]
pub struct ListResult {
    /// The items (without apiVersion/kind; the caller presents them).
    pub items: Vec<Value>,
    /// The resourceVersion the list is consistent at.
    pub resource_version: u64,
    /// The continue token for the next page, if more remain.
    pub continue_token: Option<String>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    /// Events with rv > floor are retained: a watch or continue from `floor` or later can be
    /// answered; older ones get 410 Expired.
    floor: u64,
    history_limit: usize,
    compactions: u64,
    services: Allocator,
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// The object without apiVersion/kind, metadata, and status: what a generation counts.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        for k in ["apiVersion", "kind", "metadata", "status"] {
            m.remove(k);
        }
    }
    o
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Drops strategic-merge-patch directives (`$patch`, `$setElementOrder/...`,
/// `$retainKeys`, `$deleteFromPrimitiveList/...`) so the rest applies as a merge patch.
pub fn strip_directives(patch: &mut Value) {
    match patch {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Validates a name as the real server does per kind.
fn check_name(kind: Kind, name: &str) -> Result<(), String> {
    match kind {
        Kind::Service => {
            if is_dns_label(name, 63) && name.as_bytes()[0].is_ascii_lowercase() {
                Ok(())
            } else {
                Err("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character".into())
            }
        }
        Kind::Namespace => {
            if is_dns_label(name, 63) {
                Ok(())
            } else {
                Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character".into())
            }
        }
        _ => {
            if name.len() <= 253 && name.split('.').all(|l| is_dns_label(l, 63)) {
                Ok(())
            } else {
                Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character".into())
            }
        }
    }
}

fn random_uid() -> String {
    let n: u128 = rand::random();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| CHARS[rand::random_range(0..CHARS.len())] as char)
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

impl Store {
    /// An empty store with namespaces `namespaces` created, allocating ClusterIPs from
    /// `service_cidr` and keeping at most `history_limit` events.
    pub fn new(
        namespaces: &[String],
        services: Allocator,
        history_limit: usize,
        now: &str,
    ) -> Store {
        let mut store = Store {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 0,
            history_limit: history_limit.max(1),
            compactions: 0,
            services,
        };
        for ns in namespaces {
            // A duplicate in the options is harmless: the first one wins.
            let _ = store.create(Kind::Namespace, "", json!({"metadata": {"name": ns}}), now);
        }
        store
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// How many times the history was compacted (open watches end when this changes).
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    /// Drops the event history: every resume from before now is Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
        self.compactions += 1;
    }

    fn record(&mut self, key: Key, kind: EventType, prev: Option<Value>, object: Value) {
        self.history.push_back(Event {
            rv: self.rv,
            key,
            kind,
            prev,
            object,
        });
        while self.history.len() > self.history_limit {
            if let Some(e) = self.history.pop_front() {
                self.floor = e.rv;
            }
        }
    }

    fn too_old(&self, rv: u64) -> ApiError {
        ApiError::expired(format!("too old resource version: {rv} ({})", self.floor))
    }

    /// Events after `cursor`, or 410 Expired when some of them are no longer retained.
    ///
    /// # Errors
    /// 410 Expired.
    pub fn events_after(&self, cursor: u64) -> Result<impl Iterator<Item = &Event>, ApiError> {
        if cursor < self.floor {
            return Err(self.too_old(cursor));
        }
        let start = self.history.partition_point(|e| e.rv <= cursor);
        Ok(self.history.range(start..))
    }

    /// One object.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(kind, ns.to_owned(), name.to_owned()))
    }

    fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError::not_found(kind.meta().plural, kind.meta().group, name)
    }

    fn check_namespace(&self, kind: Kind, ns: &str) -> Result<(), ApiError> {
        if kind.meta().namespaced && self.get(Kind::Namespace, "", ns).is_none() {
            return Err(ApiError::not_found("namespaces", "", ns));
        }
        Ok(())
    }

    /// Checks the body's metadata against the request path and returns the name.
    fn check_meta(
        kind: Kind,
        ns: &str,
        obj: &Value,
        url_name: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(meta) = obj.get("metadata").filter(|m| m.is_object()) else {
            return Err(ApiError::bad_request(format!(
                "the {} body has no metadata object: expected {{\"metadata\": {{\"name\": ...}}}}",
                kind.meta().kind
            )));
        };
        let body_kind = obj.get("kind").and_then(Value::as_str);
        if let Some(k) = body_kind
            && k != kind.meta().kind
        {
            return Err(ApiError::bad_request(format!(
                "the body is a {k:?}, but the request path is for {}",
                kind.meta().plural
            )));
        }
        if let Some(body_ns) = meta.get("namespace").and_then(Value::as_str)
            && kind.meta().namespaced
            && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if let (Some(url), Some(body)) = (url_name, meta.get("name").and_then(Value::as_str))
            && url != body
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body}) does not match the name on the URL ({url})"
            )));
        }
        Ok(())
    }

    /// Creates an object (POST).
    ///
    /// # Errors
    /// 400 for a malformed body, 404 for a missing namespace, 409 AlreadyExists, 422 Invalid.
    pub fn create(
        &mut self,
        kind: Kind,
        ns: &str,
        mut obj: Value,
        now: &str,
    ) -> Result<Value, ApiError> {
        let ns = if kind.meta().namespaced { ns } else { "" };
        Self::check_meta(kind, ns, &obj, None)?;
        let plural = kind.meta().plural;
        let name = match meta_str(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => match meta_str(&obj, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(ApiError::invalid(
                        plural,
                        "",
                        format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                            kind.meta().kind
                        ),
                    ));
                }
            },
        };
        check_name(kind, &name).map_err(|why| {
            ApiError::invalid(
                plural,
                &name,
                format!(
                    "{} {name:?} is invalid: metadata.name: Invalid value: {name:?}: {why}",
                    kind.meta().kind
                ),
            )
        })?;
        self.check_namespace(kind, ns)?;
        let key = (kind, ns.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::about(
                Reason::AlreadyExists,
                format!(
                    "{} {name:?} already exists",
                    qualified(plural, kind.meta().group)
                ),
                plural,
                &name,
            ));
        }
        if let Some(m) = obj.as_object_mut() {
            m.remove("apiVersion");
            m.remove("kind");
            if kind.meta().status_subresource {
                m.remove("status");
            }
        }
        match kind {
            Kind::Service => self.services.admit(&name, &mut obj, None)?,
            Kind::Namespace => {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
            }
            _ => {}
        }
        self.rv += 1;
        let meta = &mut obj["metadata"];
        meta["name"] = Value::String(name.clone());
        if kind.meta().namespaced {
            meta["namespace"] = Value::String(ns.to_owned());
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        meta["uid"] = Value::String(random_uid());
        meta["creationTimestamp"] = Value::String(now.to_owned());
        meta["resourceVersion"] = Value::String(self.rv.to_string());
        meta["generation"] = Value::from(1);
        self.objects.insert(key.clone(), obj.clone());
        self.record(key, EventType::Added, None, obj.clone());
        Ok(obj)
    }

    fn conflict(kind: Kind, name: &str) -> ApiError {
        let plural = kind.meta().plural;
        ApiError::about(
            Reason::Conflict,
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                qualified(plural, kind.meta().group)
            ),
            plural,
            name,
        )
    }

    /// Replaces an object (PUT). `check_rv`: a resourceVersion in the body must be current.
    ///
    /// # Errors
    /// 400, 404, 409 Conflict, 422.
    pub fn replace(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        mut obj: Value,
        part: Part,
        check_rv: bool,
    ) -> Result<Value, ApiError> {
        let ns = if kind.meta().namespaced { ns } else { "" };
        Self::check_meta(kind, ns, &obj, Some(name))?;
        self.check_namespace(kind, ns)?;
        let key = (kind, ns.to_owned(), name.to_owned());
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(Self::not_found(kind, name));
        };
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or("");
        if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|r| !r.is_empty())
            && check_rv
        {
            if rv.parse::<u64>().is_err() {
                return Err(ApiError::bad_request(format!(
                    "metadata.resourceVersion {rv:?} of {} {name:?}: expected a decimal resourceVersion this server returned",
                    kind.meta().kind
                )));
            }
            if rv != old_rv {
                return Err(Self::conflict(kind, name));
            }
        }
        if let Some(m) = obj.as_object_mut() {
            m.remove("apiVersion");
            m.remove("kind");
        }
        let status_kind = kind.meta().status_subresource;
        if status_kind && part == Part::Status {
            let mut next = old.clone();
            match obj.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(m) = next.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            obj = next;
        } else if status_kind && let Some(m) = obj.as_object_mut() {
            match old.get("status") {
                Some(s) => {
                    m.insert("status".into(), s.clone());
                }
                None => {
                    m.remove("status");
                }
            }
        }
        // What the server owns in metadata is kept from the stored object.
        let meta = &mut obj["metadata"];
        for field in [
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
            "generation",
        ] {
            match old["metadata"].get(field) {
                Some(v) => meta[field] = v.clone(),
                None => {
                    if let Some(m) = meta.as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        meta["resourceVersion"] = Value::String(old_rv.to_owned());
        match kind {
            Kind::Service => {
                // Admission works on a copy so a refusal leaves the allocations as they were.
                self.services.admit(name, &mut obj, Some(&old))?;
            }
            Kind::Namespace => {
                obj["spec"] = old["spec"].clone();
                obj["status"] = old["status"].clone();
            }
            _ => {}
        }
        if obj == old {
            // A no-op update: the real server neither bumps resourceVersion nor sends an event.
            return Ok(old);
        }
        if spec_part(&obj) != spec_part(&old) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            obj["metadata"]["generation"] = Value::from(generation);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        self.objects.insert(key.clone(), obj.clone());
        self.record(key, EventType::Modified, Some(old), obj.clone());
        Ok(obj)
    }

    /// Patches an object (PATCH). Apply creates a missing object.
    ///
    /// # Errors
    /// 400, 404, 409, 422.
    pub fn patch(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        mut patch: Value,
        (ty, part): (PatchType, Part),
        now: &str,
    ) -> Result<Value, ApiError> {
        let ns = if kind.meta().namespaced { ns } else { "" };
        if !patch.is_object() {
            return Err(ApiError::bad_request(format!(
                "the patch for {} {name:?} is not a JSON object",
                kind.meta().kind
            )));
        }
        if ty == PatchType::Strategic {
            strip_directives(&mut patch);
        }
        let Some(old) = self.get(kind, ns, name).cloned() else {
            if ty == PatchType::Apply && part == Part::Main {
                if meta_str(&patch, "name") != Some(name) {
                    return Err(ApiError::bad_request(format!(
                        "the apply body for {} {name:?} must carry metadata.name {name:?}",
                        kind.meta().kind
                    )));
                }
                return self.create(kind, ns, patch, now);
            }
            return Err(Self::not_found(kind, name));
        };
        // A resourceVersion in the patch is a precondition, as on the real server.
        let check = patch
            .pointer("/metadata/resourceVersion")
            .is_some_and(|v| !v.is_null());
        let mut merged = old.clone();
        merge_patch(&mut merged, &patch);
        self.replace(kind, ns, name, merged, part, check)
    }

    /// Deletes an object, with optional uid / resourceVersion preconditions.
    ///
    /// # Errors
    /// 404, 409 Conflict on a failed precondition.
    pub fn delete(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        preconditions: &Value,
    ) -> Result<Value, ApiError> {
        let ns = if kind.meta().namespaced { ns } else { "" };
        let key = (kind, ns.to_owned(), name.to_owned());
        let Some(old) = self.objects.get(&key) else {
            return Err(Self::not_found(kind, name));
        };
        for field in ["uid", "resourceVersion"] {
            if let Some(want) = preconditions.get(field).and_then(Value::as_str)
                && meta_str(old, field) != Some(want)
            {
                let plural = kind.meta().plural;
                return Err(ApiError::about(
                    Reason::Conflict,
                    format!(
                        "Operation cannot be fulfilled on {} {name:?}: Precondition failed: {field}: {want}, object has {}",
                        qualified(plural, kind.meta().group),
                        meta_str(old, field).unwrap_or("")
                    ),
                    plural,
                    name,
                ));
            }
        }
        if kind == Kind::Namespace {
            // The namespace controller's work, done at once: everything in it goes first.
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|(k, n, _)| *k != Kind::Namespace && n == name)
                .cloned()
                .collect();
            for (k, n, obj_name) in inside {
                self.delete(k, &n, &obj_name, &Value::Null)?;
            }
        }
        let Some(mut obj) = self.objects.remove(&key) else {
            return Err(Self::not_found(kind, name));
        };
        if kind == Kind::Service {
            self.services.release(&obj);
        }
        self.rv += 1;
        let prev = obj.clone();
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        self.record(key, EventType::Deleted, Some(prev), obj.clone());
        Ok(obj)
    }

    /// The objects of `kind` (in `ns`, or all) as they were at `rv`, which must be retained.
    fn snapshot(
        &self,
        kind: Kind,
        ns: Option<&str>,
        rv: u64,
    ) -> Result<BTreeMap<Key, Value>, ApiError> {
        if rv < self.floor {
            return Err(self.too_old(rv));
        }
        let in_scope = |k: &Key| k.0 == kind && ns.is_none_or(|n| k.1 == n);
        let mut state: BTreeMap<Key, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| in_scope(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for event in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if !in_scope(&event.key) {
                continue;
            }
            match (&event.kind, &event.prev) {
                (EventType::Added, _) | (_, None) => {
                    state.remove(&event.key);
                }
                (_, Some(prev)) => {
                    state.insert(event.key.clone(), prev.clone());
                }
            }
        }
        Ok(state)
    }

    /// Lists objects (namespaced when `ns` is Some).
    ///
    /// # Errors
    /// 400 for bad parameters, 410 Expired for a resourceVersion or continue token older than
    /// the history, 504 for a resourceVersion newer than the store.
    pub fn list(
        &self,
        kind: Kind,
        ns: Option<&str>,
        params: &ListParams,
    ) -> Result<ListResult, ApiError> {
        let ns = if kind.meta().namespaced { ns } else { None };
        let rv_param = params.resource_version.as_deref().filter(|s| !s.is_empty());
        let (at, after) = match &params.continue_token {
            Some(token) => {
                if rv_param.is_some() && rv_param != Some("0") {
                    return Err(ApiError::bad_request(
                        "specifying resource version is not allowed when using continue",
                    ));
                }
                let bad = || {
                    ApiError::bad_request(format!(
                        "continue key is not valid: {token:?} is not a continue token this server issued"
                    ))
                };
                let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
                let t: ContinueToken = serde_json::from_slice(&raw).map_err(|_| bad())?;
                if t.rv < self.floor {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (t.rv, Some((t.ns, t.name)))
            }
            None => {
                let requested = match rv_param {
                    None => None,
                    Some(s) => Some(s.parse::<u64>().map_err(|_| {
                        ApiError::bad_request(format!(
                            "resourceVersion {s:?}: expected a decimal resourceVersion this server returned"
                        ))
                    })?),
                };
                match (params.resource_version_match.as_deref(), requested) {
                    (Some("Exact"), Some(rv)) if rv > 0 => {
                        if rv > self.rv {
                            return Err(ApiError::new(
                                Reason::Timeout,
                                format!("Too large resource version: {rv}, current: {}", self.rv),
                            ));
                        }
                        (rv, None)
                    }
                    (Some("Exact"), _) => {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch=Exact requires a non-zero resourceVersion",
                        ));
                    }
                    (Some("NotOlderThan") | None, Some(rv)) => {
                        if rv > self.rv {
                            return Err(ApiError::new(
                                Reason::Timeout,
                                format!("Too large resource version: {rv}, current: {}", self.rv),
                            ));
                        }
                        (self.rv, None)
                    }
                    (Some("NotOlderThan"), None) => {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch=NotOlderThan requires a resourceVersion",
                        ));
                    }
                    (None, None) => (self.rv, None),
                    (Some(other), _) => {
                        return Err(ApiError::bad_request(format!(
                            "resourceVersionMatch {other:?}: expected Exact or NotOlderThan"
                        )));
                    }
                }
            }
        };
        let state = if at == self.rv {
            self.objects
                .iter()
                .filter(|(k, _)| k.0 == kind && ns.is_none_or(|n| k.1 == n))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            self.snapshot(kind, ns, at)?
        };
        let mut items = Vec::new();
        let mut continue_token = None;
        for ((_, o_ns, o_name), obj) in state {
            if let Some((a_ns, a_name)) = &after
                && (&o_ns, &o_name) <= (a_ns, a_name)
            {
                continue;
            }
            if !params.labels.matches(&obj) || !params.fields.matches(&obj) {
                continue;
            }
            if params.limit > 0 && items.len() == params.limit {
                let last = items.last().map(|o: &Value| {
                    (
                        meta_str(o, "namespace").unwrap_or("").to_owned(),
                        meta_str(o, "name").unwrap_or("").to_owned(),
                    )
                });
                if let Some((ns, name)) = last {
                    let token =
                        serde_json::to_vec(&ContinueToken { rv: at, ns, name }).unwrap_or_default();
                    continue_token = Some(URL_SAFE_NO_PAD.encode(token));
                }
                break;
            }
            items.push(obj);
        }
        Ok(ListResult {
            items,
            resource_version: at,
            continue_token,
        })
    }
}

/// An object as served at `gvk`: apiVersion and kind set.
pub fn present(obj: &Value, gvk: Gvk) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::String(gvk.api_version()));
    out.insert(
        "kind".into(),
        Value::String(gvk.kind.meta().kind.to_owned()),
    );
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            if k != "apiVersion" && k != "kind" {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::super::services::parse_cidr;
    use super::*;

    const NOW: &str = "2026-01-01T00:00:00Z";

    fn store(limit: usize) -> Store {
        let (ip, len) = parse_cidr("10.96.0.0/16").unwrap();
        Store::new(&["default".into()], Allocator::new(ip, len), limit, NOW)
    }

    fn lease(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"holderIdentity": "a"}})
    }

    #[test]
    fn create_replace_conflict_and_noop() {
        let mut s = store(100);
        let a = s.create(Kind::Lease, "default", lease("l"), NOW).unwrap();
        assert_eq!(a["metadata"]["generation"], 1);
        let rv = a["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        let err = s
            .create(Kind::Lease, "default", lease("l"), NOW)
            .unwrap_err();
        assert_eq!(err.reason, Reason::AlreadyExists);
        // Same content: no new resourceVersion.
        let same = s
            .replace(Kind::Lease, "default", "l", a.clone(), Part::Main, true)
            .unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], rv.as_str());
        let mut b = a.clone();
        b["spec"]["holderIdentity"] = "b".into();
        let b = s
            .replace(Kind::Lease, "default", "l", b, Part::Main, true)
            .unwrap();
        assert_eq!(b["metadata"]["generation"], 2);
        // The first version's resourceVersion is now stale.
        let err = s
            .replace(Kind::Lease, "default", "l", a, Part::Main, true)
            .unwrap_err();
        assert_eq!(err.reason, Reason::Conflict);
        let err = s.create(Kind::Lease, "nope", lease("x"), NOW).unwrap_err();
        assert_eq!((err.code(), err.kind.as_deref()), (404, Some("namespaces")));
    }

    #[test]
    fn status_subresource_split() {
        let mut s = store(100);
        let mut e = json!({"metadata": {"name": "e"}, "status": {"conditions": [1]}});
        let created = s
            .create(Kind::ServiceExport, "default", e.clone(), NOW)
            .unwrap();
        assert!(created.get("status").is_none());
        e["status"] = json!({"conditions": [2]});
        let st = s
            .replace(
                Kind::ServiceExport,
                "default",
                "e",
                e.clone(),
                Part::Status,
                false,
            )
            .unwrap();
        assert_eq!(st["status"], json!({"conditions": [2]}));
        e["status"] = json!({"conditions": [3]});
        e["metadata"]["labels"] = json!({"a": "b"});
        let main = s
            .replace(Kind::ServiceExport, "default", "e", e, Part::Main, false)
            .unwrap();
        assert_eq!(main["status"], json!({"conditions": [2]}));
        assert_eq!(main["metadata"]["labels"], json!({"a": "b"}));
    }

    #[test]
    fn paging_is_consistent_and_expires() {
        let mut s = store(100);
        for i in 0..5 {
            s.create(Kind::Lease, "default", lease(&format!("l{i}")), NOW)
                .unwrap();
        }
        let p = ListParams {
            limit: 2,
            ..Default::default()
        };
        let first = s.list(Kind::Lease, None, &p).unwrap();
        assert_eq!(first.items.len(), 2);
        // A change after the first page does not show in later ones.
        s.delete(Kind::Lease, "default", "l4", &Value::Null)
            .unwrap();
        let mut names = Vec::new();
        let mut token = first.continue_token.clone();
        while let Some(t) = token {
            let page = s
                .list(
                    Kind::Lease,
                    None,
                    &ListParams {
                        limit: 2,
                        continue_token: Some(t),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(page.resource_version, first.resource_version);
            names.extend(
                page.items
                    .iter()
                    .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned()),
            );
            token = page.continue_token;
        }
        assert_eq!(names, ["l2", "l3", "l4"]);
        s.compact();
        let err = s
            .list(
                Kind::Lease,
                None,
                &ListParams {
                    limit: 2,
                    continue_token: first.continue_token,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(err.reason, Reason::Expired);
        assert!(s.events_after(first.resource_version).is_err());
    }

    #[test]
    fn bounded_history_raises_the_floor() {
        let mut s = store(3);
        for i in 0..6 {
            s.create(Kind::Lease, "default", lease(&format!("l{i}")), NOW)
                .unwrap();
        }
        assert!(s.events_after(1).is_err());
        assert_eq!(s.events_after(s.resource_version() - 3).unwrap().count(), 3);
    }

    #[test]
    fn merge_and_strategic_patch() {
        let mut s = store(100);
        s.create(Kind::Lease, "default", lease("l"), NOW).unwrap();
        let p = json!({"metadata": {"labels": {"x": "1"}}, "spec": {"holderIdentity": null, "$patch": "x"}});
        let out = s
            .patch(
                Kind::Lease,
                "default",
                "l",
                p,
                (PatchType::Strategic, Part::Main),
                NOW,
            )
            .unwrap();
        assert_eq!(out["metadata"]["labels"]["x"], "1");
        assert!(out["spec"].get("holderIdentity").is_none());
        assert!(out["spec"].get("$patch").is_none());
        let applied = s
            .patch(
                Kind::Lease,
                "default",
                "new",
                lease("new"),
                (PatchType::Apply, Part::Main),
                NOW,
            )
            .unwrap();
        assert_eq!(applied["metadata"]["generation"], 1);
        let missing = s.patch(
            Kind::Lease,
            "default",
            "zz",
            json!({}),
            (PatchType::Merge, Part::Main),
            NOW,
        );
        assert_eq!(missing.unwrap_err().code(), 404);
    }

    #[test]
    fn bad_names_are_invalid() {
        let mut s = store(100);
        for (kind, name) in [
            (Kind::Service, "1abc"),
            (Kind::Lease, "UPPER"),
            (Kind::Lease, ""),
        ] {
            let err = s
                .create(kind, "default", json!({"metadata": {"name": name}}), NOW)
                .unwrap_err();
            assert_eq!(err.code(), 422, "{name}");
        }
        let err = s
            .create(Kind::Lease, "default", json!({"spec": {}}), NOW)
            .unwrap_err();
        assert_eq!(err.code(), 400);
    }
}

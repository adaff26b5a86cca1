//! API errors and the `Status` objects the real API server answers them with.

use serde_json::{Value, json};

/// Why a request failed, as the `reason` of a Kubernetes `Status` (meta/v1 StatusReason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// 404: the object, namespace, resource or path does not exist.
    NotFound,
    /// 409: create of a name that exists.
    AlreadyExists,
    /// 409: a write carried a stale resourceVersion (or precondition).
    Conflict,
    /// 410: a resourceVersion or continue token older than the retained history.
    Expired,
    /// 410: the resource is gone (kept for completeness of the reason set).
    Gone,
    /// 400: the request is malformed.
    BadRequest,
    /// 401: no valid bearer token.
    Unauthorized,
    /// 422: the object fails validation.
    Invalid,
    /// 405: the verb is not supported on this path.
    MethodNotAllowed,
    /// 415: the body's content type is not supported.
    UnsupportedMediaType,
    /// 413: the body exceeds the server's limit.
    RequestEntityTooLarge,
    /// 504: a resourceVersion newer than the server has (the real server waits, then times out).
    Timeout,
}

impl Reason {
    /// The HTTP status code the real server sends with this reason.
    pub fn code(self) -> u16 {
        match self {
            Reason::NotFound => 404,
            Reason::AlreadyExists | Reason::Conflict => 409,
            Reason::Expired | Reason::Gone => 410,
            Reason::BadRequest => 400,
            Reason::Unauthorized => 401,
            Reason::Invalid => 422,
            Reason::MethodNotAllowed => 405,
            Reason::UnsupportedMediaType => 415,
            Reason::RequestEntityTooLarge => 413,
            Reason::Timeout => 504,
        }
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotFound => "NotFound",
            Reason::AlreadyExists => "AlreadyExists",
            Reason::Conflict => "Conflict",
            Reason::Expired => "Expired",
            Reason::Gone => "Gone",
            Reason::BadRequest => "BadRequest",
            Reason::Unauthorized => "Unauthorized",
            Reason::Invalid => "Invalid",
            Reason::MethodNotAllowed => "MethodNotAllowed",
            Reason::UnsupportedMediaType => "UnsupportedMediaType",
            Reason::RequestEntityTooLarge => "RequestEntityTooLarge",
            Reason::Timeout => "Timeout",
        }
    }
}

/// A failed API operation: what the HTTP layer turns into a `Status` and what the in-process
/// controls return.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} ({}): {message}", reason.as_str(), reason.code())]
pub struct ApiError {
    /// The Status reason (and so the HTTP code).
    pub reason: Reason,
    /// The human message, worded like the real server's.
    pub message: String,
    /// `details.name`: the object the error is about, when there is one.
    pub name: Option<String>,
    /// `details.kind`: the resource (plural, as the real server reports it).
    pub kind: Option<String>,
}

impl ApiError {
    /// An error without details.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        ApiError {
            reason,
            message: message.into(),
            name: None,
            kind: None,
        }
    }

    /// An error about one named object of a resource (`details.name`, `details.kind`).
    pub fn about(reason: Reason, message: impl Into<String>, kind: &str, name: &str) -> Self {
        ApiError {
            reason,
            message: message.into(),
            name: Some(name.to_owned()),
            kind: Some(kind.to_owned()),
        }
    }

    /// 404 for `plural "name" not found`, worded as the real server does.
    pub fn not_found(plural: &str, group: &str, name: &str) -> Self {
        let what = qualified(plural, group);
        ApiError::about(
            Reason::NotFound,
            format!("{what} \"{name}\" not found"),
            plural,
            name,
        )
    }

    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(Reason::BadRequest, message)
    }

    /// 422 about a named object.
    pub fn invalid(kind: &str, name: &str, message: impl Into<String>) -> Self {
        ApiError::about(Reason::Invalid, message, kind, name)
    }

    /// 410 Expired, for a resourceVersion or continue token that is too old.
    pub fn expired(message: impl Into<String>) -> Self {
        ApiError::new(Reason::Expired, message)
    }

    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        self.reason.code()
    }

    /// The `Status` object (meta/v1) for this error.
    pub fn status(&self) -> Value {
        let mut details = serde_json::Map::new();
        if let Some(name) = &self.name {
            details.insert("name".into(), Value::String(name.clone()));
        }
        if let Some(kind) = &self.kind {
            details.insert("kind".into(), Value::String(kind.clone()));
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason.as_str(),
            "code": self.code(),
        });
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// `plural.group` as the real server names a resource in messages (`services`,
/// `leases.coordination.k8s.io`).
pub fn qualified(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_owned()
    } else {
        format!("{plural}.{group}")
    }
}

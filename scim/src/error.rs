//! The one SCIM error type of this crate and its RFC 7644 §3.12 JSON body.
//!
//! Every check in the protocol layer (filters, paths, PATCH, validation) ends in a
//! [`ScimError`], so the HTTP layer answers all of them the same way: status line from
//! [`ScimError::status`], body from [`ScimError::to_json`].

use std::fmt;

use serde_json::{json, Value};

use crate::filter::FilterError;
use crate::path::PathError;

/// The URN of a SCIM error response body.
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// The `scimType` keywords of RFC 7644 §3.12, table 9.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScimType {
    InvalidFilter,
    TooMany,
    Uniqueness,
    Mutability,
    InvalidSyntax,
    InvalidPath,
    NoTarget,
    InvalidValue,
    InvalidVers,
    Sensitive,
}

impl ScimType {
    /// The keyword exactly as the RFC spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidFilter => "invalidFilter",
            Self::TooMany => "tooMany",
            Self::Uniqueness => "uniqueness",
            Self::Mutability => "mutability",
            Self::InvalidSyntax => "invalidSyntax",
            Self::InvalidPath => "invalidPath",
            Self::NoTarget => "noTarget",
            Self::InvalidValue => "invalidValue",
            Self::InvalidVers => "invalidVers",
            Self::Sensitive => "sensitive",
        }
    }
}

impl fmt::Display for ScimType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SCIM error: an HTTP status, an optional `scimType` and a `detail` a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimError {
    pub status: u16,
    pub scim_type: Option<ScimType>,
    pub detail: String,
    /// The write was made all the same (see [`ScimError::saved`]).
    saved: bool,
}

impl ScimError {
    pub fn new(status: u16, scim_type: Option<ScimType>, detail: impl Into<String>) -> Self {
        Self {
            status,
            scim_type,
            detail: detail.into(),
            saved: false,
        }
    }

    /// A `503` for a write committed, and visible here, but not known to be on every replica
    /// yet: a retry finds it made.
    pub fn saved_unconfirmed(detail: impl Into<String>) -> Self {
        Self {
            saved: true,
            ..Self::new(503, None, detail)
        }
    }

    /// Whether the write this answers was made all the same (committed, and visible here):
    /// only confirming it on every replica failed.
    pub fn saved(&self) -> bool {
        self.saved
    }

    /// A `400 Bad Request` with the given `scimType`, the status of every protocol error here.
    pub fn bad_request(scim_type: ScimType, detail: impl Into<String>) -> Self {
        Self::new(400, Some(scim_type), detail)
    }

    /// The RFC 7644 §3.12 body. `status` is a string: the RFC's schema and examples say so,
    /// and strict clients (and conformance suites) check the type.
    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "schemas": [ERROR_SCHEMA],
            "status": self.status.to_string(),
            "detail": self.detail,
        });
        if let (Some(scim_type), Some(map)) = (self.scim_type, body.as_object_mut()) {
            map.insert("scimType".into(), Value::from(scim_type.as_str()));
        }
        body
    }
}

impl fmt::Display for ScimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scim_type {
            Some(t) => write!(f, "{} {t}: {}", self.status, self.detail),
            None => write!(f, "{}: {}", self.status, self.detail),
        }
    }
}

impl std::error::Error for ScimError {}

impl From<FilterError> for ScimError {
    fn from(e: FilterError) -> Self {
        Self::bad_request(ScimType::InvalidFilter, format!("invalid filter: {e}"))
    }
}

impl From<PathError> for ScimError {
    fn from(e: PathError) -> Self {
        Self::bad_request(ScimType::InvalidPath, format!("invalid path: {e}"))
    }
}

/// `error` and its causes, each after the one it caused (`postgres::Error` says only "db
/// error", openidconnect's "Request failed": their causes say why). Shared with the proxy.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Filter;
    use crate::path::PatchPath;

    #[test]
    fn body_follows_rfc_7644_section_3_12() {
        let err = ScimError::bad_request(ScimType::Uniqueness, "userName 'a@x' is taken");
        assert_eq!(
            err.to_json(),
            json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                "status": "400",
                "scimType": "uniqueness",
                "detail": "userName 'a@x' is taken",
            })
        );
        let not_found = ScimError::new(404, None, "no such user");
        assert_eq!(not_found.to_json().get("scimType"), None);
        assert_eq!(not_found.to_json()["status"], "404");
        assert_eq!(not_found.to_string(), "404: no such user");
    }

    #[test]
    fn parser_errors_convert_with_their_scim_type() {
        let err: ScimError = Filter::parse("userName xx 1").unwrap_err().into();
        assert_eq!(err.scim_type, Some(ScimType::InvalidFilter));
        assert!(err.detail.contains("at byte 9"), "{err}");
        let err: ScimError = PatchPath::parse("members eq").unwrap_err().into();
        assert_eq!(err.status, 400);
        assert_eq!(err.scim_type, Some(ScimType::InvalidPath));
        assert_eq!(err.to_json()["scimType"], "invalidPath");
    }

    #[test]
    fn keywords_are_spelled_as_in_the_rfc() {
        let all = [
            (ScimType::InvalidFilter, "invalidFilter"),
            (ScimType::TooMany, "tooMany"),
            (ScimType::Uniqueness, "uniqueness"),
            (ScimType::Mutability, "mutability"),
            (ScimType::InvalidSyntax, "invalidSyntax"),
            (ScimType::InvalidPath, "invalidPath"),
            (ScimType::NoTarget, "noTarget"),
            (ScimType::InvalidValue, "invalidValue"),
            (ScimType::InvalidVers, "invalidVers"),
            (ScimType::Sensitive, "sensitive"),
        ];
        for (t, s) in all {
            assert_eq!(t.as_str(), s);
        }
    }
}

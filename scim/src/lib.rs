//! The SCIM 2.0 protocol (RFC 7643, RFC 7644) and the directory store behind Portcullis'
//! `/scim/v2` endpoint.
//!
//! So far it holds the pure parsing layer for untrusted SCIM syntax: [`filter`] (the `filter=`
//! query parameter) and [`path`] (the `path` of a PATCH operation). Both are bounded in length and
//! nesting, never panic, and return errors that carry the byte offset and the `scimType` to
//! answer with. They do no I/O and know no schema: evaluating a filter against stored resources
//! and applying PATCH operations belong to the store, which is not written yet. Listeners, HTTP
//! wiring and authorization decisions live in `proxy/` and `policy/`.
//!
//! Read first: the tables of real Okta and Entra ID filters in the tests at the bottom of
//! `src/filter.rs`, then the fuzz targets in `fuzz/` at the repository root.

pub mod filter;
pub mod path;

pub use filter::{Filter, FilterError};
pub use path::{PatchPath, PathError};

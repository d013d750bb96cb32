//! The SCIM 2.0 protocol (RFC 7643, RFC 7644) and the directory store behind Portcullis'
//! `/scim/v2` endpoint.
//!
//! It holds the pure protocol layer, with no I/O: [`filter`] and [`path`] parse untrusted SCIM
//! syntax (bounded in length and nesting, never panicking, errors carrying the byte offset);
//! [`schema`] holds the User, Enterprise User and Group schemas and the `/Schemas` and
//! `/ResourceTypes` documents; [`eval`] evaluates a filter against a resource; [`patch`] parses
//! and applies PATCH requests, reporting group membership changes apart from the group so a
//! 100,000-member list is never rewritten; [`validate`] checks POST/PUT bodies; [`project`]
//! applies `attributes`/`excludedAttributes`; every failure is an [`error::ScimError`] with
//! its RFC 7644 error body. [`store`] is the durable directory: a redb database, a single
//! writer that commits concurrent writes together, and an in-memory index for lookups.
//! Listeners, HTTP wiring and authorization decisions live in
//! `proxy/` and `policy/`.
//!
//! Read first: the tables of real Okta and Entra ID filters in the tests at the bottom of
//! `src/filter.rs`, the Okta and Entra ID request sequences in the tests of `src/patch.rs`, then the fuzz targets in `fuzz/` at the repository root.

pub mod error;
pub mod eval;
pub mod filter;
pub mod patch;
pub mod path;
pub mod project;
pub mod schema;
pub mod service;
pub mod store;
pub mod validate;
mod value;

pub use error::{ScimError, ScimType};
pub use filter::{Filter, FilterError};
pub use path::{PatchPath, PathError};

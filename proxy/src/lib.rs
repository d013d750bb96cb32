//! The `portcullis` library: everything the `portcullis` binary runs, as modules, so that
//! benchmarks (`proxy/benches/`) can drive the real decision path.
//!
//! The pingora data plane is [`proxy`]: read its module doc first, it lists the request phases.
//! Policy and directory logic live in `portcullis-policy` and `portcullis-scim`, and the
//! configuration model in `portcullis-config`.

pub mod admin;
pub mod assertion;
pub mod audit;
pub mod auth;
pub mod caller;
pub mod clock;
pub mod console;
pub mod cookies;
pub mod explain;
pub mod gate;
pub mod human;
pub mod logging;
pub mod metrics;
pub use portcullis_policy::path;
pub mod proxy;
pub mod reload;
pub mod reply;
pub mod routes;
pub mod scim_http;
pub mod services;
pub mod state;
pub mod streams;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod upstream;
pub mod watched;

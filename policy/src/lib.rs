//! Authorization decisions for Portcullis: an identity and a request in, allow or deny with the
//! rule and a reason out.
//!
//! This crate will stay pure — no I/O, no async, no pingora — so it can be property-tested and
//! benchmarked alone, and it fails closed on anything it cannot evaluate. It is empty until the
//! authorization issue lands; the proxy routes without policy until then.

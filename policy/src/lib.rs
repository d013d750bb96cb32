//! Authorization decisions for Portcullis: an identity and a request in, allow or deny with the
//! deciding rule and a reason a person can read out.
//!
//! What it owns: the rule model ([`RuleSpec`]), its validation and compilation into an immutable
//! [`Policy`] (once per configuration load), and [`Policy::evaluate`] (once per request: no
//! allocation, each of the subject's names hashed once whatever the number of rules).
//!
//! What it deliberately does not do: no I/O, no async, no configuration parsing (the config
//! crate builds [`RuleSpec`]s and names each rule by its key path), no directory lookups (the
//! proxy finds the SCIM user and its transitive groups and hands them in as a [`Subject`]). Path
//! normalization lives here ([`path::normalize`], pure as the rest) but is not done by
//! [`Policy::evaluate`]: the proxy normalizes each request path once, and a path that is
//! visibly not normalized is refused here rather than matched. Rule paths are refused unless
//! they are in that same normal form, so that a rule and a request spell a path alike.
//!
//! The semantics in short — [`Policy::evaluate`] has the full order:
//! - deny rules are checked before allow rules and win over any of them;
//! - a request nobody signed in for (`None`) is allowed only by a `public` rule;
//! - a deactivated subject is refused everywhere except where a `public` rule allows the
//!   request, since public rules let in everyone, signed in or not;
//! - whatever cannot be evaluated is refused. It fails closed.
//!
//! Read first: the tests at the bottom of `src/policy.rs` (one per criterion and condition) and
//! the property tests in `tests/properties.rs`; `benches/decision.rs` measures one evaluation.

mod index;
pub mod path;
mod policy;
mod reason;
mod spec;

use std::borrow::Cow;

pub use policy::{
    loose_depth, loosely_within, next_data_routed, page_with_info, script_routed, strictly_within,
    LoosePath, PageNames, Policy,
};
pub use reason::{Conditions, Decision, Match, Reason};
pub use spec::{
    holds_star, spelling_problem, PolicyError, Problem, RuleSpec, PREFIXES_NOT_PATTERNS,
};

/// Whether the subject is a person (signed in through OIDC), a machine (bearer token of a
/// service account) or an AI agent (bearer token of a SCIM Agent). Rules treat people and
/// machines alike, except the `machines` criterion, which only machines match. An agent is let
/// in only by the agent criteria (`agents`, `agent_groups`, `agent_owner_groups`), so an allow
/// rule written for people never lets an agent in by accident; but deny rules refuse it by its
/// own names too (`users`, `groups`, `group_ids`, `any_signed_in`): least privilege both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectKind {
    Person,
    Machine,
    Agent,
}

/// The caller as the directory knows it right now. Borrowed, so it costs nothing to build
/// per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    pub kind: SubjectKind,
    /// The SCIM `userName`, e.g. `alice@corp.example` (an agent's `name`).
    pub user_name: &'a str,
    /// The address `email_domains` rules look at; the proxy decides which one (the SCIM
    /// primary email, say). Without one, no `email_domains` criterion matches.
    pub email: Option<&'a str>,
    /// The SCIM `active` flag; for an agent, whether its owner chain holds.
    pub active: bool,
    /// Every group the subject is in, directly or through nested groups.
    pub groups: &'a [GroupRef<'a>],
    /// For an agent, the groups its owners are in (see `agent_owner_groups`); empty for
    /// anyone else.
    pub owner_groups: &'a [GroupRef<'a>],
}

/// One of the subject's groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRef<'a> {
    pub display_name: &'a str,
    pub external_id: Option<&'a str>,
}

/// What the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The normalized path (no query), exactly as it is routed and sent upstream.
    pub path: &'a str,
}

/// How Portcullis compares names without regard to case (user names, group names, email
/// addresses, in rules and in the SCIM directory alike): each char replaced by its lower-case
/// mapping (`char::to_lowercase`), one char at a time. The directory folds with this same
/// function, so a rule matches a name however either spells its case.
///
/// `str::to_lowercase` is not the same: it lower-cases a capital sigma at the end of a word to
/// `ς` and elsewhere to `σ`, so `ΟΔΥΣΣΕΥΣ` would fold to two different strings.
pub fn fold(s: &str) -> Cow<'_, str> {
    let folded_already = if s.is_ascii() {
        !s.bytes().any(|b| b.is_ascii_uppercase())
    } else {
        s.chars().all(|c| {
            let mut lower = c.to_lowercase();
            lower.next() == Some(c) && lower.next().is_none()
        })
    };
    if folded_already {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.chars().flat_map(char::to_lowercase).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::fold;

    #[test]
    fn folding_is_per_char_and_borrows_what_is_folded_already() {
        assert_eq!(fold("Alice@Corp.Example"), "alice@corp.example");
        assert!(matches!(
            fold("alice@corp.example"),
            std::borrow::Cow::Borrowed(_)
        ));
        // A final capital sigma folds like any other: no word context.
        assert_eq!(fold("ΟΔΥΣΣΕΥΣ"), "οδυσσευσ");
        assert_eq!(fold("οδυσσευσ"), "οδυσσευσ");
        // A title-case letter is not upper case, and still has a lower-case mapping.
        assert_eq!(fold("ǅemal"), "ǆemal");
        assert_eq!(fold("İ"), "i\u{307}");
    }
}

//! Why a decision came out as it did, in a sentence the person refused can read.
//!
//! A reason names only the rule, the caller's own name, the caller's own groups or domain that
//! matched, and the caller's own request: nothing about other users, and not the rest of the rule.

use std::fmt;

/// The outcome of [`Policy::evaluate`](crate::Policy::evaluate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Decision<'a> {
    pub allowed: bool,
    /// The name of the deciding rule, when a rule decided.
    pub rule: Option<&'a str>,
    pub reason: Reason<'a>,
}

impl<'a> Decision<'a> {
    pub(crate) fn deny(reason: Reason<'a>) -> Self {
        Self {
            allowed: false,
            rule: None,
            reason,
        }
    }
}

/// Why. `Display` gives the sentence; the variants let the proxy choose the response (for
/// example, [`Reason::NotSignedIn`] is worth a sign-in redirect, the others a 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason<'a> {
    /// An allow rule matched and no deny rule did.
    Allowed {
        rule: &'a str,
        by: Match<'a>,
        conditions: Conditions<'a>,
    },
    /// A deny rule matched.
    Denied {
        rule: &'a str,
        by: Match<'a>,
        conditions: Conditions<'a>,
    },
    /// The subject is not active, and no public rule covers the request.
    Deactivated,
    /// There is no subject and no public rule covers the request.
    NotSignedIn,
    /// An active subject that no allow rule covers.
    NoRuleAllows {
        user: &'a str,
        method: &'a str,
        path: &'a str,
    },
    /// The request is not one the policy can judge (its method is not an HTTP token or its path
    /// is not normalized), so it is refused.
    Unevaluable { problem: &'static str },
}

/// Which of the rule's who-criteria matched the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match<'a> {
    /// The subject's `userName`.
    User(&'a str),
    /// The `displayName` of one of the subject's groups, as the directory spells it.
    Group(&'a str),
    /// The `externalId` of one of the subject's groups.
    GroupId(&'a str),
    /// The subject's email domain and the rule's domain entry it matched (`*.` entries are
    /// given without the `*.` and with `wildcard` set).
    EmailDomain {
        domain: &'a str,
        entry: &'a str,
        wildcard: bool,
    },
    /// `any_signed_in`, with the subject's `userName`.
    SignedIn(&'a str),
    /// `machines`, with the machine's `userName`.
    Machine(&'a str),
    /// `agents`, with the agent's `name`.
    Agent(&'a str),
    /// `agent_groups`: one of the agent's groups.
    AgentGroup(&'a str),
    /// `agent_owner_groups`: one of its owners' groups.
    AgentOwnerGroup(&'a str),
    /// `public`.
    Public,
}

impl Match<'_> {
    /// Whether this is one of the agent criteria, the only names that let an agent in.
    pub fn names_an_agent(&self) -> bool {
        matches!(
            self,
            Match::Agent(_) | Match::AgentGroup(_) | Match::AgentOwnerGroup(_)
        )
    }
}

/// The rule's conditions as they applied: the request's method when the rule restricts
/// methods, the matching prefix when it restricts paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conditions<'a> {
    pub method: Option<&'a str>,
    pub path_prefix: Option<&'a str>,
}

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Allowed {
                rule,
                by,
                conditions,
            } => write!(f, "allowed by {rule}: {by}{conditions}"),
            Reason::Denied {
                rule,
                by,
                conditions,
            } => write!(f, "denied by {rule}: {by}{conditions}"),
            Reason::Deactivated => f.write_str("the account is deactivated"),
            Reason::NotSignedIn => f.write_str("no rule allows this: not signed in"),
            Reason::NoRuleAllows { user, method, path } => {
                write!(f, "no rule allows {user} to {method} {path}")
            }
            Reason::Unevaluable { problem } => {
                write!(
                    f,
                    "the request cannot be evaluated ({problem}), so it is refused"
                )
            }
        }
    }
}

impl fmt::Display for Match<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::User(name) => write!(f, "user {name}"),
            Match::Group(name) => write!(f, "member of group {name}"),
            Match::GroupId(id) => write!(f, "member of the group with externalId {id}"),
            Match::EmailDomain {
                domain,
                wildcard: false,
                ..
            } => write!(f, "email domain {domain}"),
            Match::EmailDomain {
                domain,
                entry,
                wildcard: true,
            } => write!(f, "email domain {domain}, under *.{entry}"),
            Match::SignedIn(name) => write!(f, "signed in as {name}"),
            Match::Machine(name) => write!(f, "machine {name}"),
            Match::Agent(name) => write!(f, "agent {name}"),
            Match::AgentGroup(name) => write!(f, "agent in group {name}"),
            Match::AgentOwnerGroup(name) => {
                write!(f, "agent owned by a member of group {name}")
            }
            Match::Public => f.write_str("open to everyone"),
        }
    }
}

impl fmt::Display for Conditions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(method) = self.method {
            write!(f, ", method {method}")?;
        }
        if let Some(prefix) = self.path_prefix {
            write!(f, ", path under {prefix}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences() {
        let cases = [
            (
                Reason::Denied {
                    rule: "routes[0].deny[0]",
                    by: Match::Group("contractors"),
                    conditions: Conditions {
                        method: Some("DELETE"),
                        path_prefix: None,
                    },
                },
                "denied by routes[0].deny[0]: member of group contractors, method DELETE",
            ),
            (
                Reason::Allowed {
                    rule: "routes[0].allow[1]",
                    by: Match::Group("sre"),
                    conditions: Conditions::default(),
                },
                "allowed by routes[0].allow[1]: member of group sre",
            ),
            (
                Reason::Allowed {
                    rule: "r",
                    by: Match::EmailDomain {
                        domain: "eu.corp.example",
                        entry: "corp.example",
                        wildcard: true,
                    },
                    conditions: Conditions {
                        method: Some("GET"),
                        path_prefix: Some("/api/"),
                    },
                },
                "allowed by r: email domain eu.corp.example, under *.corp.example, method GET, \
                 path under /api/",
            ),
            (
                Reason::Allowed {
                    rule: "routes[3].allow",
                    by: Match::Machine("ci-bot"),
                    conditions: Conditions::default(),
                },
                "allowed by routes[3].allow: machine ci-bot",
            ),
            (
                Reason::Allowed {
                    rule: "routes[4].allow",
                    by: Match::AgentOwnerGroup("eng"),
                    conditions: Conditions::default(),
                },
                "allowed by routes[4].allow: agent owned by a member of group eng",
            ),
            (Reason::NotSignedIn, "no rule allows this: not signed in"),
            (Reason::Deactivated, "the account is deactivated"),
            (
                Reason::NoRuleAllows {
                    user: "alice@corp.example",
                    method: "GET",
                    path: "/admin",
                },
                "no rule allows alice@corp.example to GET /admin",
            ),
        ];
        for (reason, sentence) in cases {
            assert_eq!(reason.to_string(), sentence);
        }
    }
}

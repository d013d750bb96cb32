//! The decision for every request on a route with rules, from memory only: the caller → their
//! SCIM user → still active, and signed in after their last deactivation? → their groups
//! (transitive) → the route's policy.
//!
//! The directory is read once, under one consistent view (`Directory::with_subject`): a SCIM
//! write answered before the request arrived is always seen, so removing someone from a group,
//! deactivating or deleting them refuses their very next request.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};

use portcullis_config::{IdentityClaim, IdentityConfig, MachineClaim, ScimAttribute};
use portcullis_policy::{GroupRef, Policy, Request, Subject, SubjectKind};
use portcullis_scim::store::{Directory, SubjectKey};

use crate::auth::Caller;

/// What the upstream is told about an allowed caller.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The SCIM `userName` (lower-cased).
    pub user: String,
    pub email: Option<String>,
    /// Display names of every group, comma-separated.
    pub groups: String,
    pub group_names: Vec<String>,
    /// Changes whenever the user's standing or groups may have changed; keys caches of
    /// anything derived from them (the signed assertion).
    pub version: u64,
    /// The rule that allowed and why, when asked for (`portcullis explain`).
    pub why: Option<Why>,
}

/// The rule behind an allow, in words.
#[derive(Debug, Clone)]
pub struct Why {
    pub rule: Option<String>,
    pub reason: String,
}

impl Why {
    fn of(decision: &portcullis_policy::Decision<'_>) -> Self {
        Self {
            rule: decision.rule.map(str::to_owned),
            reason: decision.reason.to_string(),
        }
    }
}

#[derive(Debug)]
pub enum Verdict {
    Allow(Forward),
    /// The session began before the user was deactivated (or re-created): it is over.
    SessionRevoked,
    Deny {
        who: String,
        rule: Option<String>,
        reason: String,
    },
}

fn subject_key<'a>(identity: &IdentityConfig, caller: &'a Caller) -> Option<SubjectKey<'a>> {
    let (value, attribute) = match caller {
        Caller::Person { identity: who, .. } => {
            let value = match identity.claim {
                IdentityClaim::Email => who.email.as_deref()?,
                IdentityClaim::Sub => who.subject.as_str(),
            };
            (value, identity.scim_attribute)
        }
        Caller::Machine {
            subject, client_id, ..
        } => {
            let value = match identity.machine_claim {
                MachineClaim::Sub => subject.as_str(),
                MachineClaim::ClientId => client_id.as_deref()?,
            };
            (value, identity.machine_scim_attribute)
        }
    };
    Some(match attribute {
        ScimAttribute::UserName => SubjectKey::UserName(value),
        ScimAttribute::Emails => SubjectKey::Email(value),
        ScimAttribute::ExternalId => SubjectKey::ExternalId(value),
    })
}

/// Decides whether `caller` may make this request on a route with `policy`. With
/// `token_groups`, a caller who is not in the directory is judged on their token's own claims
/// (name, email, `groups`) instead of being refused.
pub fn decide(
    directory: &Directory,
    identity: &IdentityConfig,
    policy: &Policy,
    token_groups: bool,
    caller: &Caller,
    method: &str,
    path: &str,
) -> Verdict {
    judge(
        directory,
        identity,
        policy,
        token_groups,
        caller,
        method,
        path,
        false,
    )
}

/// [`decide`]; with `explain`, an allow also says which rule allowed and why
/// ([`Forward::why`]).
#[allow(clippy::too_many_arguments)]
pub fn judge(
    directory: &Directory,
    identity: &IdentityConfig,
    policy: &Policy,
    token_groups: bool,
    caller: &Caller,
    method: &str,
    path: &str,
    explain: bool,
) -> Verdict {
    let who = caller.log_name();
    let Some(key) = subject_key(identity, caller) else {
        return Verdict::Deny {
            who,
            rule: None,
            reason: "the sign-in carries no claim that identifies a directory user".to_owned(),
        };
    };
    let (kind, email, session_epoch) = match caller {
        Caller::Person { identity, .. } => (
            SubjectKind::Person,
            identity.email.as_deref(),
            Some(identity.directory_seq),
        ),
        Caller::Machine { .. } => (SubjectKind::Machine, None, None),
    };
    directory.with_subject(key, |view| {
        let Some(view) = view else {
            if token_groups {
                return decide_on_token(policy, caller, kind, email, method, path, explain);
            }
            return Verdict::Deny {
                who: who.clone(),
                rule: None,
                reason: format!("{who} is not a user in the directory"),
            };
        };
        if session_epoch.is_some_and(|epoch| epoch < view.user.valid_since) {
            return Verdict::SessionRevoked;
        }
        let groups: Vec<GroupRef<'_>> = view
            .groups
            .iter()
            .map(|g| GroupRef {
                display_name: &g.display_name,
                external_id: g.external_id.as_deref(),
            })
            .collect();
        let subject = Subject {
            kind,
            user_name: &view.user.user_name,
            email,
            active: view.user.active,
            groups: &groups,
        };
        let decision = policy.evaluate(Some(&subject), &Request { method, path });
        if !decision.allowed {
            return Verdict::Deny {
                who: view.user.user_name.to_string(),
                rule: decision.rule.map(str::to_owned),
                reason: decision.reason.to_string(),
            };
        }
        let mut joined = String::new();
        for (i, group) in view.groups.iter().enumerate() {
            if i > 0 {
                joined.push_str(", ");
            }
            // Header values cannot hold control characters; a group name with one is shown
            // without it.
            let _ = write!(
                joined,
                "{}",
                group.display_name.replace(|c: char| c.is_control(), "")
            );
        }
        let forward = Forward {
            user: view.user.user_name.to_string(),
            email: email
                .map(str::to_owned)
                .or_else(|| view.user.emails.first().map(|e| e.to_string())),
            groups: joined,
            group_names: view
                .groups
                .iter()
                .map(|g| g.display_name.to_string())
                .collect(),
            version: 0,
            why: explain.then(|| Why::of(&decision)),
        };
        Verdict::Allow(forward.with_version())
    })
}

impl Forward {
    /// Stamps the version: a hash of everything the upstream is told, so anything cached on
    /// it (the signed assertion) is reused exactly as long as it is still true.
    fn with_version(mut self) -> Self {
        let mut hasher = std::hash::DefaultHasher::new();
        (&self.user, &self.email, &self.groups).hash(&mut hasher);
        self.version = hasher.finish();
        self
    }
}

fn decide_on_token(
    policy: &Policy,
    caller: &Caller,
    kind: SubjectKind,
    email: Option<&str>,
    method: &str,
    path: &str,
    explain: bool,
) -> Verdict {
    let (name, token_groups) = match caller {
        Caller::Person { identity, .. } => (
            identity.email.as_deref().unwrap_or(&identity.subject),
            &identity.groups,
        ),
        Caller::Machine {
            subject,
            client_id,
            groups,
            ..
        } => (client_id.as_deref().unwrap_or(subject), groups),
    };
    let user = name.to_lowercase();
    let groups: Vec<GroupRef<'_>> = token_groups
        .iter()
        .map(|g| GroupRef {
            display_name: g,
            external_id: None,
        })
        .collect();
    let subject = Subject {
        kind,
        user_name: &user,
        email,
        active: true,
        groups: &groups,
    };
    let decision = policy.evaluate(Some(&subject), &Request { method, path });
    if !decision.allowed {
        return Verdict::Deny {
            who: user.clone(),
            rule: decision.rule.map(str::to_owned),
            reason: decision.reason.to_string(),
        };
    }
    let forward = Forward {
        user: user.clone(),
        email: email.map(str::to_owned),
        groups: token_groups
            .join(", ")
            .replace(|c: char| c.is_control(), ""),
        group_names: token_groups.clone(),
        version: 0,
        why: explain.then(|| Why::of(&decision)),
    };
    Verdict::Allow(forward.with_version())
}

/// The directory's view of a caller, for `/.portcullis/me` and `portcullis explain`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DirectoryView {
    pub user_name: String,
    pub active: bool,
    pub groups: Vec<String>,
}

pub fn directory_view(
    directory: &Directory,
    identity: &IdentityConfig,
    caller: &Caller,
) -> Option<DirectoryView> {
    let key = subject_key(identity, caller)?;
    directory.with_subject(key, |view| {
        view.map(|view| DirectoryView {
            user_name: view.user.user_name.to_string(),
            active: view.user.active,
            groups: view
                .groups
                .iter()
                .map(|g| g.display_name.to_string())
                .collect(),
        })
    })
}

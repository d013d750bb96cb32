//! Who is calling: the types every layer shares. Authentication makes them (a session lookup,
//! a verified bearer token), the gate judges them, open connections keep them. They hold no
//! behaviour beyond naming the caller.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub type SessionKey = [u8; 32];

/// A caller's string-valued claims, by name: what an `[identity]` mapping to any claim reads.
pub type Claims = BTreeMap<String, String>;

/// Most claims kept per caller (and those a mapping reads: see [`add_string_claims`]),
/// longest claim name and longest value: tokens are untrusted in size, and a claim that names
/// a person is short.
const MAX_CLAIMS: usize = 64;
const MAX_CLAIM_NAME: usize = 128;
pub(crate) const MAX_CLAIM_VALUE: usize = 1024;

/// The string claims of a JSON object's bytes (a token's payload), within the bounds below,
/// `read` first (see [`add_string_claims`]); empty for anything that is not an object.
pub fn string_claims(json: &[u8], read: &[&str]) -> Claims {
    let mut claims = Claims::new();
    if let Ok(object) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(json) {
        add_string_claims(&mut claims, &object, read);
    }
    claims
}

/// Adds the string claims of `object` that `claims` lacks, within the bounds above: first those
/// named in `read` (the claims a mapping reads), whatever the count, then the others in the
/// order given (a JSON object's, by name) up to [`MAX_CLAIMS`]. Without that order, 64 claims
/// that sort before a mapping's `upn` would leave the person with no `upn`.
pub fn add_string_claims<'a, I>(claims: &mut Claims, object: I, read: &[&str])
where
    I: IntoIterator<Item = (&'a String, &'a serde_json::Value)> + Clone,
{
    let add = |claims: &mut Claims, name: &String, value: &serde_json::Value| {
        if let Some(value) = value.as_str() {
            if name.len() <= MAX_CLAIM_NAME
                && value.len() <= MAX_CLAIM_VALUE
                && !claims.contains_key(name)
            {
                claims.insert(name.clone(), value.to_owned());
            }
        }
    };
    for (name, value) in object.clone() {
        if read.contains(&name.as_str()) {
            add(claims, name, value);
        }
    }
    for (name, value) in object {
        if claims.len() >= MAX_CLAIMS {
            return;
        }
        add(claims, name, value);
    }
}

/// Who signed in, and for how long.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    /// The ID token's `email_verified`, when it has one. An email the IdP says it has not
    /// verified (`Some(false)`) identifies nobody.
    #[serde(default)]
    pub email_verified: Option<bool>,
    pub name: Option<String>,
    /// The IdP's session id (`sid`), for back-channel logout.
    pub idp_session: Option<String>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds after which the session ends whatever happens.
    pub expires: u64,
    /// The ID token, for `id_token_hint` at sign-out. Never logged. Only until the session
    /// is made, which keeps it sealed apart (`sessions::IdToken`); held here by sessions
    /// stored before that.
    #[serde(default)]
    pub id_token: Option<String>,
    /// The directory's change sequence when this person signed in: a deactivation after it
    /// ends the session for good.
    #[serde(default)]
    pub directory_seq: u64,
    /// The ID token's `groups` claim, used only on routes with `token_groups = true` for
    /// people who are not in the directory.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Whether the sign-in spoke of groups it did not list (see
    /// [`crate::auth::groups_unlisted`]), or left them unsaid where a route reads them (the ID
    /// token without them, UserInfo refusing its access token): `groups` is then not all of
    /// them. `None`: stored by a version that wrote only `true` (before 2026-12-06), so not
    /// known; a stranger's such session signs in again where the IdP's groups judge them.
    #[serde(default)]
    pub groups_unlisted: Option<bool>,
    /// The string claims of the ID token, then of UserInfo for what it lacked (see
    /// [`add_string_claims`]), for a mapping by any claim.
    #[serde(default)]
    pub claims: Claims,
}

/// Everything but the ID token, which a `{:?}` must never print.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("email", &self.email)
            .field("email_verified", &self.email_verified)
            .field("name", &self.name)
            .field("idp_session", &self.idp_session)
            .field("created", &self.created)
            .field("expires", &self.expires)
            .field(
                "id_token",
                &self.id_token.as_ref().map(|_| "(kept, not shown)"),
            )
            .field("directory_seq", &self.directory_seq)
            .field("groups", &self.groups)
            .field("groups_unlisted", &self.groups_unlisted)
            .field("claims", &self.claims)
            .finish()
    }
}

/// A machine or agent, as its verified bearer token names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub issuer: String,
    pub subject: String,
    /// The client the token was issued to: `client_id`, or else `azp`, `cid` (Okta) or
    /// `appid` (Entra ID's v1 tokens).
    pub client_id: Option<String>,
    /// The token's `groups` claim (for `token_groups` routes).
    pub groups: Vec<String>,
    /// Whether the token spoke of groups it did not list (see
    /// [`crate::auth::groups_unlisted`]).
    pub groups_unlisted: bool,
    /// What the token is for: its `aud` values its issuer's `audiences` hold, which a route
    /// naming `audiences` asks for one of.
    pub audiences: Vec<String>,
    /// Whether the issuer gave the token to a client for itself (client credentials), as
    /// the authenticator reads its marks (`is_client_token`): a machine. A token a client holds for
    /// a person is judged as that person (the `[identity]` person mapping, `SubjectKind::Person`),
    /// so `machines = true` never names it and it never borrows a service account's groups.
    pub for_itself: bool,
    /// The token's `email` and `email_verified`, for a person's token.
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    /// The token's string claims (see [`add_string_claims`]), for a mapping by any claim.
    pub claims: Claims,
    /// Unix seconds from which the token no longer vouches for the machine: its `exp` plus
    /// the issuer's leeway.
    pub expires: u64,
    /// Its `iat`, Unix seconds: a token issued before its user's record began (created,
    /// re-activated, given a new identifier) is not theirs, or no longer.
    pub issued: Option<u64>,
    /// Who acts for the token's subject, when the token is delegated (RFC 8693 §4.1 `act`):
    /// an agent acting for a person. Only the current actor counts; earlier ones (an `act`
    /// inside `act`) are not judged.
    pub act: Option<Actor>,
    /// The key that verified the token (`None` for one `explain` supposes).
    pub signed: Option<crate::auth::jwt::SignedWith>,
}

/// The current actor of a delegated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Its `sub`.
    pub subject: String,
    /// Its string claims (`sub`, `client_id`, …), for the agent mapping.
    pub claims: Claims,
}

/// The caller of a request, once authenticated. Cheap to clone: it is shared by every request
/// the same session or token makes.
#[derive(Debug, Clone)]
pub enum Caller {
    Person {
        /// Which session, so it can be ended when the person is deprovisioned, and its open
        /// connections closed when it ends.
        session: SessionKey,
        identity: Arc<Identity>,
    },
    Machine(Arc<Machine>),
}

/// Who a caller is, without how they came in: what the gate judges. `explain` makes one for a
/// person who has not signed in at all.
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    Person(&'a Identity),
    Machine(&'a Machine),
}

impl Caller {
    pub fn principal(&self) -> Principal<'_> {
        match self {
            Caller::Person { identity, .. } => Principal::Person(identity),
            Caller::Machine(machine) => Principal::Machine(machine),
        }
    }

    /// A short name for logs: see [`Principal::log_name`].
    pub fn log_name(&self) -> String {
        self.principal().log_name()
    }
}

impl Principal<'_> {
    /// A short name for logs: the person's email (or subject), also for a person's bearer
    /// token, or `client@issuer` for a machine. An email the IdP says it has not verified
    /// names nobody (anyone may type another's address into their IdP profile): the subject
    /// stands instead, so such a caller's records never read as another person's.
    pub fn log_name(&self) -> String {
        let person = |email: &Option<String>, verified: Option<bool>, subject: &String| match email
        {
            Some(email) if verified != Some(false) => email.clone(),
            _ => subject.clone(),
        };
        match self {
            Principal::Person(identity) => {
                person(&identity.email, identity.email_verified, &identity.subject)
            }
            Principal::Machine(token) if !token.for_itself => {
                person(&token.email, token.email_verified, &token.subject)
            }
            Principal::Machine(machine) => format!(
                "{}@{}",
                machine.client_id.as_deref().unwrap_or(&machine.subject),
                machine.issuer
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_s_debug_never_shows_its_id_token() {
        let identity = Identity {
            issuer: "https://idp.example".into(),
            subject: "alice".into(),
            email: None,
            email_verified: None,
            name: None,
            idp_session: None,
            created: 0,
            expires: 0,
            id_token: Some("eyJhbGciOiJSUzI1NiJ9.secret-payload.signature".into()),
            directory_seq: 0,
            groups: Vec::new(),
            groups_unlisted: Some(false),
            claims: Claims::new(),
        };
        let shown = format!("{identity:?}");
        assert!(!shown.contains("secret-payload"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
    }

    #[test]
    fn every_string_claim_of_a_payload_is_kept_within_bounds() {
        // An Entra ID app-only access token's claims: every one a mapping may name is kept,
        // those the verifier also reads (`sub`, `azp`) and the marks (`oid`, `idtyp`) too.
        let payload = serde_json::json!({
            "aud": "api://portcullis", "iss": "https://login.microsoftonline.com/t/v2.0",
            "exp": 1_900_000_000u64, "sub": "sp-oid", "oid": "sp-oid", "azp": "app-id",
            "appid": "app-id", "tid": "t", "idtyp": "app", "roles": ["Reader"],
            "upn": "x".repeat(MAX_CLAIM_VALUE + 1),
        });
        let claims = string_claims(payload.to_string().as_bytes(), &[]);
        for name in ["sub", "oid", "azp", "appid", "tid", "idtyp", "aud", "iss"] {
            assert!(claims.contains_key(name), "{name}: {claims:?}");
        }
        assert!(!claims.contains_key("exp"), "not a string");
        assert!(!claims.contains_key("roles"), "not a string");
        assert!(!claims.contains_key("upn"), "longer than the bound");
        assert!(string_claims(b"[1,2]", &[]).is_empty());

        let many: serde_json::Map<String, serde_json::Value> = (0..200)
            .map(|i| (format!("c{i:03}"), serde_json::Value::from("v")))
            .chain([("upn".to_owned(), serde_json::Value::from("ann@example.com"))])
            .collect();
        let json = serde_json::Value::Object(many).to_string();
        let claims = string_claims(json.as_bytes(), &[]);
        assert_eq!(claims.len(), MAX_CLAIMS);
        // A claim a mapping reads is kept past the bound, whatever sorts before it.
        let claims = string_claims(json.as_bytes(), &["upn"]);
        assert_eq!(claims.len(), MAX_CLAIMS);
        assert_eq!(
            claims.get("upn").map(String::as_str),
            Some("ann@example.com")
        );
    }
}

//! The gate: the one code that decides who gets in. Requests, open websockets and streams (when
//! they are judged again) and `portcullis explain` all ask it, with plain values in and a plain
//! [`Admission`] out: no sockets, no pingora session, no disk.
//!
//! What it is given:
//! - the request's facts ([`Facts`]): the route, the normalized path, the method and the kind of
//!   client ([`Client`], the one definition of "a browser");
//! - what the caller presented ([`Presented`]): nothing, something that did not verify, or a
//!   verified caller ([`Principal`]).
//!
//! What it decides, from memory only: the caller → their SCIM user (by the `[identity]`
//! mapping) → still active, and signed in after their last deactivation? → their groups
//! (transitive) → the route's policy. The directory is read under one consistent view
//! (`Directory::with_subject`), so a SCIM write answered before the question is always seen.
//!
//! The answer is one of four ([`Admission`]): let in, with what the upstream is told; send the
//! browser to sign in; answer 401 with a challenge; or refuse with 403, with the typed cause and
//! the deciding rule. Which of 302, 401 and 403 a refusal gets is decided here, from the types,
//! and nowhere else.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::ops::Deref;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};

use portcullis_config::{
    AgentAttribute, Credential, IdentityClaim, IdentityConfig, JwtIssuer, MachineClaim, Route,
    ScimAttribute,
};
use portcullis_policy::{Decision, GroupRef, Match, Reason, Request, Subject, SubjectKind};
use portcullis_scim::store::{
    AgentKey, AgentLookup, AgentView, Directory, GroupEntry, Index, Lookup, Row, Seq, Stamp,
    SubjectKey, UserEntry,
};

pub use crate::audit::AgentRecord;
use crate::caller::{Actor, Claims, Identity, Machine, Principal};

/// What kind of client sent a request: the one definition every choice that depends on it
/// uses (a sign-in redirect or a 401; a refusal as a page or as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A browser loading or submitting a page: it accepts HTML, and it is not a page's script
    /// (`X-Requested-With: XMLHttpRequest`, or a `Sec-Fetch-Mode` other than `navigate`).
    Browser,
    /// Anything else: API clients, command-line tools, a page's own `fetch()`.
    Api,
}

impl Client {
    pub fn of(headers: &HeaderMap) -> Client {
        if !accepts(headers, b"text/html") {
            return Client::Api;
        }
        let script = headers
            .get("x-requested-with")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"xmlhttprequest"))
            || headers
                .get("sec-fetch-mode")
                .is_some_and(|v| v.as_bytes() != b"navigate");
        if script {
            Client::Api
        } else {
            Client::Browser
        }
    }
}

/// Whether an `Accept` header of the request names `media` (media types are
/// case-insensitive).
pub fn accepts(headers: &HeaderMap, media: &[u8]) -> bool {
    !media.is_empty()
        && headers.get_all(header::ACCEPT).iter().any(|v| {
            v.as_bytes()
                .windows(media.len())
                .any(|w| w.eq_ignore_ascii_case(media))
        })
}

/// The request being judged.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The route, with its compiled rules.
    pub route: &'a Route,
    pub method: &'a str,
    /// The normalized path, exactly as it is routed and sent upstream.
    pub path: &'a str,
    pub client: ClientOf<'a>,
}

/// The kind of client a request comes from: known, or read from the request's headers when a
/// refusal needs it (an allowed request never does).
#[derive(Debug, Clone, Copy)]
pub enum ClientOf<'a> {
    Known(Client),
    Headers(&'a HeaderMap),
}

impl ClientOf<'_> {
    pub fn get(self) -> Client {
        match self {
            ClientOf::Known(client) => client,
            ClientOf::Headers(headers) => Client::of(headers),
        }
    }
}

/// What the caller presented, once authentication has looked at it.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    /// No credential this route takes.
    Nothing,
    /// A credential that did not verify: an unknown, expired or ended session (`bearer` false),
    /// or a bearer token that was refused (`bearer` true).
    Invalid { bearer: bool },
    /// A verified caller.
    Caller(Principal<'a>),
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Let in.
    Allow(Pass),
    Refuse(Refused),
}

/// How a request that is not let in is answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// Send the browser to sign in, and back here afterwards. `revoked`: the credential the
    /// request carried is older than the record it stands on, the caller's (a session whose
    /// user was deactivated, re-created or given a new identifier since: it is over) or the
    /// agent's a token acts through.
    SignIn { revoked: Option<Outdated> },
    /// 401 with a `WWW-Authenticate` challenge; `invalid_token` when a bearer token was
    /// presented and refused (RFC 6750 §3.1). `revoked` as for [`Refused::SignIn`].
    Challenge {
        invalid_token: bool,
        revoked: Option<Outdated>,
    },
    /// 403.
    Forbid(Refusal),
    /// 503: this replica cannot be sure its directory is current (it has lost the shared
    /// store's change feed), so it judges nobody who needs the directory.
    Unavailable,
}

impl Refused {
    /// Whether the credential the request carried is older than its user's record: a
    /// session then is over and must be ended; a token will never pass.
    pub fn revoked(&self) -> bool {
        matches!(
            self,
            Refused::SignIn { revoked: Some(_) }
                | Refused::Challenge {
                    revoked: Some(_),
                    ..
                }
        )
    }

    /// Whose record the refused credential is older than, when it is.
    pub fn outdated(&self) -> Option<&Outdated> {
        match self {
            Refused::SignIn { revoked } | Refused::Challenge { revoked, .. } => revoked.as_ref(),
            _ => None,
        }
    }

    /// The agent a refused token older than a record acts through, if any: the record is the
    /// agent's, or the person's it acts for.
    pub fn outdated_agent(&self) -> Option<&AgentRecord> {
        self.outdated()?.agent()
    }
}

/// Whose directory record a refused credential is older than (see [`outlived`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Outdated {
    /// The caller's own user; with the agent a delegated token acts through for them, if one
    /// does (`on_behalf_of` names them).
    Caller(Option<AgentRecord>),
    /// The agent a token acts through, its own or for a person (`on_behalf_of`).
    Agent(AgentRecord),
    /// A stranger's session, stored before Portcullis said of every session whether its
    /// groups were all listed ([`crate::caller::Identity::groups_unlisted`]): it cannot be
    /// judged on them.
    Unlisted,
}

impl Outdated {
    /// The agent the refused token acts through, if any: the record is the agent's, or the
    /// person's it acts for.
    pub fn agent(&self) -> Option<&AgentRecord> {
        match self {
            Outdated::Agent(agent) | Outdated::Caller(Some(agent)) => Some(agent),
            Outdated::Caller(None) | Outdated::Unlisted => None,
        }
    }

    /// Why a person's session refused as outdated is over, as audited.
    pub fn session_reason(&self, who: &str) -> String {
        match self {
            Outdated::Unlisted => format!(
                "the session of {who}, who is not in the directory, was stored before \
                 Portcullis kept whether its groups were all listed: it is over, and {who} \
                 must sign in again"
            ),
            _ => format!(
                "the session began before {who} was deactivated, re-created or given a new \
                 identifier in the directory: it is over, and {who} must sign in again"
            ),
        }
    }
}

/// A request let in.
#[derive(Debug, Clone, PartialEq)]
pub struct Pass {
    /// What the upstream is told about the caller; `None` when a public rule lets the request
    /// in as anyone's: without a caller, or with one the directory has deactivated.
    pub forward: Option<Forward>,
    /// The deciding rule and why, when the gate was asked to explain ([`Gate::explain`]).
    pub why: Option<Why>,
}

/// What the upstream is told about an allowed caller: who ([`Named`], read through `Deref`)
/// and the agent, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Shared by a directory user's requests while the directory does not change (see
    /// [`Forwards`]).
    pub named: Arc<Named>,
    /// The agent making the request: the caller itself (then `user` is its name), or the
    /// actor of a delegated token (then `user` is the person it acts for).
    pub agent: Option<AgentRecord>,
}

impl Forward {
    /// Why the identity headers cannot tell the upstream truly who this caller is; `None`
    /// when they can.
    /// `headers`: the upstream is told in identity headers (else in the assertion only).
    fn untellable(&self, headers: bool) -> Option<String> {
        let itself = self
            .agent
            .as_ref()
            .is_some_and(|a| a.on_behalf_of.is_none());
        if headers {
            if self.agent.as_ref().is_some_and(|a| !fits_header(&a.name)) {
                return Some(unsendable("agent's name"));
            }
            // `values`, made once per user, is `None` exactly when the name or email does
            // not fit a header: only then are they read again, to say which.
            if self.values.is_none() {
                return untellable_name(&self.user, self.email.as_deref(), itself, true);
            }
        }
        untellable_name(&self.user, None, itself, false)
    }

    /// Whether what the upstream was told in `told` still holds of the caller let in as
    /// `self`: the same user, email and agent (its name, and whether it acts for someone), and
    /// every group it was told of (one added takes nothing away).
    pub fn still_true_of(&self, told: &Forward) -> bool {
        let (now, then) = (&*self.named, &*told.named);
        (Arc::ptr_eq(&self.named, &told.named)
            || (now.user == then.user
                && now.email == then.email
                && then.group_names.iter().all(|g| now.group_names.contains(g))))
            && same_agent(self.agent.as_ref(), told.agent.as_ref())
    }
}

/// The same agent as the upstream is told of it: its name, and the person it acts for (its
/// owners are not told).
fn same_agent(a: Option<&AgentRecord>, b: Option<&AgentRecord>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.name == b.name && a.on_behalf_of == b.on_behalf_of,
        _ => false,
    }
}

impl Deref for Forward {
    type Target = Named;

    fn deref(&self) -> &Named {
        &self.named
    }
}

/// Who the upstream is told an allowed caller is.
#[derive(Debug, PartialEq, Eq)]
pub struct Named {
    /// The SCIM `userName` (lower-cased; an agent's: `agent:` and its name).
    pub user: String,
    pub email: Option<String>,
    /// Display names of every group, comma-separated.
    pub groups: String,
    pub group_names: Vec<String>,
    /// A hash of the user, email and groups the upstream is told of; keys caches of anything
    /// derived from them (the signed assertion).
    pub version: u64,
    /// `user`, `email` and `groups` as header values; `None` when one of them cannot be one
    /// (then a route with identity headers refuses the request rather than send it without).
    pub values: Option<IdentityValues>,
}

/// The identity headers' values.
#[derive(Debug, PartialEq, Eq)]
pub struct IdentityValues {
    pub user: HeaderValue,
    pub email: Option<HeaderValue>,
    pub groups: HeaderValue,
}

impl IdentityValues {
    /// `None` when one of them cannot be a header value.
    fn of(user: &str, email: Option<&str>, groups: &str) -> Option<IdentityValues> {
        let value = header_value;
        let email = match email {
            Some(email) => Some(value(email)?),
            None => None,
        };
        Some(IdentityValues {
            user: value(user)?,
            email,
            groups: value(groups)?,
        })
    }
}

/// Whether `text` reaches the upstream as it is in an identity header. A control character
/// (CR, LF, NUL, …) cannot be sent in a header at all, and HTTP/1 parsers trim spaces and tabs
/// around a value: `alice ` would reach the upstream as `alice`, another user. (Other text,
/// UTF-8 included, is sent as it is.)
fn fits_header(text: &str) -> bool {
    let padded = text.starts_with([' ', '\t']) || text.ends_with([' ', '\t']);
    !padded && text.bytes().all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// `text` as an identity header's value, if it [`fits_header`].
fn header_value(text: &str) -> Option<HeaderValue> {
    fits_header(text)
        .then(|| HeaderValue::from_str(text).ok())
        .flatten()
}

/// Why the upstream cannot be told truly of a caller named `user`, with `email` (when it is
/// to be checked too); `None` when it can. In identity headers (`headers`), a name must fit
/// one ([`fits_header`]). In them and in the assertion's `sub`, only an agent calling for
/// itself (`agent_itself`) is named `agent:…`, in any case (see [`agent_user`]): a person so
/// named (also one an agent acts for) would pass for it with an upstream that reads the name
/// alone, and one that compares names without case, as SCIM does, reads `Agent:` so too.
fn untellable_name(
    user: &str,
    email: Option<&str>,
    agent_itself: bool,
    headers: bool,
) -> Option<String> {
    if headers && !fits_header(user) {
        return Some(unsendable("name"));
    }
    if headers && email.is_some_and(|email| !fits_header(email)) {
        return Some(unsendable("email"));
    }
    let agent_named = user
        .get(..AGENT_PREFIX.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(AGENT_PREFIX));
    (!agent_itself && agent_named).then(|| {
        "the caller's name begins with \"agent:\", as only agents' do, so the upstream cannot be \
         told who calls"
            .to_owned()
    })
}

/// What an agent's name is prefixed with where a user's would be (see [`agent_user`]).
const AGENT_PREFIX: &str = "agent:";

fn unsendable(what: &str) -> String {
    format!(
        "the caller's {what} holds a control character or begins or ends with a space, so the \
         identity headers cannot tell the upstream who calls"
    )
}

/// The [`Named`] of directory users, made once per user and state of the directory and shared
/// by their requests, instead of once per request. One map per worker thread, so a hit takes no
/// lock and touches no counter another thread uses. A map holds one state of the directory
/// only: a view of any other (after any change, or a reload) empties it first.
#[derive(Default)]
pub struct Forwards {
    threads: thread_local::ThreadLocal<RefCell<ThreadForwards>>,
}

/// One worker thread's [`Named`], by row, all made from views of the directory at `state`.
#[derive(Default)]
struct ThreadForwards {
    /// The index generation and sequence number of the views they were made from.
    state: (u64, Seq),
    named: HashMap<Row, Arc<Named>, foldhash::fast::RandomState>,
    /// What they hold, about ([`Named::bytes`]).
    bytes: usize,
}

/// Users kept per worker thread, and bytes: a person in 150 groups is told of in some 20 KB.
/// Past either, the users already kept stay and others are made per request: a full map never
/// churns.
const FORWARDS_PER_THREAD: usize = 16_384;
const FORWARD_BYTES_PER_THREAD: usize = 16 << 20;

impl Forwards {
    /// The `Named` made by `make` for the view `stamp` names, made now unless kept.
    fn get_or_make(&self, stamp: Stamp, make: impl FnOnce() -> Named) -> Arc<Named> {
        let Ok(mut kept) = self.threads.get_or_default().try_borrow_mut() else {
            return Arc::new(make());
        };
        let state = (stamp.generation, stamp.seq);
        if kept.state != state {
            kept.named.clear();
            kept.state = state;
            kept.bytes = 0;
        }
        if let Some(named) = kept.named.get(&stamp.row) {
            return named.clone();
        }
        let named = Arc::new(make());
        let bytes = kept.bytes + named.bytes();
        if kept.named.len() < FORWARDS_PER_THREAD && bytes <= FORWARD_BYTES_PER_THREAD {
            kept.named.insert(stamp.row, named.clone());
            kept.bytes = bytes;
        }
        named
    }
}

/// The rule behind a decision, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Why {
    pub rule: Option<String>,
    pub reason: String,
}

/// The answer of a replica whose directory may miss a revocation, to a caller it cannot judge:
/// it answers for nobody (fail closed). What anyone may have (a public rule) stays open, as
/// anyone's: the caller would have it without their credential.
fn out_of_touch(facts: &Facts<'_>, request: &Request<'_>, explain: bool) -> Admission {
    let decision = facts.route.policy.evaluate(None, request);
    if decision.allowed {
        return allow_anonymous(&decision, explain);
    }
    Admission::Refuse(Refused::Unavailable)
}

/// A refused request: who, which rule, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Who was refused, as the refusal page names them: the directory's `userName`, or the
    /// caller's own name when the directory does not know them; `None` when nobody signed in.
    pub who: Option<String>,
    /// The deciding rule, when a rule decided.
    pub rule: Option<String>,
    pub cause: Cause,
    /// The sentence the caller and the audit log are given.
    pub reason: String,
    /// The agent refused, or the agent of a refused delegated token.
    pub agent: Option<AgentRecord>,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A deny rule matched.
    DenyRule,
    /// No allow rule covers this caller and request.
    NoRuleAllows,
    /// The directory has the account deactivated.
    Deactivated,
    /// The request cannot be judged (a method or path the policy cannot evaluate).
    Unevaluable,
    /// The caller's identifying claim names no user in the directory.
    NotInDirectory,
    /// The caller's token has no claim to look them up by.
    NoIdentifyingClaim,
    /// Nobody signed in, on a public route whose public rules do not cover this request.
    NotPublic,
    /// An open connection's route is no longer in the configuration.
    RouteRemoved,
    /// An open connection's caller would be let in now only as anyone (by a public rule), not
    /// as whom the upstream was told of when it was opened.
    AsAnyoneOnly,
    /// What the upstream was told of an open connection's caller when it was opened no longer
    /// holds (see [`Forward::still_true_of`]).
    IdentityChanged,
    /// The route tells upstreams who calls in headers, and the caller's name, email or agent
    /// name cannot be told there as it is (see [`header_value`]).
    CannotBeTold,
}

/// The gate, over the live directory and the current `[identity]` mapping.
#[derive(Clone, Copy)]
pub struct Gate<'a> {
    pub directory: &'a Directory,
    pub identity: &'a IdentityConfig,
    /// The issuers of bearer tokens, for the clients each takes a person's token from.
    pub jwt_issuers: &'a [JwtIssuer],
    /// Whether the directory is known to be current. Always true with an embedded store;
    /// with a shared one, while this replica's lease on the change feed holds.
    pub current: bool,
    /// Unix seconds: an agent's `expires` is judged against it.
    pub now: u64,
    /// Where what directory users' requests tell the upstream is kept; `None` makes it anew
    /// for every request.
    pub forwards: Option<&'a Forwards>,
}

/// The directory's view of a caller, for `/.portcullis/me` and `portcullis explain`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectoryView {
    pub user_name: String,
    pub active: bool,
    pub groups: Vec<String>,
    /// The caller is a session older than this user's record as it now is (see
    /// [`outlived`]): the user it names is not the one who signed in.
    pub outlived: bool,
}

/// Whether the caller's credential is older than `user`'s record as it stands: a session that
/// began, or a token issued (`iat`), before the user was last created, re-activated or given
/// a new identifier, so that it is not theirs, or no longer. A session is dated by the
/// directory's change sequence, a token by the IdP's clock against the writer's (a token
/// issued in the seconds after a re-activation by an IdP whose clock is behind is refused
/// until a newer one is). A token without `iat` cannot show it is not older; it passes only
/// for a record written before its time was kept. A deactivated user's token is not judged
/// by its age: it is refused as theirs, with that reason.
fn outlived(principal: Principal<'_>, user: &UserEntry) -> bool {
    match principal {
        Principal::Person(identity) => identity.directory_seq < user.valid_since,
        Principal::Machine(token) => predates(token.issued, user.active, user.valid_since_unix),
    }
}

/// Whether a session of `user`'s lets them in, by the directory: they are active, and it
/// began after they were last created, re-activated or given a new identifier.
pub fn session_stands(identity: &Identity, user: &UserEntry) -> bool {
    user.active && !outlived(Principal::Person(identity), user)
}

/// Whether a token issued at `issued` (`iat`) predates the record it names, a user's or an
/// agent's, whose `valid_since` moved at `since` (0: not known); see [`outlived`]. An
/// inactive record's token is not judged by its age: it is refused as inactive.
fn predates(issued: Option<u64>, active: bool, since: u64) -> bool {
    active && since > 0 && issued.is_none_or(|iat| iat < since)
}

/// The outcome of judging a caller the gate could look up.
enum Judged {
    Allow(Pass),
    Refuse(Refusal),
    /// The session began, or the token was issued, before the user (or the agent) was last
    /// created, re-activated or given a new identifier ([`outlived`]).
    Revoked(Outdated),
}

impl Gate<'_> {
    /// Decides whether `presented` may make the request `facts` describe.
    pub fn admit(&self, facts: &Facts<'_>, presented: Presented<'_>) -> Admission {
        self.judge(facts, presented, false)
    }

    /// [`Gate::admit`], and an allow also says which rule allowed and why ([`Pass::why`]).
    pub fn explain(&self, facts: &Facts<'_>, presented: Presented<'_>) -> Admission {
        self.judge(facts, presented, true)
    }

    fn judge(&self, facts: &Facts<'_>, presented: Presented<'_>, explain: bool) -> Admission {
        let request = Request {
            method: facts.method,
            path: facts.path,
        };
        let principal = match presented {
            // A person's token replayed by a client its issuer takes none of theirs from: an
            // invalid token, wherever it is presented.
            // (Judged so only where the directory is current: one behind may not yet know
            // the agent that holds it.)
            Presented::Caller(Principal::Machine(token))
                if self.current && self.unlisted_holder(token).is_some() =>
            {
                return self.anonymous(facts, &request, true, explain)
            }
            // A caller of a kind the route does not take is no caller there.
            Presented::Caller(principal) if takes(facts.route, principal) => principal,
            // A token of a kind it takes, but not for it: an invalid token here.
            Presented::Caller(Principal::Machine(_))
                if facts.route.accept.contains(&Credential::Bearer) =>
            {
                return self.anonymous(facts, &request, true, explain)
            }
            Presented::Caller(_) | Presented::Nothing => {
                return self.anonymous(facts, &request, false, explain)
            }
            // A session this replica does not hold may be one it has not heard of (begun on
            // another while this one was out of touch): the caller is told to try again, as
            // one it holds is, not sent to sign in anew.
            Presented::Invalid { bearer: false } if !self.current => {
                return out_of_touch(facts, &request, explain)
            }
            Presented::Invalid { bearer } => {
                return self.anonymous(facts, &request, bearer, explain)
            }
        };
        if !self.current {
            return out_of_touch(facts, &request, explain);
        }
        let judged = match self.resolve(facts, &request, principal, explain) {
            // Fail closed: an upstream that is told who calls (in headers, or the assertion)
            // is told truly, or not at all.
            Judged::Allow(pass) => match pass
                .forward
                .as_ref()
                .filter(|_| facts.route.identity_headers || facts.route.assertion)
            {
                Some(forward) => match forward.untellable(facts.route.identity_headers) {
                    Some(reason) => Judged::Refuse(Refusal {
                        who: Some(forward.user.clone()),
                        rule: None,
                        cause: Cause::CannotBeTold,
                        reason,
                        agent: forward.agent.clone(),
                    }),
                    None => Judged::Allow(pass),
                },
                None => Judged::Allow(pass),
            },
            judged => judged,
        };
        match judged {
            Judged::Allow(pass) => Admission::Allow(pass),
            // Someone the directory cannot place, or the upstream cannot be told of, is still
            // anyone: public rules let them in.
            Judged::Refuse(refusal)
                if matches!(
                    refusal.cause,
                    Cause::NotInDirectory | Cause::NoIdentifyingClaim | Cause::CannotBeTold
                ) =>
            {
                match facts.route.policy.evaluate(None, &request) {
                    decision if decision.allowed => allow_anonymous(&decision, explain),
                    _ => Admission::Refuse(Refused::Forbid(refusal)),
                }
            }
            Judged::Refuse(refusal) => Admission::Refuse(Refused::Forbid(refusal)),
            // The session is over for good: the person signs in again. A token is invalid:
            // its client needs a new one.
            Judged::Revoked(outdated) => unauthenticated(
                facts,
                matches!(principal, Principal::Machine(_)),
                Some(outdated),
            ),
        }
    }

    /// The answer for a request with no valid caller: in by a public rule, refused on a public
    /// route, or asked to sign in or to authenticate.
    fn anonymous(
        &self,
        facts: &Facts<'_>,
        request: &Request<'_>,
        invalid_token: bool,
        explain: bool,
    ) -> Admission {
        let decision = facts.route.policy.evaluate(None, request);
        if decision.allowed {
            return allow_anonymous(&decision, explain);
        }
        if facts.route.accept.is_empty() {
            // A public route whose public rules don't cover this request: there is no way to
            // sign in here, so it is simply refused.
            return Admission::Refuse(Refused::Forbid(Refusal {
                who: None,
                rule: None,
                cause: Cause::NotPublic,
                reason: "this address is not public".to_owned(),
                agent: None,
            }));
        }
        unauthenticated(facts, invalid_token, None)
    }

    /// The claim and the SCIM attribute that find `principal` in the directory.
    fn mapping(&self, principal: Principal<'_>) -> (&str, ScimAttribute) {
        match principal {
            Principal::Person(_) => (self.identity.claim.as_str(), self.identity.scim_attribute),
            Principal::Machine(token) if !token.for_itself => (
                self.identity.bearer_claim.as_str(),
                self.identity.scim_attribute,
            ),
            Principal::Machine(_) => (
                self.identity.machine_claim.as_str(),
                self.identity.machine_scim_attribute,
            ),
        }
    }

    /// Looks the caller up and applies the route's policy to them:
    /// - a delegated token (with `act`) as both its person and the agent acting for them;
    /// - a person's token held by a client that is an agent, likewise: an agent cannot shed
    ///   its owner chain by holding a person's token;
    /// - a client's own token as the agent it names, if there is one, else as a machine;
    /// - anyone else as a directory user.
    fn resolve(
        &self,
        facts: &Facts<'_>,
        request: &Request<'_>,
        principal: Principal<'_>,
        explain: bool,
    ) -> Judged {
        let Principal::Machine(token) = principal else {
            return self.user(facts, request, principal, explain);
        };
        let claim = &self.identity.agent_claim;
        let judged = match (&token.act, token.for_itself) {
            (Some(_), true) => Some(Judged::Refuse(Refusal {
                who: Some(principal.log_name()),
                rule: None,
                cause: Cause::NoIdentifyingClaim,
                reason: "the token is delegated (it has an act claim), but its subject is a \
                         client, not a person"
                    .to_owned(),
                agent: None,
            })),
            (Some(actor), false) => {
                let (agent, named_by) = actor_claim(claim, actor);
                // An agent holding a token whose `act` names another agent would be judged as
                // that one, and shed its own standing (an owner deactivated) by it.
                let holder = client_claim(claim, token)
                    .filter(|holder| !self.same_agent(holder, agent) && self.agent_known(holder));
                Some(match holder {
                    Some(holder) => Judged::Refuse(Refusal {
                        who: Some(self.person_name(principal)),
                        rule: None,
                        cause: Cause::NoIdentifyingClaim,
                        reason: format!(
                            "the token is held by the agent \"{holder}\" ({}), but acts through \
                             another, \"{agent}\" (its act claim's {named_by})",
                            claim.as_str()
                        ),
                        agent: None,
                    }),
                    None => {
                        let through = ("its act claim's", named_by);
                        self.delegated(facts, request, principal, agent, through, explain)
                    }
                })
            }
            (None, false) => client_claim(claim, token)
                .filter(|agent| self.agent_known(agent))
                .map(|agent| {
                    let through = ("its client's", claim.as_str());
                    self.delegated(facts, request, principal, agent, through, explain)
                }),
            (None, true) => client_claim(claim, token)
                .and_then(|agent| self.agent(facts, request, agent, token.issued, explain)),
        };
        judged.unwrap_or_else(|| self.user(facts, request, principal, explain))
    }

    /// The client holding `token` when it is a person's held by a client its issuer takes
    /// none of theirs from (`person_clients`), and that is no agent: an application that signs
    /// people in through the same IdP, replaying their tokens here. An agent's client is
    /// judged as its agent; a delegated token (`act`) names the agent acting.
    pub fn unlisted_holder<'t>(&self, token: &'t Machine) -> Option<&'t str> {
        unlisted_client(self.jwt_issuers, token).filter(|_| {
            !client_claim(&self.identity.agent_claim, token)
                .is_some_and(|agent| self.agent_known(agent))
        })
    }

    /// The agent acting with `token`, as a refusal of the token names it (see
    /// [`Gate::resolve`]): an agent's own token's client (the record then names no person),
    /// or, beside the person, the agent a person's token's `act` claim names, or its client
    /// when that is an agent. So an agent replaying the tokens of many people is one caller in
    /// the audit log's budgets, whatever refuses them.
    /// Named as the directory names it, and by the value it was looked up by when deleted or
    /// ambiguous, as [`Gate::delegated`]'s refusals name it; none when no agent has it.
    pub fn acting_agent(&self, token: &Machine) -> Option<AgentRecord> {
        let value = self.acting_value(token)?;
        let now = i64::try_from(self.now).unwrap_or(i64::MAX);
        let found =
            (self.directory).with_agent(self.agent_key(value), now, |lookup| match lookup {
                AgentLookup::Found(view) => Some(Some(agent_record(&view))),
                AgentLookup::Unknown => None,
                AgentLookup::Ambiguous(_) | AgentLookup::Deleted => Some(None),
            })?;
        // An agent's own token whose agent was deleted or is ambiguous: no record, as
        // `Gate::agent` refuses it (see `Gate::token_refused_as` for whom it names).
        if token.for_itself && found.is_none() {
            return None;
        }
        let mut record = found.unwrap_or_else(|| AgentRecord {
            name: value.to_owned(),
            owners: Vec::new(),
            on_behalf_of: None,
        });
        record.on_behalf_of =
            (!token.for_itself).then(|| self.person_name(Principal::Machine(token)));
        Some(record)
    }

    /// The agent acting with `token` ([`Gate::acting_agent`]) when the token was issued before
    /// the agent was last created, re-activated or named otherwise, or its application
    /// re-activated: refused so by every route ([`Outdated::Agent`]), before its person is
    /// asked.
    pub fn outdated_agent(&self, token: &Machine) -> Option<AgentRecord> {
        let key = self.agent_key(self.acting_value(token)?);
        let now = i64::try_from(self.now).unwrap_or(i64::MAX);
        let mut record = self.directory.with_agent(key, now, |lookup| match lookup {
            AgentLookup::Found(view)
                if predates(token.issued, view.agent.active, view.valid_since_unix) =>
            {
                Some(agent_record(&view))
            }
            _ => None,
        })?;
        record.on_behalf_of =
            (!token.for_itself).then(|| self.person_name(Principal::Machine(token)));
        Some(record)
    }

    /// The value of `agent_claim` the agent acting with `token` is found by (see
    /// [`Gate::acting_agent`]).
    fn acting_value<'t>(&'t self, token: &'t Machine) -> Option<&'t str> {
        let claim = &self.identity.agent_claim;
        match (&token.act, token.for_itself) {
            (Some(actor), false) => Some(actor_claim(claim, actor).0),
            (None, _) => client_claim(claim, token),
            // A client's own token that says another acts: refused as the client's, no agent's
            // (see `Gate::resolve`).
            (Some(_), true) => None,
        }
    }

    /// Whom a refusal of `token` names, with the agent acting with it ([`Gate::acting_agent`]):
    /// an agent's own token as the agent (`agent:` and the value it was looked up by where the
    /// directory's agent of it was deleted or is ambiguous, as `Gate::agent` names it), any
    /// other as its caller.
    pub fn token_refused_as(&self, token: &Machine) -> (String, Option<AgentRecord>) {
        let agent = self.acting_agent(token);
        let who = match &agent {
            Some(agent) if agent.on_behalf_of.is_none() => agent_user(&agent.name),
            None if token.for_itself && token.act.is_none() => match self.own_agent(token) {
                Some(value) => agent_user(value),
                None => Principal::Machine(token).log_name(),
            },
            // Named by the token (before the directory is asked), but not by a directory
            // user's name when the directory does not find its person: as their other
            // refusals are.
            _ if !token.for_itself && self.directory_view(Principal::Machine(token)).is_none() => {
                self.stranger_name(Principal::Machine(token))
            }
            _ => Principal::Machine(token).log_name(),
        };
        (who, agent)
    }

    /// Whether two values of `agent_claim` name the same agent, as its attribute compares
    /// (a name case-insensitively, an `externalId` exactly).
    fn same_agent(&self, a: &str, b: &str) -> bool {
        match self.identity.agent_scim_attribute {
            AgentAttribute::Name => portcullis_policy::fold(a) == portcullis_policy::fold(b),
            AgentAttribute::ExternalId => a == b,
        }
    }

    /// Whether `value` names an agent, live or deleted.
    /// The value `token`'s agent is found by, when the token is an agent's own (its client's,
    /// acting for no one) and the directory has or had that agent: judged as the agent, never
    /// as a user (see [`Gate::resolve`]).
    pub fn own_agent<'t>(&self, token: &'t Machine) -> Option<&'t str> {
        let own = token.for_itself && token.act.is_none();
        let value = client_claim(&self.identity.agent_claim, token).filter(|_| own)?;
        self.agent_known(value).then_some(value)
    }

    pub fn agent_known(&self, value: &str) -> bool {
        let key = self.agent_key(value);
        self.directory
            .with_agent(key, 0, |lookup| !matches!(lookup, AgentLookup::Unknown))
    }

    fn agent_key<'v>(&self, value: &'v str) -> AgentKey<'v> {
        match self.identity.agent_scim_attribute {
            AgentAttribute::Name => AgentKey::Name(value),
            AgentAttribute::ExternalId => AgentKey::ExternalId(value),
        }
    }

    /// A token an agent holds for a person (RFC 8693 delegation, or a person's token issued to
    /// the agent's client): let in only if both the person and the agent, `value` (named by
    /// `through`: whose claim it was read from, and which), are.
    fn delegated(
        &self,
        facts: &Facts<'_>,
        request: &Request<'_>,
        principal: Principal<'_>,
        value: &str,
        through: (&str, &str),
        explain: bool,
    ) -> Judged {
        let issued = match principal {
            Principal::Machine(token) => token.issued,
            Principal::Person(_) => None,
        };
        let agent = match self.agent(facts, request, value, issued, explain) {
            // A deactivated agent, let in by a public rule: so is the request, as anyone's.
            Some(Judged::Allow(pass)) if pass.forward.is_none() => return Judged::Allow(pass),
            Some(Judged::Allow(pass)) => pass,
            // Recorded as the person's, with the agent beside them, as the token's other
            // refusals are (an agent deleted, or ambiguous, is named by the value it was
            // looked up by).
            Some(Judged::Refuse(mut refusal)) => {
                let person = self.person_name(principal);
                let agent = refusal.agent.get_or_insert_with(|| AgentRecord {
                    name: value.to_owned(),
                    owners: Vec::new(),
                    on_behalf_of: None,
                });
                agent.on_behalf_of = Some(person.clone());
                refusal.who = Some(person);
                return Judged::Refuse(refusal);
            }
            Some(Judged::Revoked(Outdated::Agent(mut agent))) => {
                agent.on_behalf_of = Some(self.person_name(principal));
                return Judged::Revoked(Outdated::Agent(agent));
            }
            Some(Judged::Revoked(outdated)) => return Judged::Revoked(outdated),
            None => {
                return Judged::Refuse(Refusal {
                    who: Some(self.person_name(principal)),
                    rule: None,
                    cause: Cause::NotInDirectory,
                    reason: format!(
                        "the token acts through \"{value}\" ({} {}), which is not an agent in \
                         the directory",
                        through.0, through.1
                    ),
                    agent: None,
                });
            }
        };
        let mut record = agent.forward.and_then(|f| f.agent);
        match self.user(facts, request, principal, explain) {
            Judged::Allow(person) => {
                let Some(mut forward) = person.forward else {
                    // Only a public rule lets a request in without a caller: none to delegate.
                    return Judged::Allow(person);
                };
                if let Some(agent) = &mut record {
                    agent.on_behalf_of = Some(forward.user.clone());
                }
                forward.agent = record;
                let why = match (person.why, agent.why) {
                    (Some(person), Some(agent)) => Some(Why {
                        rule: person.rule,
                        reason: format!("{}; and for the agent, {}", person.reason, agent.reason),
                    }),
                    (person, _) => person,
                };
                Judged::Allow(Pass {
                    forward: Some(forward),
                    why,
                })
            }
            Judged::Refuse(mut refusal) => {
                if let (Some(agent), Some(who)) = (&mut record, &refusal.who) {
                    agent.on_behalf_of = Some(who.clone());
                }
                refusal.agent = record;
                Judged::Refuse(refusal)
            }
            // The person's record is newer than the token: recorded as theirs, with the agent
            // beside them, as the token's other refusals are.
            Judged::Revoked(Outdated::Caller(_)) => {
                if let Some(agent) = &mut record {
                    agent.on_behalf_of = Some(self.person_name(principal));
                }
                Judged::Revoked(Outdated::Caller(record))
            }
            Judged::Revoked(outdated) => Judged::Revoked(outdated),
        }
    }

    /// Judges the agent whose `agent_scim_attribute` is `value`; `None` when no agent has it
    /// and none that had it was deleted (the caller is then no agent).
    fn agent(
        &self,
        facts: &Facts<'_>,
        request: &Request<'_>,
        value: &str,
        issued: Option<u64>,
        explain: bool,
    ) -> Option<Judged> {
        let key = self.agent_key(value);
        let now = i64::try_from(self.now).unwrap_or(i64::MAX);
        self.directory.with_agent(key, now, |lookup| {
            let attribute = self.identity.agent_scim_attribute.as_str();
            let refuse = |reason: String| {
                Some(Judged::Refuse(Refusal {
                    who: Some(agent_user(value)),
                    rule: None,
                    cause: Cause::NotInDirectory,
                    reason,
                    agent: None,
                }))
            };
            let view = match lookup {
                AgentLookup::Found(view) => view,
                AgentLookup::Unknown => return None,
                AgentLookup::Ambiguous(count) => {
                    return refuse(format!(
                        "{count} agents have the {attribute} \"{value}\", and Portcullis will \
                         not guess which one"
                    ))
                }
                AgentLookup::Deleted => {
                    return refuse(format!(
                        "the agent with the {attribute} \"{value}\" was deleted from the \
                         directory, or is found there by another value now"
                    ))
                }
            };
            // A token issued before the agent was last created, re-activated or named
            // otherwise is not its own, or no longer (as a user's: see `outlived`); nor one
            // from before its application was deactivated or re-activated.
            let record = agent_record(&view);
            if predates(issued, view.agent.active, view.valid_since_unix) {
                return Some(Judged::Revoked(Outdated::Agent(record)));
            }
            let groups = group_refs(&view.groups);
            let owner_groups = group_refs(&view.owner_groups);
            let subject = Subject {
                kind: SubjectKind::Agent,
                user_name: &view.agent.name,
                email: None,
                active: view.standing.is_ok(),
                groups: &groups,
                owner_groups: &owner_groups,
            };
            let decision = facts.route.policy.evaluate(Some(&subject), request);
            if !decision.allowed {
                // Named as the agent it is where the reason names the caller, not as a person
                // of its name (`agent:helper`, not `helper`).
                let shown = agent_user(&record.name);
                let reason = match decision.reason {
                    Reason::NoRuleAllows { method, path, .. } => Reason::NoRuleAllows {
                        user: &shown,
                        method,
                        path,
                    },
                    Reason::Denied {
                        rule,
                        by: Match::SignedIn(_),
                        conditions,
                    } => Reason::Denied {
                        rule,
                        by: Match::SignedIn(&shown),
                        conditions,
                    },
                    other => other,
                };
                let mut refusal = refusal(Some(shown.clone()), &Decision { reason, ..decision });
                if let (Reason::Deactivated, Err(why)) = (decision.reason, view.standing) {
                    refusal.reason = format!("the agent is refused: {}", why.as_str());
                }
                refusal.agent = Some(record);
                return Some(Judged::Refuse(refusal));
            }
            if !subject.active {
                return Some(Judged::Allow(anyone(&decision, explain)));
            }
            let mut forward = Forward::new(
                agent_user(&record.name),
                None,
                view.groups
                    .iter()
                    .map(|g| String::from(&*g.display_name))
                    .collect(),
            );
            forward.agent = Some(record);
            Some(Judged::Allow(Pass {
                forward: Some(forward),
                why: explain.then(|| Why::of(&decision)),
            }))
        })
    }

    /// Looks a directory user up and applies the route's policy to them.
    fn user(
        &self,
        facts: &Facts<'_>,
        request: &Request<'_>,
        principal: Principal<'_>,
        explain: bool,
    ) -> Judged {
        let (claim, attribute) = self.mapping(principal);
        let Some(key) = subject_key(self.identity, principal) else {
            // (A person's bearer token too: it says whether the IdP verified its email.)
            let reason = match unverified_email(principal) {
                Some(email) if claim == "email" => {
                    format!(
                        "the identity provider has not verified the email {email} \
                         (email_verified is false), so it identifies nobody"
                    )
                }
                _ => format!(
                    "the sign-in carries no {claim} claim, which identifies a directory user"
                ),
            };
            return Judged::Refuse(Refusal {
                who: Some(self.stranger_name(principal)),
                rule: None,
                cause: Cause::NoIdentifyingClaim,
                reason,
                agent: None,
            });
        };
        let kind = match principal {
            // A person's token, held by a client acting for them: a person.
            Principal::Person(_) => SubjectKind::Person,
            Principal::Machine(token) if !token.for_itself => SubjectKind::Person,
            Principal::Machine(_) => SubjectKind::Machine,
        };
        let judged = self.directory.with_subject(key, |lookup| {
            let view = match lookup {
                Lookup::Found(view) => view,
                // Token groups speak only for strangers: never for someone the directory
                // cannot tell apart or the IdP removed, and never for a person's bearer token,
                // whose claims may name them differently from their ID token (Okta's access
                // tokens carry the login as `sub`): not found there is not "a stranger".
                // Judged once the lookup is done (it looks the directory up again).
                Lookup::Unknown if facts.route.token_groups && !person_token(principal) => {
                    return Ok(None);
                }
                // Refused once the lookup is done (it is named by looking the directory up
                // again).
                Lookup::Ambiguous(count) => return Err(Some(count)),
                Lookup::Deleted => return Err(None),
                Lookup::Unknown => return Err(Some(0)),
            };
            if outlived(principal, view.user) {
                return Ok(Some(Judged::Revoked(Outdated::Caller(None))));
            }
            let groups = group_refs(&view.groups);
            let mut subject = user_subject(kind, view.user, &groups);
            // An address the IdP says it has not verified names nobody, from the directory
            // either: the IdP provisioned that same unverified address (Okta's self-service
            // registration without email verification), found here by `sub`. (Nor is it told
            // to the upstream, which the user's other credentials are: not kept for them.)
            let mut withheld = false;
            if let (Some(email), Some(unverified)) = (subject.email, unverified_email(principal)) {
                if portcullis_policy::fold(email) == portcullis_policy::fold(unverified) {
                    subject.email = None;
                    withheld = true;
                }
            }
            let email = subject.email;
            let unverified = unverified_email(principal).filter(|_| withheld);
            let decision = decide(facts, request, subject, unverified);
            if !decision.allowed {
                let who = Some(view.user.user_name.to_string());
                return Ok(Some(Judged::Refuse(refusal(who, &decision))));
            }
            if !subject.active {
                return Ok(Some(Judged::Allow(anyone(&decision, explain))));
            }
            let make = || {
                Named::new(
                    String::from(&*view.user.user_name),
                    email.map(str::to_owned),
                    view.groups
                        .iter()
                        .map(|g| String::from(&*g.display_name))
                        .collect(),
                )
            };
            let named = match self.forwards {
                Some(forwards) if !withheld => forwards.get_or_make(view.stamp, make),
                _ => Arc::new(make()),
            };
            let forward = Forward { named, agent: None };
            Ok(Some(Judged::Allow(Pass {
                forward: Some(forward),
                why: explain.then(|| Why::of(&decision)),
            })))
        });
        let who = || self.stranger_name(principal);
        match judged {
            Ok(Some(judged)) => judged,
            // A stranger is named to the upstream by their token: never by a name the
            // directory gives someone (a forged or mistyped email, with `externalId` mapping).
            Ok(None) => {
                // A name a directory user has, had (deleted) or shares.
                let known = |name: &str| {
                    self.names_users(name, |lookup| !matches!(lookup, Lookup::Unknown))
                };
                on_token(facts, request, principal, kind, known, who, explain)
            }
            Err(users) => {
                // Which claim and value were looked up, against which attribute: the usual
                // first-day mistake is a mapping that does not match, and this says how.
                let who = who();
                let attribute = attribute.as_str();
                let looked_up = format!(
                    "its {claim} claim, \"{}\", was looked up as the SCIM {attribute}",
                    key_value(key)
                );
                let reason = match users {
                    Some(0) => format!("{who} is not a user in the directory ({looked_up})"),
                    Some(count) => format!(
                        "{who} matches {count} directory users ({looked_up}), and Portcullis \
                         will not guess which one"
                    ),
                    None => format!(
                        "{who} was deleted from the directory, or is found there by another \
                         value now ({looked_up})"
                    ),
                };
                Judged::Refuse(Refusal {
                    reason,
                    who: Some(who),
                    rule: None,
                    cause: Cause::NotInDirectory,
                    agent: None,
                })
            }
        }
    }

    /// How refusals name a caller the directory does not find (by [`Principal::log_name`]),
    /// unless that is the userName or email of users it holds: then by the subject. An address
    /// the IdP does not check (Entra ID's `mail`, a guest's) must not make a stranger's refusals
    /// read as someone else's, nor a shared one read as each of theirs. (A deleted user's name
    /// stays: their own tries after the deletion are to be found under it.)
    fn stranger_name(&self, principal: Principal<'_>) -> String {
        let name = principal.log_name();
        let subject = match principal {
            Principal::Person(identity) => &identity.subject,
            Principal::Machine(token) if !token.for_itself => &token.subject,
            Principal::Machine(_) => return name,
        };
        let folded = portcullis_policy::fold(&name);
        let names_users = self.names_users(&folded, |lookup| {
            matches!(lookup, Lookup::Found(_) | Lookup::Ambiguous(_))
        });
        match names_users && name != *subject {
            true => subject.clone(),
            false => name,
        }
    }

    /// Whether the folded `name`, looked up as a `userName` and as an email, finds what
    /// `counts` takes.
    fn names_users(&self, name: &str, counts: impl Fn(&Lookup<'_>) -> bool) -> bool {
        [SubjectKey::UserName(name), SubjectKey::Email(name)]
            .into_iter()
            .any(|key| self.directory.with_subject(key, |lookup| counts(&lookup)))
    }

    /// The person a delegated token acts for, as the records of their requests name them:
    /// their `userName` in the directory, else as a stranger's refusals are
    /// ([`Gate::stranger_name`]).
    fn person_name(&self, principal: Principal<'_>) -> String {
        self.directory_view(principal)
            .map_or_else(|| self.stranger_name(principal), |view| view.user_name)
    }

    /// The directory's view of a caller, if the directory knows them.
    pub fn directory_view(&self, principal: Principal<'_>) -> Option<DirectoryView> {
        // An agent's own token is its agent's, as the gate judges it (see `Gate::resolve`),
        // never a user's who shares the agent's name.
        if let Principal::Machine(token) = principal {
            if self.own_agent(token).is_some() {
                return None;
            }
        }
        let key = subject_key(self.identity, principal)?;
        self.directory.with_subject(key, |lookup| {
            lookup.found().map(|view| DirectoryView {
                user_name: view.user.user_name.to_string(),
                active: view.user.active,
                groups: view
                    .groups
                    .iter()
                    .map(|g| g.display_name.to_string())
                    .collect(),
                outlived: outlived(principal, view.user),
            })
        })
    }
}

fn unauthenticated(facts: &Facts<'_>, invalid_token: bool, revoked: Option<Outdated>) -> Admission {
    Admission::Refuse(sign_in_or_challenge(
        facts.method,
        facts.client.get(),
        facts.route.accept.contains(&Credential::Session),
        invalid_token,
        revoked,
    ))
}

/// How a request that needs a caller and has none is answered: a browser asking for a page
/// where people can sign in (`sessions`) is sent to sign in (302); anything else gets a 401.
/// Only a GET or HEAD is sent to sign in: any other request could not be replayed afterwards.
/// Nor is one that presented a bearer token (`invalid_token`): no browser sends one on a
/// page load, and a client that did (Java's `HttpURLConnection` accepts `text/html` unasked)
/// is told its token is invalid, so that it gets a new one, not the IdP's sign-in page.
pub fn sign_in_or_challenge(
    method: &str,
    client: Client,
    sessions: bool,
    invalid_token: bool,
    revoked: Option<Outdated>,
) -> Refused {
    let replayable = matches!(method, "GET" | "HEAD");
    if client == Client::Browser && replayable && sessions && !invalid_token {
        Refused::SignIn { revoked }
    } else {
        Refused::Challenge {
            invalid_token,
            revoked,
        }
    }
}

/// Whether `route` takes the credential `principal` came with: a session, or a bearer token
/// for one of the route's `audiences` when it names any (RFC 8725 §3.9: a token minted for
/// one API of an issuer is not taken by another). Judged on every request and every recheck
/// of an open connection, so a reload that narrows a route's audiences cuts those too.
fn takes(route: &Route, principal: Principal<'_>) -> bool {
    match principal {
        Principal::Person(_) => route.accept.contains(&Credential::Session),
        Principal::Machine(machine) => {
            route.accept.contains(&Credential::Bearer)
                && (route.audiences.is_empty()
                    || machine
                        .audiences
                        .iter()
                        .any(|a| route.audiences.contains(a)))
        }
    }
}

fn allow_anonymous(decision: &Decision<'_>, explain: bool) -> Admission {
    Admission::Allow(anyone(decision, explain))
}

/// In by a public rule, as anyone: the upstream is told of no caller. So also for a caller the
/// directory has deactivated (a user, or an agent without an active owner): the upstream cannot
/// take them for someone the directory still vouches for, and their token is not passed on.
fn anyone(decision: &Decision<'_>, explain: bool) -> Pass {
    Pass {
        forward: None,
        why: explain.then(|| Why::of(decision)),
    }
}

fn refusal(who: Option<String>, decision: &Decision<'_>) -> Refusal {
    let cause = match decision.reason {
        Reason::Denied { .. } => Cause::DenyRule,
        Reason::Deactivated => Cause::Deactivated,
        Reason::Unevaluable { .. } => Cause::Unevaluable,
        // `NotSignedIn` cannot come with a subject; `Allowed` is not a refusal.
        Reason::NoRuleAllows { .. } | Reason::NotSignedIn | Reason::Allowed { .. } => {
            Cause::NoRuleAllows
        }
    };
    Refusal {
        who,
        rule: decision.rule.map(str::to_owned),
        cause,
        reason: decision.reason.to_string(),
        agent: None,
    }
}

/// An agent as records name it: by its name and its owners'.
fn agent_record(view: &AgentView<'_>) -> AgentRecord {
    AgentRecord {
        name: view.agent.name.to_string(),
        owners: view.owners.iter().map(|o| o.name().to_owned()).collect(),
        on_behalf_of: None,
    }
}

/// How an agent is named where a user would be (the user header, the assertion's `sub`, the
/// audit log): `agent:` and its name, so that no upstream takes it for a person of that
/// `userName`. (`X-Portcullis-Agent` carries the bare name.)
pub(crate) fn agent_user(name: &str) -> String {
    format!("{AGENT_PREFIX}{name}")
}

fn group_refs<'a>(groups: &[&'a GroupEntry]) -> Vec<GroupRef<'a>> {
    groups.iter().map(|g| group_ref(g)).collect()
}

fn group_ref(group: &GroupEntry) -> GroupRef<'_> {
    GroupRef {
        display_name: &group.display_name,
        external_id: group.external_id.as_deref(),
    }
}

/// Judges a caller the directory does not know on their token's own claims (name, email,
/// `groups`), for routes with `token_groups`.
fn on_token(
    facts: &Facts<'_>,
    request: &Request<'_>,
    principal: Principal<'_>,
    kind: SubjectKind,
    known: impl Fn(&str) -> bool,
    who: impl Fn() -> String,
    explain: bool,
) -> Judged {
    // Only a verified email: an unverified one names nobody and matches no email domain.
    let email = match principal {
        Principal::Person(identity) if !unverified(identity) => identity.email.as_deref(),
        Principal::Machine(token) if !token.for_itself && token.email_verified != Some(false) => {
            token.email.as_deref()
        }
        _ => None,
    };
    // A token that names more groups than it lists (Entra ID's overage, past 200), or a
    // sign-in whose groups the IdP did not say, says nothing of the rest: a deny rule could
    // miss the one that refuses. Judged as nobody.
    let unlisted = match principal {
        Principal::Person(identity) => match identity.groups_unlisted {
            Some(unlisted) => unlisted,
            // Stored by a version that did not say: the session is over, and the person signs
            // in again, to be judged on the groups said then.
            None => return Judged::Revoked(Outdated::Unlisted),
        },
        Principal::Machine(token) => token.groups_unlisted,
    };
    if unlisted {
        return Judged::Refuse(Refusal {
            who: Some(who()),
            rule: None,
            cause: Cause::NotInDirectory,
            reason: "the caller is not in the directory, and their groups cannot be judged: \
                     the token names more groups than it lists (Entra ID's overage, past 200 \
                     groups), or the IdP did not say them at sign-in"
                .to_owned(),
            agent: None,
        });
    }
    let (name, token_groups) = match principal {
        Principal::Person(identity) => (email.unwrap_or(&identity.subject), &identity.groups),
        Principal::Machine(token) if !token.for_itself => {
            (email.unwrap_or(&token.subject), &token.groups)
        }
        Principal::Machine(machine) => (
            machine.client_id.as_deref().unwrap_or(&machine.subject),
            &machine.groups,
        ),
    };
    let user = portcullis_policy::fold(name).into_owned();
    // `agent:` is how agents are named (see `agent_user`).
    if known(&user) || user.starts_with("agent:") {
        return Judged::Refuse(Refusal {
            reason: format!(
                "the caller is not in the directory, and their token names them \"{user}\", \
                 which is a directory user's userName or email, or an agent's name: judged as \
                 nobody rather than named to the upstream as them"
            ),
            // Recorded by what the token says, not as the user it would have passed for.
            who: Some(who()),
            rule: None,
            cause: Cause::NotInDirectory,
            agent: None,
        });
    }
    // Where the upstream compares names more loosely than `fold` (MySQL's collations, NFKC,
    // .NET's and Java's ignore-case), `ａlice` (full-width), `alıce` or `ſam` is a directory
    // user's name, and `ａgent:x` an agent's: a stranger's name beyond ASCII could pass for one.
    if !name.is_ascii() {
        return Judged::Refuse(Refusal {
            reason: "the caller is not in the directory, and their token names them with \
                     characters beyond ASCII, which upstreams may read as another's name (a \
                     full-width `ａ` as `a`): judged as nobody rather than named to the upstream"
                .to_owned(),
            who: Some(who()),
            rule: None,
            cause: Cause::NotInDirectory,
            agent: None,
        });
    }
    // A token names a group by whatever the IdP puts in the claim: a name (Okta), or the id
    // its SCIM provisioning sends as the group's `externalId` (Entra ID's object ids). Either
    // rule matches it, so that a deny by `group_ids` sees the group the token lists.
    let groups: Vec<GroupRef<'_>> = token_groups
        .iter()
        .map(|g| GroupRef {
            display_name: g,
            external_id: Some(g),
        })
        .collect();
    let subject = Subject {
        kind,
        user_name: &user,
        email,
        active: true,
        groups: &groups,
        owner_groups: &[],
    };
    let unverified = unverified_email(principal).filter(|_| email.is_none());
    let decision = decide(facts, request, subject, unverified);
    if !decision.allowed {
        return Judged::Refuse(refusal(Some(user.clone()), &decision));
    }
    let why = explain.then(|| Why::of(&decision));
    let forward = Forward::new(user.clone(), email.map(str::to_owned), token_groups.clone());
    Judged::Allow(Pass {
        forward: Some(forward),
        why,
    })
}

/// The directory key the `[identity]` mapping looks a caller up by, if their token has the
/// claim it needs.
fn subject_key<'a>(identity: &IdentityConfig, principal: Principal<'a>) -> Option<SubjectKey<'a>> {
    let (value, attribute) = match principal {
        Principal::Person(who) => (person_claim(identity, who)?, identity.scim_attribute),
        Principal::Machine(token) if !token.for_itself => {
            let value = claim_of(
                &identity.bearer_claim,
                (token.email.as_deref(), token.email_verified),
                &token.subject,
                &token.claims,
            )?;
            (value, identity.scim_attribute)
        }
        Principal::Machine(machine) => (
            client_claim(&identity.machine_claim, machine)?,
            identity.machine_scim_attribute,
        ),
    };
    Some(match attribute {
        ScimAttribute::UserName => SubjectKey::UserName(value),
        ScimAttribute::Emails => SubjectKey::Email(value),
        ScimAttribute::ExternalId => SubjectKey::ExternalId(value),
    })
}

/// The directory key a signed-in person is looked up by (see `[identity]`), if their sign-in
/// has the claim it needs.
pub fn person_key<'a>(identity: &IdentityConfig, who: &'a Identity) -> Option<SubjectKey<'a>> {
    subject_key(identity, Principal::Person(who))
}

/// The email `principal`'s token says the IdP has not verified (`email_verified: false`).
fn unverified_email<'a>(principal: Principal<'a>) -> Option<&'a str> {
    match principal {
        Principal::Person(identity) if unverified(identity) => identity.email.as_deref(),
        Principal::Machine(token) if token.email_verified == Some(false) => token.email.as_deref(),
        _ => None,
    }
}

/// The route's decision for `subject`, and with `unverified`, an address withheld from it
/// (judged without it) because the IdP has not verified it: an allow rule never matches it,
/// but a deny rule still does, or a person would escape a deny on their domain by leaving
/// their address unverified.
fn decide<'a>(
    facts: &Facts<'a>,
    request: &'a Request<'a>,
    subject: Subject<'a>,
    unverified: Option<&'a str>,
) -> Decision<'a> {
    let decision = facts.route.policy.evaluate(Some(&subject), request);
    let Some(unverified) = unverified.filter(|_| decision.allowed) else {
        return decision;
    };
    let with_it = Subject {
        email: Some(unverified),
        ..subject
    };
    let denied = facts.route.policy.evaluate(Some(&with_it), request);
    match denied.reason {
        Reason::Denied { .. } => denied,
        _ => decision,
    }
}

/// The policy's view of the directory user `user`, in `groups` (every group they are in).
fn user_subject<'a>(
    kind: SubjectKind,
    user: &'a UserEntry,
    groups: &'a [GroupRef<'a>],
) -> Subject<'a> {
    // The directory's email, never the token's: the IdP provisions the directory, while a
    // token's email is whatever the account at the IdP says. That is the primary email, else
    // the first, else the userName when it is an address (as Okta sends it), but for an Entra
    // guest's UPN (`ann_partner.example#EXT#@corp.onmicrosoft.com`): a name the host tenant
    // makes up in its own domain, not the guest's address.
    let email = user.emails.first().map(|e| &**e).or_else(|| {
        let name = &*user.user_name;
        let guest = name
            .as_bytes()
            .windows(5)
            .any(|w| w.eq_ignore_ascii_case(b"#EXT#"));
        (name.contains('@') && !guest).then_some(name)
    });
    Subject {
        kind,
        user_name: &user.user_name,
        email,
        active: user.active,
        groups,
        owner_groups: &[],
    }
}

/// Whether `route` lets in, for `request`, the person who signs in as the directory user at
/// `row` just now: what [`Gate::admit`] answers for them (and `portcullis explain` says),
/// worked out from `index` alone, so that the console can ask it of a million users.
///
/// They present the value of the attribute `[identity]` looks people up by. Found as exactly
/// this user, they are judged by the policy as the gate judges a person; found as nobody in
/// particular (an email or `externalId` several users share, or none at all), they are
/// anyone, whom only a public rule lets in.
pub fn admits_person(
    identity: &IdentityConfig,
    route: &Route,
    request: &Request<'_>,
    index: &Index,
    row: Row,
) -> bool {
    let found_by = (Credential::Session, identity.scim_attribute);
    admits_user(SubjectKind::Person, found_by, route, request, index, row)
}

/// [`admits_person`] for a machine calling with its client's own token, found as the user at
/// `row` (its service account) by `machine_scim_attribute`, from a client that is no agent.
pub fn admits_machine(
    identity: &IdentityConfig,
    route: &Route,
    request: &Request<'_>,
    index: &Index,
    row: Row,
) -> bool {
    let found_by = (Credential::Bearer, identity.machine_scim_attribute);
    admits_user(SubjectKind::Machine, found_by, route, request, index, row)
}

/// A caller of `kind`, presenting `credential`, found as the user at `row` by `attribute`.
fn admits_user(
    kind: SubjectKind,
    (credential, attribute): (Credential, ScimAttribute),
    route: &Route,
    request: &Request<'_>,
    index: &Index,
    row: Row,
) -> bool {
    let Some(user) = index.user(row) else {
        return false;
    };
    let unique = |rows: Vec<Row>| rows.as_slice() == [row];
    let found = route.accept.contains(&credential)
        && match attribute {
            ScimAttribute::UserName => true,
            ScimAttribute::Emails => user
                .emails
                .first()
                .is_some_and(|email| unique(index.users_by_email(email))),
            ScimAttribute::ExternalId => user
                .external_id
                .as_deref()
                .is_some_and(|id| unique(index.users_by_external_id(id))),
        };
    if !found {
        return route.policy.evaluate(None, request).allowed;
    }
    // Without nested groups (the common case) the user's own groups are all of them: no set
    // to build, and for a few groups no allocation, for each of a million users.
    const FEW: usize = 8;
    let mut few = [GroupRef {
        display_name: "",
        external_id: None,
    }; FEW];
    let many: Vec<GroupRef<'_>>;
    let nested = || {
        user.parents
            .iter()
            .any(|&g| index.parents_of(g).next().is_some())
    };
    let groups: &[GroupRef<'_>] = if !route.policy.reads_groups() {
        &[]
    } else if user.parents.len() <= FEW && !nested() {
        let mut n = 0;
        for (slot, group) in few
            .iter_mut()
            .zip(user.parents.iter().filter_map(|&g| index.group(g)))
        {
            *slot = group_ref(group);
            n += 1;
        }
        few.get(..n).unwrap_or_default()
    } else {
        let all = index.groups_of(row).into_iter();
        many = all
            .filter_map(|(g, _)| index.group(g))
            .map(group_ref)
            .collect();
        &many
    };
    let subject = user_subject(kind, user, groups);
    if !route.policy.evaluate(Some(&subject), request).allowed {
        return false;
    }
    // As the gate: one let in whom the identity headers cannot tell the upstream of is anyone
    // (a deny rule that holds for them holds all the same, above).
    let told = route.identity_headers || route.assertion;
    let untellable = || {
        untellable_name(
            &user.user_name,
            subject.email,
            false,
            route.identity_headers,
        )
        .is_some()
    };
    if subject.active && told && untellable() {
        return route.policy.evaluate(None, request).allowed;
    }
    true
}

/// Whether `principal` is a bearer token a client holds for a person.
fn person_token(principal: Principal<'_>) -> bool {
    matches!(principal, Principal::Machine(token) if !token.for_itself)
}

fn key_value<'a>(key: SubjectKey<'a>) -> &'a str {
    match key {
        SubjectKey::UserName(value) | SubjectKey::Email(value) | SubjectKey::ExternalId(value) => {
            value
        }
    }
}

/// Whether the IdP said it has not verified the person's email. An IdP that does not say
/// (Entra ID sends no `email_verified`) is taken at its word that the email is theirs.
fn unverified(identity: &Identity) -> bool {
    identity.email_verified == Some(false)
}

fn person_claim<'a>(identity: &IdentityConfig, who: &'a Identity) -> Option<&'a str> {
    claim_of(
        &identity.claim,
        (who.email.as_deref(), who.email_verified),
        &who.subject,
        &who.claims,
    )
}

/// The value of a person's identifying `claim`: an email only when not unverified, `sub`, or
/// any other string claim.
fn claim_of<'a>(
    claim: &IdentityClaim,
    (email, verified): (Option<&'a str>, Option<bool>),
    subject: &'a str,
    claims: &'a Claims,
) -> Option<&'a str> {
    match claim {
        IdentityClaim::Email if verified == Some(false) => None,
        IdentityClaim::Email => email,
        IdentityClaim::Sub => Some(subject),
        IdentityClaim::Named(name) => claims.get(name).map(String::as_str),
    }
}

/// The client holding `token`, a person's, when its issuer lists the clients it takes a
/// person's token from (`person_clients`) and not this one (`""` for a token naming none).
fn unlisted_client<'t>(issuers: &[JwtIssuer], token: &'t Machine) -> Option<&'t str> {
    if token.for_itself || token.act.is_some() {
        return None;
    }
    let issuer = issuers.iter().find(|i| i.issuer == token.issuer)?;
    let client = token.client_id.as_deref().unwrap_or_default();
    (!issuer.person_clients.is_empty() && !issuer.person_clients.iter().any(|c| c == client))
        .then_some(client)
}

/// Why a person's token held by `client`, which its issuer does not list, is refused.
pub fn unlisted_client_reason(client: &str) -> String {
    format!(
        "the bearer token is a person's held by the client \"{client}\", which its issuer's \
         person_clients does not list"
    )
}

/// The value of a client token's `claim` (`machine_claim`, `agent_claim`).
fn client_claim<'a>(claim: &MachineClaim, machine: &'a Machine) -> Option<&'a str> {
    match claim {
        MachineClaim::Sub => Some(machine.subject.as_str()),
        MachineClaim::ClientId => machine.client_id.as_deref(),
        MachineClaim::Named(name) => machine.claims.get(name).map(String::as_str),
    }
}

/// The value of `claim` in a delegated token's `act`, and the claim it was read from; an actor
/// without it is named by its `sub`, which RFC 8693 §4.1's actors (clients) carry as their
/// client id: Okta's `cid` or Entra's `appid` name the client of a token, and an issuer's
/// `act` may hold a `sub` alone.
fn actor_claim<'a>(claim: &'a MachineClaim, actor: &'a Actor) -> (&'a str, &'a str) {
    let get = |name: &'a str| Some((actor.claims.get(name)?.as_str(), name));
    let named = match claim {
        MachineClaim::Sub => None,
        MachineClaim::ClientId => get("client_id").or_else(|| get("azp")),
        MachineClaim::Named(name) => get(name),
    };
    named.unwrap_or((actor.subject.as_str(), "sub"))
}

impl Forward {
    fn new(user: String, email: Option<String>, group_names: Vec<String>) -> Forward {
        Forward {
            named: Arc::new(Named::new(user, email, group_names)),
            agent: None,
        }
    }
}

impl Named {
    /// About the memory it holds: its text, and each header value's copy of it.
    fn bytes(&self) -> usize {
        let text = self.user.len() + self.email.as_ref().map_or(0, String::len);
        let names: usize = (self.group_names.iter())
            .map(|name| name.len() + std::mem::size_of::<String>())
            .sum();
        std::mem::size_of::<Named>() + 2 * (text + self.groups.len()) + names
    }

    /// Who the upstream is told of, stamped with its version: a hash of everything in it, so
    /// anything cached on it (the signed assertion) is reused exactly as long as it is true.
    pub(crate) fn new(user: String, email: Option<String>, group_names: Vec<String>) -> Named {
        let groups = groups_header(&group_names);
        let version = foldhash::quality::FixedState::default().hash_one((&user, &email, &groups));
        let values = IdentityValues::of(&user, email.as_deref(), &groups);
        Named {
            user,
            email,
            groups,
            group_names,
            version,
            values,
        }
    }
}

/// The groups header: each name percent-encoded as UTF-8 (every byte but the unreserved
/// `A-Z a-z 0-9 - . _ ~` written `%XX`), the names separated by `, `. So a group named
/// `eng, admins` is one group (`eng%2C%20admins`), never two, and any name fits in a header.
fn groups_header(names: &[String]) -> String {
    let mut header = String::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            header.push_str(", ");
        }
        for &b in name.as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                header.push(char::from(b));
            } else {
                let _ = write!(header, "%{b:02X}");
            }
        }
    }
    header
}

impl Why {
    fn of(decision: &Decision<'_>) -> Why {
        Why {
            rule: decision.rule.map(str::to_owned),
            reason: decision.reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::caller::Identity;
    use crate::testing::{agent_token, config, delegated_token, machine, World};
    use http::Method;
    use serde_json::Value;

    const ALICE: &str = "alice@corp.example";
    const BOB: &str = "bob@corp.example";
    const BOT: &str = "build-bot";

    /// What a worker thread keeps of who upstreams are told of is bounded in bytes as in users:
    /// past it, people in many groups are told of as made for each request, and those kept stay.
    #[test]
    fn what_a_thread_keeps_of_who_upstreams_are_told_of_is_bounded_in_bytes() {
        let forwards = Forwards::default();
        let groups: Vec<String> = (0..150)
            .map(|g| format!("a-group-named-in-thirty-chars{g:03}"))
            .collect();
        let stamp = |row| Stamp {
            generation: 1,
            seq: 1,
            row,
        };
        let make = || Named::new("someone@corp.example".to_owned(), None, groups.clone());
        let first = forwards.get_or_make(stamp(0), make);
        for row in 1..4_000 {
            forwards.get_or_make(stamp(row), make);
        }
        {
            let kept = forwards.threads.get().expect("this thread's").borrow();
            assert!(kept.bytes <= FORWARD_BYTES_PER_THREAD, "{}", kept.bytes);
            assert!(
                (100..4_000).contains(&kept.named.len()),
                "{}",
                kept.named.len()
            );
            let held: usize = kept.named.values().map(|named| named.bytes()).sum();
            assert_eq!(held, kept.bytes);
        }
        assert!(Arc::ptr_eq(&forwards.get_or_make(stamp(0), make), &first));
    }

    /// alice and the build bot are in `eng`; bob is in no group.
    async fn world() -> World {
        let world = World::new();
        let alice = world.user(ALICE).await;
        world.user(BOB).await;
        let bot = world.user(BOT).await;
        world.group("eng", &[&alice, &bot]).await;
        world
    }

    fn facts<'a>(world: &'a World, route: usize, method: &'a str, path: &'a str) -> Facts<'a> {
        Facts {
            route: &world.config.routes[route],
            method,
            path,
            client: ClientOf::Known(Client::Browser),
        }
    }

    fn as_person(world: &World, identity: &Identity, route: usize, path: &str) -> Admission {
        world.gate().admit(
            &facts(world, route, "GET", path),
            Presented::Caller(Principal::Person(identity)),
        )
    }

    fn forbidden(admission: Admission) -> Refusal {
        match admission {
            Admission::Refuse(Refused::Forbid(refusal)) => refusal,
            other => panic!("expected a 403, got {other:?}"),
        }
    }

    fn allowed(admission: Admission) -> Pass {
        match admission {
            Admission::Allow(pass) => pass,
            other => panic!("expected to be let in, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_member_of_an_allowed_group_is_let_in_and_named_to_the_upstream() {
        let world = world().await;
        let pass = allowed(as_person(&world, &world.person(ALICE), 0, "/work"));
        let forward = pass.forward.expect("the upstream is told who");
        assert_eq!(forward.user, ALICE);
        assert_eq!(forward.email.as_deref(), Some(ALICE));
        assert_eq!(forward.groups, "eng");
        assert_eq!(forward.group_names, ["eng"]);
        assert_eq!(pass.why, None, "only explain says why");
    }

    #[tokio::test]
    async fn what_the_upstream_is_told_is_kept_only_while_the_directory_holds_still() {
        let world = world().await;
        let alice = world.person(ALICE);
        let named = |world: &World| {
            let pass = allowed(as_person(world, &alice, 0, "/work"));
            pass.forward.expect("the upstream is told who").named
        };
        let first = named(&world);
        assert!(Arc::ptr_eq(&first, &named(&world)), "kept between requests");
        assert_eq!(
            first.values.as_ref().map(|v| (&v.user, &v.groups)),
            Some((
                &HeaderValue::from_static(ALICE),
                &HeaderValue::from_static("eng")
            ))
        );

        // alice joins a second group: her very next request tells the upstream so.
        world.group("ops", &[&world.id_of(ALICE)]).await;
        let joined = named(&world);
        assert!(!Arc::ptr_eq(&first, &joined));
        assert!(joined.group_names.contains(&"ops".to_owned()), "{joined:?}");
        assert_ne!(joined.version, first.version);

        // A change to someone else is a change too: made anew, and the same.
        world.user("carol@corp.example").await;
        let again = named(&world);
        assert!(!Arc::ptr_eq(&joined, &again));
        assert_eq!(*joined, *again);

        // An entry beside the directory (anyone's sign-in) changes nobody: kept.
        let session = portcullis_scim::store::Entry {
            kind: "session".to_owned(),
            key: "k".to_owned(),
            value: None,
        };
        let put = portcullis_scim::store::Command::Put(vec![session]);
        world.directory.write(put, "test").await.expect("written");
        assert!(
            Arc::ptr_eq(&again, &named(&world)),
            "made anew for a session"
        );
    }

    #[tokio::test]
    async fn someone_no_rule_allows_is_forbidden_with_their_own_name() {
        let world = world().await;
        let refusal = forbidden(as_person(&world, &world.person(BOB), 0, "/work"));
        assert_eq!(refusal.cause, Cause::NoRuleAllows);
        assert_eq!(refusal.who.as_deref(), Some(BOB));
        assert_eq!(refusal.rule, None);
        assert!(
            refusal.reason.contains("no rule allows"),
            "{}",
            refusal.reason
        );
    }

    #[tokio::test]
    async fn a_deny_rule_wins_over_the_allow_rule_and_is_named() {
        let world = world().await;
        let refusal = forbidden(as_person(&world, &world.person(ALICE), 0, "/admin/users"));
        assert_eq!(refusal.cause, Cause::DenyRule);
        assert_eq!(refusal.rule.as_deref(), Some("routes[0].deny"));
    }

    #[tokio::test]
    async fn a_deactivated_user_is_forbidden_even_in_an_allowed_group() {
        let world = world().await;
        let carol = world.user("carol@corp.example").await;
        world.group("eng2", &[&carol]).await;
        world.set_active(&carol, false).await;
        // Signed in after the deactivation: the session is fine, the account is not.
        let identity = world.person("carol@corp.example");
        let refusal = forbidden(as_person(&world, &identity, 0, "/work"));
        assert_eq!(refusal.cause, Cause::Deactivated);
    }

    #[tokio::test]
    async fn a_session_from_before_a_deactivation_is_revoked_and_signs_in_again() {
        let world = world().await;
        let alice = world.person(ALICE);
        let id = world.id_of(ALICE);
        world.set_active(&id, false).await;
        world.set_active(&id, true).await;
        // Active again, but the session began before the deactivation: it is over.
        let browser = as_person(&world, &alice, 0, "/work");
        assert_eq!(
            browser,
            Admission::Refuse(Refused::SignIn {
                revoked: Some(Outdated::Caller(None))
            })
        );
        let api = world.gate().admit(
            &Facts {
                client: ClientOf::Known(Client::Api),
                ..facts(&world, 0, "GET", "/work")
            },
            Presented::Caller(Principal::Person(&alice)),
        );
        assert_eq!(
            api,
            Admission::Refuse(Refused::Challenge {
                invalid_token: false,
                revoked: Some(Outdated::Caller(None))
            })
        );
        // Signing in again works.
        allowed(as_person(&world, &world.person(ALICE), 0, "/work"));
    }

    #[tokio::test]
    async fn a_stranger_is_told_which_claim_was_looked_up_and_where() {
        let world = world().await;
        let refusal = forbidden(as_person(
            &world,
            &world.person("eve@else.example"),
            0,
            "/work",
        ));
        assert_eq!(refusal.cause, Cause::NotInDirectory);
        assert_eq!(refusal.who.as_deref(), Some("eve@else.example"));
        assert!(
            refusal.reason.contains("not a user in the directory")
                && refusal.reason.contains("email claim")
                && refusal.reason.contains("userName"),
            "{}",
            refusal.reason
        );
    }

    #[tokio::test]
    async fn a_stranger_still_gets_what_public_rules_give_anyone() {
        let world = world().await;
        let pass = allowed(as_person(
            &world,
            &world.person("eve@else.example"),
            0,
            "/public/x",
        ));
        assert_eq!(pass.forward, None, "let in as anyone, not as a user");
    }

    #[tokio::test]
    async fn a_deactivated_caller_gets_what_public_rules_give_anyone_and_no_more() {
        let world = world().await;
        let carol = world.user("carol@corp.example").await;
        world.group("eng2", &[&carol]).await;
        world.set_active(&carol, false).await;
        world.set_active(&world.id_of(BOT), false).await;
        let carol = world.person("carol@corp.example");
        let bot = machine(BOT);
        let public = facts(&world, 0, "GET", "/public/x");
        for presented in [Principal::Person(&carol), Principal::Machine(&bot)] {
            let pass = allowed(world.gate().admit(&public, Presented::Caller(presented)));
            // In as a stranger would be: the upstream is told of nobody, not of someone the
            // directory no longer vouches for.
            assert_eq!(pass.forward, None, "{presented:?}");
        }
        // Someone active is still named there.
        let pass = allowed(as_person(&world, &world.person(ALICE), 0, "/public/x"));
        assert!(pass.forward.is_some_and(|f| f.user == ALICE));
    }

    #[tokio::test]
    async fn a_sign_in_without_the_identifying_claim_is_refused_and_says_so() {
        let world = world().await;
        let mut identity = world.person(ALICE);
        identity.email = None;
        let refusal = forbidden(as_person(&world, &identity, 0, "/work"));
        assert_eq!(refusal.cause, Cause::NoIdentifyingClaim);
        assert!(
            refusal.reason.contains("no email claim"),
            "{}",
            refusal.reason
        );
    }

    #[tokio::test]
    async fn an_email_the_idp_has_not_verified_identifies_nobody() {
        let world = world().await;
        let mut identity = world.person(ALICE);
        identity.email_verified = Some(false);
        let refusal = forbidden(as_person(&world, &identity, 0, "/work"));
        assert_eq!(refusal.cause, Cause::NoIdentifyingClaim);
        assert!(
            refusal.reason.contains("not verified"),
            "{}",
            refusal.reason
        );
        identity.email_verified = Some(true);
        allowed(as_person(&world, &identity, 0, "/work"));
    }

    /// People found by `sub` as the `externalId`, so the token's email is not what finds them.
    fn by_sub() -> World {
        World::with(config(
            "[identity]\nclaim = \"sub\"\nscim_attribute = \"externalId\"\n",
        ))
    }

    #[tokio::test]
    async fn email_domains_judge_the_directory_s_email_not_the_token_s() {
        let world = by_sub();
        world
            .user_with_emails("asmith", "ext-a", &[("a.smith@corp.example", true)])
            .await;
        world
            .user_with_emails("bsmith", "ext-b", &[("b.smith@elsewhere.example", true)])
            .await;
        let mut a = world.person("a@elsewhere.example");
        a.subject = "ext-a".to_owned();
        let pass = allowed(as_person(&world, &a, 5, "/"));
        assert_eq!(
            pass.forward.and_then(|f| f.email.clone()).as_deref(),
            Some("a.smith@corp.example"),
            "the upstream is told the directory's email too"
        );
        let mut b = world.person("b@corp.example");
        b.subject = "ext-b".to_owned();
        assert_eq!(
            forbidden(as_person(&world, &b, 5, "/")).cause,
            Cause::NoRuleAllows,
            "a token's email at corp.example does not make bob one of corp.example"
        );
    }

    /// A replica out of touch with the directory answers for nobody, but a public rule still
    /// lets a signed-in caller in, as anyone (as it lets in a caller without credentials).
    #[tokio::test]
    async fn out_of_touch_a_public_path_stays_open_to_a_signed_in_caller_as_anyone() {
        let world = World::new();
        let alice = world.user("alice@corp.example").await;
        world.group("eng", &[&alice]).await;
        let person = world.person("alice@corp.example");
        let gate = Gate {
            current: false,
            ..world.gate()
        };
        let admit = |path| {
            gate.admit(
                &facts(&world, 0, "GET", path),
                Presented::Caller(Principal::Person(&person)),
            )
        };
        match admit("/public") {
            Admission::Allow(pass) => assert!(pass.forward.is_none(), "told of no caller"),
            other => panic!("expected the public path open, got {other:?}"),
        }
        assert!(matches!(
            admit("/work"),
            Admission::Refuse(Refused::Unavailable)
        ));
        // So is a session cookie it does not hold (begun elsewhere meanwhile): try again, not
        // sign in anew; a public path stays open.
        let unheld = |path| {
            gate.admit(
                &facts(&world, 0, "GET", path),
                Presented::Invalid { bearer: false },
            )
        };
        assert!(matches!(
            unheld("/work"),
            Admission::Refuse(Refused::Unavailable)
        ));
        assert!(matches!(unheld("/public"), Admission::Allow(_)));
        // In touch, such a cookie is no sign-in.
        let current = world.gate();
        let unheld = current.admit(
            &facts(&world, 0, "GET", "/work"),
            Presented::Invalid { bearer: false },
        );
        assert!(!matches!(
            unheld,
            Admission::Refuse(Refused::Unavailable) | Admission::Allow(_)
        ));
    }

    /// Found by `sub`, a person whose token says the IdP has not verified their email is
    /// not judged by that same address in the directory (the IdP provisioned it unverified).
    #[tokio::test]
    async fn an_unverified_email_matches_no_email_domain_from_the_directory_either() {
        let world = by_sub();
        world
            .user_with_emails("eve", "ext-e", &[("eve@corp.example", true)])
            .await;
        let mut eve = world.person("eve@corp.example");
        eve.subject = "ext-e".to_owned();
        eve.email_verified = Some(false);
        assert_eq!(
            forbidden(as_person(&world, &eve, 5, "/")).cause,
            Cause::NoRuleAllows
        );
        eve.email_verified = None;
        allowed(as_person(&world, &eve, 5, "/"));
    }

    /// An address the IdP has not verified is withheld from allow rules, but a deny rule on its
    /// domain still refuses: leaving it unverified is no way past one. So for a stranger judged
    /// on their token (`token_groups`).
    #[tokio::test]
    async fn an_unverified_email_still_meets_a_deny_on_its_domain() {
        let world = World::with(config(
            "[[routes]]\nfrom = \"http://partners.test\"\nto = [\"http://127.0.0.1:3\"]\n\
             accept = [\"session\"]\ntoken_groups = true\nallow = { any_signed_in = true }\n\
             deny = { email_domains = [\"contractors.example\"] }\n\
             [identity]\nclaim = \"sub\"\nscim_attribute = \"externalId\"\n",
        ));
        let route = world.config.routes.len() - 1;
        world
            .user_with_emails("bob", "ext-b", &[("bob@contractors.example", true)])
            .await;
        let mut bob = world.person("bob@contractors.example");
        bob.subject = "ext-b".to_owned();
        for verified in [Some(false), None] {
            bob.email_verified = verified;
            let refusal = forbidden(as_person(&world, &bob, route, "/"));
            assert_eq!(
                refusal.cause,
                Cause::DenyRule,
                "{verified:?}: {}",
                refusal.reason
            );
        }
        // A stranger, on their token's own claims.
        let mut cal = world.person("cal@contractors.example");
        cal.subject = "ext-c".to_owned();
        cal.email_verified = Some(false);
        let refusal = forbidden(as_person(&world, &cal, route, "/"));
        assert_eq!(refusal.cause, Cause::DenyRule, "{}", refusal.reason);
        cal.email = Some("cal@elsewhere.example".to_owned());
        allowed(as_person(&world, &cal, route, "/"));
    }

    /// A stranger whose token carries a directory user's email the IdP does not check (Entra
    /// ID's `mail`), found by `externalId`: refused, and recorded by their subject, never as
    /// that user; on a `token_groups` route too. One whose email names nobody is recorded by it.
    #[tokio::test]
    async fn a_stranger_with_a_directory_user_s_email_is_recorded_by_their_subject() {
        let world = World::with(config(
            "[[routes]]\nfrom = \"http://partners.test\"\nto = [\"http://127.0.0.1:3\"]\n\
             accept = [\"session\"]\ntoken_groups = true\nallow = { any_signed_in = true }\n\
             [identity]\nclaim = \"sub\"\nscim_attribute = \"externalId\"\n",
        ));
        let partners = world.config.routes.len() - 1;
        world
            .user_with_emails(ALICE, "ext-a", &[(ALICE, true)])
            .await;
        let mut mallory = world.person(ALICE);
        mallory.subject = "ext-m".to_owned();
        for route in [0, partners] {
            let refusal = forbidden(as_person(&world, &mallory, route, "/"));
            assert_eq!(refusal.who.as_deref(), Some("ext-m"), "{}", refusal.reason);
        }
        let mut cal = world.person("cal@elsewhere.example");
        cal.subject = "ext-c".to_owned();
        let refusal = forbidden(as_person(&world, &cal, 0, "/"));
        assert_eq!(refusal.who.as_deref(), Some("cal@elsewhere.example"));
        // Their token, through an agent the directory does not hold: so too.
        let token = Machine {
            subject: "ext-m".to_owned(),
            ..crate::testing::delegated_token(ALICE, "ghost")
        };
        let refusal = forbidden(world.gate().admit(
            &facts(&world, 1, "GET", "/"),
            Presented::Caller(Principal::Machine(&token)),
        ));
        assert_eq!(refusal.who.as_deref(), Some("ext-m"), "{}", refusal.reason);
        let (who, _) = world.gate().token_refused_as(&token);
        assert_eq!(who, "ext-m");
    }

    /// Found by email (the default), a person whose sign-in, or bearer token, says the IdP has
    /// not verified their email is refused as that: told "no email claim", an operator would
    /// add one to the token, and change nothing.
    #[tokio::test]
    async fn an_unverified_email_is_said_so_for_a_session_and_a_bearer_token_alike() {
        let world = world().await;
        let mut alice = world.person(ALICE);
        alice.email_verified = Some(false);
        let token = Machine {
            for_itself: false,
            email: Some(ALICE.to_owned()),
            email_verified: Some(false),
            ..machine("sub-alice")
        };
        let said = format!("the identity provider has not verified the email {ALICE}");
        let refusals = [
            forbidden(as_person(&world, &alice, 0, "/")),
            forbidden(world.gate().admit(
                &facts(&world, 1, "GET", "/"),
                Presented::Caller(Principal::Machine(&token)),
            )),
        ];
        for refusal in refusals {
            assert_eq!(refusal.cause, Cause::NoIdentifyingClaim);
            assert!(refusal.reason.contains(&said), "{}", refusal.reason);
        }
    }

    /// The upstream is told a person's directory email by their credentials that leave it
    /// standing, and not by one whose IdP says it has not verified it, whichever came first.
    #[tokio::test]
    async fn an_unverified_email_is_not_told_to_the_upstream_by_another_credential_s_answer() {
        let world = by_sub();
        let id = world
            .user_with_emails("eve", "ext-e", &[("eve@corp.example", true)])
            .await;
        world.group("eng", &[&id]).await;
        let mut eve = world.person("eve@corp.example");
        eve.subject = "ext-e".to_owned();
        let told = |eve: &Identity| {
            let pass = allowed(as_person(&world, eve, 0, "/work"));
            pass.forward.and_then(|f| f.email.clone())
        };
        for first in [Some(true), Some(false), Some(true)] {
            eve.email_verified = first;
            let email = told(&eve);
            assert_eq!(email.is_some(), first == Some(true), "{first:?}");
        }
    }

    /// A stranger's token groups (on a `token_groups` route) are matched by `group_ids` too:
    /// Entra ID's tokens list object ids, which its SCIM sends as groups' `externalId`.
    #[tokio::test]
    async fn a_deny_by_group_id_refuses_a_stranger_whose_token_lists_it() {
        let world = World::with(config(
            "[[routes]]\nfrom = \"http://ids.test\"\nto = [\"http://127.0.0.1:3\"]\ntoken_groups = true\nallow = { any_signed_in = true }\ndeny = { group_ids = [\"c0ffee\"] }\n",
        ));
        let route = world.config.routes.len() - 1;
        let mut dan = world.person("dan@partner.example");
        dan.groups = vec!["c0ffee".to_owned()];
        assert_eq!(
            forbidden(as_person(&world, &dan, route, "/")).cause,
            Cause::DenyRule
        );
        dan.groups = vec!["other".to_owned()];
        allowed(as_person(&world, &dan, route, "/"));
    }

    #[tokio::test]
    async fn without_emails_the_directory_s_email_is_a_user_name_in_email_form() {
        let world = by_sub();
        world
            .user_with_emails("d.smith@corp.example", "ext-d", &[])
            .await;
        world.user_with_emails("esmith", "ext-e", &[]).await;
        let mut d = world.person("d@elsewhere.example");
        d.subject = "ext-d".to_owned();
        let pass = allowed(as_person(&world, &d, 5, "/"));
        assert_eq!(
            pass.forward.and_then(|f| f.email.clone()).as_deref(),
            Some("d.smith@corp.example")
        );
        let mut e = world.person("e@corp.example");
        e.subject = "ext-e".to_owned();
        let refusal = forbidden(as_person(&world, &e, 5, "/"));
        assert_eq!(
            refusal.cause,
            Cause::NoRuleAllows,
            "no email in the directory at all"
        );
        // An Entra guest's UPN is in the host tenant's domain, not the guest's address.
        world
            .user_with_emails("mal_partner.example#EXT#@corp.example", "ext-m", &[])
            .await;
        let mut guest = world.person("mal@partner.example");
        guest.subject = "ext-m".to_owned();
        let refusal = forbidden(as_person(&world, &guest, 5, "/"));
        assert_eq!(refusal.cause, Cause::NoRuleAllows, "a guest's UPN");
    }

    #[tokio::test]
    async fn the_directory_s_email_is_its_primary_one() {
        let world = by_sub();
        world
            .user_with_emails(
                "csmith",
                "ext-c",
                &[("c@home.example", false), ("c.smith@corp.example", true)],
            )
            .await;
        let mut c = world.person("c@home.example");
        c.subject = "ext-c".to_owned();
        let pass = allowed(as_person(&world, &c, 5, "/"));
        assert_eq!(
            pass.forward.and_then(|f| f.email.clone()).as_deref(),
            Some("c.smith@corp.example")
        );
    }

    #[tokio::test]
    async fn token_groups_never_trust_an_unverified_email() {
        let world = world().await;
        let mut contractor = world.person("dan@partner.example");
        contractor.groups = vec!["contractors".to_owned()];
        contractor.email_verified = Some(false);
        // Found by email, so an unverified one identifies nobody at all.
        assert_eq!(
            forbidden(as_person(&world, &contractor, 3, "/")).cause,
            Cause::NoIdentifyingClaim
        );
        // Found by sub: judged on the token, named by sub, with no email.
        let world = by_sub();
        let pass = allowed(as_person(&world, &contractor, 3, "/"));
        let forward = pass.forward.expect("named to the upstream");
        assert_eq!(forward.user, "sub-dan@partner.example");
        assert_eq!(forward.email, None);
    }

    #[tokio::test]
    async fn nobody_signed_in_a_browser_asking_for_a_page_is_sent_to_sign_in() {
        let world = world().await;
        for method in ["GET", "HEAD"] {
            let admission = world
                .gate()
                .admit(&facts(&world, 0, method, "/work"), Presented::Nothing);
            assert_eq!(
                admission,
                Admission::Refuse(Refused::SignIn { revoked: None }),
                "{method}"
            );
        }
    }

    #[tokio::test]
    async fn nobody_signed_in_a_browser_posting_gets_401_as_it_cannot_be_replayed() {
        let world = world().await;
        let admission = world
            .gate()
            .admit(&facts(&world, 0, "POST", "/work"), Presented::Nothing);
        assert_eq!(
            admission,
            Admission::Refuse(Refused::Challenge {
                invalid_token: false,
                revoked: None
            })
        );
    }

    #[tokio::test]
    async fn an_api_client_without_credentials_gets_401() {
        let world = world().await;
        let api = Facts {
            client: ClientOf::Known(Client::Api),
            ..facts(&world, 0, "GET", "/work")
        };
        assert_eq!(
            world.gate().admit(&api, Presented::Nothing),
            Admission::Refuse(Refused::Challenge {
                invalid_token: false,
                revoked: None
            })
        );
    }

    #[tokio::test]
    async fn a_refused_bearer_token_is_told_invalid_token() {
        let world = world().await;
        let api = Facts {
            client: ClientOf::Known(Client::Api),
            ..facts(&world, 0, "GET", "/work")
        };
        // Whatever kind of client sent it: one that asks for HTML too is never a browser's
        // page load.
        for facts in [api, facts(&world, 0, "GET", "/work")] {
            assert_eq!(
                world
                    .gate()
                    .admit(&facts, Presented::Invalid { bearer: true }),
                Admission::Refuse(Refused::Challenge {
                    invalid_token: true,
                    revoked: None
                })
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_session_cookie_in_a_browser_signs_in_again() {
        let world = world().await;
        let admission = world.gate().admit(
            &facts(&world, 0, "GET", "/work"),
            Presented::Invalid { bearer: false },
        );
        assert_eq!(
            admission,
            Admission::Refuse(Refused::SignIn { revoked: None })
        );
    }

    #[tokio::test]
    async fn a_public_rule_lets_anyone_in_without_an_identity() {
        let world = world().await;
        let pass = allowed(
            world
                .gate()
                .admit(&facts(&world, 0, "GET", "/public/page"), Presented::Nothing),
        );
        assert_eq!(pass.forward, None);
    }

    #[tokio::test]
    async fn a_public_route_refuses_what_it_does_not_cover_without_asking_to_sign_in() {
        let world = world().await;
        allowed(
            world
                .gate()
                .admit(&facts(&world, 2, "GET", "/open/x"), Presented::Nothing),
        );
        let refusal = forbidden(
            world
                .gate()
                .admit(&facts(&world, 2, "GET", "/closed"), Presented::Nothing),
        );
        assert_eq!(refusal.cause, Cause::NotPublic);
        assert_eq!(refusal.who, None, "nobody signed in");
    }

    #[tokio::test]
    async fn a_route_for_bearer_tokens_never_sends_a_browser_to_sign_in() {
        let world = world().await;
        let admission = world
            .gate()
            .admit(&facts(&world, 1, "GET", "/v1"), Presented::Nothing);
        assert_eq!(
            admission,
            Admission::Refuse(Refused::Challenge {
                invalid_token: false,
                revoked: None
            })
        );
    }

    #[tokio::test]
    async fn a_person_is_no_caller_on_a_route_for_bearer_tokens_only() {
        let world = world().await;
        let admission = as_person(&world, &world.person(ALICE), 1, "/v1");
        assert!(
            matches!(admission, Admission::Refuse(Refused::Challenge { .. })),
            "{admission:?}"
        );
    }

    #[tokio::test]
    async fn a_machine_in_an_allowed_group_is_let_in() {
        let world = world().await;
        let bot = machine(BOT);
        let pass = allowed(world.gate().admit(
            &facts(&world, 1, "GET", "/v1/builds"),
            Presented::Caller(Principal::Machine(&bot)),
        ));
        assert_eq!(pass.forward.map(|f| f.user.clone()), Some(BOT.to_owned()));
    }

    #[tokio::test]
    async fn a_token_for_another_audience_is_an_invalid_token_on_a_route_that_names_its_own() {
        let mut world = world().await;
        world.config.routes[1].audiences = vec!["api".to_owned()];
        let for_api = Machine {
            audiences: vec!["api".to_owned()],
            ..machine(BOT)
        };
        let judged = |token: &Machine| {
            world.gate().admit(
                &facts(&world, 1, "GET", "/v1/builds"),
                Presented::Caller(Principal::Machine(token)),
            )
        };
        allowed(judged(&for_api));
        assert!(
            matches!(
                judged(&machine(BOT)),
                Admission::Refuse(Refused::Challenge {
                    invalid_token: true,
                    ..
                })
            ),
            "a token for none of the route's audiences"
        );
    }

    #[tokio::test]
    async fn a_machine_is_no_caller_on_a_route_for_sessions_only() {
        let world = world().await;
        let bot = machine(BOT);
        let admission = world.gate().admit(
            &facts(&world, 4, "GET", "/"),
            Presented::Caller(Principal::Machine(&bot)),
        );
        assert_eq!(
            admission,
            Admission::Refuse(Refused::SignIn { revoked: None })
        );
    }

    #[tokio::test]
    async fn a_deactivated_service_account_is_forbidden() {
        let world = world().await;
        world.set_active(&world.id_of(BOT), false).await;
        let bot = machine(BOT);
        let refusal = forbidden(world.gate().admit(
            &facts(&world, 1, "GET", "/v1"),
            Presented::Caller(Principal::Machine(&bot)),
        ));
        assert_eq!(refusal.cause, Cause::Deactivated);
    }

    #[tokio::test]
    async fn a_token_issued_before_its_user_was_re_activated_or_re_created_is_invalid() {
        let world = world().await;
        let bot = world.id_of(BOT);
        let judge = |token: &Machine| {
            world.gate().admit(
                &facts(&world, 1, "GET", "/v1"),
                Presented::Caller(Principal::Machine(token)),
            )
        };
        let invalid = Admission::Refuse(Refused::Challenge {
            invalid_token: true,
            revoked: Some(Outdated::Caller(None)),
        });
        let issued = |iat: Option<u64>| Machine {
            issued: iat,
            ..machine(BOT)
        };
        world.set_active(&bot, false).await;
        world.set_active(&bot, true).await;
        // The second of the re-activation, as the directory keeps it.
        let now = world
            .directory
            .with_subject(SubjectKey::UserName(BOT), |lookup| {
                lookup.found().map_or(0, |view| view.user.valid_since_unix)
            });
        assert!(now > 0);
        // Issued before the re-activation (a second before, at the least: `iat` is in
        // seconds), or not saying when: refused as invalid, so its client gets a new one.
        assert_eq!(judge(&issued(Some(now - 1))), invalid);
        assert_eq!(judge(&issued(None)), invalid);
        // Issued since: in.
        allowed(judge(&issued(Some(now))));
        allowed(judge(&issued(Some(now + 60))));
        // A user written before the time was kept: any token, as before.
        let entry = |unix| UserEntry {
            id: 1,
            user_name: "bot".into(),
            external_id: None,
            emails: Box::new([]),
            active: true,
            version: 1,
            valid_since: 5,
            valid_since_unix: unix,
            parents: Vec::new(),
        };
        assert!(!outlived(Principal::Machine(&issued(None)), &entry(0)));
        assert!(outlived(Principal::Machine(&issued(None)), &entry(now)));
    }

    #[tokio::test]
    async fn an_unknown_machine_is_not_in_the_directory() {
        let world = world().await;
        let ghost = machine("ghost");
        let refusal = forbidden(world.gate().admit(
            &facts(&world, 1, "GET", "/v1"),
            Presented::Caller(Principal::Machine(&ghost)),
        ));
        assert_eq!(refusal.cause, Cause::NotInDirectory);
        assert!(refusal.reason.contains("sub claim"), "{}", refusal.reason);
    }

    #[tokio::test]
    async fn a_machine_without_the_mapped_claim_says_which() {
        let world = World::with(config("[identity]\nmachine_claim = \"client_id\"\n"));
        let bot = machine(BOT); // no client_id
        let refusal = forbidden(world.gate().admit(
            &facts(&world, 1, "GET", "/v1"),
            Presented::Caller(Principal::Machine(&bot)),
        ));
        assert_eq!(refusal.cause, Cause::NoIdentifyingClaim);
        assert!(refusal.reason.contains("client_id"), "{}", refusal.reason);
    }

    #[tokio::test]
    async fn token_groups_judge_a_stranger_on_the_token_s_own_groups() {
        let world = world().await;
        let mut contractor = world.person("dan@partner.example");
        contractor.groups = vec!["contractors".to_owned()];
        let pass = allowed(as_person(&world, &contractor, 3, "/"));
        let forward = pass.forward.expect("named to the upstream");
        assert_eq!(forward.user, "dan@partner.example");
        assert_eq!(forward.group_names, ["contractors"]);

        let mut other = world.person("erin@partner.example");
        other.groups = vec!["visitors".to_owned()];
        assert_eq!(
            forbidden(as_person(&world, &other, 3, "/")).cause,
            Cause::NoRuleAllows
        );
    }

    /// A token that names more groups than it lists (Entra ID's overage) cannot be judged on
    /// them: a deny rule could miss the one that refuses. Only public rules let it in.
    #[tokio::test]
    async fn token_groups_never_judge_a_token_that_does_not_list_its_groups() {
        let world = world().await;
        let mut contractor = world.person("dan@partner.example");
        contractor.groups = vec!["contractors".to_owned()];
        contractor.groups_unlisted = Some(true);
        let refusal = forbidden(as_person(&world, &contractor, 3, "/"));
        assert_eq!(refusal.cause, Cause::NotInDirectory);
        assert!(refusal.reason.contains("overage"), "{}", refusal.reason);
        // A session stored by a version that did not say whether its groups were all listed
        // (it wrote only `true`): not taken for one that listed them all, but over, and the
        // person signs in again.
        contractor.groups_unlisted = Some(false);
        let mut stored = serde_json::to_value(&contractor).unwrap();
        assert_eq!(stored["groups_unlisted"], false, "always written: {stored}");
        stored.as_object_mut().unwrap().remove("groups_unlisted");
        let stored: crate::caller::Identity = serde_json::from_value(stored).unwrap();
        assert!(matches!(
            as_person(&world, &stored, 3, "/"),
            Admission::Refuse(Refused::SignIn {
                revoked: Some(Outdated::Unlisted)
            })
        ));
        let said = Outdated::Unlisted.session_reason("dan@partner.example");
        assert!(said.contains("not in the directory"), "{said}");
        // Read from the claims as a token or UserInfo has them.
        let unlisted = |claims: serde_json::Value| {
            crate::auth::groups_unlisted(|name| claims.get(name).cloned())
        };
        assert!(unlisted(serde_json::json!({
            "_claim_names": {"groups": "src1"},
            "_claim_sources": {"src1": {"endpoint": "https://graph.microsoft.com/"}}
        })));
        assert!(unlisted(serde_json::json!({"hasgroups": true})));
        assert!(unlisted(serde_json::json!({"groups": "contractors"})));
        assert!(!unlisted(serde_json::json!({"groups": ["contractors"]})));
        assert!(!unlisted(serde_json::json!({"hasgroups": false})));
        assert!(!unlisted(serde_json::json!({})));
    }

    /// A stranger is never named to the upstream as someone the directory knows: with people
    /// found by `externalId`, a token whose email is a directory user's (forged, or an Entra
    /// ID account's unverified mail) is judged as nobody.
    #[tokio::test]
    async fn token_groups_never_name_a_stranger_as_a_directory_user() {
        let world = World::with(config(
            "[identity]\nclaim = \"sub\"\nscim_attribute = \"externalId\"\n",
        ));
        world.user("carol@corp.example").await;
        let mut forged = world.person("carol@corp.example");
        forged.groups = vec!["contractors".to_owned()];
        let refusal = forbidden(as_person(&world, &forged, 3, "/"));
        assert_eq!(refusal.cause, Cause::NotInDirectory);
        assert!(
            refusal.reason.contains("directory user's"),
            "{}",
            refusal.reason
        );
        // Nor as an agent is named.
        let mut agent = world.person("agent:helper");
        agent.groups = vec!["contractors".to_owned()];
        assert_eq!(
            forbidden(as_person(&world, &agent, 3, "/")).cause,
            Cause::NotInDirectory
        );
        // Nor by a look-alike of a user's or an agent's name, which an upstream comparing
        // names more loosely would take for theirs.
        for look_alike in [
            "\u{ff43}arol@corp.example",
            "car\u{131}l@corp.example",
            // The Kelvin sign, which `fold` makes a `k`: the email header would carry it.
            "\u{212a}arol@corp.example",
            "\u{ff41}gent:helper",
        ] {
            let mut forged = world.person(look_alike);
            forged.groups = vec!["contractors".to_owned()];
            let refusal = forbidden(as_person(&world, &forged, 3, "/"));
            assert_eq!(refusal.cause, Cause::NotInDirectory, "{look_alike}");
            assert!(
                refusal.reason.contains("beyond ASCII"),
                "{}",
                refusal.reason
            );
        }
        // By another email, the same stranger is judged on the token's groups.
        let mut stranger = world.person("dan@partner.example");
        stranger.groups = vec!["contractors".to_owned()];
        let pass = allowed(as_person(&world, &stranger, 3, "/"));
        assert_eq!(pass.forward.expect("named").user, "dan@partner.example");
    }

    /// A name the identity headers would not carry as it is (trimmed by the upstream's
    /// parser, or not sendable at all) is refused, except as anyone where a public rule lets
    /// anyone in. Other text, UTF-8 included, is sent as it is.
    #[tokio::test]
    async fn a_caller_the_identity_headers_cannot_name_truly_is_refused() {
        let world = World::new();
        let names = [
            "carol@corp.example ",
            "\tcarol",
            "dave\u{7}@corp.example",
            "agent:helper",
            "Agent:Mallory",
            "zoë",
        ];
        let mut rows = Vec::new();
        for name in names {
            rows.push(world.user(name).await);
        }
        // And one whose email the header cannot carry as it is.
        let erin = (world.user_with_emails("erin", "e1", &[(" erin@corp.example", true)])).await;
        rows.push(erin);
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        world.group("eng", &rows).await;
        for name in &names[..5] {
            let refusal = forbidden(as_person(&world, &world.person(name), 0, "/work"));
            assert_eq!(refusal.cause, Cause::CannotBeTold, "{name:?}");
            // Named as the directory has them: `userName` in lower case.
            assert_eq!(refusal.who, Some(name.to_lowercase()));
            let pass = allowed(as_person(&world, &world.person(name), 0, "/public"));
            assert!(pass.forward.is_none(), "{name:?} is in as anyone");
        }
        // Told in the assertion only: JSON carries any name as it is, and a name as agents'
        // is refused there too; told nothing, nothing is refused.
        for (told, refused) in [("assertion = true", true), ("assertion = false", false)] {
            let route = format!(
                "[[routes]]\nfrom = \"http://quiet.test\"\nto = [\"http://127.0.0.1:3\"]\n\
                 accept = [\"session\"]\nallow = {{ groups = [\"eng\"] }}\n\
                 identity_headers = false\n{told}\n"
            );
            let quiet = World::with(config(&route));
            let rows = [
                quiet.user("carol@corp.example ").await,
                quiet.user("agent:helper").await,
            ];
            let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
            quiet.group("eng", &rows).await;
            let last = quiet.config.routes.len() - 1;
            allowed(as_person(
                &quiet,
                &quiet.person("carol@corp.example "),
                last,
                "/",
            ));
            let agent_named = as_person(&quiet, &quiet.person("agent:helper"), last, "/");
            assert_eq!(
                matches!(agent_named, Admission::Refuse(_)),
                refused,
                "{told}: {agent_named:?}"
            );
        }
        // Names reach the gate in lower case (the directory's, a token's folded); an upstream
        // that compares them without case is read so too, whatever spelling reaches it.
        assert!(untellable_name("Agent:Helper", None, false, false).is_some());
        assert!(untellable_name("agent:helper", None, true, false).is_none());
        // An email the header cannot carry as it is refuses the caller too, where headers
        // tell it.
        for email in [
            " erin@corp.example",
            "erin@corp.example\t",
            "erin\u{7}@corp.example",
        ] {
            let why = untellable_name("erin", Some(email), false, true);
            assert!(why.is_some_and(|why| why.contains("email")), "{email:?}");
            assert!(untellable_name("erin", Some(email), false, false).is_none());
        }
        assert!(untellable_name("erin", Some("erin@corp.example"), false, true).is_none());
        // As the gate judges a directory user holding one.
        let refusal = forbidden(as_person(&world, &world.person("erin"), 0, "/work"));
        assert_eq!(refusal.cause, Cause::CannotBeTold);
        assert!(refusal.reason.contains("email"), "{}", refusal.reason);
        let pass = allowed(as_person(&world, &world.person("zoë"), 0, "/work"));
        let values = pass
            .forward
            .expect("named")
            .values
            .as_ref()
            .map(|v| v.user.clone());
        assert_eq!(values, Some(HeaderValue::from_str("zoë").expect("UTF-8")));
    }

    #[tokio::test]
    async fn token_groups_never_admit_someone_deactivated_deleted_or_ambiguous() {
        // Looked up by email, which two users may share.
        let world = World::with(config("[identity]\nscim_attribute = \"emails\"\n"));
        let carol = world.user("carol@corp.example").await;
        world.set_active(&carol, false).await;
        let dave = world.user("dave@corp.example").await;
        world
            .scim(Method::DELETE, &format!("/Users/{dave}"), Value::Null)
            .await;
        world
            .user_with_emails("erin-1", "e1", &[("erin@corp.example", true)])
            .await;
        world
            .user_with_emails("erin-2", "e2", &[("erin@corp.example", true)])
            .await;
        for (email, cause, says) in [
            ("carol@corp.example", Cause::Deactivated, "deactivated"),
            ("dave@corp.example", Cause::NotInDirectory, "was deleted"),
            (
                "erin@corp.example",
                Cause::NotInDirectory,
                "matches 2 directory users",
            ),
        ] {
            let mut caller = world.person(email);
            caller.groups = vec!["contractors".to_owned()];
            let refusal = forbidden(as_person(&world, &caller, 3, "/"));
            assert_eq!(refusal.cause, cause, "{email}: {}", refusal.reason);
            assert!(refusal.reason.contains(says), "{email}: {}", refusal.reason);
        }
        // A stranger with the same token groups is admitted: the route works.
        let mut stranger = world.person("frank@partner.example");
        stranger.groups = vec!["contractors".to_owned()];
        allowed(as_person(&world, &stranger, 3, "/"));
    }

    #[tokio::test]
    async fn token_groups_never_judge_someone_by_what_the_directory_renamed_them_from() {
        let world = World::new();
        let carol = world.user("carol@corp.example").await;
        // Signed in as carol; her ID token said `contractors`, the directory never did.
        let mut signed_in = world.person("carol@corp.example");
        signed_in.groups = vec!["contractors".to_owned()];
        forbidden(as_person(&world, &signed_in, 3, "/"));
        // The IdP renames her (a new login); her session still names the old one.
        let rename = serde_json::json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "userName", "value": "carol.new@corp.example"}]
        });
        world
            .scim(Method::PATCH, &format!("/Users/{carol}"), rename)
            .await;
        let refusal = forbidden(as_person(&world, &signed_in, 3, "/"));
        assert_eq!(refusal.cause, Cause::NotInDirectory, "{}", refusal.reason);
        assert!(
            refusal.reason.contains("another value now"),
            "{}",
            refusal.reason
        );
    }

    #[tokio::test]
    async fn a_person_s_token_is_judged_as_the_person_never_as_a_machine() {
        let world = World::with(config(
            "[[routes]]\nfrom = \"http://bots.test\"\nto = [\"http://127.0.0.1:3\"]\n\
             accept = [\"bearer\"]\nallow = { machines = true }\n",
        ));
        let alice = world.user(ALICE).await;
        world.user(BOT).await;
        world.group("eng", &[&alice]).await;
        let bots = world.config.routes.len() - 1;
        let bot = machine(BOT);
        allowed(world.gate().admit(
            &facts(&world, bots, "GET", "/"),
            Presented::Caller(Principal::Machine(&bot)),
        ));
        // alice's own token, held by a client acting for her: its sub is her userName (as
        // Okta's is), so the machine mapping would find her.
        let mut hers = machine(ALICE);
        hers.for_itself = false;
        hers.email = Some(ALICE.to_owned());
        let refusal = forbidden(world.gate().admit(
            &facts(&world, bots, "GET", "/"),
            Presented::Caller(Principal::Machine(&hers)),
        ));
        assert_eq!(refusal.cause, Cause::NoRuleAllows, "{}", refusal.reason);
        // As herself, her groups count: the `eng` route for bearer tokens lets her in.
        allowed(world.gate().admit(
            &facts(&world, 1, "GET", "/"),
            Presented::Caller(Principal::Machine(&hers)),
        ));
        // A person's token the directory does not know is not a stranger's: token groups do
        // not judge it.
        let mut unknown = machine("sub-of-someone");
        unknown.for_itself = false;
        unknown.email = Some("dan@partner.example".to_owned());
        unknown.groups = vec!["contractors".to_owned()];
        let refusal = forbidden(world.gate().admit(
            &facts(&world, 3, "GET", "/"),
            Presented::Caller(Principal::Machine(&unknown)),
        ));
        assert_eq!(refusal.cause, Cause::NotInDirectory, "{}", refusal.reason);
        // An unverified email on her token names nobody.
        hers.email_verified = Some(false);
        let refusal = forbidden(world.gate().admit(
            &facts(&world, 1, "GET", "/"),
            Presented::Caller(Principal::Machine(&hers)),
        ));
        assert_eq!(refusal.cause, Cause::NoIdentifyingClaim);
    }

    #[tokio::test]
    async fn any_string_claim_can_find_a_person_and_a_miss_says_which_value_was_looked_up() {
        // Entra ID's way: the user's object id, provisioned as the SCIM externalId.
        let world = World::with(config(
            "[identity]\nclaim = \"oid\"\nscim_attribute = \"externalId\"\n\
             machine_claim = \"azp\"\n",
        ));
        let alice = world.user(ALICE).await;
        let bot = world.user(BOT).await;
        world.group("eng", &[&alice, &bot]).await;
        let mut person = world.person("someone-else@example.com");
        person.claims.insert("oid".into(), format!("ext-{ALICE}"));
        let pass = allowed(as_person(&world, &person, 0, "/work"));
        assert_eq!(pass.forward.expect("named").user, ALICE);

        // Without the claim: nobody; with another value: the refusal names claim, value and
        // attribute.
        let mut nobody = world.person(ALICE);
        assert_eq!(
            forbidden(as_person(&world, &nobody, 0, "/work")).cause,
            Cause::NoIdentifyingClaim
        );
        nobody.claims.insert("oid".into(), "0000-1111".into());
        let refusal = forbidden(as_person(&world, &nobody, 0, "/work"));
        assert!(
            refusal
                .reason
                .contains("its oid claim, \"0000-1111\", was looked up as the SCIM externalId"),
            "{}",
            refusal.reason
        );

        // A machine by its token's `azp`, against userName.
        let mut token = machine("some-sub");
        token.claims.insert("azp".into(), BOT.into());
        allowed(world.gate().admit(
            &facts(&world, 1, "GET", "/"),
            Presented::Caller(Principal::Machine(&token)),
        ));
    }

    #[tokio::test]
    async fn token_groups_never_override_the_directory_for_someone_it_knows() {
        let world = world().await;
        let mut bob = world.person(BOB);
        bob.groups = vec!["contractors".to_owned()];
        let refusal = forbidden(as_person(&world, &bob, 3, "/"));
        assert_eq!(
            refusal.cause,
            Cause::NoRuleAllows,
            "bob's directory groups count"
        );
    }

    #[tokio::test]
    async fn explaining_says_which_rule_allowed_and_why() {
        let world = world().await;
        let alice = world.person(ALICE);
        let pass = allowed(world.gate().explain(
            &facts(&world, 0, "GET", "/work"),
            Presented::Caller(Principal::Person(&alice)),
        ));
        let why = pass.why.expect("explain says why");
        assert_eq!(why.rule.as_deref(), Some("routes[0].allow[0]"));
        assert!(why.reason.contains("eng"), "{}", why.reason);
    }

    #[tokio::test]
    async fn a_rule_naming_a_final_sigma_matches_the_directory_s_user() {
        let world = World::new();
        world.user("Οδυσσευς@ithaca.example").await;
        world.user("ΟΔΥΣΣΕΥΣ").await;
        allowed(as_person(&world, &world.person("οδυσσευσ"), 4, "/"));
    }

    #[tokio::test]
    async fn people_can_be_found_by_sub_as_the_external_id() {
        let world = World::with(config(
            "[identity]\nclaim = \"sub\"\nscim_attribute = \"externalId\"\n",
        ));
        let alice = world.user(ALICE).await;
        world.group("eng", &[&alice]).await;
        let mut identity = world.person("not-the-user-name@x.example");
        identity.subject = format!("ext-{ALICE}");
        let pass = allowed(as_person(&world, &identity, 0, "/work"));
        assert_eq!(pass.forward.map(|f| f.user.clone()), Some(ALICE.to_owned()));
    }

    #[tokio::test]
    async fn people_can_be_found_by_any_of_their_emails() {
        let world = World::with(config("[identity]\nscim_attribute = \"emails\"\n"));
        let user = world
            .scim(
                http::Method::POST,
                "/Users",
                serde_json::json!({
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                    "userName": "asmith",
                    "emails": [{"value": "a.smith@corp.example"}, {"value": "alice@corp.example"}],
                }),
            )
            .await;
        let id = user["id"].as_str().unwrap_or_default().to_owned();
        world.group("eng", &[&id]).await;
        let pass = allowed(as_person(
            &world,
            &world.person("Alice@Corp.Example"),
            0,
            "/x",
        ));
        assert_eq!(
            pass.forward.map(|f| f.user.clone()),
            Some("asmith".to_owned())
        );
    }

    #[tokio::test]
    async fn the_version_changes_with_what_the_upstream_is_told() {
        let world = world().await;
        let alice = world.person(ALICE);
        let version = |world: &World| {
            allowed(as_person(world, &alice, 0, "/work"))
                .forward
                .map(|f| f.version)
        };
        let before = version(&world);
        assert_eq!(before, version(&world), "stable while nothing changes");
        world.group("sre", &[&world.id_of(ALICE)]).await;
        assert_ne!(before, version(&world), "a new group, a new version");
    }

    #[tokio::test]
    async fn a_path_that_is_not_normalized_cannot_be_judged() {
        let world = world().await;
        let refusal = forbidden(as_person(&world, &world.person(ALICE), 0, "/x/../admin"));
        assert_eq!(refusal.cause, Cause::Unevaluable);
    }

    #[tokio::test]
    async fn the_directory_view_shows_a_known_caller_and_nothing_for_a_stranger() {
        let world = world().await;
        let alice = world.person(ALICE);
        let view = world.gate().directory_view(Principal::Person(&alice));
        assert_eq!(
            view,
            Some(DirectoryView {
                user_name: ALICE.to_owned(),
                active: true,
                groups: vec!["eng".to_owned()],
                outlived: false,
            })
        );
        // A session from before her record was made is not hers.
        let before = Identity {
            directory_seq: 0,
            ..alice.clone()
        };
        let view = world.gate().directory_view(Principal::Person(&before));
        assert!(view.is_some_and(|v| v.outlived));
        let eve = world.person("eve@else.example");
        assert_eq!(world.gate().directory_view(Principal::Person(&eve)), None);
    }

    #[test]
    fn each_group_name_is_encoded_so_none_can_pose_as_two() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let forward = Forward::new(
            "alice".to_owned(),
            None,
            names(&["eng", "eng, admins", "on\r\ncall", "Équipe 100%"]),
        );
        assert_eq!(
            forward.groups,
            "eng, eng%2C%20admins, on%0D%0Acall, %C3%89quipe%20100%25"
        );
        assert_eq!(
            forward.group_names[1], "eng, admins",
            "the assertion keeps them as they are"
        );
        assert_eq!(
            groups_header(&names(&["sre", "db-admins_2.x~"])),
            "sre, db-admins_2.x~"
        );
    }

    fn client(headers: &[(&'static str, &'static str)]) -> Client {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_static(value));
        }
        Client::of(&map)
    }

    #[test]
    fn a_browser_is_a_page_request_that_accepts_html() {
        let html = "text/html,application/xhtml+xml,*/*;q=0.8";
        assert_eq!(client(&[("accept", html)]), Client::Browser);
        assert_eq!(
            client(&[("accept", html), ("sec-fetch-mode", "navigate")]),
            Client::Browser
        );
        assert_eq!(
            client(&[("accept", "*/*"), ("accept", html)]),
            Client::Browser
        );
        assert_eq!(client(&[("accept", "Text/HTML")]), Client::Browser);
        assert_eq!(
            client(&[("accept", "application/json, tt text/HTML")]),
            Client::Browser,
            "found after other candidates for its first letter, at the very end"
        );
        assert_eq!(client(&[("accept", "text/htm")]), Client::Api, "cut short");
    }

    #[test]
    fn scripts_and_api_clients_are_not_browsers() {
        let html = "text/html";
        assert_eq!(client(&[]), Client::Api);
        assert_eq!(client(&[("accept", "application/json")]), Client::Api);
        assert_eq!(
            client(&[("accept", html), ("x-requested-with", "XMLHttpRequest")]),
            Client::Api
        );
        assert_eq!(
            client(&[("accept", html), ("sec-fetch-mode", "cors")]),
            Client::Api
        );
    }

    #[test]
    fn only_a_browser_asking_for_a_page_where_people_sign_in_is_sent_to_sign_in() {
        let sign_in =
            |method, client, sessions| sign_in_or_challenge(method, client, sessions, false, None);
        assert_eq!(
            sign_in("GET", Client::Browser, true),
            Refused::SignIn { revoked: None }
        );
        assert!(matches!(
            sign_in("GET", Client::Browser, false),
            Refused::Challenge { .. }
        ));
        assert!(matches!(
            sign_in("DELETE", Client::Browser, true),
            Refused::Challenge { .. }
        ));
        assert!(matches!(
            sign_in("GET", Client::Api, true),
            Refused::Challenge { .. }
        ));
        // A page load that presented a refused token.
        assert_eq!(
            sign_in_or_challenge("GET", Client::Browser, true, true, None),
            Refused::Challenge {
                invalid_token: true,
                revoked: None
            }
        );
    }

    #[test]
    fn only_a_revocation_ends_the_session() {
        assert!(Refused::SignIn {
            revoked: Some(Outdated::Caller(None))
        }
        .revoked());
        assert!(Refused::Challenge {
            invalid_token: false,
            revoked: Some(Outdated::Caller(None))
        }
        .revoked());
        assert!(!Refused::SignIn { revoked: None }.revoked());
        assert!(!Refused::Forbid(Refusal {
            who: None,
            rule: None,
            cause: Cause::NotPublic,
            reason: String::new(),
            agent: None,
        })
        .revoked());
        // An agent's token refused (on what looked like a browser's page load on a route that
        // also takes sessions) still says whose record it is older than.
        let agent = AgentRecord {
            name: "helper".into(),
            owners: vec![],
            on_behalf_of: None,
        };
        let sent = sign_in_or_challenge(
            "GET",
            Client::Browser,
            true,
            true,
            Some(Outdated::Agent(agent.clone())),
        );
        assert!(
            matches!(
                sent,
                Refused::Challenge {
                    invalid_token: true,
                    ..
                }
            ),
            "{sent:?}"
        );
        assert_eq!(sent.outdated_agent(), Some(&agent));
    }

    /// A route for agents owned by `eng` members, and for `eng` people.
    const AGENTS_ROUTE: &str = "[[routes]]\nfrom = \"http://agents.test\"\n\
        to = [\"http://127.0.0.1:3\"]\naccept = [\"bearer\"]\n\
        allow = [{ agent_owner_groups = [\"eng\"] }, { groups = [\"eng\"] }]\n";

    /// `world()` plus the agents route (the last), an application, and the agent `helper`
    /// owned by alice in it.
    async fn agents_world() -> (World, usize, String, String) {
        agents_world_in(config(AGENTS_ROUTE)).await
    }

    /// `agents_world()` under `config`.
    async fn agents_world_in(config: portcullis_config::Config) -> (World, usize, String, String) {
        let world = World::with(config);
        let alice = world.user(ALICE).await;
        world.user(BOB).await;
        let bot = world.user(BOT).await;
        world.group("eng", &[&alice, &bot]).await;
        let app = world.application("Helpdesk").await;
        let helper = world.agent("helper", &[&alice], &[&app], None).await;
        let route = world.config.routes.len() - 1;
        (world, route, app, helper)
    }

    fn as_machine(world: &World, token: &Machine, route: usize) -> Admission {
        world.gate().admit(
            &facts(world, route, "GET", "/tickets"),
            Presented::Caller(Principal::Machine(token)),
        )
    }

    #[tokio::test]
    async fn a_person_s_token_is_taken_only_from_the_clients_its_issuer_lists() {
        let listing = crate::testing::CONFIG.replace(
            "audiences = [\"api\"]",
            "audiences = [\"api\"]\nperson_clients = [\"cli\"]",
        );
        let (world, agents, _, _) =
            agents_world_in(crate::testing::parse(&format!("{listing}\n{AGENTS_ROUTE}"))).await;
        // Alice's own token (no `act`), held by `client`.
        let held_by = |client: Option<&str>| Machine {
            client_id: client.map(str::to_owned),
            for_itself: false,
            email: Some(ALICE.to_owned()),
            ..machine("sub-alice")
        };
        allowed(as_machine(&world, &held_by(Some("cli")), 1));
        // Another application's (one signing her in through the same IdP), or one naming no
        // client: an invalid token, on every route.
        for client in [Some("other"), None] {
            for route in [0, 1, agents] {
                let admission = as_machine(&world, &held_by(client), route);
                assert!(
                    invalid_token(&admission),
                    "{client:?} {route}: {admission:?}"
                );
            }
        }
        // An agent's client holding it is judged as the agent acting for her.
        let pass = allowed(as_machine(&world, &held_by(Some("helper")), agents));
        let agent = pass.forward.and_then(|f| f.agent).expect("an agent");
        assert_eq!(agent.name, "helper");
        // A client's own token is a machine's, found in the directory as ever.
        allowed(as_machine(&world, &agent_token(BOT), 1));
        // A replica behind may not know the agent whose client it is yet: it answers as one
        // behind, not as to a client it knows to be none.
        let behind = Gate {
            current: false,
            ..world.gate()
        };
        let admission = behind.admit(
            &facts(&world, 1, "GET", "/tickets"),
            Presented::Caller(Principal::Machine(&held_by(Some("other")))),
        );
        assert_eq!(admission, Admission::Refuse(Refused::Unavailable));
        // Where the issuer lists none, any client's.
        let (world, _, _, _) = agents_world().await;
        allowed(as_machine(&world, &held_by(Some("other")), 1));
    }

    /// A refusal of a token an agent holds for a person, before the directory is asked of
    /// either (a route's audiences), names the agent as the directory does, with the person.
    #[tokio::test]
    async fn the_agent_acting_with_a_person_s_token_is_named_as_the_directory_names_it() {
        let (world, _, _, _) = agents_world().await;
        let gate = world.gate();
        // Named by its act claim, or by the client holding it, in another case.
        let held = Machine {
            client_id: Some("HELPER".to_owned()),
            for_itself: false,
            email: Some(ALICE.to_owned()),
            ..machine("sub-alice")
        };
        for token in [delegated_token(ALICE, "Helper"), held] {
            let agent = gate.acting_agent(&token).expect("the agent");
            assert_eq!(agent.name, "helper");
            assert_eq!(agent.owners, [ALICE]);
            assert_eq!(agent.on_behalf_of.as_deref(), Some(ALICE));
        }
        // None acts: a client no agent is.
        assert_eq!(gate.acting_agent(&delegated_token(ALICE, "nobody")), None);
        // A client's own token that says another acts: no agent's (refused as the client's).
        let claiming = Machine {
            act: delegated_token(ALICE, "helper").act,
            ..agent_token("helper")
        };
        assert_eq!(gate.acting_agent(&claiming), None);
        // An agent's own token whose agent was deleted: named as `Gate::agent` names it, the
        // value it was looked up by, with no record.
        let gone = world.agent("gone", &[], &[], None).await;
        world
            .scim(Method::DELETE, &format!("/Agents/{gone}"), Value::Null)
            .await;
        let gate = world.gate();
        let (who, agent) = gate.token_refused_as(&agent_token("gone"));
        assert_eq!((who.as_str(), agent), ("agent:gone", None));
        // A client no agent ever was: as the client.
        let (who, agent) = gate.token_refused_as(&agent_token("stranger"));
        assert_eq!(agent, None);
        assert!(!who.starts_with("agent:"), "{who}");
        // An agent's own token: the agent, for no one, named as an agent.
        let (who, agent) = gate.token_refused_as(&agent_token("helper"));
        let agent = agent.expect("the agent");
        assert_eq!(
            (who.as_str(), agent.name.as_str()),
            ("agent:helper", "helper")
        );
        assert_eq!(
            (agent.owners, agent.on_behalf_of),
            (vec![ALICE.to_owned()], None)
        );
    }

    #[tokio::test]
    async fn an_agent_is_let_in_by_its_owners_groups_and_named_as_an_agent() {
        let (world, route, _, _) = agents_world().await;
        let pass = allowed(as_machine(&world, &agent_token("helper"), route));
        let forward = pass.forward.expect("the upstream is told who");
        // Never taken for a person of that name.
        assert_eq!(forward.user, "agent:helper");
        let agent = forward.agent.expect("an agent");
        assert_eq!(
            (agent.name.as_str(), agent.owners.as_slice()),
            ("helper", &[ALICE.to_owned()][..])
        );
        // Nor is a user of its name shown as who it is.
        world.user("helper").await;
        assert!(world
            .gate()
            .directory_view(Principal::Machine(&agent_token("helper")))
            .is_none());
        // Not on a route for people: alice's own `eng` does not speak for her agent.
        let refusal = forbidden(as_machine(&world, &agent_token("helper"), 1));
        assert_eq!(refusal.cause, Cause::NoRuleAllows, "{}", refusal.reason);
        // Named as the agent, not as a person of its name.
        assert!(
            refusal
                .reason
                .starts_with("no rule allows agent:helper to "),
            "{}",
            refusal.reason
        );
        assert_eq!(refusal.agent.map(|a| a.name), Some("helper".to_owned()));
        // A client the directory has no agent for is a machine, as before.
        let pass = allowed(as_machine(&world, &agent_token(BOT), 1));
        assert!(pass.forward.is_some_and(|f| f.agent.is_none()));
    }

    #[tokio::test]
    async fn an_agent_s_token_from_before_it_was_re_activated_is_invalid() {
        let (world, route, _, helper) = agents_world().await;
        let agent = format!("/Agents/{helper}");
        world.set_active_at(&agent, false).await;
        world.set_active_at(&agent, true).await;
        // The second of the re-activation, as the directory keeps it.
        let now = world
            .directory
            .with_agent(AgentKey::Name("helper"), 0, |lookup| match lookup {
                AgentLookup::Found(view) => view.agent.valid_since_unix,
                _ => 0,
            });
        assert!(now > 0);
        let issued = |iat: Option<u64>| Machine {
            issued: iat,
            ..agent_token("helper")
        };
        // Refused as an invalid token older than the agent (not than its caller).
        let outdated = |admission: Admission| match admission {
            Admission::Refuse(
                refused @ Refused::Challenge {
                    invalid_token: true,
                    ..
                },
            ) => refused
                .outdated_agent()
                .map(|agent| (agent.name.clone(), agent.on_behalf_of.clone())),
            other => panic!("{other:?}"),
        };
        let helper = Some(("helper".to_owned(), None));
        assert_eq!(
            outdated(as_machine(&world, &issued(Some(now - 1)), route)),
            helper
        );
        assert_eq!(outdated(as_machine(&world, &issued(None), route)), helper);
        allowed(as_machine(&world, &issued(Some(now)), route));
        // A person's token held by the agent's client likewise, for that person.
        let held = Machine {
            issued: Some(now - 1),
            ..delegated_token(ALICE, "helper")
        };
        assert_eq!(
            outdated(as_machine(&world, &held, route)),
            Some(("helper".to_owned(), Some(ALICE.to_owned())))
        );
    }

    /// The `helper` agent's `valid_since_unix`, as the directory keeps it.
    fn helper_valid_since(world: &World) -> u64 {
        world
            .directory
            .with_agent(AgentKey::Name("helper"), 0, |lookup| match lookup {
                AgentLookup::Found(view) => view.valid_since_unix,
                _ => 0,
            })
    }

    /// The `helper` agent's own token, issued at `iat`.
    fn helper_token_at(iat: u64) -> Machine {
        Machine {
            issued: Some(iat),
            ..agent_token("helper")
        }
    }

    /// Whether `admission` refuses the token as invalid (401 `invalid_token`).
    fn invalid_token(admission: &Admission) -> bool {
        matches!(
            admission,
            Admission::Refuse(Refused::Challenge {
                invalid_token: true,
                ..
            })
        )
    }

    /// Deactivating an agent's application refuses it; re-activating it takes none of its
    /// tokens from before back (disabled while its secret is rotated, say).
    #[tokio::test]
    async fn an_agent_s_token_from_before_its_application_was_re_activated_is_invalid() {
        let (world, route, app, _) = agents_world().await;
        let since = || helper_valid_since(&world);
        let issued = helper_token_at;
        let application = format!("/AgenticApplications/{app}");
        // Stamps are whole seconds: one later than everything before.
        let before = since();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        world.set_active_at(&application, false).await;
        let refusal = forbidden(as_machine(&world, &issued(before), route));
        assert_eq!(refusal.cause, Cause::Deactivated, "{}", refusal.reason);
        world.set_active_at(&application, true).await;
        let now = since();
        assert!(now > before);
        let old = as_machine(&world, &issued(now - 1), route);
        assert!(
            invalid_token(&old),
            "a token from before its application was re-activated: {old:?}"
        );
        allowed(as_machine(&world, &issued(now), route));
        // An owner's new email says nothing of whose the agent's token is.
        let alice = world.id_of(ALICE);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let email = serde_json::json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "add", "path": "emails",
                "value": [{"value": "alice.new@corp.example"}]}]});
        world
            .scim(Method::PATCH, &format!("/Users/{alice}"), email)
            .await;
        allowed(as_machine(&world, &issued(now), route));
    }

    #[tokio::test]
    async fn an_agent_s_token_from_before_its_disabled_application_was_taken_off_it_is_invalid() {
        let (world, route, app, helper) = agents_world().await;
        let since = || helper_valid_since(&world);
        let issued = helper_token_at;
        let invalid = |admission: Admission| invalid_token(&admission);
        let agent = format!("/Agents/{helper}");
        let link = |op: &str, app: &str| {
            let path = format!(
                "{}:applications",
                portcullis_scim::schema::PORTCULLIS_AGENT_SCHEMA
            );
            let ops = match op {
                "remove" => serde_json::json!([{"op": "remove",
                    "path": format!("{path}[value eq \"{app}\"]")}]),
                _ => serde_json::json!([{"op": "add", "path": path, "value": [{"value": app}]}]),
            };
            crate::testing::patch(ops)
        };
        // Stamps are whole seconds: one later than everything before.
        let before = since();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        // Another application added: nothing the agent held is given back.
        let other = world.application("Triage").await;
        world.scim(Method::PATCH, &agent, link("add", &other)).await;
        assert_eq!(since(), before);
        allowed(as_machine(&world, &issued(before), route));
        // Its application disabled (its secret rotated, say), then taken off the agent
        // instead of re-activated: the agent stands again, but not with its tokens from before.
        world
            .set_active_at(&format!("/AgenticApplications/{app}"), false)
            .await;
        world
            .scim(Method::PATCH, &agent, link("remove", &app))
            .await;
        let now = since();
        assert!(now > before);
        let old = as_machine(&world, &issued(now - 1), route);
        assert!(invalid(old.clone()), "a token from before: {old:?}");
        allowed(as_machine(&world, &issued(now), route));
        // Deleted, and the dangling link then taken off: the same.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        world
            .scim(
                Method::DELETE,
                &format!("/AgenticApplications/{other}"),
                serde_json::Value::Null,
            )
            .await;
        world
            .scim(Method::PATCH, &agent, link("remove", &other))
            .await;
        let later = since();
        assert!(later > now);
        assert!(invalid(as_machine(&world, &issued(later - 1), route)));
        allowed(as_machine(&world, &issued(later), route));
    }

    #[tokio::test]
    async fn each_link_of_the_owner_chain_refuses_the_agent() {
        let (world, route, app, helper) = agents_world().await;
        let refused = |why: &str| {
            let refusal = forbidden(as_machine(&world, &agent_token("helper"), route));
            assert_eq!(refusal.cause, Cause::Deactivated, "{}", refusal.reason);
            assert!(refusal.reason.contains(why), "{}", refusal.reason);
        };
        let alice = world.id_of(ALICE);
        world.set_active(&alice, false).await;
        refused("no owner of the agent is an active user");
        world.set_active(&alice, true).await;
        allowed(as_machine(&world, &agent_token("helper"), route));
        world
            .set_active_at(&format!("/AgenticApplications/{app}"), false)
            .await;
        refused("application is deactivated or deleted");
        world
            .set_active_at(&format!("/AgenticApplications/{app}"), true)
            .await;
        world
            .set_active_at(&format!("/Agents/{helper}"), false)
            .await;
        refused("the agent is deactivated");
        // Expired: refused, whatever else holds.
        world
            .agent("old", &[&alice], &[], Some("2020-01-01T00:00:00Z"))
            .await;
        let refusal = forbidden(as_machine(&world, &agent_token("old"), route));
        assert!(refusal.reason.contains("expired"), "{}", refusal.reason);
        // Deleted: refused, never taken for a machine of the same name.
        world
            .scim(Method::DELETE, &format!("/Agents/{helper}"), Value::Null)
            .await;
        let refusal = forbidden(as_machine(&world, &agent_token("helper"), route));
        assert_eq!(refusal.cause, Cause::NotInDirectory);
        assert!(refusal.reason.contains("was deleted"), "{}", refusal.reason);
    }

    #[tokio::test]
    async fn an_agent_without_an_active_owner_gets_only_what_public_rules_give_anyone() {
        let (world, _, _, helper) = agents_world().await;
        let public = facts(&world, 0, "GET", "/public/x");
        let admit = |token: &Machine| {
            allowed(
                world
                    .gate()
                    .admit(&public, Presented::Caller(Principal::Machine(token))),
            )
        };
        assert!(admit(&agent_token("helper")).forward.is_some());
        // The agent deactivated: neither it, nor alice through it, is named to the upstream.
        world
            .set_active_at(&format!("/Agents/{helper}"), false)
            .await;
        assert_eq!(admit(&agent_token("helper")).forward, None);
        assert_eq!(admit(&delegated_token(ALICE, "helper")).forward, None);
        // Active again, but its only owner deactivated: the same.
        world
            .set_active_at(&format!("/Agents/{helper}"), true)
            .await;
        world.set_active(&world.id_of(ALICE), false).await;
        assert_eq!(admit(&agent_token("helper")).forward, None);
    }

    #[tokio::test]
    async fn a_delegated_token_is_let_in_only_when_both_are_allowed() {
        let (world, route, _, _) = agents_world().await;
        // alice (in eng) through helper (owned by alice): both allowed.
        let pass = allowed(as_machine(&world, &delegated_token(ALICE, "helper"), route));
        let forward = pass.forward.expect("forwarded");
        assert_eq!(forward.user, ALICE);
        let agent = forward.agent.expect("the agent");
        assert_eq!(agent.name, "helper");
        assert_eq!(agent.on_behalf_of.as_deref(), Some(ALICE));
        // A person named as agents are, through it: the upstream would be told of an agent.
        let mallory = world.user("agent:mallory").await;
        let eng = world.directory.read(|index| {
            let row = index.group_by_folded_name("eng").expect("eng");
            portcullis_scim::store::format_id(index.group(row).expect("eng").id)
        });
        let add = serde_json::json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "add", "path": "members", "value": [{"value": mallory}]}]});
        world
            .scim(Method::PATCH, &format!("/Groups/{eng}"), add)
            .await;
        let token = delegated_token("agent:mallory", "helper");
        let refusal = forbidden(as_machine(&world, &token, route));
        assert_eq!(refusal.cause, Cause::CannotBeTold, "{}", refusal.reason);
        // bob (in no group) through the same agent: the person is refused.
        let refusal = forbidden(as_machine(&world, &delegated_token(BOB, "helper"), route));
        assert_eq!(refusal.who.as_deref(), Some(BOB), "{}", refusal.reason);
        assert_eq!(
            refusal.agent.and_then(|a| a.on_behalf_of),
            Some(BOB.to_owned())
        );
        // alice through an agent whose owner is bob: the agent is refused, recorded as
        // alice's refusal with the agent beside her.
        let bob = world.id_of(BOB);
        world.agent("bobs", &[&bob], &[], None).await;
        let refusal = forbidden(as_machine(&world, &delegated_token(ALICE, "bobs"), route));
        assert_eq!(refusal.who.as_deref(), Some(ALICE), "{}", refusal.reason);
        let agent = refusal.agent.expect("the agent");
        assert_eq!(
            (agent.name.as_str(), agent.on_behalf_of.as_deref()),
            ("bobs", Some(ALICE))
        );
        assert!(refusal.reason.contains("bobs"), "{}", refusal.reason);
        // alice through a client that is no agent: refused.
        let refusal = forbidden(as_machine(&world, &delegated_token(ALICE, "nobody"), route));
        assert!(
            refusal.reason.contains("not an agent"),
            "{}",
            refusal.reason
        );
        // A token that acts through helper, held by another agent (bobs, whose owner is not
        // alice): refused, not judged as helper's.
        let held_by_bobs = Machine {
            client_id: Some("bobs".to_owned()),
            ..delegated_token(ALICE, "helper")
        };
        let refusal = forbidden(as_machine(&world, &held_by_bobs, route));
        assert!(
            refusal.reason.contains("held by the agent \"bobs\""),
            "{}",
            refusal.reason
        );
        // The same agent, named in another case: one agent.
        let helper_again = Machine {
            client_id: Some("Helper".to_owned()),
            ..delegated_token(ALICE, "helper")
        };
        allowed(as_machine(&world, &helper_again, route));
        // A delegated token whose subject is a client, not a person: refused.
        let mut of_a_client = delegated_token(ALICE, "helper");
        of_a_client.for_itself = true;
        let refusal = forbidden(as_machine(&world, &of_a_client, route));
        assert_eq!(
            refusal.cause,
            Cause::NoIdentifyingClaim,
            "{}",
            refusal.reason
        );
    }

    /// An actor is named by `agent_claim`, else by its `sub`, as RFC 8693's actors are: with
    /// Okta's mapping (`cid`), an `act` that holds only a `sub` still names its agent.
    #[tokio::test]
    async fn an_actor_without_the_agent_claim_is_named_by_its_sub() {
        let world = World::with(config(&format!(
            "{AGENTS_ROUTE}\n[identity]\nagent_claim = \"cid\""
        )));
        let alice = world.user(ALICE).await;
        world.group("eng", &[&alice]).await;
        let app = world.application("Helpdesk").await;
        world.agent("helper", &[&alice], &[&app], None).await;
        let route = world.config.routes.len() - 1;
        let token = delegated_token(ALICE, "helper");
        assert!(token
            .act
            .as_ref()
            .is_some_and(|act| !act.claims.contains_key("cid")));
        let pass = allowed(as_machine(&world, &token, route));
        let forward = pass.forward.expect("forwarded");
        assert_eq!(forward.user, ALICE);
        assert_eq!(forward.agent.expect("the agent").name, "helper");
        // The refusal says which claim named what is no agent.
        let refusal = forbidden(as_machine(&world, &delegated_token(ALICE, "nobody"), route));
        assert!(
            refusal.reason.contains("(its act claim's sub)"),
            "{}",
            refusal.reason
        );
    }

    #[tokio::test]
    async fn a_person_s_token_held_by_an_agent_is_judged_as_delegated_to_it() {
        let (world, route, _, helper) = agents_world().await;
        // alice's own token, issued to the agent's client (no act claim).
        let mut held = delegated_token(ALICE, "helper");
        held.act = None;
        let pass = allowed(as_machine(&world, &held, route));
        let agent = pass
            .forward
            .and_then(|f| f.agent)
            .expect("the agent is named");
        assert_eq!(agent.on_behalf_of.as_deref(), Some(ALICE));
        world
            .set_active_at(&format!("/Agents/{helper}"), false)
            .await;
        let refusal = forbidden(as_machine(&world, &held, route));
        assert!(refusal.reason.contains("deactivated"), "{}", refusal.reason);
        // Held by a client that is no agent, it is alice's, as before.
        let mut hers = delegated_token(ALICE, "webapp");
        hers.act = None;
        let pass = allowed(as_machine(&world, &hers, route));
        assert!(pass
            .forward
            .is_some_and(|f| f.user == ALICE && f.agent.is_none()));
    }
}

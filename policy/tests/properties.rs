//! Property tests of the policy engine: random policies against random callers and requests,
//! drawn from small pools of names so that rules actually match.
//!
//! Besides the promised properties (deny always wins, anonymous and deactivated callers only get
//! in through public rules, only active machines match `machines`, evaluation is deterministic
//! and total), every decision is compared with `reference`, a deliberately naive reading of the
//! rules straight off the `RuleSpec`s.

// Test code: a rule set that does not compile is a bug in the test itself.
#![allow(clippy::panic)]

use portcullis_policy::{GroupRef, Match, Policy, Reason, Request, RuleSpec, Subject, SubjectKind};
use proptest::prelude::*;
use proptest::sample::select;

const GROUPS: &[&str] = &[
    "sre",
    "SRE",
    "eng",
    "Contractors",
    "contractors",
    "équipe",
    "ÉQUIPE",
];
const GROUP_IDS: &[&str] = &["00g1", "00G1", "00g2"];
const USERS: &[&str] = &[
    "alice@corp.example",
    "ALICE@Corp.Example",
    "bob@corp.example",
    "ci-bot",
];
const DOMAINS: &[&str] = &[
    "corp.example",
    "CORP.example",
    "*.corp.example",
    "other.example",
    "*.other.example",
];
const EMAILS: &[&str] = &[
    "alice@corp.example",
    "Alice@CORP.EXAMPLE",
    "a@b@corp.example",
    "corp.example",
    "x@eu.corp.example",
    "x@A.B.Corp.Example",
    "x@evilcorp.example",
    "x@x..corp.example",
    "x@.corp.example",
    "x@other.example",
    "x@y.other.example",
];
const METHODS: &[&str] = &[
    "GET", "get", "HEAD", "POST", "DELETE", "delete", "PROPFIND", "PATCH",
];
const PREFIXES: &[&str] = &[
    "/",
    "/admin",
    "/admin/",
    "/api",
    "/api/v1",
    "/admin.php",
    "/admin.php/x",
    "/%C3%BCber",
];
const PATHS: &[&str] = &[
    "/",
    "/admin",
    "/adminx",
    "/admin/",
    "/admin/x",
    "/api",
    "/api/v1",
    "/api/v1/x",
    "/apix",
    "/Admin",
    "/ADMIN/x",
    "/admin;jsessionid=1",
    "/admin;x/y",
    "/;x/admin",
    "/API;v=1/V1/x",
    "/admin/;x",
    "/ADMIN;a/;b",
    "/admin.json",
    "/Admin.csv;x/",
    "/api/v1.xml",
    "/admin.json/x",
    "/index.php/admin",
    "/INDEX.PHP;x/Admin.json",
    "/a.php/b.php/admin",
    "/index.php",
    "/api/index.php/v1/x",
    "/admin.php",
    "/ADMIN.PHP/x",
    "/admin.aspx;x/y",
    "/api/v1.html/x",
    "/%C3%BCber",
    "/%C3%9Cber/x",
    "/%C3%9CBER.json",
    "/%C3%BCberx",
    "/%C3%9Cber;x/y",
];

fn strings(pool: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(select(pool).prop_map(str::to_owned), 0..=max)
}

/// 1 to `max` names from `pool` mostly (so that most rule sets compile, and are judged), now
/// and then 0 to `max` of any text matching `junk` (which must be refused, never a panic).
fn mostly(
    pool: &'static [&'static str],
    max: usize,
    junk: &'static str,
) -> BoxedStrategy<Vec<String>> {
    let names = prop::collection::vec(select(pool).prop_map(str::to_owned), 1..=max);
    prop_oneof![19 => names, 1 => prop::collection::vec(junk, 0..=max)].boxed()
}

fn rule(allow_public: bool) -> impl Strategy<Value = RuleSpec> {
    (
        strings(GROUPS, 2),
        strings(GROUP_IDS, 1),
        strings(USERS, 2),
        strings(DOMAINS, 2),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
        strings(GROUPS, 1),
        strings(GROUPS, 1),
        prop::bool::weighted(if allow_public { 0.2 } else { 0.0 }),
        prop::option::weighted(0.4, prop::collection::vec(select(METHODS), 1..=2)),
        prop::option::weighted(0.4, prop::collection::vec(select(PREFIXES), 1..=2)),
    )
        .prop_map(
            move |(
                groups,
                group_ids,
                users,
                email_domains,
                any_signed_in,
                machines,
                agents,
                agent_groups,
                agent_owner_groups,
                public,
                methods,
                paths,
            )| {
                let mut spec = RuleSpec {
                    name: String::new(),
                    groups,
                    group_ids,
                    users,
                    email_domains,
                    any_signed_in,
                    machines,
                    agents,
                    agent_groups,
                    agent_owner_groups,
                    public,
                    methods: methods.map(|m| m.into_iter().map(str::to_owned).collect()),
                    paths: paths.map(|p| p.into_iter().map(str::to_owned).collect()),
                };
                let names_someone = !spec.groups.is_empty()
                    || !spec.group_ids.is_empty()
                    || !spec.users.is_empty()
                    || !spec.email_domains.is_empty()
                    || spec.any_signed_in
                    || spec.machines
                    || spec.agents
                    || !spec.agent_groups.is_empty()
                    || !spec.agent_owner_groups.is_empty()
                    || spec.public;
                if !names_someone {
                    spec.groups.push("sre".to_owned());
                }
                // An allow of HEAD without GET does not compile (it would let GET's handler in).
                if let Some(methods) = spec.methods.as_mut().filter(|_| allow_public) {
                    let has = |name: &str| methods.iter().any(|m| m.eq_ignore_ascii_case(name));
                    if has("HEAD") && !has("GET") {
                        methods.push("GET".to_owned());
                    }
                }
                spec
            },
        )
}

fn named(rules: Vec<RuleSpec>, kind: &str) -> Vec<RuleSpec> {
    rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| RuleSpec {
            name: format!("{kind}[{i}]"),
            ..rule
        })
        .collect()
}

fn rules() -> impl Strategy<Value = (Vec<RuleSpec>, Vec<RuleSpec>)> {
    (
        prop::collection::vec(rule(true), 0..6),
        prop::collection::vec(rule(false), 0..4),
    )
        .prop_map(|(allow, deny)| (named(allow, "allow"), named(deny, "deny")))
}

/// A subject as owned data; `Subject` borrows from it.
#[derive(Debug, Clone)]
struct Caller {
    kind: SubjectKind,
    user_name: &'static str,
    email: Option<&'static str>,
    active: bool,
    groups: Vec<GroupRef<'static>>,
    owner_groups: Vec<GroupRef<'static>>,
}

impl Caller {
    fn subject(&self) -> Subject<'_> {
        Subject {
            kind: self.kind,
            user_name: self.user_name,
            email: self.email,
            active: self.active,
            groups: &self.groups,
            owner_groups: &self.owner_groups,
        }
    }
}

fn caller() -> impl Strategy<Value = Caller> {
    let group = (select(GROUPS), prop::option::of(select(GROUP_IDS))).prop_map(
        |(display_name, external_id)| GroupRef {
            display_name,
            external_id,
        },
    );
    let kinds = vec![
        SubjectKind::Person,
        SubjectKind::Machine,
        SubjectKind::Agent,
    ];
    (
        select(kinds),
        select(USERS),
        prop::option::weighted(0.8, select(EMAILS)),
        prop::bool::weighted(0.7),
        prop::collection::vec(group.clone(), 0..4),
        prop::collection::vec(group, 0..3),
    )
        .prop_map(
            |(kind, user_name, email, active, groups, owner_groups)| Caller {
                kind,
                user_name,
                email,
                active,
                groups,
                // Only an agent has owners.
                owner_groups: if kind == SubjectKind::Agent {
                    owner_groups
                } else {
                    Vec::new()
                },
            },
        )
}

fn request() -> impl Strategy<Value = Request<'static>> {
    (select(METHODS), select(PATHS)).prop_map(|(method, path)| Request { method, path })
}

// ---- the naive reading of the rules ----

fn email_domain(email: &str) -> Option<String> {
    let parts: Vec<&str> = email.split('@').collect();
    match parts.as_slice() {
        [local, domain] if !local.is_empty() && !domain.is_empty() => Some(domain.to_lowercase()),
        _ => None,
    }
}

fn domain_matches(entry: &str, domain: &str) -> bool {
    let entry = entry.to_lowercase();
    match entry.strip_prefix("*.") {
        None => domain == entry,
        Some(parent) => domain
            .strip_suffix(&format!(".{parent}"))
            .is_some_and(|below| {
                !below.is_empty()
                    && !below.starts_with('.')
                    && !below.ends_with('.')
                    && !below.contains("..")
            }),
    }
}

/// Whether the rule's names (not `any_signed_in`, `machines`, `agents` or `public`) match the
/// subject, in a `deny` rule or an allow rule. Only an agent is named by `agent_groups` and
/// `agent_owner_groups`; in an allow rule, only by those.
fn names_match(rule: &RuleSpec, subject: &Subject<'_>, deny: bool) -> bool {
    let in_any = |names: &[String], groups: &[GroupRef<'_>]| {
        groups.iter().any(|g| {
            names
                .iter()
                .any(|name| name.to_lowercase() == g.display_name.to_lowercase())
        })
    };
    if subject.kind == SubjectKind::Agent {
        let by_agent_criteria = in_any(&rule.agent_groups, subject.groups)
            || in_any(&rule.agent_owner_groups, subject.owner_groups);
        if by_agent_criteria || !deny {
            return by_agent_criteria;
        }
    }
    let user = subject.user_name.to_lowercase();
    rule.users.iter().any(|u| u.to_lowercase() == user)
        || subject.groups.iter().any(|g| {
            rule.groups
                .iter()
                .any(|name| name.to_lowercase() == g.display_name.to_lowercase())
                || g.external_id
                    .is_some_and(|id| rule.group_ids.iter().any(|r| r == id))
        })
        || subject.email.and_then(email_domain).is_some_and(|domain| {
            rule.email_domains
                .iter()
                .any(|entry| domain_matches(entry, &domain))
        })
}

fn conditions_hold(rule: &RuleSpec, request: &Request<'_>, deny: bool) -> bool {
    // A deny of GET is a deny of HEAD (frameworks answer HEAD with the GET handler).
    let method_ok = rule.methods.as_ref().is_none_or(|methods| {
        methods.iter().any(|m| {
            m.eq_ignore_ascii_case(request.method)
                || (deny
                    && m.eq_ignore_ascii_case("GET")
                    && request.method.eq_ignore_ascii_case("HEAD"))
        })
    });
    // A deny rule reads the path as the most lenient upstream would, a prefix's trailing `/`
    // as not required (`/api` is served as `/api/`), and a format suffix on the path's last
    // segment as none (`/api.json` is served as `/api`), and also without a `.php` script
    // segment that has more after it (`/index.php/admin` is `/admin` to a PHP front
    // controller), and with the extension off a page's file (`/admin.php/x` runs the page
    // `/admin/x` does, `/admin.php` is `/admin`); an allow rule reads all strictly.
    let read = |p: &str| if deny { loosely(p) } else { p.to_owned() };
    let read_prefix = |p: &str| match read(p) {
        loose if deny && loose.len() > 1 => loose.trim_end_matches('/').to_owned(),
        read => read,
    };
    let mut readings = vec![request.path.to_owned()];
    if deny {
        readings.extend(without_script(request.path));
        readings.extend(page_with_info(request.path));
    }
    let path_ok = readings
        .iter()
        .any(|path| path_holds(rule, &read(path), &read_prefix, deny));
    method_ok && path_ok
}

/// `path` without its first segment but the last that names a `.php` script.
fn without_script(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split('/').collect();
    let at = segments.iter().enumerate().position(|(i, segment)| {
        let name = segment
            .split(';')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        i + 1 < segments.len() && name.len() > 4 && name.ends_with(".php")
    })?;
    let kept: Vec<&str> = segments
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != at)
        .map(|(_, segment)| *segment)
        .collect();
    Some(kept.join("/"))
}

/// `path` with the extension off its first segment that names a page's file.
fn page_with_info(path: &str) -> Option<String> {
    const PAGES: [&str; 7] = ["php", "html", "htm", "shtml", "asp", "aspx", "jsp"];
    let mut segments: Vec<&str> = path.split('/').collect();
    let at = segments.iter().enumerate().position(|(i, segment)| {
        let name = segment.split(';').next().unwrap_or_default();
        i > 0
            && name.rsplit_once('.').is_some_and(|(stem, extension)| {
                !stem.is_empty() && PAGES.iter().any(|p| extension.eq_ignore_ascii_case(p))
            })
    })?;
    segments[at] = segments[at].split(';').next()?.rsplit_once('.')?.0;
    Some(segments.join("/"))
}

fn path_holds(
    rule: &RuleSpec,
    path: &str,
    read_prefix: &dyn Fn(&str) -> String,
    deny: bool,
) -> bool {
    rule.paths.as_ref().is_none_or(|prefixes| {
        prefixes
            .iter()
            .map(|prefix| read_prefix(prefix))
            // A deny of a page's file (`/admin.php`, `/admin.php/x`) is one of its name too
            // (`/admin`, `/admin/x`).
            .flat_map(|prefix| {
                let page = prefix
                    .strip_suffix(".php")
                    .filter(|page| !page.is_empty() && !page.ends_with('/'))
                    .map(str::to_owned)
                    .or_else(|| page_with_info(&prefix))
                    .filter(|_| deny);
                std::iter::once(prefix).chain(page)
            })
            .any(|prefix| {
                let rest = path.strip_prefix(prefix.as_str());
                let formatted = |rest: &str| {
                    let suffix = rest.strip_suffix('/').unwrap_or(rest);
                    deny && suffix.starts_with('.') && !suffix.contains('/')
                };
                path == prefix
                    || rest.is_some_and(|rest| {
                        prefix.ends_with('/') || rest.starts_with('/') || formatted(rest)
                    })
            })
    })
}

/// A path as the most lenient upstream reads it: each segment without its `;` parameters,
/// empty segments gone, letters in lower case (those beyond ASCII too, as ASP.NET Core reads
/// them once decoded); a trailing `/` kept.
fn loosely(path: &str) -> String {
    let segments: Vec<String> = path
        .split('/')
        .map(|s| lower_case(s.split(';').next().unwrap_or_default()))
        .filter(|s| !s.is_empty())
        .collect();
    let mut read = format!("/{}", segments.join("/"));
    // A last segment of parameters only (`/a/;x`) reads as a trailing `/`.
    let last = path.rsplit('/').next().unwrap_or_default();
    if last.split(';').next() == Some("") && read != "/" {
        read.push('/');
    }
    read
}

/// A segment in lower case: decoded first where it holds escapes that are UTF-8.
fn lower_case(segment: &str) -> String {
    let decoded = segment
        .contains('%')
        .then(|| {
            let mut bytes = Vec::new();
            let mut rest = segment.as_bytes();
            while !rest.is_empty() {
                if rest[0] == b'%' && rest.len() >= 3 {
                    let hex = std::str::from_utf8(&rest[1..3]).ok()?;
                    bytes.push(u8::from_str_radix(hex, 16).ok()?);
                    rest = &rest[3..];
                } else {
                    bytes.push(rest[0]);
                    rest = &rest[1..];
                }
            }
            String::from_utf8(bytes).ok()
        })
        .flatten();
    match decoded {
        Some(text) => text.chars().flat_map(char::to_lowercase).collect(),
        None => segment.to_ascii_lowercase(),
    }
}

/// Whether the rule's `any_signed_in`, `machines` or `agents` matches: each only ever matches
/// an active subject; `machines` only a machine, `agents` only an agent, and `any_signed_in`
/// anyone, but an agent only in a `deny` rule.
fn kind_matches(rule: &RuleSpec, subject: &Subject<'_>, deny: bool) -> bool {
    subject.active
        && match subject.kind {
            SubjectKind::Person => rule.any_signed_in,
            SubjectKind::Machine => rule.any_signed_in || rule.machines,
            SubjectKind::Agent => rule.agents || (deny && rule.any_signed_in),
        }
}

/// Whether deny rule `rule` matches: its names match the subject (active or not), or its
/// `any_signed_in` or `machines` does.
fn deny_matches(rule: &RuleSpec, subject: Option<&Subject<'_>>, request: &Request<'_>) -> bool {
    conditions_hold(rule, request, true)
        && subject.is_some_and(|s| names_match(rule, s, true) || kind_matches(rule, s, true))
}

fn allow_matches(rule: &RuleSpec, subject: Option<&Subject<'_>>, request: &Request<'_>) -> bool {
    conditions_hold(rule, request, false)
        && (rule.public
            || subject.is_some_and(|s| {
                kind_matches(rule, s, false) || (s.active && names_match(rule, s, false))
            }))
}

/// `(allowed, deciding rule)` by a plain reading of the documented order.
fn reference(
    allow: &[RuleSpec],
    deny: &[RuleSpec],
    subject: Option<&Subject<'_>>,
    request: &Request<'_>,
) -> (bool, Option<String>) {
    let inactive = subject.is_some_and(|s| !s.active);
    let public_covers = allow
        .iter()
        .any(|r| r.public && conditions_hold(r, request, false));
    if inactive && !public_covers {
        return (false, None);
    }
    if let Some(rule) = deny.iter().find(|r| deny_matches(r, subject, request)) {
        return (false, Some(rule.name.clone()));
    }
    match allow.iter().find(|r| allow_matches(r, subject, request)) {
        Some(rule) => (true, Some(rule.name.clone())),
        None => (false, None),
    }
}

fn compiled(allow: &[RuleSpec], deny: &[RuleSpec]) -> Policy {
    match Policy::compile(allow.to_vec(), deny.to_vec()) {
        Ok(policy) => policy,
        Err(errors) => panic!("generated rules do not compile: {errors:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn deny_always_wins(
        (allow, deny) in rules(),
        caller in caller(),
        anonymous in prop::bool::weighted(0.2),
        request in request(),
    ) {
        let policy = compiled(&allow, &deny);
        let subject = caller.subject();
        let subject = (!anonymous).then_some(&subject);
        let decision = policy.evaluate(subject, &request);
        if deny.iter().any(|rule| deny_matches(rule, subject, &request)) {
            prop_assert!(!decision.allowed, "{}", decision.reason);
        }
        if decision.allowed {
            let by_a_rule = matches!(decision.reason, Reason::Allowed { .. });
            prop_assert!(by_a_rule, "{}", decision.reason);
        }
    }

    #[test]
    fn anonymous_callers_are_only_let_in_by_public_rules(
        (allow, deny) in rules(),
        request in request(),
    ) {
        let policy = compiled(&allow, &deny);
        let decision = policy.evaluate(None, &request);
        if decision.allowed {
            let rule = allow.iter().find(|r| Some(r.name.as_str()) == decision.rule);
            prop_assert!(rule.is_some_and(|r| r.public), "{}", decision.reason);
        } else {
            prop_assert_eq!(decision.reason, Reason::NotSignedIn);
        }
    }

    #[test]
    fn deactivated_subjects_are_only_let_in_by_public_rules(
        (allow, deny) in rules(),
        caller in caller(),
        request in request(),
    ) {
        let policy = compiled(&allow, &deny);
        let caller = Caller { active: false, ..caller };
        let decision = policy.evaluate(Some(&caller.subject()), &request);
        if decision.allowed {
            let rule = allow.iter().find(|r| Some(r.name.as_str()) == decision.rule);
            prop_assert!(rule.is_some_and(|r| r.public), "{}", decision.reason);
        }
    }

    #[test]
    fn only_active_machines_match_as_machines(
        (allow, deny) in rules(),
        caller in caller(),
        request in request(),
    ) {
        let policy = compiled(&allow, &deny);
        let decision = policy.evaluate(Some(&caller.subject()), &request);
        if let Reason::Allowed { by: Match::Machine(name), .. }
        | Reason::Denied { by: Match::Machine(name), .. } = decision.reason
        {
            prop_assert!(caller.kind == SubjectKind::Machine && caller.active, "{}", decision.reason);
            prop_assert_eq!(name, caller.user_name);
        }
    }

    #[test]
    fn agents_get_in_only_by_the_agent_criteria_and_nobody_else_does(
        (allow, deny) in rules(),
        caller in caller(),
        request in request(),
    ) {
        let policy = compiled(&allow, &deny);
        let decision = policy.evaluate(Some(&caller.subject()), &request);
        let Reason::Allowed { by, .. } = decision.reason else {
            return Ok(());
        };
        let by_agent_criterion =
            matches!(by, Match::Agent(_) | Match::AgentGroup(_) | Match::AgentOwnerGroup(_));
        match caller.kind {
            SubjectKind::Agent => prop_assert!(
                by_agent_criterion || by == Match::Public,
                "{}",
                decision.reason
            ),
            _ => prop_assert!(!by_agent_criterion, "{}", decision.reason),
        }
    }

    #[test]
    fn decisions_agree_with_the_plain_reading_and_are_deterministic(
        (allow, deny) in rules(),
        caller in caller(),
        anonymous in prop::bool::weighted(0.2),
        request in request(),
    ) {
        let policy = compiled(&allow, &deny);
        let subject = caller.subject();
        let subject = (!anonymous).then_some(&subject);
        let decision = policy.evaluate(subject, &request);
        prop_assert_eq!(decision, policy.evaluate(subject, &request));
        let (allowed, rule) = reference(&allow, &deny, subject, &request);
        prop_assert_eq!(decision.allowed, allowed, "{}", decision.reason);
        prop_assert_eq!(decision.rule.map(str::to_owned), rule, "{}", decision.reason);
    }

    #[test]
    fn any_input_gets_a_decision_and_refusals_fail_closed(
        specs in prop::collection::vec(
            (
                mostly(GROUPS, 2, ".{0,6}"),
                prop::option::weighted(0.3, mostly(DOMAINS, 2, ".{0,12}")),
                prop::bool::weighted(0.2),
                prop::bool::weighted(0.2),
                prop::bool::weighted(0.05),
                prop::option::weighted(0.4, mostly(&["GET", "POST", "DELETE"], 2, "[A-Za-z ]{0,4}")),
                prop::option::weighted(0.4, mostly(PREFIXES, 2, "/?[a-z/.]{0,5}")),
            ),
            1..5,
        ),
        deny_count in 0usize..5,
        machine in any::<bool>(),
        user_name in ".{0,10}",
        email in prop::option::of("[a-zA-Z@.*]{0,12}"),
        active in any::<bool>(),
        group_names in prop::collection::vec(".{0,6}", 0..4),
        method in ".{0,8}",
        path in "[a-z/.?%#]{0,10}",
    ) {
        let specs: Vec<RuleSpec> = specs
            .into_iter()
            .enumerate()
            .map(|(i, (groups, email_domains, any_signed_in, machines, public, methods, paths))| {
                RuleSpec {
                    name: format!("r{i}"),
                    groups,
                    email_domains: email_domains.unwrap_or_default(),
                    any_signed_in,
                    machines,
                    public,
                    methods,
                    paths,
                    ..RuleSpec::default()
                }
            })
            .collect();
        let split = deny_count.min(specs.len());
        let deny = specs[..split].to_vec();
        let allow = specs[split..].to_vec();
        // Compiling arbitrary rules never panics; when it succeeds, evaluating never does.
        let Ok(policy) = Policy::compile(allow, deny) else { return Ok(()) };
        let groups: Vec<GroupRef<'_>> = group_names
            .iter()
            .map(|name| GroupRef { display_name: name, external_id: Some(name) })
            .collect();
        let subject = Subject {
            kind: if machine { SubjectKind::Machine } else { SubjectKind::Person },
            user_name: &user_name,
            email: email.as_deref(),
            active,
            groups: &groups,
            owner_groups: &[],
        };
        let request = Request { method: &method, path: &path };
        for subject in [None, Some(&subject)] {
            let decision = policy.evaluate(subject, &request);
            prop_assert_eq!(decision, policy.evaluate(subject, &request));
            let by_a_rule = matches!(decision.reason, Reason::Allowed { .. });
            prop_assert_eq!(decision.allowed, by_a_rule);
            prop_assert!(!decision.reason.to_string().is_empty());
        }
    }
}

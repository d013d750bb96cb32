//! The in-memory index: every User and Group in compact form, unique names, memberships in
//! both directions. Rebuilt from storage at start; changed only by applying committed batches.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use serde_json::Value;

use super::{Batch, Record, Row, Seq};
use crate::schema::{ResourceType, PORTCULLIS_AGENT_SCHEMA};
use crate::value::get_ci;

/// A resource id in compact form. Ids are UUIDs assigned by the writer; holding them as 16
/// bytes instead of strings saves about a hundred bytes per resource in memory.
pub type Id = u128;

/// The compact form of an id, or `None` when `id` is not exactly as the writer writes ids
/// (lower-case hyphenated UUID): ids are case-exact, so `ABC…` never finds `abc…`.
pub fn parse_id(id: &str) -> Option<Id> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    let mut buf = uuid::Uuid::encode_buffer();
    (uuid.hyphenated().encode_lower(&mut buf) == id).then(|| uuid.as_u128())
}

pub fn format_id(id: Id) -> String {
    uuid::Uuid::from_u128(id).hyphenated().to_string()
}

#[derive(Debug, Clone)]
pub struct UserEntry {
    pub id: Id,
    /// `userName`, case-folded.
    pub user_name: Box<str>,
    pub external_id: Option<Box<str>>,
    /// Every `emails[].value`, case-folded; the `primary` one first (the directory's email).
    pub emails: Box<[Box<str>]>,
    pub active: bool,
    pub version: Seq,
    /// Sessions that began before this change sequence are no longer valid (see
    /// [`Record::valid_since`]).
    pub valid_since: Seq,
    /// When `valid_since` last moved, in Unix seconds; 0 if not known ([`Record::valid_since_unix`]).
    pub valid_since_unix: u64,
    /// The groups this user is directly in.
    pub parents: Vec<Row>,
}

#[derive(Debug, Clone)]
pub struct GroupEntry {
    pub id: Id,
    pub display_name: Box<str>,
    pub external_id: Option<Box<str>>,
    pub version: Seq,
    /// The groups this group is directly in.
    pub parents: Vec<Row>,
}

/// An agent, no larger than a [`UserEntry`] (checked below), so that agents do not make the
/// slot of every user larger.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    pub id: Id,
    /// `name`, as given; unique compared case-insensitively.
    pub name: Box<str>,
    pub external_id: Option<Box<str>>,
    pub active: bool,
    /// How many of `links` are owners.
    owner_count: u32,
    /// Unix time from which the agent is refused: the Portcullis extension's `expires` (an
    /// unreadable one is in the past), `i64::MAX` without one.
    pub expires: i64,
    /// The ids of its owners, then of its AgenticApplications, in one allocation (one memory
    /// read when the agent is judged): see [`AgentEntry::owners`] and
    /// [`AgentEntry::applications`].
    links: Box<[Id]>,
    pub version: Seq,
    /// When the agent was last created, (de)activated or named otherwise, in Unix seconds;
    /// 0 if not known ([`Record::valid_since_unix`]): its tokens from before are not its own.
    pub valid_since_unix: u64,
    /// The groups this agent is directly in.
    pub parents: Vec<Row>,
}

const _: () = assert!(std::mem::size_of::<AgentEntry>() <= std::mem::size_of::<UserEntry>());

impl AgentEntry {
    /// The ids of its owners, Users or Groups (the Portcullis extension's `owners`).
    pub fn owners(&self) -> &[Id] {
        self.links
            .get(..self.owner_count as usize)
            .unwrap_or_default()
    }

    /// The ids of its AgenticApplications (the extension's `applications`); an id that is not
    /// a Portcullis id is kept as [`NO_ID`], which names nothing.
    pub fn applications(&self) -> &[Id] {
        self.links
            .get(self.owner_count as usize..)
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct ApplicationEntry {
    pub id: Id,
    pub name: Box<str>,
    pub external_id: Option<Box<str>>,
    pub active: bool,
    pub version: Seq,
    /// When it was last deactivated or re-activated, in Unix seconds; 0 if never or not known
    /// ([`Record::valid_since_unix`]): its agents' tokens from before are not theirs.
    pub valid_since_unix: u64,
}

/// The nil UUID: the writer assigns random (v4) ids only, so it is nobody's.
pub const NO_ID: Id = 0;

/// One row of the directory. Rows are dense (creation order), so the index is a vector.
#[derive(Debug, Clone, Default)]
enum Slot {
    #[default]
    Empty,
    User(UserEntry),
    Group(GroupEntry),
    Agent(AgentEntry),
    Application(ApplicationEntry),
}

impl Slot {
    fn kind(&self) -> Option<ResourceType> {
        match self {
            Slot::Empty => None,
            Slot::User(_) => Some(ResourceType::User),
            Slot::Group(_) => Some(ResourceType::Group),
            Slot::Agent(_) => Some(ResourceType::Agent),
            Slot::Application(_) => Some(ResourceType::AgenticApplication),
        }
    }

    /// The groups a user, group or agent is directly in.
    fn parents_mut(&mut self) -> Option<&mut Vec<Row>> {
        match self {
            Slot::User(user) => Some(&mut user.parents),
            Slot::Group(group) => Some(&mut group.parents),
            Slot::Agent(agent) => Some(&mut agent.parents),
            Slot::Empty | Slot::Application(_) => None,
        }
    }
}

/// Why an agent is not admitted ([`Index::agent_standing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRefusal {
    /// The agent itself is deactivated.
    Inactive,
    /// Its `expires` has passed.
    Expired,
    /// One of its AgenticApplications is deactivated or gone.
    ApplicationInactive,
    /// None of its owners is an active user (directly, or as an active member of an owning
    /// group).
    NoActiveOwner,
}

impl AgentRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inactive => "the agent is deactivated",
            Self::Expired => "the agent has expired",
            Self::ApplicationInactive => "the agent's application is deactivated or deleted",
            Self::NoActiveOwner => "no owner of the agent is an active user",
        }
    }
}

/// A hasher for keys that already are hashes (the secondary indexes below).
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64`/`write_u128` are used; fold anything else in case.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write_u128(&mut self, n: u128) {
        // Ids the writer assigns are random, but imported ones need not be (sequential ids
        // put every key in one probe group), so mix the bits (the murmur3 finalizer).
        let mut x = n as u64 ^ (n >> 64) as u64;
        x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        self.0 = x ^ (x >> 33);
    }
}

type PreHashedMap<K, V> = HashMap<K, V, BuildHasherDefault<PreHashed>>;

/// Rows by the hash of a string key. Most keys have one row, kept in `first` (16 bytes per
/// key, no string stored: callers confirm a hit against the entry, which holds the string);
/// the rest (shared emails, repeated externalIds, hash collisions) go to `more`.
#[derive(Debug, Default)]
struct HashIndex {
    first: PreHashedMap<u64, Row>,
    more: PreHashedMap<u64, Vec<Row>>,
}

impl HashIndex {
    fn insert(&mut self, key: u64, row: Row) {
        match self.first.entry(key) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(row);
            }
            std::collections::hash_map::Entry::Occupied(slot) => {
                if *slot.get() != row {
                    let more = self.more.entry(key).or_default();
                    if !more.contains(&row) {
                        more.push(row);
                    }
                }
            }
        }
    }

    fn remove(&mut self, key: u64, row: Row) {
        if self.first.get(&key) == Some(&row) {
            match self.more.get_mut(&key).and_then(Vec::pop) {
                Some(next) => {
                    self.first.insert(key, next);
                }
                None => {
                    self.first.remove(&key);
                }
            }
        } else if let Some(more) = self.more.get_mut(&key) {
            more.retain(|&r| r != row);
        }
        if self.more.get(&key).is_some_and(Vec::is_empty) {
            self.more.remove(&key);
        }
    }

    fn get(&self, key: u64) -> impl Iterator<Item = Row> + '_ {
        self.first
            .get(&key)
            .copied()
            .into_iter()
            .chain(self.more.get(&key).into_iter().flatten().copied())
    }
}

pub struct Index {
    /// Tells this index from every other the process made: rows and sequence numbers say
    /// the same thing only within one index (a reload numbers rows anew).
    generation: u64,
    pub(super) seq: Seq,
    /// The last batch that changed a resource or a membership, or the load: what a view of a
    /// subject may differ by (entries beside the directory, such as sessions, do not move it).
    pub(super) standing: Seq,
    pub(super) next_row: Row,
    slots: Vec<Slot>,
    /// The type of each slot's resource, by row: what a listing scans, a byte a row rather than
    /// a whole slot's cache line.
    kinds: Vec<Option<ResourceType>>,
    /// How many resources of each type, by `ResourceType as usize`.
    counts: [usize; 4],
    ids: PreHashedMap<Id, Row>,
    /// Seeded per process, so nobody can aim keys at one hash bucket.
    hasher: foldhash::quality::RandomState,
    user_by_name: HashIndex,
    user_by_external_id: HashIndex,
    user_by_email: HashIndex,
    /// Group `displayName`, case-folded: unique.
    group_by_name: HashIndex,
    group_by_external_id: HashIndex,
    /// Agent `name`, case-folded: unique.
    agent_by_name: HashIndex,
    agent_by_external_id: HashIndex,
    /// AgenticApplication `name`, case-folded: unique.
    application_by_name: HashIndex,
    /// Group → its direct members (users, groups and agents).
    members: HashMap<Row, HashSet<Row, foldhash::fast::RandomState>, foldhash::fast::RandomState>,
    /// The identifiers of deleted users and agents, hashed with their kind (see [`Retired`]).
    /// A hash collision can only make a stranger look deleted: refused, never admitted.
    retired: HashSet<u64, BuildHasherDefault<PreHashed>>,
}

/// Which identifier of a deleted user or agent a retired key hashes.
#[derive(Clone, Copy, Hash)]
pub enum Retired {
    UserName,
    Email,
    ExternalId,
    AgentName,
    AgentExternalId,
}

/// The next [`Index::generation`].
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

impl Default for Index {
    fn default() -> Self {
        Self {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            seq: 0,
            standing: 0,
            next_row: 1,
            slots: Vec::new(),
            kinds: Vec::new(),
            counts: [0; 4],
            ids: PreHashedMap::default(),
            hasher: foldhash::quality::RandomState::default(),
            user_by_name: HashIndex::default(),
            user_by_external_id: HashIndex::default(),
            user_by_email: HashIndex::default(),
            group_by_name: HashIndex::default(),
            group_by_external_id: HashIndex::default(),
            agent_by_name: HashIndex::default(),
            agent_by_external_id: HashIndex::default(),
            application_by_name: HashIndex::default(),
            members: HashMap::default(),
            retired: HashSet::default(),
        }
    }
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("seq", &self.seq)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

/// Case folding for case-insensitive attributes (`userName`, `displayName`, emails): the one
/// folding authorization rules use too ([`portcullis_policy::fold`]).
pub fn fold(s: &str) -> Box<str> {
    folded(s).into()
}

/// [`fold`] without a copy when `s` is folded already (lookups, on the request path).
pub fn folded(s: &str) -> Cow<'_, str> {
    portcullis_policy::fold(s)
}

/// The `W/"<seq>"` entity tag of a resource last changed at `seq`.
pub fn etag(seq: Seq) -> String {
    format!("W/\"{seq}\"")
}

/// Whether an `If-Match` or `If-None-Match` list of `tags` names the `current` entity tag (or
/// is `*`), compared weakly (RFC 9110 §8.8.3.2): `"5"` is `W/"5"`, as a client or a proxy
/// between that drops the `W/` sends it.
pub fn etag_matches(tags: &str, current: &str) -> bool {
    fn opaque(tag: &str) -> &str {
        tag.strip_prefix("W/").unwrap_or(tag)
    }
    tags.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || opaque(tag) == opaque(current))
}

fn str_field<'a>(resource: &'a Value, name: &str) -> Option<&'a str> {
    resource
        .as_object()
        .and_then(|o| get_ci(o, name))
        .and_then(Value::as_str)
}

pub(super) fn version_of(resource: &Value) -> Seq {
    resource
        .get("meta")
        .and_then(|m| m.get("version"))
        .and_then(Value::as_str)
        .and_then(|v| v.strip_prefix("W/\"")?.strip_suffix('"')?.parse().ok())
        .unwrap_or(0)
}

/// Every `emails[].value` of a user, case-folded, the `primary` one first.
fn emails_of(resource: &Value) -> Box<[Box<str>]> {
    resource
        .as_object()
        .and_then(|o| get_ci(o, "emails"))
        .and_then(Value::as_array)
        .map(|emails| {
            primary_first(emails.iter().filter_map(|e| {
                let email = e.as_object()?;
                let value = get_ci(email, "value").and_then(Value::as_str)?;
                let primary = get_ci(email, "primary").and_then(Value::as_bool);
                Some((fold(value), primary == Some(true)))
            }))
        })
        .unwrap_or_default()
}

/// Whether the user `after` is found by a value `before` was not found by: a `userName`,
/// `externalId` or email it did not have (compared as the lookups compare them). A sign-in
/// that was looked up by such a value named someone else, or nobody.
pub fn gains_identifier(before: &Value, after: &Value) -> bool {
    let user_name = |r| str_field(r, "userName").map(fold);
    // What `after` has and `before` had not is what `before`, read backwards, gave up.
    let (emails, external_id) = released_identifiers(after, Some(before));
    user_name(after).is_some_and(|name| user_name(before) != Some(name))
        || external_id.is_some()
        || !emails.is_empty()
}

/// What `before`, a user or an agent, was found by and `after` is not, as the identifiers of
/// a retired record (what [`Index`] remembers of a deleted one); `None` if it gave up none (or
/// is of another type). A user's: a `userName` it changed, the emails and `externalId` it gave
/// up; an agent's: a `name` or `externalId` it changed. A sign-in or token looked up by one of
/// them named this one, not a stranger.
pub fn given_up(rt: ResourceType, before: &Value, after: &Value) -> Option<Value> {
    let changed = |name: &str, compare: fn(&str) -> Box<str>| {
        str_field(before, name)
            .filter(|&old| str_field(after, name).map(compare) != Some(compare(old)))
    };
    let mut kept = serde_json::Map::new();
    let (name, external_id, emails) = match rt {
        ResourceType::User => {
            let (emails, external_id) = released_identifiers(before, Some(after));
            (changed("userName", fold), external_id, emails)
        }
        ResourceType::Agent => (
            changed("name", fold),
            changed("externalId", |id| Box::from(id)),
            Vec::new(),
        ),
        ResourceType::Group | ResourceType::AgenticApplication => return None,
    };
    if let Some(name) = name {
        kept.insert(rt.name_attribute().to_owned(), Value::from(name));
    }
    if !emails.is_empty() {
        let values = emails.iter().map(|e| serde_json::json!({ "value": &**e }));
        kept.insert("emails".to_owned(), Value::Array(values.collect()));
    }
    if let Some(id) = external_id {
        kept.insert("externalId".to_owned(), Value::from(id));
    }
    (!kept.is_empty()).then_some(Value::Object(kept))
}

/// The emails (folded) and `externalId` a user had in `before` and has not in `after` (`None`:
/// deleted): values another user may hold too, who is then found by them alone.
pub fn released_identifiers<'v>(
    before: &'v Value,
    after: Option<&Value>,
) -> (Vec<Box<str>>, Option<&'v str>) {
    let kept = after.map(emails_of).unwrap_or_default();
    let kept: HashSet<&str> = kept.iter().map(|e| &**e).collect();
    let emails = emails_of(before)
        .into_vec()
        .into_iter()
        .filter(|e| !kept.contains(&**e))
        .collect();
    let external_id = str_field(before, "externalId")
        .filter(|id| after.and_then(|a| str_field(a, "externalId")) != Some(*id));
    (emails, external_id)
}

/// Whether user `resource` holds any of `emails` (folded) or `external_id`.
pub fn holds_any(resource: &Value, emails: &[Box<str>], external_id: Option<&str>) -> bool {
    emails_of(resource).iter().any(|e| emails.contains(e))
        || external_id.is_some_and(|id| str_field(resource, "externalId") == Some(id))
}

pub fn user_entry(record: &Record) -> Option<UserEntry> {
    let resource = &record.resource;
    Some(UserEntry {
        id: parse_id(str_field(resource, "id")?)?,
        user_name: fold(str_field(resource, "userName")?),
        external_id: str_field(resource, "externalId").map(Box::from),
        emails: emails_of(resource),
        // A user without `active` is active (RFC 7643 leaves the default to the provider).
        active: resource
            .as_object()
            .and_then(|o| get_ci(o, "active"))
            .and_then(Value::as_bool)
            .unwrap_or(true),
        version: version_of(resource),
        valid_since: record.valid_since.unwrap_or(0),
        valid_since_unix: record.valid_since_unix.unwrap_or(0),
        parents: Vec::new(),
    })
}

pub fn group_entry(record: &Record) -> Option<GroupEntry> {
    let resource = &record.resource;
    Some(GroupEntry {
        id: parse_id(str_field(resource, "id")?)?,
        display_name: Box::from(str_field(resource, "displayName")?),
        external_id: str_field(resource, "externalId").map(Box::from),
        version: version_of(resource),
        parents: Vec::new(),
    })
}

/// The ids the Portcullis extension's `name` links (`owners`, `applications`) point at. A link
/// that names no Portcullis id (no `value`, or not one of ours) is [`NO_ID`], which names
/// nothing: an application link like that refuses the agent, an owner link stands for nobody.
fn linked_ids<'a>(
    extension: Option<&'a serde_json::Map<String, Value>>,
    name: &str,
) -> impl Iterator<Item = Id> + 'a {
    extension
        .and_then(|e| get_ci(e, name))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|link| {
            link.as_object()
                .and_then(|l| get_ci(l, "value"))
                .and_then(Value::as_str)
                .and_then(parse_id)
                .unwrap_or(NO_ID)
        })
}

/// The ids an Agent resource's extension links by `name` (`owners`, `applications`), as
/// [`agent_entry`] reads them.
pub fn agent_links(resource: &Value, name: &str) -> Vec<Id> {
    let extension = resource
        .as_object()
        .and_then(|r| get_ci(r, PORTCULLIS_AGENT_SCHEMA))
        .and_then(Value::as_object);
    linked_ids(extension, name).collect()
}

fn active_of(resource: &serde_json::Map<String, Value>) -> bool {
    // Without `active`, a resource is active (RFC 7643 leaves the default to the provider).
    get_ci(resource, "active")
        .and_then(Value::as_bool)
        .unwrap_or(true)
}

/// The Unix time from which an Agent `resource` is refused: its extension's `expires`
/// (`i64::MAX` without one, `i64::MIN` for one that is no RFC 3339 time).
pub fn agent_expires(resource: &Value) -> i64 {
    let extension = (resource.as_object())
        .and_then(|r| get_ci(r, PORTCULLIS_AGENT_SCHEMA))
        .and_then(Value::as_object);
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    extension
        .and_then(|e| get_ci(e, "expires"))
        .map_or(i64::MAX, |at| {
            at.as_str()
                .and_then(|at| time::OffsetDateTime::parse(at, rfc3339).ok())
                .map_or(i64::MIN, |at| at.unix_timestamp())
        })
}

pub fn agent_entry(record: &Record) -> Option<AgentEntry> {
    let resource = record.resource.as_object()?;
    let text = |name: &str| get_ci(resource, name).and_then(Value::as_str);
    let extension = get_ci(resource, PORTCULLIS_AGENT_SCHEMA).and_then(Value::as_object);
    let expires = agent_expires(&record.resource);
    let mut links: Vec<Id> = linked_ids(extension, "owners").collect();
    // More owners than a u32 counts cannot come in a bounded SCIM body; if they did, the
    // extra ones would be read as applications, which refuse the agent rather than admit it.
    let owner_count = u32::try_from(links.len()).unwrap_or(u32::MAX);
    links.extend(linked_ids(extension, "applications"));
    Some(AgentEntry {
        id: parse_id(text("id")?)?,
        name: Box::from(text("name")?),
        external_id: text("externalId").map(Box::from),
        active: active_of(resource),
        owner_count,
        expires,
        links: links.into_boxed_slice(),
        version: version_of(&record.resource),
        valid_since_unix: record.valid_since_unix.unwrap_or(0),
        parents: Vec::new(),
    })
}

pub fn application_entry(record: &Record) -> Option<ApplicationEntry> {
    let resource = record.resource.as_object()?;
    let text = |name: &str| get_ci(resource, name).and_then(Value::as_str);
    Some(ApplicationEntry {
        id: parse_id(text("id")?)?,
        name: Box::from(text("name")?),
        external_id: text("externalId").map(Box::from),
        active: active_of(resource),
        version: version_of(&record.resource),
        valid_since_unix: record.valid_since_unix.unwrap_or(0),
    })
}

impl Index {
    fn key(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }

    fn slot(&self, row: Row) -> &Slot {
        usize::try_from(row)
            .ok()
            .and_then(|i| self.slots.get(i))
            .unwrap_or(&Slot::Empty)
    }

    fn slot_mut(&mut self, row: Row) -> Option<&mut Slot> {
        let i = usize::try_from(row).ok()?;
        if i >= self.slots.len() {
            // Rows only grow; a batch never skips more than it allocated.
            self.slots.resize_with(i + 1, Slot::default);
            self.kinds.resize(i + 1, None);
        }
        self.slots.get_mut(i)
    }

    /// Empties `row` if it holds a resource of type `rt`; what it held.
    fn take(&mut self, row: Row, rt: ResourceType) -> Option<Slot> {
        let i = usize::try_from(row).ok()?;
        let kind = self.kinds.get_mut(i).filter(|kind| **kind == Some(rt))?;
        *kind = None;
        self.counted(rt, false);
        self.slots.get_mut(i).map(std::mem::take)
    }

    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The last batch that changed a resource or a membership, or the load.
    pub fn standing(&self) -> Seq {
        self.standing
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn user_count(&self) -> usize {
        self.count(ResourceType::User)
    }

    pub fn group_count(&self) -> usize {
        self.count(ResourceType::Group)
    }

    pub fn count(&self, rt: ResourceType) -> usize {
        self.counts.get(rt as usize).copied().unwrap_or(0)
    }

    fn counted(&mut self, rt: ResourceType, added: bool) {
        if let Some(count) = self.counts.get_mut(rt as usize) {
            *count = if added {
                *count + 1
            } else {
                count.saturating_sub(1)
            };
        }
    }

    pub fn row_of(&self, id: &str) -> Option<(ResourceType, Row)> {
        self.row_of_id(parse_id(id)?)
    }

    pub fn row_of_id(&self, id: Id) -> Option<(ResourceType, Row)> {
        let row = *self.ids.get(&id)?;
        Some((self.slot(row).kind()?, row))
    }

    pub fn user(&self, row: Row) -> Option<&UserEntry> {
        match self.slot(row) {
            Slot::User(user) => Some(user),
            _ => None,
        }
    }

    pub fn group(&self, row: Row) -> Option<&GroupEntry> {
        match self.slot(row) {
            Slot::Group(group) => Some(group),
            _ => None,
        }
    }

    pub fn agent(&self, row: Row) -> Option<&AgentEntry> {
        match self.slot(row) {
            Slot::Agent(agent) => Some(agent),
            _ => None,
        }
    }

    pub fn application(&self, row: Row) -> Option<&ApplicationEntry> {
        match self.slot(row) {
            Slot::Application(application) => Some(application),
            _ => None,
        }
    }

    /// Rows of every resource of type `rt`, in creation order.
    pub fn rows(&self, rt: ResourceType) -> impl Iterator<Item = Row> + '_ {
        self.rows_between(rt, 0, Row::MAX)
    }

    /// The rows of type `rt` from `start` up to (not including) `end`, in order.
    pub fn rows_between(
        &self,
        rt: ResourceType,
        start: Row,
        end: Row,
    ) -> impl Iterator<Item = Row> + '_ {
        let clamp = |row: Row| {
            usize::try_from(row)
                .unwrap_or(usize::MAX)
                .min(self.kinds.len())
        };
        let (start, end) = (clamp(start), clamp(end));
        self.kinds
            .get(start..end.max(start))
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(move |(i, kind)| (*kind == Some(rt)).then_some((start + i) as Row))
    }

    /// One past the highest row there has been.
    pub fn row_end(&self) -> Row {
        self.slots.len() as Row
    }

    /// The agent whose `name` is `name`, case-insensitively.
    pub fn agent_by_name(&self, name: &str) -> Option<Row> {
        let name = folded(name);
        self.agent_by_name
            .get(self.key(&name))
            .find(|&row| self.agent(row).is_some_and(|a| folded(&a.name) == name))
    }

    pub fn agents_by_external_id(&self, external_id: &str) -> Vec<Row> {
        self.agent_by_external_id
            .get(self.key(external_id))
            .filter(|&row| {
                self.agent(row)
                    .is_some_and(|a| a.external_id.as_deref() == Some(external_id))
            })
            .collect()
    }

    /// The AgenticApplication whose folded `name` is `folded`.
    pub fn application_by_folded_name(&self, folded: &str) -> Option<Row> {
        self.application_by_name.get(self.key(folded)).find(|&row| {
            self.application(row)
                .is_some_and(|a| self::folded(&a.name) == folded)
        })
    }

    /// The resource of type `rt` whose folded unique name is `folded`.
    pub fn by_folded_name(&self, rt: ResourceType, folded: &str) -> Option<Row> {
        match rt {
            ResourceType::User => self.user_by_folded_name(folded),
            ResourceType::Group => self.group_by_folded_name(folded),
            ResourceType::Agent => self.agent_by_name(folded),
            ResourceType::AgenticApplication => self.application_by_folded_name(folded),
        }
    }

    /// Whether `agent` may act now (`now`: Unix time), by the owner chain: it is active and
    /// not expired, every AgenticApplication it names is active, and at least one of its
    /// owners is an active user (directly, or through an owning group's members).
    pub fn agent_standing(&self, agent: &AgentEntry, now: i64) -> Result<(), AgentRefusal> {
        self.agent_standing_but_owners(agent, now)?;
        match self.active_owners(agent).next() {
            Some(_) => Ok(()),
            None => Err(AgentRefusal::NoActiveOwner),
        }
    }

    /// [`Index::agent_standing`] but for its owners, for a caller that walks them anyway.
    pub fn agent_standing_but_owners(
        &self,
        agent: &AgentEntry,
        now: i64,
    ) -> Result<(), AgentRefusal> {
        if !agent.active {
            return Err(AgentRefusal::Inactive);
        }
        if agent.expires <= now {
            return Err(AgentRefusal::Expired);
        }
        let application_active = |&id: &Id| {
            let row = self.ids.get(&id);
            row.and_then(|&row| self.application(row))
                .is_some_and(|a| a.active)
        };
        if !agent.applications().iter().all(application_active) {
            return Err(AgentRefusal::ApplicationInactive);
        }
        Ok(())
    }

    /// The owners of `agent` through which it stands: each owning User that is active, and
    /// each owning Group with an active user among its members (nested groups included).
    pub fn active_owners<'a>(
        &'a self,
        agent: &'a AgentEntry,
    ) -> impl Iterator<Item = (ResourceType, Row)> + 'a {
        agent.owners().iter().filter_map(|id| {
            let (rt, row) = self.row_of_id(*id)?;
            let stands = match rt {
                ResourceType::User => self.user(row).is_some_and(|u| u.active),
                ResourceType::Group => self.has_active_user(row),
                ResourceType::Agent | ResourceType::AgenticApplication => false,
            };
            stands.then_some((rt, row))
        })
    }

    /// Whether some active user is in `group`, directly or through nested groups. Stops at
    /// the first one found, so a group of mostly active users answers at once, without
    /// allocating; only a group with no active direct member has its nested groups walked.
    fn has_active_user(&self, group: Row) -> bool {
        let direct = self
            .members_of(group)
            .any(|member| matches!(self.slot(member), Slot::User(user) if user.active));
        if direct {
            return true;
        }
        let mut seen = HashSet::new();
        let mut stack = vec![group];
        while let Some(group) = stack.pop() {
            if !seen.insert(group) {
                continue;
            }
            for member in self.members_of(group) {
                match self.slot(member) {
                    Slot::User(user) if user.active => return true,
                    Slot::Group(_) => stack.push(member),
                    _ => {}
                }
            }
        }
        false
    }

    /// The user whose folded `userName` is `folded`.
    pub fn user_by_folded_name(&self, folded: &str) -> Option<Row> {
        self.user_by_name
            .get(self.key(folded))
            .find(|&row| self.user(row).is_some_and(|u| &*u.user_name == folded))
    }

    pub fn user_by_name(&self, user_name: &str) -> Option<Row> {
        self.user_by_folded_name(&folded(user_name))
    }

    /// Whether a deleted user was known by this identifier (`userName` and emails
    /// case-insensitively, `externalId` exactly).
    pub fn was_deleted(&self, kind: Retired, value: &str) -> bool {
        let value = match kind {
            Retired::ExternalId | Retired::AgentExternalId => Cow::Borrowed(value),
            Retired::UserName | Retired::Email | Retired::AgentName => folded(value),
        };
        self.retired.contains(&self.retired_key(kind, &value))
    }

    fn retired_key(&self, kind: Retired, value: &str) -> u64 {
        self.hasher.hash_one((kind, value))
    }

    /// `identifiers`, what a user or agent gave up (as a retired record holds them), less
    /// those remembered already; `None` when none is left.
    pub fn not_yet_retired(&self, rt: ResourceType, identifiers: Value) -> Option<Value> {
        let Value::Object(mut kept) = identifiers else {
            return None;
        };
        let (name, external_id) = match rt {
            ResourceType::Agent => (Retired::AgentName, Retired::AgentExternalId),
            _ => (Retired::UserName, Retired::ExternalId),
        };
        let known = |kind: Retired, value: Option<&Value>| {
            value
                .and_then(Value::as_str)
                .is_some_and(|value| self.was_deleted(kind, value))
        };
        if known(name, kept.get(rt.name_attribute())) {
            kept.remove(rt.name_attribute());
        }
        if known(external_id, kept.get("externalId")) {
            kept.remove("externalId");
        }
        if let Some(Value::Array(emails)) = kept.get_mut("emails") {
            emails.retain(|email| !known(Retired::Email, email.get("value")));
            if emails.is_empty() {
                kept.remove("emails");
            }
        }
        (!kept.is_empty()).then_some(Value::Object(kept))
    }

    /// Remembers the identifiers of a deleted user or agent.
    fn insert_retired(&mut self, rt: ResourceType, record: &Record) {
        let Some(resource) = record.resource.as_object() else {
            return;
        };
        let text = |name: &str| get_ci(resource, name).and_then(Value::as_str);
        let mut keys = Vec::new();
        if rt == ResourceType::Agent {
            if let Some(name) = text("name") {
                keys.push(self.retired_key(Retired::AgentName, &fold(name)));
            }
            if let Some(id) = text("externalId") {
                keys.push(self.retired_key(Retired::AgentExternalId, id));
            }
            self.retired.extend(keys);
            return;
        }
        if let Some(name) = text("userName") {
            keys.push(self.retired_key(Retired::UserName, &fold(name)));
        }
        if let Some(id) = text("externalId") {
            keys.push(self.retired_key(Retired::ExternalId, id));
        }
        for email in get_ci(resource, "emails")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(value) = email
                .as_object()
                .and_then(|e| get_ci(e, "value"))
                .and_then(Value::as_str)
            {
                keys.push(self.retired_key(Retired::Email, &fold(value)));
            }
        }
        self.retired.extend(keys);
    }

    pub fn users_by_external_id(&self, external_id: &str) -> Vec<Row> {
        self.user_by_external_id
            .get(self.key(external_id))
            .filter(|&row| {
                self.user(row)
                    .is_some_and(|u| u.external_id.as_deref() == Some(external_id))
            })
            .collect()
    }

    pub fn users_by_email(&self, email: &str) -> Vec<Row> {
        let email = folded(email);
        self.user_by_email
            .get(self.key(&email))
            .filter(|&row| {
                self.user(row)
                    .is_some_and(|u| u.emails.iter().any(|e| **e == *email))
            })
            .collect()
    }

    /// The group whose folded `displayName` is `folded`.
    pub fn group_by_folded_name(&self, folded: &str) -> Option<Row> {
        self.group_by_name.get(self.key(folded)).find(|&row| {
            self.group(row)
                .is_some_and(|g| self::folded(&g.display_name) == folded)
        })
    }

    pub fn groups_by_external_id(&self, external_id: &str) -> Vec<Row> {
        self.group_by_external_id
            .get(self.key(external_id))
            .filter(|&row| {
                self.group(row)
                    .is_some_and(|g| g.external_id.as_deref() == Some(external_id))
            })
            .collect()
    }

    pub fn is_member(&self, group: Row, member: Row) -> bool {
        self.members
            .get(&group)
            .is_some_and(|m| m.contains(&member))
    }

    pub fn members_of(&self, group: Row) -> impl Iterator<Item = Row> + '_ {
        self.members.get(&group).into_iter().flatten().copied()
    }

    /// How many direct members `group` has, without walking them.
    pub fn member_count(&self, group: Row) -> usize {
        self.members.get(&group).map_or(0, |m| m.len())
    }

    pub fn parents_of(&self, member: Row) -> impl Iterator<Item = Row> + '_ {
        let parents: &[Row] = match self.slot(member) {
            Slot::User(user) => &user.parents,
            Slot::Group(group) => &group.parents,
            Slot::Agent(agent) => &agent.parents,
            Slot::Empty | Slot::Application(_) => &[],
        };
        parents.iter().copied()
    }

    /// The groups `member` is in, directly or through nested groups, with whether each is
    /// direct. Cycles are impossible (the writer refuses them) but are tolerated anyway.
    pub fn groups_of(&self, member: Row) -> Vec<(Row, bool)> {
        let mut direct: Vec<(Row, bool)> = self.parents_of(member).map(|g| (g, true)).collect();
        if direct
            .iter()
            .all(|&(g, _)| self.parents_of(g).next().is_none())
        {
            // No nested groups (the common case): no set needed.
            direct.sort_unstable();
            direct.dedup();
            return direct;
        }
        let mut seen: HashMap<Row, bool> = HashMap::new();
        let mut frontier: Vec<Row> = self.parents_of(member).collect();
        for &g in &frontier {
            seen.insert(g, true);
        }
        while let Some(group) = frontier.pop() {
            for parent in self.parents_of(group) {
                if let std::collections::hash_map::Entry::Vacant(slot) = seen.entry(parent) {
                    slot.insert(false);
                    frontier.push(parent);
                }
            }
        }
        let mut groups: Vec<(Row, bool)> = seen.into_iter().collect();
        groups.sort_unstable();
        groups
    }

    /// Indexes a stored record given as its JSON bytes, reading only the indexed fields.
    pub(super) fn insert_stored(&mut self, rt: ResourceType, row: Row, json: &[u8]) -> bool {
        let fast = matches!(rt, ResourceType::User | ResourceType::Group)
            .then(|| serde_json::from_slice::<StoredFields<'_>>(json).ok())
            .flatten()
            .and_then(|stored| {
                let valid_since = (
                    stored.valid_since.unwrap_or(0),
                    stored.valid_since_unix.unwrap_or(0),
                );
                stored.resource.entry(rt, valid_since)
            });
        match fast {
            Some(Entry::User(entry)) => self.insert_user(row, entry),
            Some(Entry::Group(entry)) => self.insert_group(row, entry),
            // Agents and applications (fewer, and with nested fields), or not in the canonical
            // shape the writer stores: read it the slow, lenient way.
            None => {
                return serde_json::from_slice::<Record>(json)
                    .is_ok_and(|record| self.insert_loaded(rt, row, &record));
            }
        }
        true
    }

    pub(super) fn insert_loaded(&mut self, rt: ResourceType, row: Row, record: &Record) -> bool {
        if record.retired {
            self.insert_retired(rt, record);
            return true;
        }
        match rt {
            ResourceType::User => match user_entry(record) {
                Some(entry) => self.insert_user(row, entry),
                None => return false,
            },
            ResourceType::Group => match group_entry(record) {
                Some(entry) => self.insert_group(row, entry),
                None => return false,
            },
            ResourceType::Agent => match agent_entry(record) {
                Some(entry) => self.insert_agent(row, entry),
                None => return false,
            },
            ResourceType::AgenticApplication => match application_entry(record) {
                Some(entry) => self.insert_application(row, entry),
                None => return false,
            },
        }
        true
    }

    pub(super) fn insert_member(&mut self, group: Row, member: Row) {
        // The group's members and the member's parents say the same: one new to the first is
        // new to the second, without a look through every group the member is in (a load of
        // a user in 100,000 groups would take them all that many times).
        let added = self.members.entry(group).or_default().insert(member);
        let Some(parents) = self.slot_mut(member).and_then(Slot::parents_mut) else {
            return;
        };
        if added || !parents.contains(&group) {
            parents.push(group);
        }
    }

    fn remove_member(&mut self, group: Row, member: Row) {
        if let Some(set) = self.members.get_mut(&group) {
            set.remove(&member);
            if set.is_empty() {
                self.members.remove(&group);
            }
        }
        let Some(parents) = self.slot_mut(member).and_then(Slot::parents_mut) else {
            return;
        };
        parents.retain(|&g| g != group);
    }

    fn insert_user(&mut self, row: Row, entry: UserEntry) {
        let name_key = self.key(&entry.user_name);
        let external_key = entry.external_id.as_deref().map(|e| self.key(e));
        let email_keys: Vec<u64> = entry.emails.iter().map(|e| self.key(e)).collect();
        self.ids.insert(entry.id, row);
        self.user_by_name.insert(name_key, row);
        if let Some(key) = external_key {
            self.user_by_external_id.insert(key, row);
        }
        for key in email_keys {
            self.user_by_email.insert(key, row);
        }
        self.place(row, Slot::User(entry));
    }

    /// Puts `entry` at `row`. An entry that replaces one of its type keeps that one's
    /// memberships (a replaced user is still in its groups); a new one is counted.
    fn place(&mut self, row: Row, mut entry: Slot) {
        let Some(kind) = entry.kind() else {
            return;
        };
        let Some(slot) = self.slot_mut(row) else {
            return;
        };
        let held = slot.kind();
        let new = held != Some(kind);
        if let (false, Some(old), Some(parents)) = (new, slot.parents_mut(), entry.parents_mut()) {
            *parents = std::mem::take(old);
        }
        *slot = entry;
        if let Some(placed) = usize::try_from(row)
            .ok()
            .and_then(|i| self.kinds.get_mut(i))
        {
            *placed = Some(kind);
        }
        if new {
            // A row never holds two types in turn, but if stored rows ever said so, the counts
            // still follow the slots.
            if let Some(held) = held {
                self.counted(held, false);
            }
            self.counted(kind, true);
        }
    }

    fn remove_user(&mut self, row: Row) -> Option<UserEntry> {
        let Some(Slot::User(entry)) = self.take(row, ResourceType::User) else {
            return None;
        };
        self.ids.remove(&entry.id);
        self.user_by_name.remove(self.key(&entry.user_name), row);
        if let Some(external_id) = &entry.external_id {
            self.user_by_external_id.remove(self.key(external_id), row);
        }
        for email in entry.emails.iter() {
            self.user_by_email.remove(self.key(email), row);
        }
        Some(entry)
    }

    fn insert_group(&mut self, row: Row, entry: GroupEntry) {
        let name_key = self.key(&fold(&entry.display_name));
        let external_key = entry.external_id.as_deref().map(|e| self.key(e));
        self.ids.insert(entry.id, row);
        self.group_by_name.insert(name_key, row);
        if let Some(key) = external_key {
            self.group_by_external_id.insert(key, row);
        }
        self.place(row, Slot::Group(entry));
    }

    fn remove_group(&mut self, row: Row) -> Option<GroupEntry> {
        let Some(Slot::Group(entry)) = self.take(row, ResourceType::Group) else {
            return None;
        };
        self.ids.remove(&entry.id);
        self.group_by_name
            .remove(self.key(&fold(&entry.display_name)), row);
        if let Some(external_id) = &entry.external_id {
            self.group_by_external_id.remove(self.key(external_id), row);
        }
        Some(entry)
    }

    fn insert_agent(&mut self, row: Row, entry: AgentEntry) {
        let name_key = self.key(&fold(&entry.name));
        let external_key = entry.external_id.as_deref().map(|e| self.key(e));
        self.ids.insert(entry.id, row);
        self.agent_by_name.insert(name_key, row);
        if let Some(key) = external_key {
            self.agent_by_external_id.insert(key, row);
        }
        self.place(row, Slot::Agent(entry));
    }

    fn remove_agent(&mut self, row: Row) -> Option<AgentEntry> {
        let Some(Slot::Agent(entry)) = self.take(row, ResourceType::Agent) else {
            return None;
        };
        self.ids.remove(&entry.id);
        self.agent_by_name.remove(self.key(&fold(&entry.name)), row);
        if let Some(external_id) = &entry.external_id {
            self.agent_by_external_id.remove(self.key(external_id), row);
        }
        Some(entry)
    }

    fn insert_application(&mut self, row: Row, entry: ApplicationEntry) {
        let name_key = self.key(&fold(&entry.name));
        self.ids.insert(entry.id, row);
        self.application_by_name.insert(name_key, row);
        self.place(row, Slot::Application(entry));
    }

    fn remove_application(&mut self, row: Row) {
        let Some(Slot::Application(entry)) = self.take(row, ResourceType::AgenticApplication)
        else {
            return;
        };
        self.ids.remove(&entry.id);
        self.application_by_name
            .remove(self.key(&fold(&entry.name)), row);
    }

    /// Makes a committed batch visible. Records are replaced whole (keeping memberships);
    /// memberships change row by row.
    pub(super) fn apply(&mut self, batch: &Batch) {
        for (rt, row, record) in &batch.records {
            let parents = match rt {
                ResourceType::User => self.remove_user(*row).map(|u| u.parents),
                ResourceType::Group => self.remove_group(*row).map(|g| g.parents),
                ResourceType::Agent => self.remove_agent(*row).map(|a| a.parents),
                ResourceType::AgenticApplication => {
                    self.remove_application(*row);
                    None
                }
            };
            if let Some(record) = record {
                // The writer only commits records it built, so they always have an id and a
                // name; a record that somehow lacks them stays out of the index (not found).
                // Still in its groups: their members were left as they were, and its own list
                // of them is put back whole (the same rows, in the same order).
                if self.insert_loaded(*rt, *row, record) && !record.retired {
                    let slot = self.slot_mut(*row).and_then(Slot::parents_mut);
                    if let (Some(slot), Some(parents)) = (slot, parents) {
                        *slot = parents;
                    }
                }
            }
        }
        for &(group, member, present) in &batch.members {
            if present {
                self.insert_member(group, member);
            } else {
                self.remove_member(group, member);
            }
        }
        self.seq = batch.seq;
        if !batch.records.is_empty() || !batch.members.is_empty() {
            self.standing = batch.seq;
        }
        self.next_row = batch.next_row;
    }
}

enum Entry {
    User(UserEntry),
    Group(GroupEntry),
}

/// The indexed fields of a stored record, borrowed from its JSON: loading a million users
/// this way is several times faster than building each one's `serde_json::Value`.
#[derive(Deserialize)]
struct StoredFields<'a> {
    #[serde(borrow)]
    resource: Fields<'a>,
    #[serde(default)]
    valid_since: Option<Seq>,
    #[serde(default)]
    valid_since_unix: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    user_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    display_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    external_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    emails: Vec<EmailField<'a>>,
    #[serde(default)]
    active: Option<bool>,
    #[serde(borrow)]
    meta: MetaField<'a>,
}

#[derive(Deserialize)]
struct EmailField<'a> {
    #[serde(borrow, default)]
    value: Option<Cow<'a, str>>,
    /// Any JSON: a value of another type must not keep the user out of the index.
    #[serde(default)]
    primary: Option<Value>,
}

/// The emails in the order given, but the (first) primary one first.
fn primary_first(emails: impl Iterator<Item = (Box<str>, bool)>) -> Box<[Box<str>]> {
    let mut emails: Vec<(Box<str>, bool)> = emails.collect();
    // Stable: the others keep their order.
    emails.sort_by_key(|(_, primary)| !primary);
    emails.into_iter().map(|(email, _)| email).collect()
}

#[derive(Deserialize)]
struct MetaField<'a> {
    #[serde(borrow)]
    version: Cow<'a, str>,
}

impl Fields<'_> {
    /// `valid_since`: the sequence and its Unix time.
    fn entry(self, rt: ResourceType, valid_since: (Seq, u64)) -> Option<Entry> {
        let id = parse_id(&self.id)?;
        let version = self
            .meta
            .version
            .strip_prefix("W/\"")?
            .strip_suffix('"')?
            .parse()
            .ok()?;
        let external_id = self.external_id.map(|e| Box::from(&*e));
        Some(match rt {
            ResourceType::User => Entry::User(UserEntry {
                id,
                user_name: fold(&self.user_name?),
                external_id,
                emails: primary_first(self.emails.iter().filter_map(|e| {
                    let primary = e.primary.as_ref().and_then(Value::as_bool);
                    Some((fold(e.value.as_deref()?), primary == Some(true)))
                })),
                active: self.active.unwrap_or(true),
                version,
                valid_since: valid_since.0,
                valid_since_unix: valid_since.1,
                parents: Vec::new(),
            }),
            ResourceType::Group => Entry::Group(GroupEntry {
                id,
                display_name: Box::from(&*self.display_name?),
                external_id,
                version,
                parents: Vec::new(),
            }),
            ResourceType::Agent | ResourceType::AgenticApplication => return None,
        })
    }
}

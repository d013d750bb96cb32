//! The in-memory index: every User and Group in compact form, unique names, memberships in
//! both directions. Rebuilt from storage at start; changed only by applying committed batches.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use serde::Deserialize;
use serde_json::Value;

use super::{Batch, Record, Row, Seq};
use crate::schema::ResourceType;
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

/// One row of the directory. Rows are dense (creation order), so the index is a vector.
#[derive(Debug, Clone, Default)]
enum Slot {
    #[default]
    Empty,
    User(UserEntry),
    Group(GroupEntry),
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
    pub(super) seq: Seq,
    pub(super) next_row: Row,
    slots: Vec<Slot>,
    user_count: usize,
    group_count: usize,
    ids: PreHashedMap<Id, Row>,
    /// Seeded per process, so nobody can aim keys at one hash bucket.
    hasher: foldhash::quality::RandomState,
    user_by_name: HashIndex,
    user_by_external_id: HashIndex,
    user_by_email: HashIndex,
    /// Group `displayName`, case-folded: unique.
    group_by_name: HashIndex,
    group_by_external_id: HashIndex,
    /// Group → its direct members (users and groups).
    members: HashMap<Row, HashSet<Row, foldhash::fast::RandomState>, foldhash::fast::RandomState>,
    /// The identifiers of deleted users, hashed with their kind (see [`Retired`]). A hash
    /// collision can only make a stranger look deleted: refused, never admitted.
    retired: HashSet<u64, BuildHasherDefault<PreHashed>>,
}

/// Which identifier of a deleted user a retired key hashes.
#[derive(Clone, Copy, Hash)]
pub enum Retired {
    UserName,
    Email,
    ExternalId,
}

impl Default for Index {
    fn default() -> Self {
        Self {
            seq: 0,
            next_row: 1,
            slots: Vec::new(),
            user_count: 0,
            group_count: 0,
            ids: PreHashedMap::default(),
            hasher: foldhash::quality::RandomState::default(),
            user_by_name: HashIndex::default(),
            user_by_external_id: HashIndex::default(),
            user_by_email: HashIndex::default(),
            group_by_name: HashIndex::default(),
            group_by_external_id: HashIndex::default(),
            members: HashMap::default(),
            retired: HashSet::default(),
        }
    }
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("seq", &self.seq)
            .field("users", &self.user_count)
            .field("groups", &self.group_count)
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

fn str_field<'a>(resource: &'a Value, name: &str) -> Option<&'a str> {
    resource
        .as_object()
        .and_then(|o| get_ci(o, name))
        .and_then(Value::as_str)
}

fn version_of(resource: &Value) -> Seq {
    resource
        .get("meta")
        .and_then(|m| m.get("version"))
        .and_then(Value::as_str)
        .and_then(|v| v.strip_prefix("W/\"")?.strip_suffix('"')?.parse().ok())
        .unwrap_or(0)
}

pub fn user_entry(record: &Record) -> Option<UserEntry> {
    let resource = &record.resource;
    let emails = resource
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
        .unwrap_or_default();
    Some(UserEntry {
        id: parse_id(str_field(resource, "id")?)?,
        user_name: fold(str_field(resource, "userName")?),
        external_id: str_field(resource, "externalId").map(Box::from),
        emails,
        // A user without `active` is active (RFC 7643 leaves the default to the provider).
        active: resource
            .as_object()
            .and_then(|o| get_ci(o, "active"))
            .and_then(Value::as_bool)
            .unwrap_or(true),
        version: version_of(resource),
        valid_since: record.valid_since.unwrap_or(0),
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
        }
        self.slots.get_mut(i)
    }

    pub fn seq(&self) -> Seq {
        self.seq
    }

    pub fn user_count(&self) -> usize {
        self.user_count
    }

    pub fn group_count(&self) -> usize {
        self.group_count
    }

    pub fn row_of(&self, id: &str) -> Option<(ResourceType, Row)> {
        let row = *self.ids.get(&parse_id(id)?)?;
        match self.slot(row) {
            Slot::User(_) => Some((ResourceType::User, row)),
            Slot::Group(_) => Some((ResourceType::Group, row)),
            Slot::Empty => None,
        }
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

    /// Rows of every user (or group), in creation order.
    pub fn rows(&self, rt: ResourceType) -> impl Iterator<Item = Row> + '_ {
        self.slots.iter().enumerate().filter_map(move |(i, slot)| {
            let wanted = matches!(
                (rt, slot),
                (ResourceType::User, Slot::User(_)) | (ResourceType::Group, Slot::Group(_))
            );
            wanted.then_some(i as Row)
        })
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
            Retired::ExternalId => Cow::Borrowed(value),
            Retired::UserName | Retired::Email => folded(value),
        };
        self.retired.contains(&self.retired_key(kind, &value))
    }

    fn retired_key(&self, kind: Retired, value: &str) -> u64 {
        self.hasher.hash_one((kind, value))
    }

    /// Remembers the identifiers of a deleted user.
    fn insert_retired(&mut self, record: &Record) {
        let Some(resource) = record.resource.as_object() else {
            return;
        };
        let text = |name: &str| get_ci(resource, name).and_then(Value::as_str);
        let mut keys = Vec::new();
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

    pub fn parents_of(&self, member: Row) -> impl Iterator<Item = Row> + '_ {
        let parents: &[Row] = match self.slot(member) {
            Slot::User(user) => &user.parents,
            Slot::Group(group) => &group.parents,
            Slot::Empty => &[],
        };
        parents.iter().copied()
    }

    /// The groups `member` is in, directly or through nested groups, with whether each is
    /// direct. Cycles are impossible (the writer refuses them) but are tolerated anyway.
    pub fn groups_of(&self, member: Row) -> Vec<(Row, bool)> {
        let direct: Vec<Row> = self.parents_of(member).collect();
        if direct.iter().all(|&g| self.parents_of(g).next().is_none()) {
            // No nested groups (the common case): no set needed.
            let mut groups: Vec<(Row, bool)> = direct.into_iter().map(|g| (g, true)).collect();
            groups.sort_unstable();
            groups.dedup();
            return groups;
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
        let fast = serde_json::from_slice::<StoredFields<'_>>(json)
            .ok()
            .and_then(|stored| stored.resource.entry(rt, stored.valid_since.unwrap_or(0)));
        match fast {
            Some(Entry::User(entry)) => self.insert_user(row, entry),
            Some(Entry::Group(entry)) => self.insert_group(row, entry),
            // Not in the canonical shape the writer stores: read it the slow, lenient way.
            None => {
                return serde_json::from_slice::<Record>(json)
                    .is_ok_and(|record| self.insert_loaded(rt, row, &record));
            }
        }
        true
    }

    pub(super) fn insert_loaded(&mut self, rt: ResourceType, row: Row, record: &Record) -> bool {
        if record.retired {
            self.insert_retired(record);
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
        }
        true
    }

    pub(super) fn insert_member(&mut self, group: Row, member: Row) {
        self.members.entry(group).or_default().insert(member);
        let parents = match self.slot_mut(member) {
            Some(Slot::User(user)) => &mut user.parents,
            Some(Slot::Group(group)) => &mut group.parents,
            _ => return,
        };
        if !parents.contains(&group) {
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
        let parents = match self.slot_mut(member) {
            Some(Slot::User(user)) => &mut user.parents,
            Some(Slot::Group(group)) => &mut group.parents,
            _ => return,
        };
        parents.retain(|&g| g != group);
    }

    fn insert_user(&mut self, row: Row, mut entry: UserEntry) {
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
        let Some(slot) = self.slot_mut(row) else {
            return;
        };
        // A replaced user keeps its memberships.
        let new = match slot {
            Slot::User(old) => {
                entry.parents = std::mem::take(&mut old.parents);
                false
            }
            _ => true,
        };
        *slot = Slot::User(entry);
        if new {
            self.user_count += 1;
        }
    }

    fn remove_user(&mut self, row: Row) -> Option<UserEntry> {
        let slot = self.slot_mut(row)?;
        let Slot::User(entry) = std::mem::take(slot) else {
            return None;
        };
        self.user_count -= 1;
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

    fn insert_group(&mut self, row: Row, mut entry: GroupEntry) {
        let name_key = self.key(&fold(&entry.display_name));
        let external_key = entry.external_id.as_deref().map(|e| self.key(e));
        self.ids.insert(entry.id, row);
        self.group_by_name.insert(name_key, row);
        if let Some(key) = external_key {
            self.group_by_external_id.insert(key, row);
        }
        let Some(slot) = self.slot_mut(row) else {
            return;
        };
        let new = match slot {
            Slot::Group(old) => {
                entry.parents = std::mem::take(&mut old.parents);
                false
            }
            _ => true,
        };
        *slot = Slot::Group(entry);
        if new {
            self.group_count += 1;
        }
    }

    fn remove_group(&mut self, row: Row) -> Option<GroupEntry> {
        let slot = self.slot_mut(row)?;
        let Slot::Group(entry) = std::mem::take(slot) else {
            return None;
        };
        self.group_count -= 1;
        self.ids.remove(&entry.id);
        self.group_by_name
            .remove(self.key(&fold(&entry.display_name)), row);
        if let Some(external_id) = &entry.external_id {
            self.group_by_external_id.remove(self.key(external_id), row);
        }
        Some(entry)
    }

    /// Makes a committed batch visible. Records are replaced whole (keeping memberships);
    /// memberships change row by row.
    pub(super) fn apply(&mut self, batch: &Batch) {
        for (rt, row, record) in &batch.records {
            let parents = match rt {
                ResourceType::User => self.remove_user(*row).map(|u| u.parents),
                ResourceType::Group => self.remove_group(*row).map(|g| g.parents),
            };
            if let Some(record) = record {
                // The writer only commits records it built, so they always have an id and a
                // name; a record that somehow lacks them stays out of the index (not found).
                if self.insert_loaded(*rt, *row, record) && !record.retired {
                    for group in parents.unwrap_or_default() {
                        self.insert_member(group, *row);
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
    fn entry(self, rt: ResourceType, valid_since: Seq) -> Option<Entry> {
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
                valid_since,
                parents: Vec::new(),
            }),
            ResourceType::Group => Entry::Group(GroupEntry {
                id,
                display_name: Box::from(&*self.display_name?),
                external_id,
                version,
                parents: Vec::new(),
            }),
        })
    }
}

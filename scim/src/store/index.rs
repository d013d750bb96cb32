//! The in-memory index: every User and Group in compact form, unique names, memberships in
//! both directions. Rebuilt from storage at start; changed only by applying committed batches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::{Batch, Record, Row, Seq};
use crate::schema::ResourceType;
use crate::value::get_ci;

#[derive(Debug, Clone)]
pub struct UserEntry {
    pub id: Arc<str>,
    /// `userName`, case-folded.
    pub user_name: Box<str>,
    pub external_id: Option<Box<str>>,
    /// Every `emails[].value`, case-folded.
    pub emails: Box<[Box<str>]>,
    pub active: bool,
    pub version: Seq,
}

#[derive(Debug, Clone)]
pub struct GroupEntry {
    pub id: Arc<str>,
    pub display_name: Box<str>,
    pub external_id: Option<Box<str>>,
    pub version: Seq,
}

#[derive(Debug, Default)]
pub struct Index {
    pub(super) seq: Seq,
    pub(super) next_row: Row,
    pub(super) ids: HashMap<Arc<str>, (ResourceType, Row)>,
    /// Ordered by row, which is creation order: the stable order of every listing.
    pub(super) users: BTreeMap<Row, UserEntry>,
    pub(super) groups: BTreeMap<Row, GroupEntry>,
    pub(super) user_by_name: HashMap<Box<str>, Row>,
    pub(super) user_by_external_id: HashMap<Box<str>, Vec<Row>>,
    pub(super) user_by_email: HashMap<Box<str>, Vec<Row>>,
    /// Group `displayName`, case-folded: unique.
    pub(super) group_by_name: HashMap<Box<str>, Row>,
    pub(super) group_by_external_id: HashMap<Box<str>, Vec<Row>>,
    /// Group → its direct members (users and groups).
    pub(super) members: HashMap<Row, HashSet<Row>>,
    /// Member → the groups it is directly in.
    pub(super) parents: HashMap<Row, HashSet<Row>>,
}

/// Case folding for case-insensitive attributes (`userName`, `displayName`, emails).
pub fn fold(s: &str) -> Box<str> {
    if s.chars().any(char::is_uppercase) {
        s.to_lowercase().into_boxed_str()
    } else {
        Box::from(s)
    }
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
            emails
                .iter()
                .filter_map(|e| e.as_object().and_then(|o| get_ci(o, "value")))
                .filter_map(Value::as_str)
                .map(fold)
                .collect()
        })
        .unwrap_or_default();
    Some(UserEntry {
        id: Arc::from(str_field(resource, "id")?),
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
    })
}

pub fn group_entry(record: &Record) -> Option<GroupEntry> {
    let resource = &record.resource;
    Some(GroupEntry {
        id: Arc::from(str_field(resource, "id")?),
        display_name: Box::from(str_field(resource, "displayName")?),
        external_id: str_field(resource, "externalId").map(Box::from),
        version: version_of(resource),
    })
}

fn remove_from(map: &mut HashMap<Box<str>, Vec<Row>>, key: &str, row: Row) {
    if let Some(rows) = map.get_mut(key) {
        rows.retain(|&r| r != row);
        if rows.is_empty() {
            map.remove(key);
        }
    }
}

impl Index {
    pub fn seq(&self) -> Seq {
        self.seq
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    pub fn row_of(&self, id: &str) -> Option<(ResourceType, Row)> {
        self.ids.get(id).copied()
    }

    pub fn user(&self, row: Row) -> Option<&UserEntry> {
        self.users.get(&row)
    }

    pub fn group(&self, row: Row) -> Option<&GroupEntry> {
        self.groups.get(&row)
    }

    pub fn user_by_name(&self, user_name: &str) -> Option<Row> {
        self.user_by_name.get(&*fold(user_name)).copied()
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
        self.parents.get(&member).into_iter().flatten().copied()
    }

    /// The groups `member` is in, directly or through nested groups, with whether each is
    /// direct. Cycles are impossible (the writer refuses them) but are tolerated anyway.
    pub fn groups_of(&self, member: Row) -> Vec<(Row, bool)> {
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

    pub(super) fn insert_loaded(&mut self, rt: ResourceType, row: Row, record: &Record) -> bool {
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
        self.parents.entry(member).or_default().insert(group);
    }

    fn remove_member(&mut self, group: Row, member: Row) {
        if let Some(set) = self.members.get_mut(&group) {
            set.remove(&member);
            if set.is_empty() {
                self.members.remove(&group);
            }
        }
        if let Some(set) = self.parents.get_mut(&member) {
            set.remove(&group);
            if set.is_empty() {
                self.parents.remove(&member);
            }
        }
    }

    fn insert_user(&mut self, row: Row, entry: UserEntry) {
        self.ids.insert(entry.id.clone(), (ResourceType::User, row));
        self.user_by_name.insert(entry.user_name.clone(), row);
        if let Some(external_id) = &entry.external_id {
            self.user_by_external_id
                .entry(external_id.clone())
                .or_default()
                .push(row);
        }
        for email in entry.emails.iter() {
            let rows = self.user_by_email.entry(email.clone()).or_default();
            if !rows.contains(&row) {
                rows.push(row);
            }
        }
        self.users.insert(row, entry);
    }

    fn remove_user(&mut self, row: Row) {
        let Some(entry) = self.users.remove(&row) else {
            return;
        };
        self.ids.remove(&entry.id);
        if self.user_by_name.get(&entry.user_name) == Some(&row) {
            self.user_by_name.remove(&entry.user_name);
        }
        if let Some(external_id) = &entry.external_id {
            remove_from(&mut self.user_by_external_id, external_id, row);
        }
        for email in entry.emails.iter() {
            remove_from(&mut self.user_by_email, email, row);
        }
    }

    fn insert_group(&mut self, row: Row, entry: GroupEntry) {
        self.ids
            .insert(entry.id.clone(), (ResourceType::Group, row));
        self.group_by_name.insert(fold(&entry.display_name), row);
        if let Some(external_id) = &entry.external_id {
            self.group_by_external_id
                .entry(external_id.clone())
                .or_default()
                .push(row);
        }
        self.groups.insert(row, entry);
    }

    fn remove_group(&mut self, row: Row) {
        let Some(entry) = self.groups.remove(&row) else {
            return;
        };
        self.ids.remove(&entry.id);
        let name = fold(&entry.display_name);
        if self.group_by_name.get(&name) == Some(&row) {
            self.group_by_name.remove(&name);
        }
        if let Some(external_id) = &entry.external_id {
            remove_from(&mut self.group_by_external_id, external_id, row);
        }
    }

    /// Makes a committed batch visible. Records are replaced whole; memberships row by row.
    pub(super) fn apply(&mut self, batch: &Batch) {
        for (rt, row, record) in &batch.records {
            match rt {
                ResourceType::User => self.remove_user(*row),
                ResourceType::Group => self.remove_group(*row),
            }
            if let Some(record) = record {
                // The writer only commits records it built, so they always have an id and a
                // name; a record that somehow lacks them stays out of the index (not found).
                self.insert_loaded(*rt, *row, record);
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

//! The single writer: evaluates a batch of commands in order against the index plus the
//! batch's own earlier effects (the overlay), producing one [`Batch`] to commit.
//!
//! Nothing here touches the index: it is read-only while the batch is built, and the batch is
//! applied to it only after the storage commit succeeded.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::index::{
    agent_expires, agent_links, etag, etag_matches, fold, format_id, gains_identifier, given_up,
    holds_any, released_identifiers, Id, Index, NO_ID,
};
use super::{Batch, Change, Command, Entry, Record, Row, Seq, Storage, StoreError, Written};
use crate::error::{ScimError, ScimType};
use crate::patch::apply_patch;
use crate::schema::ResourceType;
use crate::validate::{check_value_counts, take_member_ids};
use crate::value::{get_ci, remove_ci};

/// Most membership rows a single command may change (a full replace of a huge group).
const MAX_MEMBER_CHANGES: usize = 1_000_000;

pub struct Overlay<'a> {
    index: &'a Index,
    storage: &'a dyn Storage,
    /// The batch's time, as `meta` shows it (RFC 3339) and in Unix seconds.
    now: String,
    unix: u64,
    seq: Seq,
    next_row: Row,
    records: HashMap<Row, (ResourceType, Option<Record>)>,
    record_order: Vec<Row>,
    ids: HashMap<String, Option<(ResourceType, Row)>>,
    /// Unique names (folded) taken or freed in this batch, by resource type.
    names: HashMap<(ResourceType, Box<str>), Option<Row>>,
    /// `(group, member) → present` for memberships changed in this batch.
    members: HashMap<(Row, Row), bool>,
    member_order: Vec<(Row, Row)>,
    /// The keys of `members` by group and by member, so that one group's or one member's
    /// changes are found without reading every change in the batch (a replaced 100,000-member
    /// group makes as many). A key undone by a failed command may stay listed: `members` no
    /// longer has it, and the index's state stands.
    touched_members: HashMap<Row, Vec<Row>>,
    touched_parents: HashMap<Row, Vec<Row>>,
    changes: Vec<Change>,
    entries: Vec<Entry>,
    /// What the command being run replaced in the maps above, to put back if it fails.
    undo: Vec<Undo>,
    /// The address the command being evaluated came from, for its changes.
    client: Option<String>,
    /// A read of the store that failed in this batch (a table locked past the writer's lock
    /// timeout, the connection lost): the batch's later commands that need the store fail
    /// with it at once, not each after a wait of its own, so a batch of them does not hold
    /// the writer (and with it the lease it renews) for the sum of their waits.
    failed_read: RefCell<Option<ScimError>>,
}

/// One map entry as it was before a command changed it (`None`: it was not there).
enum Undo {
    Record(Row, Option<(ResourceType, Option<Record>)>),
    Id(String, Option<Option<(ResourceType, Row)>>),
    Name((ResourceType, Box<str>), Option<Option<Row>>),
    Member((Row, Row), Option<bool>),
}

fn not_found(rt: ResourceType, id: &str) -> ScimError {
    ScimError::new(404, None, format!("{} {id} not found", rt.name()))
}

fn invalid(detail: impl Into<String>) -> ScimError {
    ScimError::bad_request(ScimType::InvalidValue, detail)
}

impl<'a> Overlay<'a> {
    pub fn new(index: &'a Index, storage: &'a dyn Storage, now: OffsetDateTime) -> Self {
        Self {
            index,
            storage,
            now: now
                .format(&Rfc3339)
                .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned()),
            unix: u64::try_from(now.unix_timestamp()).unwrap_or(0),
            seq: index.seq,
            next_row: index.next_row.max(1),
            records: HashMap::new(),
            record_order: Vec::new(),
            ids: HashMap::new(),
            names: HashMap::new(),
            members: HashMap::new(),
            member_order: Vec::new(),
            touched_members: HashMap::new(),
            touched_parents: HashMap::new(),
            changes: Vec::new(),
            entries: Vec::new(),
            undo: Vec::new(),
            client: None,
            failed_read: RefCell::new(None),
        }
    }

    pub fn into_batch(self) -> Batch {
        let mut records = self.records;
        Batch {
            base: self.index.seq,
            seq: self.seq,
            next_row: self.next_row,
            records: self
                .record_order
                .iter()
                .filter_map(|row| records.remove(row).map(|(rt, rec)| (rt, *row, rec)))
                .collect(),
            members: self
                .member_order
                .iter()
                .filter_map(|key| self.members.get(key).map(|&p| (key.0, key.1, p)))
                .collect(),
            changes: self.changes,
            entries: self.entries,
        }
    }

    /// Evaluates one command, of `actor` from the address `client`. On error the overlay is
    /// left as it was before the command.
    pub fn execute(
        &mut self,
        command: &Command,
        actor: &str,
        client: Option<&str>,
    ) -> Result<Written, ScimError> {
        // Commands are atomic: every entry a command replaces is kept aside, and put back if
        // the command fails. What a command costs does not grow with the batch it is in.
        let checkpoint = self.checkpoint();
        self.client = client.map(str::to_owned);
        let result = self.run(command, actor);
        if result.is_err() {
            self.restore(checkpoint);
        }
        self.undo.clear();
        result
    }

    fn run(&mut self, command: &Command, actor: &str) -> Result<Written, ScimError> {
        match command {
            Command::Create {
                rt,
                resource,
                password_hash,
            } => self.create(*rt, resource.clone(), password_hash.clone(), actor),
            Command::Replace {
                rt,
                id,
                resource,
                password_hash,
                if_match,
            } => {
                let (row, current) = self.current(*rt, id, if_match.as_deref())?;
                self.replace(
                    *rt,
                    row,
                    current,
                    resource.clone(),
                    password_hash.clone(),
                    actor,
                )
            }
            Command::Patch {
                rt,
                id,
                ops,
                password_hash,
                if_match,
            } => {
                let (row, current) = self.current(*rt, id, if_match.as_deref())?;
                let mut resource = current.resource.clone();
                let outcome = {
                    let is_member = |member_id: &str| {
                        self.row_of(member_id)
                            .is_some_and(|(_, member)| self.is_member(row, member))
                    };
                    apply_patch(&mut resource, *rt, ops, &is_member)?
                };
                let mut changed = outcome.resource_changed || password_hash.is_some();
                let mut summary = Vec::new();
                if outcome.resource_changed {
                    summary.push("attributes".to_owned());
                }
                // Never the password itself, nor its hash: that it was set.
                if password_hash.is_some() {
                    summary.push("password set".to_owned());
                }
                if *rt == ResourceType::Group {
                    let changes = &outcome.member_changes;
                    let done = match &changes.replaced_all {
                        Some(all) => {
                            let (added, removed) = self.set_members(row, all)?;
                            (!added.is_empty() || !removed.is_empty())
                                .then(|| replaced_summary(all.len(), &added, &removed))
                        }
                        None => {
                            let added = self.add_members(row, &changes.added)?;
                            let removed = self.remove_members(row, &changes.removed)?;
                            (added + removed > 0).then(|| {
                                format!(
                                    "members +[{}] -[{}]",
                                    changes.added.join(","),
                                    changes.removed.join(",")
                                )
                            })
                        }
                    };
                    if let Some(done) = done {
                        changed = true;
                        summary.push(done);
                    }
                }
                if !changed {
                    return Ok(Written {
                        seq: self.seq,
                        id: id.clone(),
                        record: Some(current),
                    });
                }
                let password_hash = password_hash.clone().or(current.password_hash.clone());
                self.store(
                    *rt,
                    row,
                    resource,
                    Some(&current),
                    password_hash,
                    "patch",
                    actor,
                    &summary.join(", "),
                )
            }
            Command::Delete { rt, id, if_match } => {
                let (row, current) = self.current(*rt, id, if_match.as_deref())?;
                self.delete(*rt, row, &current, id, actor)
            }
            Command::Put(entries) => {
                // A sequence number of its own, so replicas apply entries in commit order too.
                if !entries.is_empty() {
                    self.seq += 1;
                }
                self.entries.extend(entries.iter().cloned());
                Ok(Written {
                    seq: self.seq,
                    id: String::new(),
                    record: None,
                })
            }
        }
    }

    fn create(
        &mut self,
        rt: ResourceType,
        mut resource: Value,
        password_hash: Option<String>,
        actor: &str,
    ) -> Result<Written, ScimError> {
        let members = take_members(rt, &mut resource)?;
        let row = self.next_row;
        self.next_row += 1;
        let id = uuid::Uuid::new_v4().to_string();
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("id".to_owned(), Value::String(id.clone()));
        }
        let written = self.store(
            rt,
            row,
            resource,
            None,
            password_hash,
            "create",
            actor,
            "created",
        )?;
        // Named in the change, as a PATCH's are: a group created with members grants them.
        if let Some(members) = members {
            let (added, _) = self.set_members(row, &members)?;
            if !added.is_empty() {
                self.add_to_summary(&format!("members +[{}]", added.join(",")));
            }
        }
        Ok(written)
    }

    fn replace(
        &mut self,
        rt: ResourceType,
        row: Row,
        current: Record,
        mut resource: Value,
        password_hash: Option<String>,
        actor: &str,
    ) -> Result<Written, ScimError> {
        let id = current
            .resource
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        // A PUT that leaves `members` out keeps them: clients that PUT groups manage members by
        // PATCH, and silently emptying a 100,000-member group is the worse reading of the RFC.
        let members = take_members(rt, &mut resource)?;
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("id".to_owned(), Value::String(id));
            // One that leaves `active` out (or null) keeps it too: read as true, it would
            // re-activate a deactivated user, agent or application that a client updating
            // its profile never meant to let back in. Only `"active": true` does.
            let kept = current
                .resource
                .as_object()
                .and_then(|o| get_ci(o, "active"));
            if let (Some(active), None) = (kept, get_ci(obj, "active")) {
                obj.insert("active".to_owned(), active.clone());
            }
        }
        let password_hash = password_hash.or(current.password_hash.clone());
        let written = self.store(
            rt,
            row,
            resource,
            Some(&current),
            password_hash,
            "replace",
            actor,
            "replaced",
        )?;
        if let Some(members) = members {
            let (added, removed) = self.set_members(row, &members)?;
            if !added.is_empty() || !removed.is_empty() {
                let all = members.len();
                self.add_to_summary(&replaced_summary(all, &added, &removed));
            }
        }
        Ok(written)
    }

    fn delete(
        &mut self,
        rt: ResourceType,
        row: Row,
        current: &Record,
        id: &str,
        actor: &str,
    ) -> Result<Written, ScimError> {
        self.seq += 1;
        let released = match rt {
            ResourceType::User | ResourceType::Agent => {
                self.release_identifiers(rt, row, &current.resource, None)?
            }
            _ => String::new(),
        };
        // Out of every group it was in, and (a group) emptied of its members. The groups it
        // leaves show other members now: a new version, or a client holding the old ETag
        // would be told its copy still stands.
        let parents: Vec<Row> = self.parents_now(row);
        for &group in &parents {
            self.set_member(group, row, false);
        }
        self.restamp(ResourceType::Group, &parents)?;
        // Named in the change, as a PATCH's are: each member's records show they lost it.
        let mut removed = Vec::new();
        if rt == ResourceType::Group {
            for member in self.members_now(row) {
                self.set_member(row, member, false);
                removed.extend(self.id_at(member));
            }
        }
        if let Some(name) = str_of(&current.resource, rt.name_attribute()) {
            self.set_name((rt, fold(name)), None);
        }
        self.set_id(id.to_owned(), None);
        // Deleted users and agents are remembered by the identifiers a token names them by.
        let retired = match rt {
            ResourceType::User | ResourceType::Agent => Some(retired(rt, current)),
            ResourceType::Group | ResourceType::AgenticApplication => None,
        };
        self.put_record(rt, row, retired);
        let mut summary = match str_of(&current.resource, rt.name_attribute()) {
            Some(name) => format!("deleted {} {}", rt.name_attribute(), quoted(name)),
            None => "deleted".to_owned(),
        };
        summary.push_str(&released);
        if !removed.is_empty() {
            summary.push_str(&format!(", members -[{}]", removed.join(",")));
        }
        if rt == ResourceType::Agent {
            summary.push_str(&agent_links_changed(Some(&current.resource), None));
        }
        self.log(actor, "delete", rt, id, summary);
        Ok(Written {
            seq: self.seq,
            id: id.to_owned(),
            record: None,
        })
    }

    /// Stamps `meta`, checks the unique name, and records the new state of a resource.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &mut self,
        rt: ResourceType,
        row: Row,
        mut resource: Value,
        previous: Option<&Record>,
        password_hash: Option<String>,
        op: &str,
        actor: &str,
        summary: &str,
    ) -> Result<Written, ScimError> {
        // However it was written (created, replaced, patched): no list past the bound.
        check_value_counts(rt, &resource, previous.map(|p| &p.resource))?;
        let Some(obj) = resource.as_object_mut() else {
            return Err(invalid("a resource must be a JSON object"));
        };
        // Never store a clear-text password, whatever path it came by.
        remove_ci(obj, "password");
        let id = obj
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ScimError::new(500, None, "resource without id"))?;
        let name_attr = rt.name_attribute();
        let name = get_ci(obj, name_attr)
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("{name_attr} is required")))?;
        let folded = fold(name);
        // What the audit trail says: the resource by name (a created one has no other), and a
        // deactivation or re-activation in so many words.
        let mut summary = match previous {
            None => format!("{summary} {name_attr} {}", quoted(name)),
            Some(_) => summary.to_owned(),
        };
        if self
            .name_owner(rt, &folded)
            .is_some_and(|owner| owner != row)
        {
            return Err(ScimError::new(
                409,
                Some(ScimType::Uniqueness),
                format!("a {} with {name_attr} {name:?} already exists", rt.name()),
            ));
        }
        // Renamed, in any letter: the groups it is in show it by name (a group or agent member's
        // `display`).
        let mut shown_otherwise = false;
        if let Some(previous) = previous {
            if let Some(old) = str_of(&previous.resource, name_attr) {
                // Renamed: said first (a group's members after it are read as ids, outside
                // the quoted names; see the audit log's user filter). Rules name groups, and
                // people, by these names.
                if old != name {
                    summary = format!("{name_attr} {} → {}, {summary}", quoted(old), quoted(name));
                    shown_otherwise = true;
                }
                let old = fold(old);
                if old != folded {
                    self.set_name((rt, old), None);
                }
            }
        }
        self.set_name((rt, folded), Some(row));

        self.seq += 1;
        // Those groups show other members now: a new version, or a client holding the old ETag
        // would be told its copy still stands. A user member is shown by id alone.
        if shown_otherwise && rt != ResourceType::User {
            let parents = self.parents_now(row);
            self.restamp(ResourceType::Group, &parents)?;
        }
        let created = previous
            .and_then(|p| p.resource.get("meta"))
            .and_then(|m| m.get("created"))
            .cloned()
            .unwrap_or_else(|| Value::String(self.now.clone()));
        obj.insert(
            "meta".to_owned(),
            json!({
                "resourceType": rt.name(),
                "created": created,
                "lastModified": self.now,
                "version": etag(self.seq),
            }),
        );
        let active = |r: &Value| {
            r.as_object()
                .and_then(|o| get_ci(o, "active"))
                .and_then(Value::as_bool)
                .unwrap_or(true)
        };
        // Every kind that has `active` (an agent, or its application, refuses its agents).
        if previous.is_some_and(|p| active(&p.resource) != active(&resource)) {
            summary.push_str(if active(&resource) {
                ", re-activated"
            } else {
                ", deactivated"
            });
        }
        // Whom an agent stands through, and where it runs, by id as a group's members are (a
        // console's user page finds them so): an owner added lets it in with the tokens it
        // holds.
        if rt == ResourceType::Agent {
            summary.push_str(&agent_links_changed(
                previous.map(|p| &p.resource),
                Some(&resource),
            ));
        }
        let (valid_since, valid_since_unix) = match rt {
            ResourceType::Group => (None, None),
            // Deactivated or re-activated, its agents' tokens from before are not theirs: an
            // application disabled while its secret is rotated takes no old token back.
            ResourceType::AgenticApplication => match previous {
                Some(p) if active(&p.resource) == active(&resource) => {
                    (p.valid_since, p.valid_since_unix)
                }
                Some(_) => self.valid_from_now(),
                None => (None, None),
            },
            // An agent's tokens are held to it as a user's are: created, deactivated or
            // re-activated, or named otherwise (a deleted agent's name, say), its tokens from
            // before are not its own, or no longer. Nor when an application it ran in is taken
            // off it: that application may have been disabled (its secret rotated), and taking
            // it off lets the agent stand again, as re-activating it would; nor when its
            // `expires`, passed, is put later or taken away.
            ResourceType::Agent => {
                let unlinked = |p: &Record| {
                    let now = agent_links(&resource, "applications");
                    (agent_links(&p.resource, "applications").iter()).any(|id| !now.contains(id))
                };
                let now = i64::try_from(self.unix).unwrap_or(i64::MAX);
                let expired = |r: &Value| agent_expires(r) <= now;
                let revived = |p: &Record| expired(&p.resource) && !expired(&resource);
                let named = |r: &Value| {
                    let text = |name| r.as_object().and_then(|o| get_ci(o, name)?.as_str());
                    (
                        text("name").map(fold),
                        text("externalId").map(str::to_owned),
                    )
                };
                match previous {
                    Some(p)
                        if active(&p.resource) == active(&resource)
                            && named(&p.resource) == named(&resource)
                            && !unlinked(p)
                            && !revived(p) =>
                    {
                        (p.valid_since, p.valid_since_unix)
                    }
                    _ => self.valid_from_now(),
                }
            }
            ResourceType::User => {
                let toggled = |p: &Record| active(&p.resource) != active(&resource);
                let gains = |p: &Record| gains_identifier(&p.resource, &resource);
                match previous {
                    // Created, or deactivated or re-activated by this change: a session that
                    // began while the user was inactive is no more a way back in than one
                    // from before.
                    None => self.valid_from_now(),
                    Some(p) if toggled(p) => self.valid_from_now(),
                    // Found by a name, id or email it was not found by: a session signed in
                    // by that value before now was someone else's (a deleted user's, say),
                    // not this user's.
                    Some(p) if gains(p) => {
                        summary.push_str(", sessions from before ended (a new identifier)");
                        self.valid_from_now()
                    }
                    Some(p) => (p.valid_since.or(Some(0)), p.valid_since_unix),
                }
            }
        };
        if let (ResourceType::User | ResourceType::Agent, Some(previous)) = (rt, previous) {
            let released =
                self.release_identifiers(rt, row, &previous.resource, Some(&resource))?;
            summary.push_str(&released);
        }
        // What a user or agent was found by and is not any more is remembered, as a deleted
        // one's identifiers are (a record of its own): a session or token naming it by its
        // former name is not a stranger's, to be judged on its token's groups.
        // (Once each: one given up before, and taken back since, is remembered already.)
        let given_up = previous.and_then(|p| given_up(rt, &p.resource, &resource));
        if let Some(identifiers) = given_up.and_then(|i| self.index.not_yet_retired(rt, i)) {
            let kept = self.next_row;
            self.next_row += 1;
            self.put_record(rt, kept, Some(retired_identifiers(identifiers)));
            summary.push_str(", former identifiers kept");
        }
        let record = Record {
            resource,
            password_hash,
            valid_since,
            valid_since_unix,
            retired: false,
            later: previous.map(|p| p.later.clone()).unwrap_or_default(),
        };
        self.set_id(id.clone(), Some((rt, row)));
        self.put_record(rt, row, Some(record.clone()));
        self.log(actor, op, rt, &id, summary);
        Ok(Written {
            seq: self.seq,
            id,
            record: Some(record),
        })
    }

    fn log(&mut self, actor: &str, op: &str, rt: ResourceType, id: &str, summary: String) {
        self.changes.push(Change {
            seq: self.seq,
            time: self.now.clone(),
            actor: actor.to_owned(),
            client: self.client.clone(),
            op: op.to_owned(),
            resource_type: rt.name().to_owned(),
            id: id.to_owned(),
            summary,
        });
    }

    /// Gives the resources at `rows` this command's version and time, for a change to what
    /// they show that was not a write to them. Those this batch has not written are read from
    /// the store in one request: a user leaving hundreds of groups was a round trip to
    /// PostgreSQL each, on the thread that renews the replica's lease.
    fn restamp(&mut self, rt: ResourceType, rows: &[Row]) -> Result<(), ScimError> {
        let unread: Vec<Row> = (rows.iter().copied())
            .filter(|row| !self.records.contains_key(row))
            .collect();
        let mut read: HashMap<Row, Record> = self.read(rt, &unread)?.into_iter().collect();
        for &row in rows {
            let record = match self.records.get(&row) {
                Some((_, record)) => record.clone(),
                None => read.remove(&row),
            };
            let Some(mut record) = record.filter(|r| !r.retired) else {
                continue;
            };
            if let Some(meta) = record
                .resource
                .get_mut("meta")
                .and_then(Value::as_object_mut)
            {
                meta.insert("lastModified".to_owned(), Value::String(self.now.clone()));
                meta.insert("version".to_owned(), Value::String(etag(self.seq)));
            }
            self.put_record(rt, row, Some(record));
        }
        Ok(())
    }

    /// Moves `valid_since` of the other users (or agents, of `rt`) still holding an email or
    /// `externalId` that `row` gave up (`after`: `None` when deleted). A session signed in, or
    /// a token issued, by such a value while it named two was refused as naming both; found by
    /// one of them alone now, it must not pass to them.
    fn release_identifiers(
        &mut self,
        rt: ResourceType,
        row: Row,
        before: &Value,
        after: Option<&Value>,
    ) -> Result<String, ScimError> {
        let (emails, external_id) = released_identifiers(before, after);
        let by_external_id = |id| match rt {
            ResourceType::Agent => self.index.agents_by_external_id(id),
            _ => self.index.users_by_external_id(id),
        };
        let mut holders: Vec<Row> = emails
            .iter()
            .filter(|_| rt == ResourceType::User)
            .flat_map(|email| self.index.users_by_email(email))
            .chain(external_id.into_iter().flat_map(by_external_id))
            .filter(|&holder| holder != row)
            .collect();
        holders.sort_unstable();
        holders.dedup();
        let mut ended = Vec::new();
        for holder in holders {
            let Some(mut record) = self.record(rt, holder)? else {
                continue;
            };
            if holds_any(&record.resource, &emails, external_id) {
                (record.valid_since, record.valid_since_unix) = self.valid_from_now();
                ended.extend(str_of(&record.resource, "id").map(str::to_owned));
                self.put_record(rt, holder, Some(record));
            }
        }
        // Named in the change: their next request is refused as from before a re-creation,
        // and this change is the one that says why.
        if ended.is_empty() {
            return Ok(String::new());
        }
        let what = match rt {
            ResourceType::Agent => "tokens issued before to",
            _ => "sessions of",
        };
        Ok(format!(
            ", {what} [{}] ended (an identifier they shared was given up)",
            ended.join(",")
        ))
    }

    /// A user's `valid_since` and its time, moved to this change.
    fn valid_from_now(&self) -> (Option<Seq>, Option<u64>) {
        (Some(self.seq), Some(self.unix))
    }

    fn put_record(&mut self, rt: ResourceType, row: Row, record: Option<Record>) {
        let before = self.records.insert(row, (rt, record));
        if before.is_none() {
            self.record_order.push(row);
        }
        self.undo.push(Undo::Record(row, before));
    }

    fn set_id(&mut self, id: String, owner: Option<(ResourceType, Row)>) {
        let before = self.ids.insert(id.clone(), owner);
        self.undo.push(Undo::Id(id, before));
    }

    fn set_name(&mut self, name: (ResourceType, Box<str>), owner: Option<Row>) {
        let before = self.names.insert(name.clone(), owner);
        self.undo.push(Undo::Name(name, before));
    }

    /// The current record of `id`, checked against `If-Match`.
    fn current(
        &self,
        rt: ResourceType,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(Row, Record), ScimError> {
        let row = match self.row_of(id) {
            Some((kind, row)) if kind == rt => row,
            _ => return Err(not_found(rt, id)),
        };
        let record = self.record(rt, row)?.ok_or_else(|| not_found(rt, id))?;
        if let Some(expected) = if_match {
            let current = record
                .resource
                .get("meta")
                .and_then(|m| m.get("version"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !etag_matches(expected, current) {
                return Err(ScimError::new(
                    412,
                    None,
                    format!("If-Match {expected} does not match the current version {current}"),
                ));
            }
        }
        Ok((row, record))
    }

    /// The live record at `row`: a deleted user's identifiers are no record.
    fn record(&self, rt: ResourceType, row: Row) -> Result<Option<Record>, ScimError> {
        let record = match self.records.get(&row) {
            Some((_, record)) => record.clone(),
            None => self.read(rt, &[row])?.into_iter().next().map(|(_, r)| r),
        };
        Ok(record.filter(|r| !r.retired))
    }

    /// The stored records at `rows` (missing ones skipped), in one request; after a read of
    /// this batch failed, none (see `failed_read`).
    fn read(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, ScimError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(failed) = self.failed_read.borrow().as_ref() {
            return Err(failed.clone());
        }
        match self.storage.records_for_writer(rt, rows) {
            Ok(records) => Ok(records),
            Err(e @ StoreError::Backend(_)) => {
                let failed = ScimError::from(e);
                *self.failed_read.borrow_mut() = Some(failed.clone());
                Err(failed)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn row_of(&self, id: &str) -> Option<(ResourceType, Row)> {
        match self.ids.get(id) {
            Some(entry) => *entry,
            None => self.index.row_of(id),
        }
    }

    /// The row of type `rt` whose unique name folds to `folded`, as of this batch.
    fn name_owner(&self, rt: ResourceType, folded: &str) -> Option<Row> {
        match self.names.get(&(rt, Box::from(folded))) {
            Some(owner) => *owner,
            None => self.index.by_folded_name(rt, folded),
        }
    }

    fn is_member(&self, group: Row, member: Row) -> bool {
        match self.members.get(&(group, member)) {
            Some(&present) => present,
            None => self.index.is_member(group, member),
        }
    }

    /// The id of the resource at `row`, as of this batch.
    fn id_at(&self, row: Row) -> Option<String> {
        if let Some((_, record)) = self.records.get(&row) {
            let resource = &record.as_ref()?.resource;
            return resource.get("id")?.as_str().map(str::to_owned);
        }
        let index = self.index;
        (index.user(row).map(|u| u.id))
            .or_else(|| index.group(row).map(|g| g.id))
            .or_else(|| index.agent(row).map(|a| a.id))
            .map(format_id)
    }

    fn members_now(&self, group: Row) -> Vec<Row> {
        let mut rows: HashSet<Row> = self.index.members_of(group).collect();
        for &member in self.touched_members.get(&group).into_iter().flatten() {
            match self.members.get(&(group, member)) {
                Some(true) => rows.insert(member),
                Some(false) => rows.remove(&member),
                None => false,
            };
        }
        rows.into_iter().collect()
    }

    fn parents_now(&self, member: Row) -> Vec<Row> {
        let mut rows: HashSet<Row> = self.index.parents_of(member).collect();
        for &group in self.touched_parents.get(&member).into_iter().flatten() {
            match self.members.get(&(group, member)) {
                Some(true) => rows.insert(group),
                Some(false) => rows.remove(&group),
                None => false,
            };
        }
        rows.into_iter().collect()
    }

    fn set_member(&mut self, group: Row, member: Row, present: bool) -> bool {
        if self.is_member(group, member) == present {
            return false;
        }
        let before = self.members.insert((group, member), present);
        if before.is_none() {
            self.member_order.push((group, member));
            self.touched_members.entry(group).or_default().push(member);
            self.touched_parents.entry(member).or_default().push(group);
        }
        self.undo.push(Undo::Member((group, member), before));
        true
    }

    /// Resolves member ids to rows: each must be an existing User, Group or Agent, and a group
    /// may not end up inside itself.
    fn member_rows(&self, group: Row, ids: &[String]) -> Result<Vec<Row>, ScimError> {
        if ids.len() > MAX_MEMBER_CHANGES {
            return Err(ScimError::bad_request(
                ScimType::TooMany,
                format!("at most {MAX_MEMBER_CHANGES} members can change in one request"),
            ));
        }
        // Read once for the command, however many of its members are groups.
        let enclosing = std::cell::OnceCell::new();
        ids.iter()
            .map(|id| {
                let (rt, row) = self
                    .row_of(id)
                    .filter(|(rt, _)| rt.can_be_member())
                    .ok_or_else(|| {
                        invalid(format!("member {id} is not a known User, Group or Agent"))
                    })?;
                let enclosing = || enclosing.get_or_init(|| self.enclosing(group));
                if rt == ResourceType::Group && enclosing().contains(&row) {
                    return Err(invalid(format!(
                        "group {id} contains this group: adding it would make a cycle"
                    )));
                }
                Ok(row)
            })
            .collect()
    }

    /// `group` and every group that contains it, through any depth of nesting: a group among
    /// them added to `group` would make a cycle. Read up from `group` through the groups it is
    /// in (few), never down through members (a 100,000-member group would be read whole).
    fn enclosing(&self, group: Row) -> HashSet<Row> {
        let mut seen = HashSet::new();
        let mut stack = vec![group];
        while let Some(group) = stack.pop() {
            if seen.insert(group) {
                stack.extend(self.parents_now(group));
            }
        }
        seen
    }

    fn add_members(&mut self, group: Row, ids: &[String]) -> Result<usize, ScimError> {
        let rows = self.member_rows(group, ids)?;
        Ok(rows
            .into_iter()
            .filter(|&m| self.set_member(group, m, true))
            .count())
    }

    fn remove_members(&mut self, group: Row, ids: &[String]) -> Result<usize, ScimError> {
        // Removing someone who is not there (or no longer exists) succeeds: IdPs retry.
        let rows: Vec<Row> = ids
            .iter()
            .filter_map(|id| self.row_of(id))
            .map(|(_, r)| r)
            .collect();
        Ok(rows
            .into_iter()
            .filter(|&m| self.set_member(group, m, false))
            .count())
    }

    /// Makes `ids` the members of `group`. Returns the ids it added (each once), and those of
    /// the members it removed.
    fn set_members(
        &mut self,
        group: Row,
        ids: &[String],
    ) -> Result<(Vec<String>, Vec<String>), ScimError> {
        let rows = self.member_rows(group, ids)?;
        let wanted: HashSet<Row> = rows.iter().copied().collect();
        let mut removed = Vec::new();
        for member in self.members_now(group) {
            if !wanted.contains(&member) && self.set_member(group, member, false) {
                removed.extend(self.id_at(member));
            }
        }
        let mut added = Vec::new();
        for (id, member) in ids.iter().zip(rows) {
            if self.set_member(group, member, true) {
                added.push(id.clone());
            }
        }
        Ok((added, removed))
    }

    /// Adds `more` to what the change this command last logged says.
    fn add_to_summary(&mut self, more: &str) {
        if let Some(change) = self.changes.last_mut() {
            change.summary.push_str(", ");
            change.summary.push_str(more);
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            seq: self.seq,
            next_row: self.next_row,
            record_order: self.record_order.len(),
            member_order: self.member_order.len(),
            changes: self.changes.len(),
            entries: self.entries.len(),
        }
    }

    /// Back to `c`: the counters and orders by length, the maps by undoing, last first, what
    /// was replaced since.
    fn restore(&mut self, c: Checkpoint) {
        fn put_back<K: Eq + std::hash::Hash, V>(
            map: &mut HashMap<K, V>,
            key: K,
            before: Option<V>,
        ) {
            match before {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Record(row, before) => put_back(&mut self.records, row, before),
                Undo::Id(id, before) => put_back(&mut self.ids, id, before),
                Undo::Name(name, before) => put_back(&mut self.names, name, before),
                Undo::Member(key, before) => put_back(&mut self.members, key, before),
            }
        }
        self.seq = c.seq;
        self.next_row = c.next_row;
        self.record_order.truncate(c.record_order);
        self.member_order.truncate(c.member_order);
        self.changes.truncate(c.changes);
        self.entries.truncate(c.entries);
    }
}

/// The overlay's counters and the lengths of its ordered lists, before a command.
struct Checkpoint {
    seq: Seq,
    next_row: Row,
    record_order: usize,
    member_order: usize,
    changes: usize,
    entries: usize,
}

fn str_of<'v>(resource: &'v Value, name: &str) -> Option<&'v str> {
    resource
        .as_object()
        .and_then(|o| get_ci(o, name))
        .and_then(Value::as_str)
}

/// A Group's member ids, taken out of its validated resource: members are stored as rows,
/// never inside the group.
fn take_members(rt: ResourceType, resource: &mut Value) -> Result<Option<Vec<String>>, ScimError> {
    match rt {
        ResourceType::Group => take_member_ids(resource),
        ResourceType::User | ResourceType::Agent | ResourceType::AgenticApplication => Ok(None),
    }
}

/// For a change's summary, the owners and applications an agent gained and lost between
/// `before` and `after` (`None`: not there), by id, as `, owners +[a] -[b]`.
fn agent_links_changed(before: Option<&Value>, after: Option<&Value>) -> String {
    let mut summary = String::new();
    for name in ["owners", "applications"] {
        let links = |resource: Option<&Value>| -> HashSet<Id> {
            resource.map_or_else(HashSet::new, |r| agent_links(r, name).into_iter().collect())
        };
        let (before, after) = (links(before), links(after));
        let ids = |from: &HashSet<Id>, not_in: &HashSet<Id>| {
            let mut ids: Vec<Id> = (from.difference(not_in))
                .copied()
                .filter(|&id| id != NO_ID)
                .collect();
            ids.sort_unstable();
            ids.into_iter().map(format_id).collect::<Vec<_>>().join(",")
        };
        let (added, removed) = (ids(&after, &before), ids(&before, &after));
        if !added.is_empty() || !removed.is_empty() {
            summary.push_str(&format!(", {name} +[{added}] -[{removed}]"));
        }
    }
    summary
}

/// What a replace of all of a group's members (by `all` ids) changed: the members it added and
/// those it removed, by id (it grants them what the group grants, or takes it away).
fn replaced_summary(all: usize, added: &[String], removed: &[String]) -> String {
    format!(
        "members replaced ({all} members): +[{}] -[{}]",
        added.join(","),
        removed.join(",")
    )
}

/// What stays of a deleted user or agent: the identifiers a token could name it by.
fn retired(rt: ResourceType, current: &Record) -> Record {
    let mut kept = serde_json::Map::new();
    let identifiers: &[&str] = match rt {
        ResourceType::Agent => &["name", "externalId"],
        _ => &["userName", "emails", "externalId"],
    };
    if let Some(resource) = current.resource.as_object() {
        for &name in identifiers {
            if let Some(value) = get_ci(resource, name) {
                kept.insert(name.to_owned(), value.clone());
            }
        }
    }
    retired_identifiers(Value::Object(kept))
}

/// A record that is only `identifiers` remembered: served by no lookup but the index's
/// "was this deleted".
fn retired_identifiers(identifiers: Value) -> Record {
    Record {
        resource: identifiers,
        password_hash: None,
        valid_since: None,
        valid_since_unix: None,
        retired: true,
        later: serde_json::Map::new(),
    }
}

/// `name` quoted for an audit summary, cut to its first 256 bytes: a SCIM client may send a
/// name of any length, and the summary goes to the audit log and the console.
fn quoted(name: &str) -> String {
    const MAX: usize = 256;
    if name.len() <= MAX {
        return format!("{name:?}");
    }
    let mut end = MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…({} bytes more)", &name[..end], name.len() - end)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::{GROUP_SCHEMA, USER_SCHEMA};
    use crate::store::memory::MemoryStorage;

    fn create(rt: ResourceType, resource: Value) -> Command {
        Command::Create {
            rt,
            resource,
            password_hash: None,
        }
    }

    #[test]
    fn a_name_in_a_summary_is_quoted_and_cut() {
        assert_eq!(quoted("ann \"x\""), "\"ann \\\"x\\\"\"");
        let long = format!("{}é{}", "a".repeat(255), "b".repeat(1000));
        let shown = quoted(&long);
        assert_eq!(shown, format!("{:?}…(1002 bytes more)", "a".repeat(255)));
    }

    /// A command that fails after changing names, records and members leaves the batch as the
    /// commands before it made it, and the commands after it see that.
    #[test]
    fn a_failed_command_leaves_the_batch_as_it_was() {
        let (index, storage) = (Index::default(), MemoryStorage::default());
        let mut overlay = Overlay::new(&index, &storage, OffsetDateTime::UNIX_EPOCH);
        let user = json!({"schemas": [USER_SCHEMA], "userName": "ann"});
        let ann = overlay
            .execute(&create(ResourceType::User, user), "t", None)
            .unwrap();
        let group = json!({"schemas": [GROUP_SCHEMA], "displayName": "eng", "members": [{"value": ann.id}]});
        let eng = overlay
            .execute(&create(ResourceType::Group, group), "t", None)
            .unwrap();
        let seq = overlay.seq;

        // Renamed, and its members replaced by ann and someone unknown: refused after the
        // rename and the record were written into the overlay.
        let renamed = json!({"schemas": [GROUP_SCHEMA], "displayName": "ops",
            "members": [{"value": "nobody"}]});
        let replace = Command::Replace {
            rt: ResourceType::Group,
            id: eng.id.clone(),
            resource: renamed,
            password_hash: None,
            if_match: None,
        };
        assert!(overlay.execute(&replace, "t", None).is_err());
        // And a delete of someone unknown.
        let delete = Command::Delete {
            rt: ResourceType::User,
            id: "nobody".to_owned(),
            if_match: None,
        };
        assert!(overlay.execute(&delete, "t", None).is_err());

        assert_eq!(overlay.seq, seq);
        let eng_row = overlay.row_of(&eng.id).unwrap().1;
        let ann_row = overlay.row_of(&ann.id).unwrap().1;
        assert!(overlay.is_member(eng_row, ann_row));
        assert_eq!(
            overlay.name_owner(ResourceType::Group, "eng"),
            Some(eng_row)
        );
        assert_eq!(overlay.name_owner(ResourceType::Group, "ops"), None);
        let record = overlay
            .record(ResourceType::Group, eng_row)
            .unwrap()
            .unwrap();
        assert_eq!(record.resource["displayName"], "eng");

        // The name the failed command held is free for the next one.
        let ops = json!({"schemas": [GROUP_SCHEMA], "displayName": "ops"});
        overlay
            .execute(&create(ResourceType::Group, ops), "t", None)
            .unwrap();
        let batch = overlay.into_batch();
        assert_eq!(batch.records.len(), 3);
        assert_eq!(batch.members, [(eng_row, ann_row, true)]);
        assert_eq!(batch.changes.len(), 3);
    }
}

//! SCIM PATCH (RFC 7644 §3.5.2): parsing the PatchOp request body and applying its
//! operations to a resource, as Okta and Entra ID really send them.
//!
//! ## Group members are not in the resource
//! A group can have 100,000 members, and adding one must not read or rewrite the list. So
//! [`apply_patch`] is given a Group *without* its `members` and a function answering "is this
//! id a member now?"; every membership change is reported in [`PatchOutcome::member_changes`]
//! as ids to add and remove (or, for a full `replace` of `members`, the new list), for the
//! store to apply one row at a time. A `members` key left in the value is never touched.
//! The one cost of this design: a filter on `members` can only be `value eq "<id>"` (or
//! several joined with `or`), as Okta sends; any other member filter is a `400
//! invalidFilter` that says so.
//!
//! ## Semantics, and where they depart from the letter of the RFC
//! - Operation names are case-insensitive (`Add`, `Replace`, `Remove` from Entra ID).
//! - Without a path, `add`/`replace` take an object whose keys may be plain names, dotted
//!   names (`name.givenName`) or extension-URN names, and an extension URN key may hold an
//!   object of extension attributes (all Entra ID).
//! - A filtered `replace` (or `add`) that matches no value appends one, seeded with the
//!   filter's `eq` terms: `emails[type eq "work"].value` on a user without a work email adds
//!   `{"type": "work", "value": …}`. RFC 7644 §3.5.2.3 asks for `noTarget`; Entra ID relies
//!   on the add. A filter of other terms (`or`, `co`, `ne`, `not`) describes no one value to
//!   add: `noTarget`.
//! - Booleans sent as strings (`"False"`) are coerced for boolean attributes.
//! - Writing `primary: true` on one value of a multi-valued attribute clears the others; on
//!   several at once (`emails.primary`, or a filter matching several) it is `invalidValue`.
//! - Read-only attributes: a value equal to the current one is ignored (Okta sends the group's
//!   own `id` when renaming it); a different one is `400 mutability`. `meta` inside a
//!   path-less value is ignored outright, since clients echo a stale copy of it.
//! - An unknown attribute is `400 invalidPath`, never silently dropped.
//! - Removing a value that is not there (a member who is not a member, a filter matching
//!   nothing) succeeds: IdPs retry, and a retry must not fail.
//! - The request is atomic: operations run on a copy and the resource is only replaced when
//!   all of them succeeded.

use std::collections::HashSet;

use serde_json::Value;

use crate::error::{ScimError, ScimType};
use crate::eval::{check_element_filter, element_matches};
use crate::filter::{AttrOp, CompValue, CompareOp, Filter};
use crate::path::PatchPath;
use crate::schema::{extension_named_by, resolve_path, AttrType, AttributeDef, ResourceType};
use crate::validate::{too_many_values, MAX_VALUES};
use crate::value::{coerce, get_ci, is_primary, is_unassigned, key_ci, remove_ci, slot_ci, Object};

pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// Most operations accepted in one PATCH request (said in the README: RFC 7643's
/// ServiceProviderConfig has no field for it).
pub const MAX_PATCH_OPERATIONS: usize = 1000;

/// The most work one PATCH may ask for (said in the README), counted before each operation
/// runs: a filter's comparisons with each value it selects among, a remove's values given
/// compared with each held, a multi-valued add's (or replace's) values, held and given (each
/// held one is looked at again to skip duplicates), and the values a sub-attribute is set in.
/// A group's members aside (the ledger, by id). It runs on the directory's one writer: a request that
/// asked hundreds of filters of every value of a large attribute held up every other write,
/// and sign-ins, for seconds.
pub const MAX_PATCH_WORK: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Add,
    Remove,
    Replace,
}

impl OpKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Remove => "remove",
            Self::Replace => "replace",
        }
    }
}

/// One entry of `Operations`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchOp {
    pub op: OpKind,
    pub path: Option<PatchPath>,
    /// Present for `add`; present (possibly `null`, meaning remove) for `replace`.
    pub value: Option<Value>,
}

/// Membership changes of a Group PATCH, as member ids.
///
/// When `replaced_all` is `Some`, the members become exactly that list and `added` and
/// `removed` are empty. Otherwise `added` holds ids that were not members and `removed` ids
/// that were (as the `is_member` function answered); the two are disjoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub replaced_all: Option<Vec<String>>,
}

impl MemberChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced_all.is_none()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatchOutcome {
    /// Whether the resource value (not counting members) differs from before.
    pub resource_changed: bool,
    pub member_changes: MemberChanges,
}

fn syntax(detail: impl Into<String>) -> ScimError {
    ScimError::bad_request(ScimType::InvalidSyntax, detail)
}

/// Parses a PATCH request body (RFC 7644 §3.5.2).
pub fn parse_patch_request(body: &Value) -> Result<Vec<PatchOp>, ScimError> {
    let body = body
        .as_object()
        .ok_or_else(|| syntax("a PATCH body must be a JSON object"))?;
    let declares_patch_op = get_ci(body, "schemas")
        .and_then(Value::as_array)
        .is_some_and(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .any(|s| s.eq_ignore_ascii_case(PATCH_OP_SCHEMA))
        });
    if !declares_patch_op {
        return Err(syntax(format!(
            "a PATCH body must have \"schemas\": [\"{PATCH_OP_SCHEMA}\"]"
        )));
    }
    let ops = get_ci(body, "Operations")
        .and_then(Value::as_array)
        .ok_or_else(|| syntax("a PATCH body must have an \"Operations\" array"))?;
    if ops.is_empty() {
        return Err(syntax("\"Operations\" is empty"));
    }
    if ops.len() > MAX_PATCH_OPERATIONS {
        return Err(ScimError::bad_request(
            ScimType::TooMany,
            format!(
                "{} operations in one PATCH; at most {MAX_PATCH_OPERATIONS} are accepted",
                ops.len()
            ),
        ));
    }
    ops.iter()
        .enumerate()
        .map(|(i, op)| parse_op(op).map_err(|e| at_operation(i, e)))
        .collect()
}

fn at_operation(index: usize, mut e: ScimError) -> ScimError {
    e.detail = format!("Operations[{index}]: {}", e.detail);
    e
}

fn parse_op(op: &Value) -> Result<PatchOp, ScimError> {
    let op = op
        .as_object()
        .ok_or_else(|| syntax("an operation must be a JSON object"))?;
    let name = get_ci(op, "op").and_then(Value::as_str).unwrap_or("");
    let kind = [OpKind::Add, OpKind::Remove, OpKind::Replace]
        .into_iter()
        .find(|k| k.as_str().eq_ignore_ascii_case(name))
        .ok_or_else(|| syntax("\"op\" must be \"add\", \"remove\" or \"replace\""))?;
    let path = match get_ci(op, "path") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if p.trim().is_empty() => None,
        Some(Value::String(p)) => Some(PatchPath::parse(p)?),
        Some(_) => return Err(syntax("\"path\" must be a string")),
    };
    let value = get_ci(op, "value").cloned();
    match (kind, &value) {
        (OpKind::Add, None | Some(Value::Null)) => Err(syntax("add needs a \"value\"")),
        (OpKind::Replace, None) => Err(syntax("replace needs a \"value\"")),
        _ => Ok(PatchOp {
            op: kind,
            path,
            value,
        }),
    }
}

/// Applies `ops` to `resource` (for a Group: without its members, see the module doc).
/// `is_member` answers whether an id is currently a member; it is not called for Users.
/// On error `resource` is unchanged.
pub fn apply_patch(
    resource: &mut Value,
    rt: ResourceType,
    ops: &[PatchOp],
    is_member: &dyn Fn(&str) -> bool,
) -> Result<PatchOutcome, ScimError> {
    let Some(original) = resource.as_object() else {
        return Err(ScimError::new(
            500,
            None,
            "stored resource is not a JSON object",
        ));
    };
    // Each value a remove lists is compared with each value the attribute holds: in all, no
    // more than an attribute may hold (a group's members are removed by id, not so).
    let listed: usize = ops
        .iter()
        .filter(|op| op.op == OpKind::Remove)
        .filter(|op| {
            op.path
                .as_ref()
                .is_some_and(|path| !path.attr.name.eq_ignore_ascii_case("members"))
        })
        .filter_map(|op| op.value.as_ref()?.as_array().map(Vec::len))
        .sum();
    if listed > MAX_VALUES {
        return Err(ScimError::bad_request(
            ScimType::TooMany,
            format!(
                "the removes list {listed} values in all, more than the {MAX_VALUES} one \
                 attribute may hold"
            ),
        ));
    }
    let mut work = original.clone();
    let mut ledger = Ledger::new(is_member);
    let mut budget = MAX_PATCH_WORK;
    for (i, op) in ops.iter().enumerate() {
        let mut patcher = Patcher {
            rt,
            work: &mut work,
            ledger: &mut ledger,
            budget: &mut budget,
        };
        patcher.apply(op).map_err(|e| at_operation(i, e))?;
    }
    sync_extension_schemas(&mut work, rt);
    check_required(&work, rt)?;
    let resource_changed = work != *original;
    *resource = Value::Object(work);
    Ok(PatchOutcome {
        resource_changed,
        member_changes: ledger.into_changes(),
    })
}

struct Patcher<'a, 'm> {
    rt: ResourceType,
    work: &'a mut Object,
    ledger: &'a mut Ledger<'m>,
    /// What is left of [`MAX_PATCH_WORK`].
    budget: &'a mut usize,
}

fn invalid_path(detail: impl Into<String>) -> ScimError {
    ScimError::bad_request(ScimType::InvalidPath, detail)
}

fn invalid_value(detail: impl Into<String>) -> ScimError {
    ScimError::bad_request(ScimType::InvalidValue, detail)
}

/// Refuses an object of attributes that names one twice, in other letter case: which would
/// win is the order its keys are walked in, not the order they were sent in (as a POST or a
/// PUT refuses it).
fn once_each(attrs: &serde_json::Map<String, Value>) -> Result<(), ScimError> {
    let mut seen = std::collections::HashMap::with_capacity(attrs.len());
    for key in attrs.keys() {
        if let Some(first) = seen.insert(key.to_ascii_lowercase(), key) {
            return Err(given_twice(key, first));
        }
    }
    Ok(())
}

/// `key` names what `first` named, in one object of attributes.
fn given_twice(key: &str, first: &str) -> ScimError {
    ScimError::bad_request(
        ScimType::InvalidSyntax,
        format!("'{key}' names what '{first}' names: an attribute is given once"),
    )
}

/// Refuses a PATCH value (without a path) that names one attribute, or one and a part of it,
/// under two of its spellings: in other case, by its schema's URN (`urn:…:User:active` beside
/// `active`), dotted and whole (`name.givenName` beside `name`), flat and in its extension's
/// object (or beside the whole extension). Which would win is the order keys are walked in,
/// not as sent. Keys that name an element by a filter (`emails[type eq "work"].value`), or
/// nothing, are left to the PATCH.
fn once_each_attribute(
    rt: ResourceType,
    attrs: &serde_json::Map<String, Value>,
) -> Result<(), ScimError> {
    // What each key names, as its definition names it: (schema, attribute, sub-attribute),
    // the attribute `None` for a whole extension; with the key as sent.
    type Named<'d> = (&'d str, Option<&'d str>, Option<&'d str>, String);
    let mut named: Vec<Named<'static>> = Vec::new();
    // (`path`: the key as a path; `shown`: as it was sent.)
    let mut add = |path: String, shown: String| {
        let Ok(parsed) = PatchPath::parse(&path) else {
            return;
        };
        if parsed.value_filter.is_some() {
            return;
        }
        if let Some(resolved) = resolve_path(rt, &parsed.attr) {
            let sub = resolved.sub.map(|sub| sub.name);
            named.push((resolved.schema.id, Some(resolved.attr.name), sub, shown));
        }
    };
    let mut whole = Vec::new();
    for (key, value) in attrs {
        match (rt.extension(key), value.as_object()) {
            (Some(_), Some(inner)) => {
                for inner_key in inner.keys().filter(|k| !k.eq_ignore_ascii_case("schemas")) {
                    add(
                        format!("{key}:{inner_key}"),
                        format!("{inner_key}' in '{key}"),
                    );
                }
            }
            (Some(ext), None) => whole.push((ext.id, None, None, key.clone())),
            (None, _) => add(key.clone(), key.clone()),
        }
    }
    named.extend(whole);
    for (i, (schema, attr, sub, key)) in named.iter().enumerate() {
        let earlier = named[..i].iter().find(|(s, a, b, _)| {
            s == schema
                && (a.is_none() || attr.is_none() || a == attr)
                && (b == sub || b.is_none() || sub.is_none())
        });
        if let Some((.., earlier)) = earlier {
            return Err(given_twice(key, earlier));
        }
    }
    Ok(())
}

impl Patcher<'_, '_> {
    fn apply(&mut self, op: &PatchOp) -> Result<(), ScimError> {
        match &op.path {
            Some(path) => self.apply_path(op.op, path, op.value.as_ref(), false),
            None if op.op == OpKind::Remove => Err(ScimError::bad_request(
                ScimType::NoTarget,
                "remove needs a \"path\"",
            )),
            None => self.apply_no_path(op.op, op.value.as_ref().unwrap_or(&Value::Null)),
        }
    }

    /// `{"op": "replace", "value": {"active": false, "name.givenName": "B", "urn:…:department": "X"}}`.
    fn apply_no_path(&mut self, kind: OpKind, value: &Value) -> Result<(), ScimError> {
        let attrs = value.as_object().ok_or_else(|| {
            invalid_value(format!(
                "{} without a \"path\" needs an object of attributes as \"value\"",
                kind.as_str()
            ))
        })?;
        once_each(attrs)?;
        once_each_attribute(self.rt, attrs)?;
        for (key, value) in attrs {
            if key.eq_ignore_ascii_case("schemas") {
                // Derived from the attributes present; see `sync_extension_schemas`.
                continue;
            }
            if let Some(ext) = self.rt.extension(key) {
                self.apply_extension_object(kind, ext.id, value)?;
                continue;
            }
            // The path reader skips spaces around a name, which `password` is taken out by
            // before the patch (to be hashed) without: " password" would be set as sent, and
            // dropped by the store, a request answered as done with the password unchanged.
            if key.trim_matches([' ', '\t', '\r', '\n']) != key {
                return Err(invalid_path(format!(
                    "{key:?} is not an attribute name: it has spaces around it"
                )));
            }
            let path = PatchPath::parse(key)
                .map_err(|e| invalid_path(format!("{key:?} is not an attribute name: {e}")))?;
            self.apply_path(kind, &path, Some(value), true)?;
        }
        Ok(())
    }

    /// `"urn:…:enterprise:2.0:User": {"department": "X", "manager": {...}}`.
    fn apply_extension_object(
        &mut self,
        kind: OpKind,
        urn: &str,
        value: &Value,
    ) -> Result<(), ScimError> {
        if value.is_null() && kind == OpKind::Replace {
            remove_ci(self.work, urn);
            return Ok(());
        }
        let attrs = value
            .as_object()
            .ok_or_else(|| invalid_value(format!("{urn} must be an object of its attributes")))?;
        once_each(attrs)?;
        for (key, value) in attrs {
            if key.eq_ignore_ascii_case("schemas") {
                // Clients echo the extension's own `schemas` inside it; it is not an
                // attribute, and the resource's `schemas` is derived anyway.
                continue;
            }
            let path = PatchPath::parse(&format!("{urn}:{key}"))
                .map_err(|e| invalid_path(format!("{key:?} is not an attribute name: {e}")))?;
            self.apply_path(kind, &path, Some(value), true)?;
        }
        Ok(())
    }

    fn apply_path(
        &mut self,
        kind: OpKind,
        path: &PatchPath,
        value: Option<&Value>,
        in_value: bool,
    ) -> Result<(), ScimError> {
        if let (Some(ext), None) = (extension_named_by(self.rt, &path.attr), &path.value_filter) {
            return match kind {
                OpKind::Remove => {
                    remove_ci(self.work, ext.id);
                    Ok(())
                }
                _ => self.apply_extension_object(kind, ext.id, value.unwrap_or(&Value::Null)),
            };
        }
        let resolved = resolve_path(self.rt, &path.attr).ok_or_else(|| {
            invalid_path(format!(
                "'{}' is not an attribute of the {} schema",
                path.attr,
                self.rt.name()
            ))
        })?;
        if self.rt == ResourceType::Group && resolved.attr.name == "members" {
            return self.ledger.apply(kind, path, value);
        }
        let container = if resolved.schema.is_extension {
            if kind == OpKind::Remove && get_ci(self.work, resolved.schema.id).is_none() {
                return Ok(());
            }
            object_slot(self.work, resolved.schema.id)?
        } else {
            &mut *self.work
        };
        if resolved.attr.is_read_only() || resolved.sub.is_some_and(|s| s.is_read_only()) {
            return read_only(
                container,
                resolved.attr,
                resolved.sub,
                path,
                value,
                in_value,
            );
        }
        // A replace with `null` unassigns, like a remove; so does an add of `null` inside a
        // value (`{"name.givenName": null}`: an add of `null` alone is refused as it is read),
        // but not to a multi-valued attribute, which an add adds values to, and `null` none.
        let multi_valued = resolved.attr.multi_valued && resolved.sub.is_none();
        let (kind, value) = match (kind, value) {
            (OpKind::Replace, Some(Value::Null)) => (OpKind::Remove, None),
            (OpKind::Add, Some(Value::Null)) if !multi_valued => (OpKind::Remove, None),
            other => other,
        };
        let held = get_ci(container, resolved.attr.name)
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let given = |value: Option<&Value>| value.map_or(0, |v| v.as_array().map_or(1, Vec::len));
        let work = match (&path.value_filter, kind) {
            (Some(filter), _) => comparisons(filter).saturating_mul(held.max(1)),
            // Each value given is compared with each held (Entra ID's remove by values).
            (None, OpKind::Remove) if multi_valued => held.saturating_mul(given(value)),
            // Those held looked at again to skip duplicates, and those given.
            (None, _) if multi_valued => held + given(value),
            // A sub-attribute of every value held.
            (None, _) if resolved.attr.multi_valued => held.max(1),
            _ => 1,
        };
        *self.budget = self.budget.checked_sub(work).ok_or_else(|| {
            ScimError::bad_request(
                ScimType::TooMany,
                format!(
                    "the operations ask for more work than one PATCH may ({MAX_PATCH_WORK} \
                     comparisons of a filter or a value given with a value held, values looked \
                     at to add, or values a sub-attribute is set in): send them in several"
                ),
            )
        })?;
        let target = Target {
            attr: resolved.attr,
            name: path.attr.to_string(),
        };
        match (&path.value_filter, resolved.sub) {
            (None, None) => target.whole(container, kind, value),
            (None, Some(sub)) => target.sub_attribute(container, sub, kind, value),
            (Some(filter), sub) => target.filtered(container, filter, sub, kind, value),
        }
    }
}

/// How many comparisons `filter` makes of one value.
fn comparisons(filter: &Filter) -> usize {
    match filter {
        Filter::Attr(_) => 1,
        Filter::ValuePath { filter, sub, .. } => comparisons(filter) + usize::from(sub.is_some()),
        Filter::Not(inner) => comparisons(inner),
        Filter::And(l, r) | Filter::Or(l, r) => comparisons(l) + comparisons(r),
    }
}

/// An object under `key` in `obj`, created if absent.
fn object_slot<'a>(obj: &'a mut Object, key: &str) -> Result<&'a mut Object, ScimError> {
    let slot = slot_ci(obj, key);
    if !slot.is_object() {
        *slot = Value::Object(Object::new());
    }
    slot.as_object_mut()
        .ok_or_else(|| ScimError::new(500, None, "object slot is not an object"))
}

/// A read-only attribute in a PATCH: fine when it changes nothing, else `mutability`.
fn read_only(
    container: &Object,
    attr: &AttributeDef,
    sub: Option<&AttributeDef>,
    path: &PatchPath,
    value: Option<&Value>,
    in_value: bool,
) -> Result<(), ScimError> {
    if in_value && attr.name == "meta" {
        return Ok(());
    }
    let current = get_ci(container, attr.name);
    let current = match sub {
        Some(sub) => current
            .and_then(Value::as_object)
            .and_then(|o| get_ci(o, sub.name)),
        None => current,
    };
    let unchanged = current == value || (current.is_none() && value.is_some_and(is_unassigned));
    if path.value_filter.is_none() && value.is_some() && unchanged {
        return Ok(());
    }
    Err(ScimError::bad_request(
        ScimType::Mutability,
        format!("'{}' is read-only and cannot be changed", path.attr),
    ))
}

/// The attribute an operation writes, with its name as written for error messages.
struct Target {
    attr: &'static AttributeDef,
    name: String,
}

/// The sub-attributes of complex `attr` that `value`, an object of them, sets to null: unassigned
/// (RFC 7643 §2.5), so a merge of `value` removes them (coercing it leaves them out).
fn nulled(attr: &AttributeDef, value: &Value) -> Vec<&'static str> {
    let Some(fields) = value.as_object().filter(|_| attr.ty == AttrType::Complex) else {
        return Vec::new();
    };
    (fields.iter())
        .filter(|(_, value)| value.is_null())
        .filter_map(|(key, _)| Some(attr.sub_attribute(key)?.name))
        .collect()
}

impl Target {
    fn coerce(&self, def: &AttributeDef, value: &Value) -> Result<Value, ScimError> {
        coerce(def, value, &self.name, ScimType::InvalidPath)
    }

    /// `path: "emails"`, `path: "active"`, `path: "name"`.
    fn whole(
        &self,
        container: &mut Object,
        kind: OpKind,
        value: Option<&Value>,
    ) -> Result<(), ScimError> {
        let attr = self.attr;
        let Some(value) = value.filter(|_| kind != OpKind::Remove) else {
            return self.remove_whole(container, value);
        };
        let unassigned = if attr.multi_valued {
            Vec::new()
        } else {
            nulled(attr, value)
        };
        let value = self.coerce(attr, value)?;
        let slot = slot_ci(container, attr.name);
        match (attr.multi_valued, attr.ty, kind) {
            (true, _, OpKind::Add) => {
                let Value::Array(new) = value else {
                    return Err(invalid_value(format!("{} needs an array", self.name)));
                };
                let mut items = match slot.take() {
                    Value::Array(items) => items,
                    _ => Vec::new(),
                };
                // Values already there are skipped, each found in one look: a value's JSON
                // text is one text (object keys sorted), so equal values have equal texts.
                let mut seen: HashSet<String> = items.iter().map(Value::to_string).collect();
                for item in new {
                    if !seen.insert(item.to_string()) {
                        continue;
                    }
                    if items.len() >= MAX_VALUES {
                        return Err(too_many_values(attr.name));
                    }
                    let primary = is_primary(&item);
                    items.push(item);
                    if primary {
                        let last = items.len() - 1;
                        keep_one_primary(&mut items, last);
                    }
                }
                *slot = Value::Array(items);
            }
            // RFC 7644 §3.5.2.1/3: a complex value merges into the existing sub-attributes.
            (false, AttrType::Complex, _) => {
                if !slot.is_object() {
                    *slot = Value::Object(Object::new());
                }
                if let (Some(existing), Value::Object(new)) = (slot.as_object_mut(), value) {
                    existing.extend(new);
                    for name in &unassigned {
                        remove_ci(existing, name);
                    }
                }
            }
            _ => *slot = value,
        }
        drop_if_unassigned(container, attr.name);
        Ok(())
    }

    /// Without a value the attribute goes; with one (Entra ID's form), only the values of a
    /// multi-valued attribute that contain all the given sub-attributes do.
    fn remove_whole(&self, container: &mut Object, value: Option<&Value>) -> Result<(), ScimError> {
        let attr = self.attr;
        match value {
            Some(value) if attr.multi_valued && !value.is_null() => {
                let Value::Array(gone) = self.coerce(attr, value)? else {
                    return Ok(());
                };
                // Fail closed: a value whose sub-attributes are all dropped as they are read
                // (`display`, read-only, or null) would be contained in every value, and remove
                // them all (an agent's every application, say, and with them its refusal).
                if gone
                    .iter()
                    .any(|g| g.as_object().is_some_and(Object::is_empty))
                {
                    return Err(invalid_value(format!(
                        "a value to remove from {} names none of the sub-attributes it keeps \
                         (such as \"value\"): it would select every value",
                        attr.name
                    )));
                }
                if let Some(items) = container.get_mut(attr.name).and_then(Value::as_array_mut) {
                    items.retain(|item| !gone.iter().any(|g| names(attr, item, g)));
                }
                drop_if_unassigned(container, attr.name);
            }
            _ => {
                remove_ci(container, attr.name);
            }
        }
        Ok(())
    }

    /// `path: "name.givenName"` or, on every value, `path: "emails.type"`.
    fn sub_attribute(
        &self,
        container: &mut Object,
        sub: &AttributeDef,
        kind: OpKind,
        value: Option<&Value>,
    ) -> Result<(), ScimError> {
        let attr = self.attr;
        let new = match value.filter(|_| kind != OpKind::Remove) {
            Some(v) => Some(self.coerce(sub, v)?),
            None => None,
        };
        if attr.multi_valued {
            let slot = slot_ci(container, attr.name);
            if !slot.is_array() {
                *slot = Value::Array(Vec::new());
            }
            if let (Some(items), Some(new)) = (slot.as_array_mut(), &new) {
                if items.is_empty() {
                    items.push(Value::Object(Object::new()));
                }
                // RFC 7643 §2.4: one value at most is primary. Set on every value, of several,
                // it would leave which one counts (the directory's email) to their order.
                // (`new` is coerced: Entra ID's "True" is true by now.)
                if sub.name == "primary" && *new == Value::Bool(true) && items.len() > 1 {
                    return Err(invalid_value(format!(
                        "{}.primary set on every one of {} values would make them all \
                         primary: select one with a filter ({}[value eq \"…\"].primary)",
                        attr.name,
                        items.len(),
                        attr.name
                    )));
                }
                for item in items.iter_mut().filter_map(Value::as_object_mut) {
                    *slot_ci(item, sub.name) = new.clone();
                }
            } else if let Some(items) = slot.as_array_mut() {
                for item in items.iter_mut().filter_map(Value::as_object_mut) {
                    remove_ci(item, sub.name);
                }
            }
        } else {
            match new {
                Some(new) => *slot_ci(object_slot(container, attr.name)?, sub.name) = new,
                None => {
                    if let Some(obj) = container.get_mut(attr.name).and_then(Value::as_object_mut) {
                        remove_ci(obj, sub.name);
                    }
                }
            }
        }
        drop_if_unassigned(container, attr.name);
        Ok(())
    }

    /// `path: "emails[type eq \"work\"]"` or `"emails[type eq \"work\"].value"`.
    fn filtered(
        &self,
        container: &mut Object,
        filter: &Filter,
        sub: Option<&AttributeDef>,
        kind: OpKind,
        value: Option<&Value>,
    ) -> Result<(), ScimError> {
        let attr = self.attr;
        if !(attr.multi_valued && attr.ty == AttrType::Complex) {
            return Err(invalid_path(format!(
                "'{}': a [filter] selects values of a multi-valued complex attribute",
                self.name
            )));
        }
        check_element_filter(filter, attr)?;
        let new = match (value.filter(|_| kind != OpKind::Remove), sub) {
            (None, _) => None,
            (Some(v), Some(sub)) => Some(self.coerce(sub, v)?),
            (Some(v), None) => Some(self.single_element(v)?),
        };
        let unassigned = match (value, sub) {
            // The one element, alone or in a list of one (as `single_element` takes it).
            (Some(Value::Array(items)), None) => {
                items.first().map_or(Vec::new(), |one| nulled(attr, one))
            }
            (Some(value), None) => nulled(attr, value),
            _ => Vec::new(),
        };
        let slot = slot_ci(container, attr.name);
        if !slot.is_array() {
            *slot = Value::Array(Vec::new());
        }
        let Some(items) = slot.as_array_mut() else {
            return Ok(());
        };
        let mut matched = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if element_matches(filter, attr, item)? {
                matched.push(i);
            }
        }
        match (new, sub) {
            (None, None) => {
                let mut i = 0;
                items.retain(|_| {
                    i += 1;
                    !matched.contains(&(i - 1))
                });
            }
            (None, Some(sub)) => {
                for &i in &matched {
                    if let Some(item) = items.get_mut(i).and_then(Value::as_object_mut) {
                        remove_ci(item, sub.name);
                    }
                }
            }
            (Some(new), sub) => {
                if matched.is_empty() {
                    // Entra ID: a filtered replace of a value that does not exist adds it, the
                    // value its `eq` terms describe. A filter of any other shape describes no
                    // one value: RFC 7644 §3.5.2.3's answer, noTarget.
                    if !describes_one_value(filter) {
                        return Err(ScimError::bad_request(
                            ScimType::NoTarget,
                            format!(
                                "no value of {} matches the filter, and one matching it cannot \
                                 be made from it (only `eq` terms joined by `and` describe one)",
                                attr.name
                            ),
                        ));
                    }
                    let mut seed = seed_from_filter(filter, attr);
                    match (sub, new) {
                        (Some(sub), new) => {
                            seed.insert(sub.name.into(), new);
                        }
                        (None, Value::Object(fields)) => seed.extend(fields),
                        (None, _) => {}
                    }
                    items.push(Value::Object(seed));
                    matched.push(items.len() - 1);
                } else {
                    for &i in &matched {
                        let Some(item) = items.get_mut(i) else {
                            continue;
                        };
                        match (sub, kind, &new) {
                            (Some(sub), _, new) => {
                                if let Some(obj) = item.as_object_mut() {
                                    *slot_ci(obj, sub.name) = new.clone();
                                }
                            }
                            (None, OpKind::Add, Value::Object(fields)) => {
                                if let Some(obj) = item.as_object_mut() {
                                    obj.extend(fields.clone());
                                    for name in &unassigned {
                                        remove_ci(obj, name);
                                    }
                                }
                            }
                            (None, _, new) => *item = new.clone(),
                        }
                    }
                }
                // One value at most is primary (RFC 7643 §2.4): a filter matching several made
                // primary at once would leave which one counts to their order.
                let primaries: Vec<usize> = matched
                    .iter()
                    .copied()
                    .filter(|&i| items.get(i).is_some_and(is_primary))
                    .collect();
                if primaries.len() > 1 {
                    return Err(invalid_value(format!(
                        "the filter selects {} values of {} and makes them all primary: select \
                         one",
                        primaries.len(),
                        attr.name
                    )));
                }
                if let Some(&winner) = primaries.first() {
                    keep_one_primary(items, winner);
                }
            }
        }
        drop_if_unassigned(container, attr.name);
        Ok(())
    }

    /// The one value a filtered `add`/`replace` without sub-attribute writes.
    fn single_element(&self, value: &Value) -> Result<Value, ScimError> {
        match self.coerce(self.attr, value)? {
            Value::Array(mut items) if items.len() == 1 => Ok(items.remove(0)),
            _ => Err(invalid_value(format!(
                "'{}' with a [filter] takes one value (an object), not a list",
                self.name
            ))),
        }
    }
}

/// Whether `wanted`, a value to remove, names `item`, a value of `attr`: it holds all that
/// `wanted` gives ([`contains_all`]). Of a reference (a value with a `$ref`: an agent's owners
/// and applications, an application's agents) with an id (`value`), what the client read
/// back with it need not be kept with it: the `$ref` and `display` Portcullis writes into what
/// it answers, and sub-attributes the stored value lacks (a `type` the IdP did not write).
/// A sub-attribute both give still tells them apart (an application's `owned` agent from the
/// same agent as a `guest`).
fn names(attr: &AttributeDef, item: &Value, wanted: &Value) -> bool {
    let (Some(held), Some(given)) = (item.as_object(), wanted.as_object()) else {
        return contains_all(attr, item, wanted);
    };
    if attr.sub_attribute("$ref").is_none() || get_ci(given, "value").is_none() {
        return contains_all(attr, item, wanted);
    }
    let kept: Object = given
        .iter()
        .filter(|(name, _)| {
            let described = ["$ref", "display"]
                .iter()
                .any(|d| name.eq_ignore_ascii_case(d));
            !described && (name.eq_ignore_ascii_case("value") || get_ci(held, name).is_some())
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    contains_all(attr, item, &Value::Object(kept))
}

/// Whether `item`, a value of `attr`, holds every sub-attribute of `wanted` as a filter's
/// `eq` would find it: a string compared without case unless the sub-attribute is
/// `caseExact` (Entra ID's `Remove` of `Babs@Jensen.org` takes `babs@jensen.org`).
fn contains_all(attr: &AttributeDef, item: &Value, wanted: &Value) -> bool {
    match (item.as_object(), wanted.as_object()) {
        (Some(item), Some(wanted)) => wanted.iter().all(|(k, v)| {
            let Some(held) = get_ci(item, k) else {
                return false;
            };
            let exact = attr.sub_attribute(k).is_none_or(|sub| sub.case_exact);
            match (held.as_str(), v.as_str()) {
                (Some(held), Some(v)) if !exact => {
                    portcullis_policy::fold(held) == portcullis_policy::fold(v)
                }
                _ => held == v,
            }
        }),
        _ => item == wanted,
    }
}

/// Whether `filter` is `eq` terms joined by `and`, all of a value: what a new value can be made
/// from ([`seed_from_filter`]).
fn describes_one_value(filter: &Filter) -> bool {
    match filter {
        Filter::And(l, r) => describes_one_value(l) && describes_one_value(r),
        Filter::Attr(expr) => matches!(
            &expr.op,
            AttrOp::Compare(CompareOp::Eq, value) if !matches!(value, CompValue::Null)
        ),
        _ => false,
    }
}

/// The `sub eq value` terms of an `and` filter, as the fields of a new value.
fn seed_from_filter(filter: &Filter, parent: &AttributeDef) -> Object {
    let mut seed = Object::new();
    let mut stack = vec![filter];
    while let Some(f) = stack.pop() {
        match f {
            Filter::And(l, r) => {
                stack.push(l);
                stack.push(r);
            }
            Filter::Attr(expr) => {
                let AttrOp::Compare(CompareOp::Eq, value) = &expr.op else {
                    continue;
                };
                let Some(sub) = parent.sub_attribute(&expr.path.name) else {
                    continue;
                };
                let json = match value {
                    CompValue::Null => continue,
                    CompValue::Bool(b) => Value::Bool(*b),
                    CompValue::Number(n) => Value::Number(n.clone()),
                    // Stored as the boolean it names (`primary eq "True"`).
                    CompValue::String(s) if sub.ty == AttrType::Boolean => {
                        match crate::eval::string_bool(s) {
                            Some(b) => Value::Bool(b),
                            None => continue,
                        }
                    }
                    CompValue::String(s) => Value::String(s.clone()),
                };
                seed.insert(sub.name.into(), json);
            }
            _ => {}
        }
    }
    seed
}

/// Clears `primary` on every value but `winner` (RFC 7643 §2.4: at most one primary).
fn keep_one_primary(items: &mut [Value], winner: usize) {
    for (i, item) in items.iter_mut().enumerate() {
        if i != winner {
            if let Some(obj) = item.as_object_mut() {
                remove_ci(obj, "primary");
            }
        }
    }
}

fn drop_if_unassigned(container: &mut Object, name: &str) {
    if let Some(key) = key_ci(container, name).cloned() {
        if container.get(&key).is_some_and(is_unassigned) {
            container.remove(&key);
        }
    }
}

/// Lists each extension in `schemas` exactly when the resource holds some of its attributes.
fn sync_extension_schemas(work: &mut Object, rt: ResourceType) {
    for ext in rt.extensions() {
        let has_data = match key_ci(work, ext.id).cloned() {
            Some(key) if work.get(&key).is_some_and(is_unassigned) => {
                work.remove(&key);
                false
            }
            Some(_) => true,
            None => false,
        };
        let schemas = slot_ci(work, "schemas");
        if !schemas.is_array() {
            *schemas = Value::Array(vec![Value::from(rt.core_schema().id)]);
        }
        if let Some(list) = schemas.as_array_mut() {
            let listed = |v: &Value| v.as_str().is_some_and(|s| s.eq_ignore_ascii_case(ext.id));
            match (has_data, list.iter().any(listed)) {
                (true, false) => list.push(Value::from(ext.id)),
                (false, true) => list.retain(|v| !listed(v)),
                _ => {}
            }
        }
    }
}

fn check_required(work: &Object, rt: ResourceType) -> Result<(), ScimError> {
    for attr in rt.core_schema().attributes.iter().filter(|a| a.required) {
        if get_ci(work, attr.name).is_none_or(is_unassigned) {
            return Err(invalid_value(format!(
                "{} is required and cannot be removed",
                attr.name
            )));
        }
    }
    Ok(())
}

/// Membership changes accumulated over the operations of one request.
struct Ledger<'m> {
    is_member: &'m dyn Fn(&str) -> bool,
    added: IdSet,
    removed: IdSet,
    replaced: Option<IdSet>,
}

impl<'m> Ledger<'m> {
    fn new(is_member: &'m dyn Fn(&str) -> bool) -> Self {
        Self {
            is_member,
            added: IdSet::default(),
            removed: IdSet::default(),
            replaced: None,
        }
    }

    fn add(&mut self, id: String) {
        if let Some(all) = &mut self.replaced {
            all.insert(id);
        } else if !self.removed.remove(&id) && !(self.is_member)(&id) {
            self.added.insert(id);
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(all) = &mut self.replaced {
            all.remove(id);
        } else if !self.added.remove(id) && (self.is_member)(id) {
            self.removed.insert(id.to_owned());
        }
    }

    fn replace_all(&mut self, ids: Vec<String>) {
        self.added = IdSet::default();
        self.removed = IdSet::default();
        let mut all = IdSet::default();
        for id in ids {
            all.insert(id);
        }
        self.replaced = Some(all);
    }

    fn apply(
        &mut self,
        kind: OpKind,
        path: &PatchPath,
        value: Option<&Value>,
    ) -> Result<(), ScimError> {
        if path.attr.sub_attr.is_some() {
            return Err(invalid_path(format!(
                "'{path}': member sub-attributes cannot be changed; add or remove members by id"
            )));
        }
        if let Some(filter) = &path.value_filter {
            let ids = member_filter_ids(filter)?;
            return match kind {
                OpKind::Add => Err(invalid_path(
                    "add members with \"path\": \"members\", not a [filter]",
                )),
                OpKind::Remove => {
                    for id in ids {
                        self.remove(&id);
                    }
                    Ok(())
                }
                OpKind::Replace => {
                    let new = member_ids(value)?;
                    for id in &ids {
                        self.remove(id);
                    }
                    for id in new {
                        self.add(id);
                    }
                    Ok(())
                }
            };
        }
        match kind {
            OpKind::Add => member_ids(value)?.into_iter().for_each(|id| self.add(id)),
            OpKind::Replace => self.replace_all(member_ids(value)?),
            // Entra ID: remove with a value list removes only those members.
            OpKind::Remove if value.is_some_and(|v| !v.is_null()) => {
                for id in member_ids(value)? {
                    self.remove(&id);
                }
            }
            OpKind::Remove => self.replace_all(Vec::new()),
        }
        Ok(())
    }

    fn into_changes(self) -> MemberChanges {
        match self.replaced {
            Some(all) => MemberChanges {
                replaced_all: Some(all.into_vec()),
                ..MemberChanges::default()
            },
            None => MemberChanges {
                added: self.added.into_vec(),
                removed: self.removed.into_vec(),
                replaced_all: None,
            },
        }
    }
}

/// The member ids in a `members` value: `[{"value": "id", "display": …, "$ref": null}]`.
fn member_ids(value: Option<&Value>) -> Result<Vec<String>, ScimError> {
    let items: Vec<&Value> = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one) => vec![one],
    };
    let mut ids = Vec::with_capacity(items.len());
    for item in items {
        let id = item
            .as_object()
            .and_then(|o| get_ci(o, "value"))
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                invalid_value("each member must be an object with the member's id as \"value\"")
            })?;
        if let Some(obj) = item.as_object() {
            for key in obj.keys() {
                if !["value", "$ref", "display", "type"]
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(key))
                {
                    return Err(invalid_path(format!(
                        "'members.{key}' is not an attribute of the Group schema"
                    )));
                }
            }
        }
        ids.push(id.to_owned());
    }
    Ok(ids)
}

/// The ids selected by `value eq "a" or value eq "b"`; any other member filter would need the
/// whole member list.
fn member_filter_ids(filter: &Filter) -> Result<Vec<String>, ScimError> {
    let mut ids = Vec::new();
    let mut stack = vec![filter];
    while let Some(f) = stack.pop() {
        match f {
            Filter::Or(l, r) => {
                stack.push(r);
                stack.push(l);
            }
            Filter::Attr(expr)
                if expr.path.name_is("value")
                    && expr.path.schema.is_none()
                    && expr.path.sub_attr.is_none() =>
            {
                match &expr.op {
                    AttrOp::Compare(CompareOp::Eq, CompValue::String(id)) => ids.push(id.clone()),
                    _ => return Err(member_filter_unsupported(filter)),
                }
            }
            _ => return Err(member_filter_unsupported(filter)),
        }
    }
    Ok(ids)
}

fn member_filter_unsupported(filter: &Filter) -> ScimError {
    ScimError::bad_request(
        ScimType::InvalidFilter,
        format!(
            "members[{filter}]: member filters must be value eq \"<id>\" (optionally joined \
             with or), because group member lists are not loaded to apply a PATCH"
        ),
    )
}

/// An insertion-ordered set of ids.
#[derive(Default)]
struct IdSet {
    order: Vec<String>,
    present: HashSet<String>,
}

impl IdSet {
    fn insert(&mut self, id: String) {
        if self.present.insert(id.clone()) {
            self.order.push(id);
        }
    }

    /// Whether it was present. Leaves a stale entry in `order`, skipped by `into_vec`.
    fn remove(&mut self, id: &str) -> bool {
        self.present.remove(id)
    }

    fn into_vec(self) -> Vec<String> {
        let mut present = self.present;
        self.order
            .into_iter()
            .filter(|id| present.remove(id))
            .collect()
    }
}

#[cfg(test)]
mod extension_object_tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_schemas_key_inside_an_extension_object_is_ignored() {
        let urn = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
        let mut user = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": "u1",
            "userName": "a@x",
        });
        let body = json!({
            "schemas": [PATCH_OP_SCHEMA],
            "Operations": [{"op": "add", "path": urn, "value": {"schemas": [urn], "employeeNumber": "42"}}],
        });
        let ops = parse_patch_request(&body).unwrap();
        apply_patch(&mut user, ResourceType::User, &ops, &|_| false).unwrap();
        assert_eq!(user[urn], json!({"employeeNumber": "42"}));
    }

    /// An object of attributes naming one twice, in other letter case, is refused, and
    /// changes nothing: which would win is the order keys are walked in, not as sent.
    #[test]
    fn an_attribute_given_twice_in_other_case_is_refused() {
        let urn = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
        let user = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": "u1",
            "userName": "a@x",
            "active": true,
        });
        let flat = format!("{urn}:department");
        for value in [
            json!({"active": false, "ACTIVE": true}),
            json!({"Active": false, "active": true}),
            json!({urn: {"department": "a", "Department": "b"}}),
            // Other spellings of one attribute, or of one and a part of it.
            json!({"active": false, "urn:ietf:params:scim:schemas:core:2.0:User:active": true}),
            json!({"name.givenName": "dotted", "name": {"givenName": "whole"}}),
            json!({flat.clone(): "flat", urn: {"department": "nested"}}),
            json!({urn: null, flat.to_uppercase(): "X"}),
        ] {
            let body = json!({
                "schemas": [PATCH_OP_SCHEMA],
                "Operations": [{"op": "replace", "value": value}],
            });
            let ops = parse_patch_request(&body).unwrap();
            let mut patched = user.clone();
            let err = apply_patch(&mut patched, ResourceType::User, &ops, &|_| false).unwrap_err();
            assert_eq!(err.status, 400, "{value}");
            assert!(err.detail.contains("given once"), "{}", err.detail);
            // Naming both keys, as sent.
            let named = |object: &Value| {
                let keys = object
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>());
                keys.unwrap_or_default()
            };
            let inner = value
                .get(urn)
                .filter(|v| v.is_object() && value.as_object().is_some_and(|o| o.len() == 1));
            let keys = inner.map_or_else(|| named(&value), named);
            assert!(
                keys.iter().all(|k| err.detail.contains(k.as_str())),
                "{}",
                err.detail
            );
        }
        // Parts of one attribute, and elements named by filters, are each their own.
        for value in [
            json!({"name.givenName": "B", "name.familyName": "J"}),
            json!({"emails[type eq \"work\"].value": "a@x", "emails[type eq \"home\"].value": "b@x"}),
        ] {
            let body = json!({
                "schemas": [PATCH_OP_SCHEMA],
                "Operations": [{"op": "replace", "value": value}],
            });
            let ops = parse_patch_request(&body).unwrap();
            let mut patched = user.clone();
            apply_patch(&mut patched, ResourceType::User, &ops, &|_| false).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::ENTERPRISE_USER_SCHEMA;

    const USER: ResourceType = ResourceType::User;
    const GROUP: ResourceType = ResourceType::Group;

    fn user() -> Value {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": "u-1",
            "userName": "bjensen@example.com",
            "name": {"givenName": "Barbara", "familyName": "Jensen"},
            "active": true,
            "emails": [
                {"value": "bjensen@example.com", "type": "work", "primary": true},
                {"value": "babs@jensen.org", "type": "home"}
            ]
        })
    }

    fn body(ops: Value) -> Value {
        json!({"schemas": [PATCH_OP_SCHEMA], "Operations": ops})
    }

    fn no_members(_: &str) -> bool {
        false
    }

    /// Parses and applies `ops` to `resource`, returning the outcome.
    fn patch(
        resource: &mut Value,
        rt: ResourceType,
        ops: Value,
    ) -> Result<PatchOutcome, ScimError> {
        let ops = parse_patch_request(&body(ops))?;
        apply_patch(resource, rt, &ops, &no_members)
    }

    fn patched_user(ops: Value) -> Value {
        let mut u = user();
        patch(&mut u, USER, ops).unwrap_or_else(|e| panic!("{e}"));
        u
    }

    fn user_error(ops: Value) -> ScimError {
        let mut u = user();
        let err = patch(&mut u, USER, ops).expect_err("should fail");
        assert_eq!(u, user(), "a failed PATCH changes nothing");
        err
    }

    /// A sub-attribute set to null in a complex value is unassigned (RFC 7643 §2.5), as with
    /// a path to it: a merge removes it rather than skip it.
    #[test]
    fn a_null_inside_a_complex_value_unassigns_that_sub_attribute() {
        for ops in [
            json!([{"op": "replace", "path": "name", "value": {"givenName": null}}]),
            json!([{"op": "add", "path": "name", "value": {"GivenName": null}}]),
            json!([{"op": "replace", "value": {"name": {"givenName": null}}}]),
            json!([{"op": "replace", "path": "name.givenName", "value": null}]),
        ] {
            let u = patched_user(ops.clone());
            assert_eq!(u["name"], json!({"familyName": "Jensen"}), "{ops}");
        }
        let u = patched_user(json!([{"op": "add", "value": {"name.givenName": null}}]));
        assert_eq!(u["name"], json!({"familyName": "Jensen"}));
        // An add of null to a multi-valued attribute adds nothing, and removes nothing.
        user_error(json!([{"op": "add", "value": {"emails": null}}]));
        for value in [
            json!({"primary": null, "display": "Work"}),
            json!([{"primary": null, "display": "Work"}]),
        ] {
            let u = patched_user(json!([{"op": "add", "path": "emails[type eq \"work\"]",
                "value": value}]));
            assert_eq!(
                u["emails"][0],
                json!({"value": "bjensen@example.com", "type": "work", "display": "Work"}),
                "{value}"
            );
        }
    }

    /// Each value a remove lists is compared with each value held: the removes of one PATCH
    /// list no more values in all than an attribute may hold.
    #[test]
    fn removes_that_list_more_values_than_an_attribute_holds_are_refused() {
        let listed = |n: usize| -> Vec<Value> { (0..n).map(|i| json!(format!("x{i}"))).collect() };
        let half = MAX_VALUES / 2 + 1;
        let e = user_error(json!([
            {"op": "remove", "path": "emails", "value": listed(half)},
            {"op": "remove", "path": "emails", "value": listed(half)},
        ]));
        assert_eq!((e.status, e.scim_type), (400, Some(ScimType::TooMany)));
        let u = patched_user(json!([
            {"op": "remove", "path": "emails", "value": listed(MAX_VALUES)},
        ]));
        assert_eq!(u["emails"].as_array().map(Vec::len), Some(2), "{u}");
    }

    /// One PATCH asks for at most [`MAX_PATCH_WORK`]: filters of many terms on every value of
    /// a full attribute, adds that look again at all it holds (a value given alone too),
    /// removes by values, or a sub-attribute of every value, are refused before they run,
    /// and change nothing.
    #[test]
    fn a_patch_that_asks_for_too_much_work_is_refused() {
        let full = |u: &mut Value| {
            u["emails"] = (0..MAX_VALUES)
                .map(|i| json!({"value": format!("u{i}@example.com"), "type": "work"}))
                .collect();
        };
        let run = |ops: Value| {
            let mut u = user();
            full(&mut u);
            let before = u.clone();
            let outcome = patch(&mut u, USER, ops);
            if outcome.is_err() {
                assert_eq!(u, before, "a failed PATCH changes nothing");
            }
            outcome
        };
        let terms = (0..20)
            .map(|i| format!("value co \"x{i}\""))
            .collect::<Vec<_>>()
            .join(" or ");
        let filtered = json!({"op": "remove", "path": format!("emails[{terms}]")});
        let e = run(Value::Array(vec![filtered.clone(); 10])).unwrap_err();
        assert_eq!((e.status, e.scim_type), (400, Some(ScimType::TooMany)));
        let again = json!({"op": "add", "path": "emails",
            "value": [{"value": "u0@example.com", "type": "work"}]});
        let e = run(Value::Array(vec![again.clone(); 100])).unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::TooMany));
        for op in [
            // One value alone, not in a list; and without a path.
            json!({"op": "add", "path": "emails",
                "value": {"value": "u0@example.com", "type": "work"}}),
            json!({"op": "add",
                "value": {"emails": [{"value": "u0@example.com", "type": "work"}]}}),
            // A sub-attribute of every value.
            json!({"op": "replace", "path": "emails.type", "value": "home"}),
        ] {
            let e = run(Value::Array(vec![op.clone(); 150])).unwrap_err();
            assert_eq!(e.scim_type, Some(ScimType::TooMany), "{op}");
        }
        let gone: Vec<Value> = (0..200)
            .map(|i| json!({"value": format!("x{i}")}))
            .collect();
        let remove = json!({"op": "remove", "path": "emails", "value": gone});
        let e = run(Value::Array(vec![remove; 4])).unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::TooMany));
        // What IdPs send, many times over, is far from it.
        run(Value::Array(vec![filtered; 4])).unwrap();
        run(Value::Array(vec![again; 90])).unwrap();
        let entra = json!({"op": "Replace", "path": "emails[type eq \"work\"].value",
            "value": "u0@example.com"});
        let mut u = user();
        patch(
            &mut u,
            USER,
            Value::Array(vec![entra; MAX_PATCH_OPERATIONS]),
        )
        .unwrap();
    }

    #[test]
    fn an_add_past_the_most_values_an_attribute_holds_changes_nothing() {
        let emails = |n: usize| -> Vec<Value> {
            (0..n)
                .map(|i| json!({"value": format!("u{i}@example.com")}))
                .collect()
        };
        // bjensen has two emails: up to the bound, what is there already or given twice in the
        // add is not counted again.
        let mut again = emails(MAX_VALUES - 2);
        again.extend(emails(MAX_VALUES - 2));
        again.push(json!({"value": "babs@jensen.org", "type": "home"}));
        let u = patched_user(json!([{"op": "add", "path": "emails", "value": again}]));
        assert_eq!(u["emails"].as_array().map(Vec::len), Some(MAX_VALUES));
        // One more than the bound, by an add: refused as it grows (the store refuses any write
        // past it, a replace's too), and nothing changed.
        let e =
            user_error(json!([{"op": "add", "path": "emails", "value": emails(MAX_VALUES - 1)}]));
        assert_eq!((e.status, e.scim_type), (400, Some(ScimType::InvalidValue)));
        assert!(e.detail.contains("emails"), "{}", e.detail);
    }

    #[test]
    fn okta_deactivates_with_a_pathless_replace() {
        let mut u = user();
        let outcome = patch(
            &mut u,
            USER,
            json!([{"op": "replace", "value": {"active": false}}]),
        );
        assert!(outcome.unwrap().resource_changed);
        assert_eq!(u["active"], json!(false));
    }

    #[test]
    fn entra_capitalised_ops_string_booleans_dotted_and_urn_keys() {
        let u = patched_user(json!([
            {"op": "Replace", "path": "active", "value": "False"},
            {"op": "Replace", "value": {
                "name.givenName": "Babs",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department": "Tour",
                "displayName": "Babs Jensen"
            }},
            {"op": "Add", "value": {
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
                    "employeeNumber": "701984",
                    "manager": {"value": "m-1", "$ref": null}
                }
            }}
        ]));
        assert_eq!(u["active"], json!(false));
        assert_eq!(
            u["name"],
            json!({"givenName": "Babs", "familyName": "Jensen"})
        );
        assert_eq!(u["displayName"], "Babs Jensen");
        assert_eq!(
            u[ENTERPRISE_USER_SCHEMA],
            json!({"department": "Tour", "employeeNumber": "701984", "manager": {"value": "m-1"}})
        );
        assert_eq!(
            u["schemas"],
            json!([
                "urn:ietf:params:scim:schemas:core:2.0:User",
                ENTERPRISE_USER_SCHEMA
            ])
        );
    }

    /// Entra ID's app role assignment (`SingleAppRoleAssignment`) addresses the primary role
    /// with the boolean as a string, beside a deactivation in the same request.
    #[test]
    fn entra_primary_role_path_with_a_string_boolean() {
        let u = patched_user(json!([
            {"op": "Add", "path": "roles[primary eq \"True\"].value", "value": "Admin"},
            {"op": "Replace", "path": "active", "value": "False"}
        ]));
        assert_eq!(u["roles"], json!([{"primary": true, "value": "Admin"}]));
        assert_eq!(u["active"], json!(false));
        // Found again by the same path, whichever way the boolean is written.
        let mut again = u.clone();
        patch(
            &mut again,
            USER,
            json!([{"op": "Replace", "path": "roles[primary eq \"true\"].value", "value": "Reader"}]),
        )
        .unwrap();
        assert_eq!(
            again["roles"],
            json!([{"primary": true, "value": "Reader"}])
        );
        let err = user_error(json!([
            {"op": "Add", "path": "roles[primary eq \"yes\"].value", "value": "Admin"}
        ]));
        assert_eq!(err.status, 400, "{err:?}");
    }

    #[test]
    fn entra_manager_as_a_bare_id_and_extension_removal() {
        let manager = format!("{ENTERPRISE_USER_SCHEMA}:manager");
        let u = patched_user(json!([{"op": "Add", "path": manager, "value": "m-2"}]));
        assert_eq!(
            u[ENTERPRISE_USER_SCHEMA]["manager"],
            json!({"value": "m-2"})
        );
        let mut u = u;
        patch(&mut u, USER, json!([{"op": "Remove", "path": manager}])).unwrap();
        assert_eq!(
            u.get(ENTERPRISE_USER_SCHEMA),
            None,
            "an empty extension goes"
        );
        assert_eq!(
            u["schemas"],
            json!(["urn:ietf:params:scim:schemas:core:2.0:User"])
        );
    }

    /// An agent's owner is removed by the value a client read back, `$ref` and `type` with
    /// its id: they describe the reference, and need not have been written with it.
    #[test]
    fn a_reference_is_removed_by_its_id_whatever_else_the_value_says() {
        use crate::schema::{AGENT_SCHEMA, PORTCULLIS_AGENT_SCHEMA};
        let mut agent = json!({
            "schemas": [AGENT_SCHEMA, PORTCULLIS_AGENT_SCHEMA],
            "id": "a-1",
            "name": "helpdesk",
            PORTCULLIS_AGENT_SCHEMA: {"owners": [{"value": "u1"}, {"value": "u2"}]}
        });
        let read_back = json!({
            "value": "u1",
            "$ref": "https://auth.example/scim/v2/Users/u1",
            "type": "User"
        });
        let path = format!("{PORTCULLIS_AGENT_SCHEMA}:owners");
        let ops = json!([{"op": "remove", "path": path, "value": [read_back]}]);
        patch(&mut agent, ResourceType::Agent, ops).unwrap();
        assert_eq!(
            agent[PORTCULLIS_AGENT_SCHEMA]["owners"],
            json!([{"value": "u2"}])
        );
        // A sub-attribute the stored value has still counts: an application's agent as a
        // `guest` is not the same agent `owned`.
        let mut application = json!({
            "schemas": [crate::schema::AGENTIC_APPLICATION_SCHEMA],
            "id": "app-1",
            "name": "helpdesk",
            "agents": [{"value": "a1", "type": "owned"}, {"value": "a1", "type": "guest"}]
        });
        let guest = json!({"value": "a1", "type": "guest", "$ref": "https://a/scim/v2/Agents/a1"});
        let ops = json!([{"op": "remove", "path": "agents", "value": [guest]}]);
        patch(&mut application, ResourceType::AgenticApplication, ops).unwrap();
        assert_eq!(
            application["agents"],
            json!([{"value": "a1", "type": "owned"}])
        );
        // Another id names no owner, whatever else it says.
        let other = json!({"value": "U2", "$ref": "https://auth.example/scim/v2/Users/u2"});
        let ops = json!([{"op": "remove", "path": path, "value": [other]}]);
        patch(&mut agent, ResourceType::Agent, ops).unwrap();
        assert_eq!(
            agent[PORTCULLIS_AGENT_SCHEMA]["owners"],
            json!([{"value": "u2"}])
        );
    }

    #[test]
    fn filtered_paths() {
        // Change the work email's value.
        let u = patched_user(json!([
            {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "b@x.com"}
        ]));
        assert_eq!(
            u["emails"][0],
            json!({"value": "b@x.com", "type": "work", "primary": true})
        );
        // Remove the home email.
        let u = patched_user(json!([{"op": "remove", "path": "emails[type eq \"home\"]"}]));
        assert_eq!(u["emails"].as_array().unwrap().len(), 1);
        // Remove a sub-attribute of the matching values only.
        let u = patched_user(json!([{"op": "remove", "path": "emails[type eq \"work\"].primary"}]));
        assert_eq!(
            u["emails"][0],
            json!({"value": "bjensen@example.com", "type": "work"})
        );
        // Replace a whole matching value.
        let u = patched_user(json!([{
            "op": "replace", "path": "emails[value eq \"BABS@jensen.org\"]",
            "value": {"value": "b@home", "type": "home"}
        }]));
        assert_eq!(u["emails"][1], json!({"value": "b@home", "type": "home"}));
        // A filter matching nothing removes nothing, and succeeds.
        let u = patched_user(json!([{"op": "remove", "path": "emails[type eq \"other\"]"}]));
        assert_eq!(u, user());
    }

    #[test]
    fn entra_filtered_replace_on_a_missing_value_adds_it() {
        let u = patched_user(json!([
            {"op": "Replace", "path": "phoneNumbers[type eq \"mobile\"].value", "value": "+1 555"},
            {"op": "Add", "path": "addresses[type eq \"work\"].locality", "value": "Paris"}
        ]));
        assert_eq!(
            u["phoneNumbers"],
            json!([{"type": "mobile", "value": "+1 555"}])
        );
        assert_eq!(
            u["addresses"],
            json!([{"type": "work", "locality": "Paris"}])
        );
        // A filter that matches nothing and describes no one value (`or`, `co`, `ne`): RFC
        // 7644 §3.5.2.3's noTarget, and nothing added.
        for filter in [
            r#"emails[type eq "other" or type eq "pager"].value"#,
            r#"emails[value co "@old"].value"#,
            r#"emails[type ne "work" and type ne "home"].value"#,
        ] {
            let err = user_error(json!([{"op": "replace", "path": filter, "value": "n@x"}]));
            assert_eq!(err.scim_type, Some(ScimType::NoTarget), "{filter}");
        }
    }

    #[test]
    fn primary_true_on_one_value_clears_the_others() {
        let u = patched_user(json!([
            {"op": "add", "path": "emails", "value": [{"value": "new@x", "primary": "True"}]}
        ]));
        let emails = u["emails"].as_array().unwrap();
        assert_eq!(emails.len(), 3);
        assert_eq!(
            emails[0],
            json!({"value": "bjensen@example.com", "type": "work"})
        );
        assert_eq!(emails[2], json!({"value": "new@x", "primary": true}));
        let u = patched_user(json!([
            {"op": "replace", "path": "emails[type eq \"home\"].primary", "value": true}
        ]));
        assert_eq!(u["emails"][0].get("primary"), None);
        assert_eq!(u["emails"][1]["primary"], json!(true));
        let err = user_error(json!([{"op": "add", "path": "emails", "value": [
            {"value": "a@x", "primary": true}, {"value": "b@x", "primary": true}
        ]}]));
        assert_eq!(err.scim_type, Some(ScimType::InvalidValue));
    }

    #[test]
    fn add_and_replace_without_filters() {
        // Adding an existing value does not duplicate it.
        let u = patched_user(json!([{"op": "add", "path": "emails",
            "value": [{"value": "babs@jensen.org", "type": "home"}]}]));
        assert_eq!(u["emails"].as_array().unwrap().len(), 2);
        // Replace of a multi-valued attribute replaces all values.
        let u = patched_user(
            json!([{"op": "replace", "path": "emails", "value": [{"value": "only@x"}]}]),
        );
        assert_eq!(u["emails"], json!([{"value": "only@x"}]));
        // Replace of a complex attribute merges its sub-attributes (RFC 7644 §3.5.2.3).
        let u =
            patched_user(json!([{"op": "replace", "path": "name", "value": {"familyName": "J"}}]));
        assert_eq!(
            u["name"],
            json!({"givenName": "Barbara", "familyName": "J"})
        );
        let u = patched_user(json!([{"op": "add", "path": "title", "value": "Boss"},
            {"op": "replace", "path": "NAME.GIVENNAME", "value": "B"}]));
        assert_eq!(u["title"], "Boss");
        assert_eq!(u["name"]["givenName"], "B");
        // Replace with null and remove unassign.
        let u = patched_user(
            json!([{"op": "replace", "path": "name.givenName", "value": null},
            {"op": "remove", "path": "emails"}]),
        );
        assert_eq!(u["name"], json!({"familyName": "Jensen"}));
        assert_eq!(u.get("emails"), None);
        // Remove with a value list removes only the values given (Entra's form), compared as
        // a filter compares them (an email's `value` without case).
        let u = patched_user(
            json!([{"op": "Remove", "path": "emails", "value": [{"value": "Babs@Jensen.org"}]}]),
        );
        assert_eq!(u["emails"].as_array().unwrap().len(), 1);
        assert_eq!(u["emails"][0]["value"], "bjensen@example.com");
        // One that names nothing kept (a null, nothing; an agent's read-only `display`, see
        // `service`) would select every value: refused, and nothing removed.
        for selects_all in [json!([{"value": null}]), json!([{}])] {
            let e = user_error(json!([{"op": "remove", "path": "emails", "value": selects_all}]));
            assert_eq!((e.status, e.scim_type), (400, Some(ScimType::InvalidValue)));
        }
        // Every one of several values made primary: refused. Of one value, it is that one.
        for primary in [json!(true), json!("True")] {
            let e =
                user_error(json!([{"op": "replace", "path": "emails.primary", "value": primary}]));
            assert_eq!((e.status, e.scim_type), (400, Some(ScimType::InvalidValue)));
        }
        // So is a filter matching several, made primary at once.
        let mut two_work = user();
        two_work["emails"][1]["type"] = json!("work");
        let before = two_work.clone();
        let ops =
            json!([{"op": "replace", "path": "emails[type eq \"work\"].primary", "value": true}]);
        let e = patch(&mut two_work, USER, ops).expect_err("refused");
        assert_eq!(e.scim_type, Some(ScimType::InvalidValue));
        assert_eq!(two_work, before, "a failed PATCH changes nothing");
        let u = patched_user(json!([{"op": "replace", "path": "emails.primary", "value": false}]));
        assert!(u["emails"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["primary"] == false));
        // A password is accepted (the service takes it out to hash it before the patch; the
        // store drops one left in a resource).
        let u = patched_user(json!([{"op": "replace", "value": {"password": "hunter2"}}]));
        assert_eq!(u["password"], "hunter2");
        // Not under a name with spaces around it, which the service would not take out.
        for key in [
            " password",
            "password\t",
            " urn:ietf:params:scim:schemas:core:2.0:User:password",
        ] {
            let e = user_error(json!([{"op": "replace", "value": {key: "hunter2"}}]));
            assert_eq!(e.scim_type, Some(ScimType::InvalidPath), "{key:?}");
        }
    }

    #[test]
    fn read_only_attributes() {
        let mut u = user();
        let outcome = patch(
            &mut u,
            USER,
            json!([{"op": "replace", "value": {
                "id": "u-1", "meta": {"lastModified": "2000-01-01T00:00:00Z"}, "userName": "b@x"
            }}]),
        );
        assert!(
            outcome.is_ok(),
            "own id and an echoed meta are ignored: {outcome:?}"
        );
        assert_eq!(u["id"], "u-1");
        assert_eq!(u.get("meta"), None);
        let err = user_error(json!([{"op": "replace", "value": {"id": "other"}}]));
        assert_eq!(err.scim_type, Some(ScimType::Mutability));
        let err = user_error(json!([{"op": "replace", "path": "id", "value": "other"}]));
        assert_eq!(err.scim_type, Some(ScimType::Mutability));
        let err = user_error(json!([{"op": "replace", "path": "meta.lastModified",
            "value": "2000-01-01T00:00:00Z"}]));
        assert_eq!(err.scim_type, Some(ScimType::Mutability));
        let err = user_error(json!([{"op": "add", "path": "groups", "value": [{"value": "g"}]}]));
        assert_eq!(err.scim_type, Some(ScimType::Mutability));
    }

    #[test]
    fn unknown_attributes_and_bad_values_are_rejected() {
        let cases = [
            (
                json!([{"op": "replace", "value": {"nickname2": "x"}}]),
                ScimType::InvalidPath,
                "nickname2",
            ),
            (
                json!([{"op": "replace", "path": "name.middle", "value": "x"}]),
                ScimType::InvalidPath,
                "name.middle",
            ),
            (
                json!([{"op": "add", "path": "emails", "value": [{"value": "a@x", "kind": "w"}]}]),
                ScimType::InvalidPath,
                "emails.kind",
            ),
            (
                json!([{"op": "replace", "value": {"department": "x"}}]),
                ScimType::InvalidPath,
                "department",
            ),
            (
                json!([{"op": "replace", "path": "active", "value": "maybe"}]),
                ScimType::InvalidValue,
                "boolean",
            ),
            (
                json!([{"op": "replace", "path": "userName", "value": 5}]),
                ScimType::InvalidValue,
                "string",
            ),
            (
                json!([{"op": "replace", "value": "active"}]),
                ScimType::InvalidValue,
                "object",
            ),
            (json!([{"op": "remove"}]), ScimType::NoTarget, "path"),
            (
                json!([{"op": "remove", "path": "userName"}]),
                ScimType::InvalidValue,
                "required",
            ),
            (
                json!([{"op": "replace", "path": "emails[kind eq \"w\"].value", "value": "x"}]),
                ScimType::InvalidFilter,
                "kind",
            ),
            (
                json!([{"op": "replace", "path": "title[value eq \"x\"]", "value": "x"}]),
                ScimType::InvalidPath,
                "multi-valued",
            ),
        ];
        for (ops, scim_type, detail) in cases {
            let err = user_error(ops.clone());
            assert_eq!(err.scim_type, Some(scim_type), "{ops}: {err}");
            assert!(err.detail.contains(detail), "{ops}: {err}");
            // The required check runs once all operations are applied.
            let whole_request = detail == "required";
            assert!(
                whole_request || err.detail.starts_with("Operations[0]: "),
                "{err}"
            );
        }
    }

    #[test]
    fn the_request_is_atomic() {
        let err = user_error(json!([
            {"op": "replace", "path": "active", "value": false},
            {"op": "replace", "path": "bogus", "value": 1}
        ]));
        assert!(err.detail.starts_with("Operations[1]: "), "{err}");
    }

    #[test]
    fn parses_the_request_body_strictly() {
        let err = parse_patch_request(
            &json!({"Operations": [{"op": "add", "path": "title", "value": "x"}]}),
        );
        assert_eq!(err.unwrap_err().scim_type, Some(ScimType::InvalidSyntax));
        let bad_ops = [
            json!([]),
            json!([{"op": "upsert", "path": "title", "value": "x"}]),
            json!([{"path": "title", "value": "x"}]),
            json!([{"op": "add", "path": "title"}]),
            json!([{"op": "replace", "path": "title"}]),
            json!([{"op": "add", "path": 5, "value": "x"}]),
            json!(["add"]),
        ];
        for ops in bad_ops {
            let err = parse_patch_request(&body(ops.clone())).expect_err(&ops.to_string());
            assert_eq!(err.scim_type, Some(ScimType::InvalidSyntax), "{ops}: {err}");
        }
        let err = parse_patch_request(&body(json!([{"op": "remove", "path": "members[value eq"}])));
        assert_eq!(err.unwrap_err().scim_type, Some(ScimType::InvalidPath));
        let many = vec![json!({"op": "remove", "path": "title"}); MAX_PATCH_OPERATIONS + 1];
        let err = parse_patch_request(&body(Value::Array(many))).unwrap_err();
        assert_eq!(err.scim_type, Some(ScimType::TooMany));
        let ops = parse_patch_request(&json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [
                {"op": "Add", "path": "members", "value": [{"value": "u"}]},
                {"op": "REMOVE", "path": ""},
                {"op": "replace", "value": null}
            ]
        }))
        .unwrap();
        assert_eq!(ops[0].op, OpKind::Add);
        assert_eq!(ops[0].path, Some(PatchPath::parse("members").unwrap()));
        assert_eq!(ops[1].op, OpKind::Remove);
        assert_eq!(ops[1].path, None);
        assert_eq!(ops[2].value, Some(Value::Null));
    }

    // --- Groups: the member list is not in the resource.

    fn group() -> Value {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "id": "g-1",
            "displayName": "Eng"
        })
    }

    /// Applies `ops` to a group whose current members are `members`.
    fn patch_group(members: &[&str], ops: Value) -> Result<(Value, PatchOutcome), ScimError> {
        let mut g = group();
        let ops = parse_patch_request(&body(ops))?;
        let is_member = |id: &str| members.contains(&id);
        let outcome = apply_patch(&mut g, GROUP, &ops, &is_member)?;
        Ok((g, outcome))
    }

    fn changes(members: &[&str], ops: Value) -> MemberChanges {
        let (g, outcome) = patch_group(members, ops).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.get("members"), None, "members never enter the resource");
        outcome.member_changes
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn okta_membership_updates() {
        let c = changes(
            &["u1", "u2"],
            json!([
                {"op": "remove", "path": "members[value eq \"u1\"]"},
                {"op": "add", "path": "members", "value": [
                    {"value": "u3", "display": "c@x"}, {"value": "u2", "display": "b@x"}
                ]}
            ]),
        );
        assert_eq!(
            c,
            MemberChanges {
                added: ids(&["u3"]),
                removed: ids(&["u1"]),
                replaced_all: None
            }
        );
        // Removing someone who is not a member is a successful no-op (retries).
        let c = changes(
            &["u1"],
            json!([{"op": "remove", "path": "members[value eq \"zz\"]"}]),
        );
        assert!(c.is_empty());
        // Full replace.
        let c = changes(
            &["u1"],
            json!([{"op": "replace", "path": "members",
            "value": [{"value": "u7"}, {"value": "u8"}, {"value": "u7"}]}]),
        );
        assert_eq!(c.replaced_all, Some(ids(&["u7", "u8"])));
        assert!(c.added.is_empty() && c.removed.is_empty());
    }

    #[test]
    fn okta_group_rename_carries_its_own_id() {
        let (g, outcome) = patch_group(
            &[],
            json!([{"op": "replace",
            "value": {"id": "g-1", "displayName": "Engineering"}}]),
        )
        .unwrap();
        assert_eq!(g["displayName"], "Engineering");
        assert!(outcome.resource_changed);
        assert!(outcome.member_changes.is_empty());
        let err = patch_group(&[], json!([{"op": "replace", "value": {"id": "g-2"}}])).unwrap_err();
        assert_eq!(err.scim_type, Some(ScimType::Mutability));
    }

    #[test]
    fn entra_membership_updates() {
        let c = changes(
            &["u1", "u2"],
            json!([
                {"op": "Remove", "path": "members", "value": [{"value": "u1"}, {"value": "u9"}]},
                {"op": "Add", "path": "members", "value": [{"value": "u5", "$ref": null}]}
            ]),
        );
        assert_eq!(
            c,
            MemberChanges {
                added: ids(&["u5"]),
                removed: ids(&["u1"]),
                replaced_all: None
            }
        );
        // Ops within one request see each other.
        let c = changes(
            &["u1"],
            json!([
                {"op": "Add", "path": "members", "value": [{"value": "u4"}]},
                {"op": "Remove", "path": "members", "value": [{"value": "u4"}, {"value": "u1"}]},
                {"op": "Add", "path": "members", "value": [{"value": "u1"}]}
            ]),
        );
        assert!(c.is_empty(), "{c:?}");
        let c = changes(
            &["u1"],
            json!([
                {"op": "replace", "path": "members", "value": [{"value": "u2"}]},
                {"op": "add", "path": "members", "value": [{"value": "u3"}]},
                {"op": "remove", "path": "members[value eq \"u2\"]"}
            ]),
        );
        assert_eq!(c.replaced_all, Some(ids(&["u3"])));
        // Remove without a value empties the group; a path-less add carries members too.
        let c = changes(&["u1"], json!([{"op": "remove", "path": "members"}]));
        assert_eq!(c.replaced_all, Some(vec![]));
        let c = changes(
            &[],
            json!([{"op": "add", "value": {"members": [{"value": "u1"}]}}]),
        );
        assert_eq!(c.added, ids(&["u1"]));
        let c = changes(
            &["u1", "u2"],
            json!([{"op": "remove",
            "path": "members[value eq \"u1\" or value eq \"u2\"]"}]),
        );
        assert_eq!(c.removed, ids(&["u1", "u2"]));
    }

    #[test]
    fn member_limits_are_clear_errors() {
        let cases = [
            (
                json!([{"op": "remove", "path": "members[display eq \"x\"]"}]),
                ScimType::InvalidFilter,
            ),
            (
                json!([{"op": "remove", "path": "members[value co \"x\"]"}]),
                ScimType::InvalidFilter,
            ),
            (
                json!([{"op": "replace", "path": "members[value eq \"x\"].display", "value": "y"}]),
                ScimType::InvalidPath,
            ),
            (
                json!([{"op": "add", "path": "members", "value": [{"id": "u1"}]}]),
                ScimType::InvalidValue,
            ),
            (
                json!([{"op": "add", "path": "members", "value": [{"value": "u1", "x": 1}]}]),
                ScimType::InvalidPath,
            ),
            (
                json!([{"op": "remove", "path": "displayName"}]),
                ScimType::InvalidValue,
            ),
        ];
        for (ops, scim_type) in cases {
            let err = patch_group(&[], ops.clone()).expect_err(&ops.to_string());
            assert_eq!(err.scim_type, Some(scim_type), "{ops}: {err}");
        }
    }
}

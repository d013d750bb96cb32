//! Checking a POST or PUT body against the schema (RFC 7643, RFC 7644 §3.3 and §3.5.1) and
//! returning it in canonical form for the store.
//!
//! What comes back: attribute names spelled as in the schema, string booleans turned into
//! booleans, `null`s dropped (they mean "unassigned"), read-only attributes (`id`, `meta`,
//! `groups`, `manager.displayName`, `members.display`) removed because RFC 7644 says clients'
//! values for them "SHALL be ignored", and `schemas` listing the core schema plus the
//! extensions that hold data. `password` is kept: the store hashes it.
//!
//! An attribute the schema does not have is `400 invalidSyntax` naming it, never dropped.
//! For a Group the result still holds `members`; take it out with [`take_member_ids`] so the
//! member list is stored apart from the group (see [`crate::patch`]).

use serde_json::Value;

use crate::error::{ScimError, ScimType};
use crate::filter::AttrPath;
use crate::schema::{resolve_path, ResourceType};
use crate::value::{coerce, get_ci, is_unassigned, slot_ci, Object};

/// Which request the body comes from.
///
/// Both modes check the same things but one: RFC 7644 asks the server to ignore read-only
/// values in both a POST and a PUT, and neither schema has a top-level immutable attribute
/// (which a PUT could not change). A PUT may not remove a user's password (`null`), which
/// a POST has none of to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Create,
    Replace,
}

/// Most values one multi-valued attribute of a resource may hold (`emails`, `roles`, …; not a
/// Group's `members`, which are stored apart). An IdP sends a few; without a bound, one user's
/// list could grow to what a body holds, and be indexed, compared and rewritten with each of
/// their writes. Far above what an IdP holds for one person, so that no write of real data
/// (a deactivation least of all) is refused for it.
pub const MAX_VALUES: usize = 1000;

/// Every multi-valued attribute of `resource`, its extensions' included, holds at most
/// [`MAX_VALUES`] values, or no more than it held in `before` (the stored resource a write
/// replaces: one stored before the bound may keep what it has, and be deactivated): else `400
/// invalidValue` naming the first that holds more.
pub fn check_value_counts(
    rt: ResourceType,
    resource: &Value,
    before: Option<&Value>,
) -> Result<(), ScimError> {
    for (name, count) in value_counts(rt, resource) {
        let held = || {
            before
                .into_iter()
                .flat_map(|b| value_counts(rt, b))
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map_or(0, |(_, c)| c)
        };
        if count > MAX_VALUES && count > held() {
            return Err(too_many_values(name));
        }
    }
    Ok(())
}

/// Each multi-valued attribute of `resource` (its extensions' included) and how many values it
/// holds; not a Group's `members`, stored apart.
fn value_counts(rt: ResourceType, resource: &Value) -> impl Iterator<Item = (&str, usize)> {
    let core = resource.as_object();
    let extensions = rt
        .extensions()
        .iter()
        .filter_map(move |ext| get_ci(core?, ext.id)?.as_object());
    core.into_iter()
        .chain(extensions)
        .flatten()
        .filter_map(move |(name, value)| {
            let stored_apart = rt == ResourceType::Group && name.eq_ignore_ascii_case("members");
            let listed = value
                .as_array()
                .filter(|_| !stored_apart && name != "schemas")?;
            Some((name.as_str(), listed.len()))
        })
}

pub(crate) fn too_many_values(name: &str) -> ScimError {
    ScimError::bad_request(
        ScimType::InvalidValue,
        format!("{name} holds more than {MAX_VALUES} values, the most one attribute may hold"),
    )
}

fn syntax(detail: impl Into<String>) -> ScimError {
    ScimError::bad_request(ScimType::InvalidSyntax, detail)
}

/// A password that is not a string (or is `null`): refused, never dropped, as a request
/// answered as done with the password unchanged would be.
pub(crate) fn password_not_a_string() -> ScimError {
    ScimError::bad_request(
        ScimType::InvalidValue,
        "password can only be set to a string; it cannot be removed",
    )
}

/// Validates a POST (`Mode::Create`) or PUT (`Mode::Replace`) body for `rt`.
pub fn validate_resource(rt: ResourceType, body: &Value, mode: Mode) -> Result<Value, ScimError> {
    let body = body
        .as_object()
        .ok_or_else(|| syntax(format!("a {} must be a JSON object", rt.name())))?;
    check_schemas(rt, body)?;
    let mut out = Object::new();
    for (key, value) in body {
        if key.eq_ignore_ascii_case("schemas") {
            continue;
        }
        if value.is_null() {
            // Null is unassigned (RFC 7643 §2.5): a Group's `"members": null` (however spelled)
            // empties it, as a PATCH that replaces members with null does. Dropped, it would
            // read as "leave them" and keep everyone the client meant to remove.
            let path = top_level_path(key).ok();
            let resolved = path.as_ref().and_then(|path| resolve_path(rt, path));
            if let (Some(path), Some(resolved)) = (&path, resolved) {
                if rt == ResourceType::Group && resolved.attr.name == "members" {
                    put(rt, &mut out, path, key, &Value::Array(Vec::new()))?;
                }
                // A PUT that would remove the password is refused, as a PATCH that would is:
                // dropped, it would be answered as done with the password kept.
                if mode == Mode::Replace
                    && resolved.sub.is_none()
                    && resolved.attr.name == "password"
                    && resolved.schema.id == rt.core_schema().id
                {
                    return Err(password_not_a_string());
                }
            }
            continue;
        }
        if let Some(ext) = rt.extension(key) {
            let attrs = value
                .as_object()
                .ok_or_else(|| syntax(format!("{} must be an object", ext.id)))?;
            for (name, value) in attrs {
                let path = AttrPath {
                    schema: Some(ext.id.to_owned()),
                    name: name.clone(),
                    sub_attr: None,
                };
                put(rt, &mut out, &path, name, value)?;
            }
            continue;
        }
        let path = top_level_path(key)?;
        put(rt, &mut out, &path, key, value)?;
    }
    for attr in rt.core_schema().attributes.iter().filter(|a| a.required) {
        if get_ci(&out, attr.name).is_none_or(is_unassigned) {
            return Err(ScimError::bad_request(
                ScimType::InvalidValue,
                format!("{} is required", attr.name),
            ));
        }
    }
    let mut schemas = vec![Value::from(rt.core_schema().id)];
    for ext in rt.extensions() {
        if out.contains_key(ext.id) {
            schemas.push(Value::from(ext.id));
        }
    }
    out.insert("schemas".into(), Value::Array(schemas));
    Ok(Value::Object(out))
}

/// A body key as an attribute path: `userName` or `urn:…:core:2.0:User:userName`, never
/// dotted (dotted names belong to PATCH).
fn top_level_path(key: &str) -> Result<AttrPath, ScimError> {
    let unknown = || syntax(format!("'{key}' is not an attribute name"));
    let path = crate::path::PatchPath::parse(key).map_err(|_| unknown())?;
    if path.value_filter.is_some() || path.attr.sub_attr.is_some() {
        return Err(unknown());
    }
    Ok(path.attr)
}

/// `schemas` must be present, name the core schema, and name nothing this type does not know
/// (an extension, or a marker an IdP adds: [`ResourceType::is_marker`]).
fn check_schemas(rt: ResourceType, body: &Object) -> Result<(), ScimError> {
    let core = rt.core_schema().id;
    let schemas = get_ci(body, "schemas")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            syntax(format!(
                "\"schemas\" must be an array containing \"{core}\""
            ))
        })?;
    let mut has_core = false;
    for schema in schemas {
        let urn = schema
            .as_str()
            .ok_or_else(|| syntax("\"schemas\" must hold strings"))?;
        if urn.eq_ignore_ascii_case(core) {
            has_core = true;
        } else if rt.extension(urn).is_none() && !rt.is_marker(urn) {
            return Err(syntax(format!(
                "schema \"{urn}\" is not supported for a {}",
                rt.name()
            )));
        }
    }
    if !has_core {
        return Err(syntax(format!("\"schemas\" must contain \"{core}\"")));
    }
    Ok(())
}

/// Checks one attribute and writes it, canonical, under its schema's object in `out`.
fn put(
    rt: ResourceType,
    out: &mut Object,
    path: &AttrPath,
    written: &str,
    value: &Value,
) -> Result<(), ScimError> {
    let resolved = resolve_path(rt, path).ok_or_else(|| {
        syntax(format!(
            "'{written}' is not an attribute of the {} schema{}",
            rt.name(),
            if path.schema.is_some() {
                ""
            } else {
                " (extension attributes need their schema URN)"
            }
        ))
    })?;
    if resolved.attr.is_read_only() || value.is_null() {
        return Ok(());
    }
    let value = coerce(
        resolved.attr,
        value,
        resolved.attr.name,
        ScimType::InvalidSyntax,
    )?;
    let container = if resolved.schema.is_extension {
        let slot = slot_ci(out, resolved.schema.id);
        if !slot.is_object() {
            *slot = Value::Object(Object::new());
        }
        match slot.as_object_mut() {
            Some(obj) => obj,
            None => return Ok(()),
        }
    } else {
        out
    };
    if container.contains_key(resolved.attr.name) {
        return Err(syntax(format!(
            "'{}' is given twice (attribute names are case-insensitive)",
            resolved.attr.name
        )));
    }
    container.insert(resolved.attr.name.into(), value);
    Ok(())
}

/// Takes a Group's `members` out of a validated value, as ids in order without duplicates;
/// `None` when the value has no `members` at all (which a PUT reads as "leave them").
///
/// A member without an id is `400 invalidValue`, as in a PATCH: dropping it would store a
/// group short of a member the client named, or empty a group that a PUT replaces.
pub fn take_member_ids(group: &mut Value) -> Result<Option<Vec<String>>, ScimError> {
    let Some(members) = group.as_object_mut().and_then(|g| g.remove("members")) else {
        return Ok(None);
    };
    let no_id = || {
        ScimError::bad_request(
            ScimType::InvalidValue,
            "each member must have its id as \"value\"",
        )
    };
    let Value::Array(members) = members else {
        return Err(no_id());
    };
    let mut seen = std::collections::HashSet::new();
    let mut ids = Vec::with_capacity(members.len());
    for member in &members {
        let id = member
            .get("value")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(no_id)?;
        if seen.insert(id) {
            ids.push(id.to_owned());
        }
    }
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::{ENTERPRISE_USER_SCHEMA, ENTRA_GROUP_MARKER, GROUP_SCHEMA, USER_SCHEMA};

    fn ok(rt: ResourceType, body: Value) -> Value {
        validate_resource(rt, &body, Mode::Create).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(rt: ResourceType, body: Value) -> ScimError {
        validate_resource(rt, &body, Mode::Replace).expect_err(&body.to_string())
    }

    #[test]
    fn a_multi_valued_attribute_holds_at_most_the_most_values_or_what_it_held() {
        let values = |n: usize| -> Vec<Value> {
            (0..n)
                .map(|i| json!({"value": format!("u{i}@example.com")}))
                .collect()
        };
        let user = |n| json!({"schemas": [USER_SCHEMA], "userName": "a", "emails": values(n)});
        let check = |n, before: Option<usize>| {
            let before = before.map(user);
            check_value_counts(ResourceType::User, &user(n), before.as_ref())
        };
        check(MAX_VALUES, None).unwrap();
        let e = check(MAX_VALUES + 1, None).unwrap_err();
        assert_eq!((e.status, e.scim_type), (400, Some(ScimType::InvalidValue)));
        assert!(e.detail.contains("emails"), "{}", e.detail);
        assert!(check(MAX_VALUES + 1, Some(MAX_VALUES)).is_err());
        // A resource stored with more, before the bound: kept as it is, or with fewer (so that
        // it can still be deactivated), never more.
        check(MAX_VALUES + 5, Some(MAX_VALUES + 5)).unwrap();
        check(MAX_VALUES + 2, Some(MAX_VALUES + 5)).unwrap();
        assert!(check(MAX_VALUES + 6, Some(MAX_VALUES + 5)).is_err());
        // A group's members are stored apart, one row each: not bounded here.
        let group = json!({"schemas": [GROUP_SCHEMA], "displayName": "g", "members": values(MAX_VALUES + 1)});
        check_value_counts(ResourceType::Group, &group, None).unwrap();
    }

    #[test]
    fn okta_create_user() {
        let user = ok(
            ResourceType::User,
            json!({
                "schemas": [USER_SCHEMA],
                "userName": "isabella@example.com",
                "name": {"givenName": "Isabella", "familyName": "Moore"},
                "emails": [{"primary": true, "value": "isabella@example.com", "type": "work"}],
                "displayName": "Isabella Moore",
                "locale": "en-US",
                "externalId": "00u1dhhb1fkIGP7RL1d8",
                "groups": [],
                "password": "1mz050nq",
                "active": true
            }),
        );
        assert_eq!(user["schemas"], json!([USER_SCHEMA]));
        assert_eq!(user["password"], "1mz050nq", "kept for the store to hash");
        assert_eq!(user.get("groups"), None, "read-only, ignored");
        assert_eq!(user["emails"][0]["primary"], json!(true));
    }

    #[test]
    fn entra_create_user_with_string_booleans_and_extension() {
        let user = ok(
            ResourceType::User,
            json!({
                "schemas": [USER_SCHEMA, ENTERPRISE_USER_SCHEMA],
                "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
                "UserName": "Test_User_00aa00aa@contoso.com",
                "active": "True",
                "displayName": "BobIsAmazing",
                "meta": {"resourceType": "User"},
                "id": "client-chosen",
                "name": {"formatted": "Ryan Leenay", "familyName": "Leenay", "givenName": "Ryan"},
                "emails": [{"Primary": "true", "type": "work", "value": "x@contoso.com"}],
                ENTERPRISE_USER_SCHEMA: {"department": "Eng", "manager": {"value": "m-1", "displayName": "Boss"}},
                "title": null
            }),
        );
        assert_eq!(user["userName"], "Test_User_00aa00aa@contoso.com");
        assert_eq!(user["active"], json!(true));
        assert_eq!(user["emails"][0]["primary"], json!(true));
        assert_eq!(user.get("id"), None);
        assert_eq!(user.get("meta"), None);
        assert_eq!(user.get("title"), None);
        assert_eq!(
            user[ENTERPRISE_USER_SCHEMA],
            json!({"department": "Eng", "manager": {"value": "m-1"}})
        );
        assert_eq!(
            user["schemas"],
            json!([USER_SCHEMA, ENTERPRISE_USER_SCHEMA])
        );
    }

    #[test]
    fn groups_keep_members_until_taken() {
        let mut group = ok(
            ResourceType::Group,
            json!({
                "schemas": [GROUP_SCHEMA],
                "displayName": "Eng",
                "members": [{"value": "u1", "display": "a"}, {"value": "u2", "$ref": null}, {"value": "u1"}]
            }),
        );
        assert_eq!(group["members"][0], json!({"value": "u1"}));
        assert_eq!(take_member_ids(&mut group).unwrap().unwrap(), ["u1", "u2"]);
        assert_eq!(group.get("members"), None);
        // `"members": null` is none, not "leave them" (what a PUT without `members` means),
        // however spelled; beside a list of members, it is the attribute given twice.
        for key in [
            "Members",
            "urn:ietf:params:scim:schemas:core:2.0:Group:members",
        ] {
            let mut group = ok(
                ResourceType::Group,
                json!({"schemas": [GROUP_SCHEMA], "displayName": "Eng", key: null}),
            );
            assert_eq!(
                take_member_ids(&mut group).unwrap(),
                Some(Vec::new()),
                "{key}"
            );
        }
        for body in [
            r#"{"members": [{"value": "u1"}], "Members": null}"#,
            r#"{"Members": null, "members": [{"value": "u1"}]}"#,
        ] {
            let mut body: Value = serde_json::from_str(body).unwrap();
            body["schemas"] = json!([GROUP_SCHEMA]);
            body["displayName"] = json!("Eng");
            let err = validate_resource(ResourceType::Group, &body, Mode::Replace).unwrap_err();
            assert!(err.detail.contains("given twice"), "{}", err.detail);
        }
        let mut group = ok(
            ResourceType::Group,
            json!({"schemas": [GROUP_SCHEMA], "displayName": "Eng"}),
        );
        assert_eq!(take_member_ids(&mut group).unwrap(), None);
    }

    #[test]
    fn entras_group_schema_marker_is_accepted_on_a_group_and_dropped() {
        let group = ok(
            ResourceType::Group,
            json!({
                "schemas": [GROUP_SCHEMA, ENTRA_GROUP_MARKER],
                "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
                "displayName": "displayName",
                "meta": {"resourceType": "Group"}
            }),
        );
        assert_eq!(group["schemas"], json!([GROUP_SCHEMA]));
        // It is a Group's marker only, and a body key of that name is still no attribute.
        let on_a_user = err(
            ResourceType::User,
            json!({"schemas": [USER_SCHEMA, ENTRA_GROUP_MARKER], "userName": "a"}),
        );
        assert!(on_a_user.detail.contains("not supported"), "{on_a_user}");
        err(
            ResourceType::Group,
            json!({"schemas": [GROUP_SCHEMA, ENTRA_GROUP_MARKER], "displayName": "g", ENTRA_GROUP_MARKER: {"x": 1}}),
        );
        err(
            ResourceType::Group,
            json!({"schemas": [GROUP_SCHEMA, "urn:example:other:2.0:Group"], "displayName": "g"}),
        );
    }

    #[test]
    fn rejects_bad_bodies_naming_the_problem() {
        let user = ResourceType::User;
        let cases = [
            (json!({"userName": "a"}), ScimType::InvalidSyntax, "schemas"),
            (
                json!({"schemas": [GROUP_SCHEMA], "userName": "a"}),
                ScimType::InvalidSyntax,
                "urn:ietf:params:scim:schemas:core:2.0:Group",
            ),
            (
                json!({"schemas": [USER_SCHEMA]}),
                ScimType::InvalidValue,
                "userName is required",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": ""}),
                ScimType::InvalidValue,
                "userName is required",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": "a", "nickname2": "x"}),
                ScimType::InvalidSyntax,
                "'nickname2'",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": "a", "department": "x"}),
                ScimType::InvalidSyntax,
                "need their schema URN",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": "a", "name.givenName": "x"}),
                ScimType::InvalidSyntax,
                "name.givenName",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": "a", "active": "yes"}),
                ScimType::InvalidValue,
                "boolean",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": "a", "emails": [{"value": "x", "label": "w"}]}),
                ScimType::InvalidSyntax,
                "emails.label",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": "a", "UserName": "b"}),
                ScimType::InvalidSyntax,
                "twice",
            ),
            (
                json!({"schemas": [USER_SCHEMA], "userName": ["a"]}),
                ScimType::InvalidValue,
                "string",
            ),
            (json!([]), ScimType::InvalidSyntax, "object"),
        ];
        for (body, scim_type, detail) in cases {
            let e = err(user, body.clone());
            assert_eq!(e.scim_type, Some(scim_type), "{body}: {e}");
            assert!(e.detail.contains(detail), "{body}: {e}");
        }
        let e = err(
            ResourceType::Group,
            json!({"schemas": [GROUP_SCHEMA], "members": []}),
        );
        assert_eq!(e.detail, "displayName is required");
    }
}

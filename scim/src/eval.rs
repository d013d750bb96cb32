//! Evaluating a parsed [`Filter`] against one resource (RFC 7644 §3.4.2.2), with the schema
//! deciding what each comparison means: case-exactness per attribute, dateTimes compared as
//! instants, numbers as numbers, booleans only with `eq`/`ne`.
//!
//! [`check_filter`] rejects a filter that can never be evaluated (an unknown attribute, `gt`
//! on a boolean, a number compared with a string attribute) without looking at any resource,
//! so a search over an empty directory still answers `400 invalidFilter`. [`matches()`] runs it
//! first; a caller scanning many resources should call [`check_filter`] once and then
//! [`matches_checked`] per resource.
//!
//! Choices where RFC 7644 is silent:
//! - A multi-valued attribute matches if any of its values does; `ne` is the negation of `eq`
//!   over the whole attribute, so `emails ne "a@x"` is true when no email is `a@x` (including
//!   when there are none).
//! - A complex multi-valued attribute compared without a sub-attribute (`emails co "@x"`)
//!   compares its `value`s.
//! - `eq null` is "not present", `ne null` is `pr`; other operators with `null` are rejected.
//! - Groups are usually stored without their member list; a filter on `members` only sees
//!   what the caller put in the resource (see [`references_attribute`]).

use std::cmp::Ordering;

use serde_json::Value;

use crate::error::{ScimError, ScimType};
use crate::filter::{AttrExpr, AttrOp, AttrPath, CompValue, CompareOp, Filter};
use crate::schema::{resolve_path, AttrType, AttributeDef, ResourceType};
use crate::value::{get_ci, is_unassigned, parse_bool, parse_datetime};

/// Whether `resource` (a User or Group as clients see it) matches `filter`.
pub fn matches(filter: &Filter, resource: &Value, rt: ResourceType) -> Result<bool, ScimError> {
    check_filter(filter, rt)?;
    matches_checked(filter, resource, rt)
}

/// [`matches()`] without the up-front check, for a filter that already passed [`check_filter`].
pub fn matches_checked(
    filter: &Filter,
    resource: &Value,
    rt: ResourceType,
) -> Result<bool, ScimError> {
    eval(filter, Ctx::Resource(rt), resource)
}

/// Rejects with `400 invalidFilter` a filter naming an unknown attribute or applying an
/// operator or value that the attribute's type does not allow.
pub fn check_filter(filter: &Filter, rt: ResourceType) -> Result<(), ScimError> {
    check(filter, Ctx::Resource(rt))
}

/// [`check_filter`] for the filter inside `attr[...]` of a PATCH path, names relative to the
/// complex attribute `parent`.
///
/// Values are kept without their read-only sub-attributes (an agent's owners and applications
/// without `display`): a term on one would match no value, and a `remove` through it would be
/// answered 2xx having removed nothing (an owner the IdP took away would stay one). Refused.
pub(crate) fn check_element_filter(
    filter: &Filter,
    parent: &'static AttributeDef,
) -> Result<(), ScimError> {
    check(filter, Ctx::Element(parent))?;
    match never_kept(filter, parent) {
        Some(name) => Err(invalid(format!(
            "'{}[{name} …]': {name} is read-only and not kept in the values of {}, so the \
             filter would select none; select values by their value",
            parent.name, parent.name
        ))),
        None => Ok(()),
    }
}

/// The first read-only sub-attribute of `parent` a term of `filter` names.
fn never_kept<'f>(filter: &'f Filter, parent: &AttributeDef) -> Option<&'f str> {
    match filter {
        Filter::Attr(expr) => parent
            .sub_attribute(&expr.path.name)
            .filter(|sub| sub.is_read_only())
            .map(|_| expr.path.name.as_str()),
        Filter::Not(inner) => never_kept(inner, parent),
        Filter::And(l, r) | Filter::Or(l, r) => {
            never_kept(l, parent).or_else(|| never_kept(r, parent))
        }
        // Value paths do not nest (`check` refuses one here).
        Filter::ValuePath { .. } => None,
    }
}

/// Whether one element of the complex attribute `parent` matches a checked `filter`.
pub(crate) fn element_matches(
    filter: &Filter,
    parent: &'static AttributeDef,
    element: &Value,
) -> Result<bool, ScimError> {
    eval(filter, Ctx::Element(parent), element)
}

/// Whether `filter` mentions the top-level attribute `name` anywhere (e.g. `members`, so a
/// caller knows it must load a group's member list before evaluating).
pub fn references_attribute(filter: &Filter, name: &str) -> bool {
    match filter {
        Filter::Attr(expr) => expr.path.name_is(name),
        Filter::ValuePath { attr, .. } => attr.name_is(name),
        Filter::Not(inner) => references_attribute(inner, name),
        Filter::And(l, r) | Filter::Or(l, r) => {
            references_attribute(l, name) || references_attribute(r, name)
        }
    }
}

/// What names in a filter are relative to: the resource, or one element of a multi-valued
/// complex attribute inside `attr[...]`.
#[derive(Clone, Copy)]
enum Ctx {
    Resource(ResourceType),
    Element(&'static AttributeDef),
}

/// Where an attribute expression reads its values, resolved against the schema.
struct Target {
    /// `Some(urn)` when the attribute lives in an extension object.
    extension: Option<&'static str>,
    /// The attribute read from the scope (resource root, extension object or element).
    attr: &'static AttributeDef,
    /// The sub-attribute read from each value of `attr`, if any.
    sub: Option<&'static AttributeDef>,
}

impl Target {
    /// The definition the compared values follow.
    fn leaf(&self) -> &'static AttributeDef {
        self.sub.unwrap_or(self.attr)
    }
}

fn invalid(detail: impl Into<String>) -> ScimError {
    ScimError::bad_request(ScimType::InvalidFilter, detail)
}

fn target(ctx: Ctx, path: &AttrPath, op: &AttrOp) -> Result<Target, ScimError> {
    let mut target = match ctx {
        Ctx::Resource(rt) => {
            let resolved = resolve_path(rt, path).ok_or_else(|| {
                invalid(format!(
                    "'{path}' is not an attribute of the {} schema",
                    rt.name()
                ))
            })?;
            // An Agent's `owners` and `applications` are stored in Portcullis' extension alone,
            // and shown (read-only) at the top as well: read where they are stored.
            let mirrored = rt == ResourceType::Agent
                && !resolved.schema.is_extension
                && matches!(resolved.attr.name, "owners" | "applications");
            Target {
                extension: match mirrored {
                    true => Some(crate::schema::PORTCULLIS_AGENT_SCHEMA),
                    false => resolved.schema.is_extension.then_some(resolved.schema.id),
                },
                attr: resolved.attr,
                sub: resolved.sub,
            }
        }
        Ctx::Element(parent) => {
            let sub = parent
                .sub_attribute(&path.name)
                .filter(|_| path.schema.is_none() && path.sub_attr.is_none())
                .ok_or_else(|| {
                    invalid(format!(
                        "'{path}' is not a sub-attribute of '{}'",
                        parent.name
                    ))
                })?;
            Target {
                extension: None,
                attr: sub,
                sub: None,
            }
        }
    };
    // `emails co "@x"` compares the emails' `value`s; `name eq "x"` means nothing.
    if target.sub.is_none() && target.attr.ty == AttrType::Complex {
        if let AttrOp::Compare(..) = op {
            let value = target.attr.sub_attribute("value").ok_or_else(|| {
                invalid(format!(
                    "'{path}' is complex: compare one of its sub-attributes, e.g. '{path}.{}'",
                    target
                        .attr
                        .sub_attributes
                        .first()
                        .map_or("value", |s| s.name)
                ))
            })?;
            target.sub = Some(value);
        }
    }
    Ok(target)
}

/// The values `target` designates in `scope`, flattened across multi-valued attributes.
fn values<'v>(target: &Target, scope: &'v Value) -> Vec<&'v Value> {
    let Some(mut container) = scope.as_object() else {
        return Vec::new();
    };
    if let Some(urn) = target.extension {
        match get_ci(container, urn).and_then(Value::as_object) {
            Some(ext) => container = ext,
            None => return Vec::new(),
        }
    }
    let top: Vec<&Value> = match get_ci(container, target.attr.name) {
        None => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one) => vec![one],
    };
    match target.sub {
        None => top,
        Some(sub) => top
            .into_iter()
            .filter_map(|v| v.as_object().and_then(|o| get_ci(o, sub.name)))
            .collect(),
    }
}

fn check(filter: &Filter, ctx: Ctx) -> Result<(), ScimError> {
    match filter {
        Filter::Attr(expr) => check_expr(expr, ctx),
        Filter::ValuePath { attr, filter, sub } => {
            let parent = value_path_parent(attr, ctx)?;
            check(filter, Ctx::Element(parent))?;
            match sub {
                Some(sub) => check_expr(sub, Ctx::Element(parent)),
                None => Ok(()),
            }
        }
        Filter::Not(inner) => check(inner, ctx),
        Filter::And(l, r) | Filter::Or(l, r) => {
            check(l, ctx)?;
            check(r, ctx)
        }
    }
}

/// The complex attribute `attr` of `attr[...]`.
fn value_path_parent(attr: &AttrPath, ctx: Ctx) -> Result<&'static AttributeDef, ScimError> {
    let Ctx::Resource(_) = ctx else {
        return Err(invalid("value filters ('[...]') cannot be nested"));
    };
    let parent = target(ctx, attr, &AttrOp::Present)?.attr;
    if parent.ty != AttrType::Complex {
        return Err(invalid(format!(
            "'{attr}[...]' needs a complex attribute such as emails; '{attr}' is a {}",
            parent.ty.as_str()
        )));
    }
    Ok(parent)
}

fn check_expr(expr: &AttrExpr, ctx: Ctx) -> Result<(), ScimError> {
    let target = target(ctx, &expr.path, &expr.op)?;
    // A `$ref` Portcullis makes (a read-only one, or a group member's, which is kept by its
    // id alone) is the address a resource is served at, made for each answer from the address
    // the request came to: not kept, so a term on it would match nothing, silently. (One the
    // client writes, a manager's or an agent's owner's, is kept as written.)
    let parent = match ctx {
        Ctx::Element(parent) => Some(parent),
        Ctx::Resource(_) => target.sub.map(|_| target.attr),
    };
    let leaf = target.leaf();
    let made_here = leaf.is_read_only() || parent.is_some_and(|p| p.name == "members");
    if leaf.name == "$ref" && made_here {
        return Err(invalid(format!(
            "'{}': a $ref is made for each answer from the address it is served at, not kept; \
             filter by value",
            expr.path
        )));
    }
    let AttrOp::Compare(op, value) = &expr.op else {
        return Ok(());
    };
    let leaf = target.leaf();
    let path = &expr.path;
    let ordering = matches!(
        op,
        CompareOp::Gt | CompareOp::Ge | CompareOp::Lt | CompareOp::Le
    );
    let substring = matches!(op, CompareOp::Co | CompareOp::Sw | CompareOp::Ew);
    match (leaf.ty, value) {
        (_, CompValue::Null) if matches!(op, CompareOp::Eq | CompareOp::Ne) => Ok(()),
        (_, CompValue::Null) => Err(invalid(format!(
            "'{path} {op} null': only eq and ne compare with null"
        ))),
        (AttrType::Boolean, CompValue::Bool(_)) if !ordering && !substring => Ok(()),
        // Entra ID writes booleans as strings: `roles[primary eq "True"].value`.
        (AttrType::Boolean, CompValue::String(s))
            if !ordering && !substring && string_bool(s).is_some() =>
        {
            Ok(())
        }
        (AttrType::Boolean, CompValue::Bool(_) | CompValue::String(_)) => Err(invalid(format!(
            "'{path}' is a boolean: use eq or ne with true or false, not {op} {value}"
        ))),
        (AttrType::Integer | AttrType::Decimal, CompValue::Number(_)) if !substring => Ok(()),
        (AttrType::Integer | AttrType::Decimal, CompValue::Number(_)) => Err(invalid(format!(
            "'{path}' is a number: {op} applies to strings"
        ))),
        (AttrType::DateTime, CompValue::String(s)) if substring || parse_datetime(s).is_some() => {
            Ok(())
        }
        (AttrType::DateTime, CompValue::String(s)) => Err(invalid(format!(
            "'{path}' is a dateTime: {s:?} is not an RFC 3339 date-time such as \
             \"2011-05-13T04:42:34Z\""
        ))),
        (AttrType::Binary, CompValue::String(_)) if ordering => {
            Err(invalid(format!("'{path}' is binary: {op} does not apply")))
        }
        (AttrType::String | AttrType::Reference | AttrType::Binary, CompValue::String(_)) => Ok(()),
        (ty, value) => Err(invalid(format!(
            "'{path}' is a {} and cannot be compared with {value}",
            ty.as_str()
        ))),
    }
}

/// A boolean written as a string (`"True"`, `"false"`), as Entra ID writes them.
pub(crate) fn string_bool(text: &str) -> Option<bool> {
    parse_bool(&Value::String(text.to_owned()))
}

fn eval(filter: &Filter, ctx: Ctx, scope: &Value) -> Result<bool, ScimError> {
    match filter {
        Filter::Attr(expr) => eval_expr(expr, ctx, scope),
        Filter::ValuePath { attr, filter, sub } => {
            let parent = value_path_parent(attr, ctx)?;
            let elements = values(&target(ctx, attr, &AttrOp::Present)?, scope);
            for element in elements {
                let element_ctx = Ctx::Element(parent);
                if eval(filter, element_ctx, element)?
                    && match sub {
                        Some(sub) => eval_expr(sub, element_ctx, element)?,
                        None => true,
                    }
                {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Filter::Not(inner) => Ok(!eval(inner, ctx, scope)?),
        Filter::And(l, r) => Ok(eval(l, ctx, scope)? && eval(r, ctx, scope)?),
        Filter::Or(l, r) => Ok(eval(l, ctx, scope)? || eval(r, ctx, scope)?),
    }
}

fn eval_expr(expr: &AttrExpr, ctx: Ctx, scope: &Value) -> Result<bool, ScimError> {
    let target = target(ctx, &expr.path, &expr.op)?;
    let mut found = values(&target, scope);
    let present = found.iter().any(|v| !is_unassigned(v));
    // A User, Agent or AgenticApplication without `active` is active, as the gate holds it
    // (created so, or re-activated by `active` removed): compared as such, though not there.
    if !present && is_active_flag(ctx, &target) {
        found = vec![&ACTIVE];
    }
    Ok(match &expr.op {
        AttrOp::Present => present,
        AttrOp::Compare(CompareOp::Eq, CompValue::Null) => !present,
        AttrOp::Compare(CompareOp::Ne, CompValue::Null) => present,
        AttrOp::Compare(CompareOp::Ne, value) => !found
            .iter()
            .any(|v| compare(target.leaf(), v, CompareOp::Eq, value)),
        AttrOp::Compare(op, value) => found.iter().any(|v| compare(target.leaf(), v, *op, value)),
    })
}

const ACTIVE: Value = Value::Bool(true);

/// Whether `target` is the `active` of a resource that is active without one.
fn is_active_flag(ctx: Ctx, target: &Target) -> bool {
    let holds_active = matches!(
        ctx,
        Ctx::Resource(ResourceType::User | ResourceType::Agent | ResourceType::AgenticApplication)
    );
    holds_active
        && target.extension.is_none()
        && target.sub.is_none()
        && target.attr.name == "active"
}

/// One stored value against the filter's value. A stored value of the wrong type never
/// matches (the store may hold data written before a schema change).
fn compare(def: &AttributeDef, stored: &Value, op: CompareOp, wanted: &CompValue) -> bool {
    match (def.ty, wanted) {
        (AttrType::Boolean, CompValue::Bool(b)) => parse_bool(stored) == Some(*b),
        (AttrType::Boolean, CompValue::String(s)) => {
            string_bool(s).is_some_and(|b| parse_bool(stored) == Some(b))
        }
        (AttrType::Integer | AttrType::Decimal, CompValue::Number(n)) => {
            let Value::Number(stored) = stored else {
                return false;
            };
            compare_numbers(stored, n).is_some_and(|ord| ordering_holds(op, ord))
        }
        (AttrType::DateTime, CompValue::String(s)) if !is_substring_op(op) => {
            match (stored.as_str().and_then(parse_datetime), parse_datetime(s)) {
                (Some(a), Some(b)) => ordering_holds(op, a.cmp(&b)),
                _ => false,
            }
        }
        (_, CompValue::String(s)) => {
            let Some(stored) = stored.as_str() else {
                return false;
            };
            if def.case_exact || def.ty == AttrType::DateTime {
                compare_strings(stored, s, op)
            } else {
                compare_strings(
                    &portcullis_policy::fold(stored),
                    &portcullis_policy::fold(s),
                    op,
                )
            }
        }
        _ => false,
    }
}

fn is_substring_op(op: CompareOp) -> bool {
    matches!(op, CompareOp::Co | CompareOp::Sw | CompareOp::Ew)
}

fn compare_strings(stored: &str, wanted: &str, op: CompareOp) -> bool {
    match op {
        CompareOp::Co => stored.contains(wanted),
        CompareOp::Sw => stored.starts_with(wanted),
        CompareOp::Ew => stored.ends_with(wanted),
        _ => ordering_holds(op, stored.cmp(wanted)),
    }
}

/// Exact for integers, `f64` otherwise.
fn compare_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) {
        return Some(a.cmp(&b));
    }
    if let (Some(a), Some(b)) = (a.as_u64(), b.as_u64()) {
        return Some(a.cmp(&b));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

/// Whether `stored <op> wanted` holds given `stored.cmp(wanted)`.
fn ordering_holds(op: CompareOp, ord: Ordering) -> bool {
    match op {
        CompareOp::Eq => ord == Ordering::Equal,
        CompareOp::Ne => ord != Ordering::Equal,
        CompareOp::Gt => ord == Ordering::Greater,
        CompareOp::Ge => ord != Ordering::Less,
        CompareOp::Lt => ord == Ordering::Less,
        CompareOp::Le => ord != Ordering::Greater,
        CompareOp::Co | CompareOp::Sw | CompareOp::Ew => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A user as Okta creates it, with the enterprise extension as Entra ID sends it.
    fn barbara() -> Value {
        json!({
            "schemas": [
                "urn:ietf:params:scim:schemas:core:2.0:User",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
            ],
            "id": "2819c223-7f76-453a-919d-413861904646",
            "externalId": "00u1abcd",
            "userName": "Barbara.Jensen@Example.com",
            "name": {"givenName": "Barbara", "familyName": "Jensen"},
            "active": true,
            "emails": [
                {"value": "bjensen@example.com", "type": "work", "primary": true},
                {"value": "babs@JENSEN.org", "type": "home"}
            ],
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
                "department": "Tour Operations",
                "employeeNumber": "701984",
                "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d"}
            },
            "meta": {
                "resourceType": "User",
                "created": "2010-01-23T04:56:22Z",
                "lastModified": "2011-05-13T04:42:34Z",
                "version": "W/\"3694e05e9dff591\""
            }
        })
    }

    fn user_matches(filter: &str) -> Result<bool, ScimError> {
        matches(
            &Filter::parse(filter).unwrap(),
            &barbara(),
            ResourceType::User,
        )
    }

    fn yes(filter: &str) {
        assert_eq!(user_matches(filter), Ok(true), "{filter} should match");
    }

    fn no(filter: &str) {
        assert_eq!(user_matches(filter), Ok(false), "{filter} should not match");
    }

    fn rejected(filter: &str, detail: &str) {
        let err = user_matches(filter).expect_err(filter);
        assert_eq!(err.scim_type, Some(ScimType::InvalidFilter), "{filter}");
        assert!(err.detail.contains(detail), "{filter}: {err}");
    }

    #[test]
    fn okta_and_entra_lookups() {
        // Okta before creating a user: userName is case-insensitive.
        yes(r#"userName eq "barbara.jensen@example.com""#);
        yes(r#"USERNAME eq "BARBARA.JENSEN@EXAMPLE.COM""#);
        // Entra ID: externalId is case-exact, and the emails[...].value form.
        yes(r#"externalId eq "00u1abcd""#);
        no(r#"externalId eq "00U1ABCD""#);
        yes(r#"emails[type eq "work"].value eq "BJensen@example.com""#);
        no(r#"emails[type eq "home"].value eq "bjensen@example.com""#);
        yes(
            r#"externalId eq "00u1abcd" and emails[type eq "work"].value eq "bjensen@example.com""#,
        );
        // Entra ID writes booleans as strings.
        yes(r#"active eq "True""#);
        no(r#"active ne "true""#);
        // id is case-exact.
        yes(r#"id eq "2819c223-7f76-453a-919d-413861904646""#);
        no(r#"id eq "2819C223-7F76-453A-919D-413861904646""#);
    }

    #[test]
    fn string_operators() {
        yes(r#"userName sw "barbara""#);
        yes(r#"userName ew "EXAMPLE.COM""#);
        yes(r#"name.familyName co "ens""#);
        no(r#"name.familyName co "xyz""#);
        yes(r#"userName ne "someone@else""#);
        no(r#"userName ne "barbara.jensen@example.com""#);
        yes(r#"name.givenName gt "Alice""#);
        yes(r#"name.givenName le "barbara""#);
        no(r#"name.givenName lt "Alice""#);
    }

    #[test]
    fn multi_valued_attributes_match_if_any_value_does() {
        yes(r#"emails co "jensen.org""#);
        yes(r#"emails.value ew "@example.com""#);
        yes(r#"emails[type eq "work" and value co "@example.com"]"#);
        no(r#"emails[type eq "home" and value co "@example.com"]"#);
        yes(r#"emails[primary eq true].type eq "work""#);
        yes(r#"emails.type eq "home""#);
        // `ne` negates `eq` over the whole attribute.
        no(r#"emails ne "babs@jensen.org""#);
        yes(r#"emails ne "nobody@x""#);
    }

    #[test]
    fn presence_and_null() {
        yes("title pr or userName pr");
        no("title pr");
        yes("title eq null");
        no("userName eq null");
        yes("userName ne null");
        yes("emails pr");
        yes("name pr");
        no("phoneNumbers pr");
        yes("phoneNumbers eq null");
    }

    #[test]
    fn booleans_numbers_and_datetimes() {
        yes("active eq true");
        no("active ne true");
        no("active eq false");
        yes(r#"meta.lastModified gt "2011-05-13T04:42:33Z""#);
        yes(r#"meta.lastModified ge "2011-05-13T06:42:34+02:00""#);
        yes(r#"meta.lastModified eq "2011-05-13T04:42:34.000Z""#);
        no(r#"meta.lastModified lt "2011-05-13T04:42:34Z""#);
        yes(r#"meta.created lt "2011-01-01T00:00:00Z""#);
        yes(r#"meta.version eq "W/\"3694e05e9dff591\"""#);
    }

    #[test]
    fn string_booleans_stored_by_a_lenient_writer_still_compare() {
        let mut user = barbara();
        user["active"] = json!("False");
        let filter = Filter::parse("active eq false").unwrap();
        assert_eq!(matches(&filter, &user, ResourceType::User), Ok(true));
    }

    #[test]
    fn extension_attributes_need_their_urn() {
        let ext = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
        yes(&format!(r#"{ext}:department eq "tour operations""#));
        yes(&format!(
            r#"{ext}:manager.value eq "26118915-6090-4610-87e4-49d8ca9f808d""#
        ));
        yes(&format!(
            r#"{ext}:manager eq "26118915-6090-4610-87e4-49d8ca9f808d""#
        ));
        no(&format!("{ext}:costCenter pr"));
        yes(r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "b""#);
        rejected(
            r#"department eq "x""#,
            "not an attribute of the User schema",
        );
    }

    #[test]
    fn logic() {
        yes(r#"not (userName eq "x") and (active eq false or title pr or emails pr)"#);
        no(r#"not (userName pr)"#);
    }

    #[test]
    fn rejects_filters_that_cannot_be_evaluated() {
        rejected(r#"nickname2 eq "x""#, "'nickname2' is not an attribute");
        rejected(r#"title pr and nope eq "x""#, "'nope'");
        rejected(r#"userName eq "x" or name.nope pr"#, "'name.nope'");
        rejected(
            r#"emails[kind eq "work"]"#,
            "'kind' is not a sub-attribute of 'emails'",
        );
        rejected(r#"emails[type eq "work"].nope eq "x""#, "'nope'");
        rejected(r#"userName[value eq "x"]"#, "needs a complex attribute");
        rejected("active gt true", "use eq or ne");
        rejected(r#"active eq "yes""#, "use eq or ne with true or false");
        rejected(r#"active co "true""#, "use eq or ne");
        rejected("userName eq 5", "cannot be compared");
        rejected(r#"meta.lastModified gt "yesterday""#, "not an RFC 3339");
        rejected(r#"name eq "Barbara""#, "compare one of its sub-attributes");
        rejected("userName gt null", "only eq and ne");
        // Made from the address a request came to, for each answer: never kept.
        rejected("groups.$ref pr", "a $ref is made for each answer");
        rejected(r#"groups[$ref ew "/x"]"#, "a $ref is made for each answer");
        // One the client writes is kept as written.
        let manager = Filter::parse(
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.$ref pr"#,
        )
        .unwrap();
        assert_eq!(check_filter(&manager, ResourceType::User), Ok(()));
    }

    #[test]
    fn unknown_attribute_is_rejected_even_without_resources() {
        let filter = Filter::parse(r#"title pr or bogus eq 1"#).unwrap();
        assert!(check_filter(&filter, ResourceType::Group).is_err());
        let group = Filter::parse(r#"displayName eq "Eng" and members[value eq "u1"]"#).unwrap();
        assert_eq!(check_filter(&group, ResourceType::Group), Ok(()));
        for made in [r#"members.$ref pr"#, r#"members[$ref ew "/u1"]"#] {
            let made = Filter::parse(made).unwrap();
            assert!(check_filter(&made, ResourceType::Group).is_err());
        }
        assert!(references_attribute(&group, "members"));
        assert!(!references_attribute(
            &Filter::parse("displayName pr").unwrap(),
            "members"
        ));
    }

    #[test]
    fn groups() {
        let group = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "id": "g1",
            "displayName": "Eng Leads",
            "members": [{"value": "u1"}, {"value": "u2", "type": "User"}]
        });
        let rt = ResourceType::Group;
        let check = |f: &str| matches(&Filter::parse(f).unwrap(), &group, rt).unwrap();
        assert!(check(r#"displayName eq "eng leads""#));
        assert!(check(r#"members[value eq "u2"]"#));
        assert!(
            !check(r#"members[value eq "U2"]"#),
            "member ids are case-exact"
        );
        assert!(check(r#"members.value eq "u1""#));
        assert!(matches(&Filter::parse("userName pr").unwrap(), &group, rt).is_err());
    }
}

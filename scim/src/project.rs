//! `attributes` and `excludedAttributes` (RFC 7644 §3.9): which attributes of a resource a
//! response carries, following each attribute's `returned` rule (RFC 7643 §7).
//!
//! `returned: always` attributes (`id`) and `schemas` are always there, `never` (`password`)
//! never is, `request` only when named in `attributes`. Names are case-insensitive and may be
//! URN-qualified (`urn:…:User:userName`), name a sub-attribute (`name.givenName`,
//! `emails.value`), or be a whole extension (`urn:…:enterprise:2.0:User`).
//!
//! Choices where the RFC is silent: a name the schema does not have is ignored (a client asking
//! for an attribute we do not support gets the resource without it, not an error); when both
//! parameters are given, `attributes` wins. [`Projection::includes`] lets the caller skip
//! loading a Group's member list for `excludedAttributes=members`.

use serde_json::Value;

use crate::path::PatchPath;
use crate::schema::{
    extension_named_by, resolve_path, AttributeDef, ResourceType, Returned, COMMON_ATTRIBUTES,
};
use crate::value::Object;

/// A parsed `attributes` / `excludedAttributes` pair for one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    rt: ResourceType,
    mode: Mode,
    selectors: Vec<Selector>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Neither parameter: every `default` and `always` attribute.
    Default,
    Include,
    Exclude,
}

/// One name from a parameter, resolved to canonical spellings.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    schema: &'static str,
    /// `None` selects the whole (extension) schema.
    attr: Option<&'static str>,
    sub: Option<&'static str>,
}

impl Projection {
    /// From the raw (percent-decoded) query parameters; an empty parameter counts as absent.
    pub fn new(rt: ResourceType, attributes: Option<&str>, excluded: Option<&str>) -> Self {
        let attributes = attributes.filter(|p| !p.trim().is_empty());
        let excluded = excluded.filter(|p| !p.trim().is_empty());
        let (mode, list) = match (attributes, excluded) {
            (Some(list), _) => (Mode::Include, list),
            (None, Some(list)) => (Mode::Exclude, list),
            (None, None) => (Mode::Default, ""),
        };
        // Each distinct once: every attribute of every resource is compared with each, and a
        // list may name one many times over.
        let mut selectors = Vec::new();
        for selector in list.split(',').filter_map(|name| selector(rt, name.trim())) {
            if !selectors.contains(&selector) {
                selectors.push(selector);
            }
        }
        Self {
            rt,
            mode,
            selectors,
        }
    }

    /// Every `default` attribute: what a response carries without either parameter.
    pub fn default_for(rt: ResourceType) -> Self {
        Self::new(rt, None, None)
    }

    /// Whether the core attribute `name` appears in the output at all (so the caller knows
    /// whether to load it, e.g. a Group's `members`).
    pub fn includes(&self, name: &str) -> bool {
        let schema = self.rt.core_schema();
        let def = schema.attribute(name).or_else(|| {
            COMMON_ATTRIBUTES
                .iter()
                .find(|d| d.name.eq_ignore_ascii_case(name))
        });
        def.is_some_and(|def| self.select(schema.id, def).is_some())
    }

    /// The resource as the response should carry it: what it keeps whole is moved, not copied
    /// (a Group's members may be a hundred thousand).
    pub fn apply(&self, resource: Value) -> Value {
        let Value::Object(resource) = resource else {
            return resource;
        };
        let core = self.rt.core_schema();
        let mut out = Object::new();
        for (key, value) in resource {
            if key.eq_ignore_ascii_case("schemas") {
                out.insert(key, value);
            } else if let Some(ext) = self.rt.extension(&key) {
                let Value::Object(attributes) = value else {
                    continue;
                };
                let kept: Object = attributes
                    .into_iter()
                    .filter_map(|(name, v)| {
                        let def = ext.attribute(&name)?;
                        let v = self.project(ext.id, def, v)?;
                        Some((name, v))
                    })
                    .collect();
                if !kept.is_empty() {
                    out.insert(key, Value::Object(kept));
                }
            } else if let Some(def) = core.attribute(&key).or_else(|| {
                COMMON_ATTRIBUTES
                    .iter()
                    .find(|d| d.name.eq_ignore_ascii_case(&key))
            }) {
                if let Some(v) = self.project(core.id, def, value) {
                    out.insert(key, v);
                }
            }
        }
        Value::Object(out)
    }

    /// What happens to attribute `def` of `schema`.
    fn select(&self, schema: &str, def: &AttributeDef) -> Option<Selection<'_>> {
        let named = |s: &&Selector| s.schema == schema && s.attr.is_none_or(|a| a == def.name);
        match (def.returned, self.mode) {
            (Returned::Never, _) => None,
            (Returned::Always, _) => Some(Selection::Whole),
            (Returned::Request, Mode::Default | Mode::Exclude) => None,
            (_, Mode::Default) => Some(Selection::Whole),
            (_, Mode::Include) => {
                let named: Vec<_> = self.selectors.iter().filter(named).collect();
                if named.is_empty() {
                    None
                } else if named.iter().any(|s| s.sub.is_none()) {
                    Some(Selection::Whole)
                } else {
                    Some(Selection::OnlySubs(
                        named.iter().filter_map(|s| s.sub).collect(),
                    ))
                }
            }
            (_, Mode::Exclude) => {
                let named: Vec<_> = self.selectors.iter().filter(named).collect();
                if named.iter().any(|s| s.sub.is_none()) {
                    None
                } else {
                    Some(Selection::AllSubsBut(
                        named.iter().filter_map(|s| s.sub).collect(),
                    ))
                }
            }
        }
    }

    fn project(&self, schema: &str, def: &AttributeDef, value: Value) -> Option<Value> {
        let keep: Box<dyn Fn(&str) -> bool + '_> = match self.select(schema, def)? {
            Selection::Whole => return Some(value),
            Selection::OnlySubs(subs) => {
                Box::new(move |k| subs.iter().any(|s| s.eq_ignore_ascii_case(k)))
            }
            Selection::AllSubsBut(subs) if subs.is_empty() => return Some(value),
            Selection::AllSubsBut(subs) => {
                Box::new(move |k| !subs.iter().any(|s| s.eq_ignore_ascii_case(k)))
            }
        };
        let filter_obj =
            |obj: Object| -> Object { obj.into_iter().filter(|(k, _)| keep(k)).collect() };
        match value {
            Value::Object(obj) => Some(Value::Object(filter_obj(obj))),
            Value::Array(items) => Some(Value::Array(
                items
                    .into_iter()
                    .map(|item| match item {
                        Value::Object(obj) => Value::Object(filter_obj(obj)),
                        other => other,
                    })
                    .collect(),
            )),
            other => Some(other),
        }
    }
}

enum Selection<'a> {
    Whole,
    OnlySubs(Vec<&'a str>),
    AllSubsBut(Vec<&'a str>),
}

/// One parameter entry, or `None` when it names nothing this resource type has.
fn selector(rt: ResourceType, name: &str) -> Option<Selector> {
    let path = PatchPath::parse(name).ok()?;
    if path.value_filter.is_some() {
        return None;
    }
    if let Some(ext) = extension_named_by(rt, &path.attr) {
        return Some(Selector {
            schema: ext.id,
            attr: None,
            sub: None,
        });
    }
    let resolved = resolve_path(rt, &path.attr)?;
    Some(Selector {
        schema: resolved.schema.id,
        attr: Some(resolved.attr.name),
        sub: resolved.sub.map(|s| s.name),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::ENTERPRISE_USER_SCHEMA;

    /// Every attribute of every resource is compared with each selector: one named many times
    /// over is one selector.
    #[test]
    fn a_name_given_many_times_is_one_selector() {
        let list = "userName,".repeat(50_000);
        let projection = Projection::new(ResourceType::User, Some(&list), None);
        assert_eq!(projection.selectors.len(), 1);
    }

    fn user() -> Value {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE_USER_SCHEMA],
            "id": "u-1",
            "externalId": "ext",
            "userName": "bjensen",
            "password": "hash-must-never-leak",
            "name": {"givenName": "Barbara", "familyName": "Jensen"},
            "emails": [{"value": "b@x", "type": "work"}, {"value": "b@home", "type": "home"}],
            ENTERPRISE_USER_SCHEMA: {"department": "Tour", "costCenter": "4130"},
            "meta": {"resourceType": "User", "version": "W/\"1\""}
        })
    }

    fn project(attributes: Option<&str>, excluded: Option<&str>) -> Value {
        Projection::new(ResourceType::User, attributes, excluded).apply(user())
    }

    #[test]
    fn default_drops_password_only() {
        let mut expected = user();
        expected.as_object_mut().unwrap().remove("password");
        assert_eq!(project(None, None), expected);
        assert_eq!(project(Some(" "), Some("")), expected);
    }

    #[test]
    fn attributes_keeps_what_is_named_plus_always() {
        assert_eq!(
            project(Some("userName,NAME.givenName, emails.value"), None),
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE_USER_SCHEMA],
                "id": "u-1",
                "userName": "bjensen",
                "name": {"givenName": "Barbara"},
                "emails": [{"value": "b@x"}, {"value": "b@home"}],
            })
        );
        let qualified = project(
            Some(&format!(
                "urn:ietf:params:scim:schemas:core:2.0:User:userName,{ENTERPRISE_USER_SCHEMA}:department,password"
            )),
            None,
        );
        assert_eq!(qualified["userName"], "bjensen");
        assert_eq!(
            qualified[ENTERPRISE_USER_SCHEMA],
            json!({"department": "Tour"})
        );
        assert_eq!(
            qualified.get("password"),
            None,
            "never returned, even when asked"
        );
        let whole_ext = project(Some(ENTERPRISE_USER_SCHEMA), None);
        assert_eq!(
            whole_ext[ENTERPRISE_USER_SCHEMA],
            json!({"department": "Tour", "costCenter": "4130"})
        );
        assert_eq!(whole_ext.get("userName"), None);
        let unknown = project(Some("nope,meta"), None);
        assert_eq!(unknown.as_object().unwrap().len(), 3, "{unknown}");
    }

    #[test]
    fn excluded_attributes_drops_what_is_named_but_not_always() {
        let out = project(None, Some("emails.type,name,id,urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter"));
        assert_eq!(out["id"], "u-1", "returned always");
        assert_eq!(out.get("name"), None);
        assert_eq!(
            out["emails"],
            json!([{"value": "b@x"}, {"value": "b@home"}])
        );
        assert_eq!(out[ENTERPRISE_USER_SCHEMA], json!({"department": "Tour"}));
        assert_eq!(out.get("password"), None);
        assert_eq!(out["userName"], "bjensen");
    }

    #[test]
    fn entra_reads_groups_without_members() {
        let p = Projection::new(ResourceType::Group, None, Some("members"));
        assert!(!p.includes("members"));
        assert!(p.includes("displayName"));
        assert!(p.includes("id"));
        let group =
            json!({"schemas": [], "id": "g", "displayName": "Eng", "members": [{"value": "u"}]});
        assert_eq!(
            p.apply(group.clone()),
            json!({"schemas": [], "id": "g", "displayName": "Eng"})
        );
        assert!(Projection::default_for(ResourceType::Group).includes("members"));
        let only_name = Projection::new(ResourceType::Group, Some("displayName"), None);
        assert!(!only_name.includes("members"));
        assert!(
            Projection::new(ResourceType::Group, Some("members.value"), None).includes("members")
        );
    }
}

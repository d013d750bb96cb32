//! Helpers over `serde_json` values shared by evaluation, PATCH, validation and projection:
//! case-insensitive key access (SCIM attribute names are case-insensitive, RFC 7643 §2.1)
//! and type coercion against an [`AttributeDef`].

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{ScimError, ScimType};
use crate::schema::{AttrType, AttributeDef};

pub(crate) type Object = Map<String, Value>;

/// The key of `obj` naming `name`: the exact spelling if present, else any ASCII-case variant.
pub(crate) fn key_ci<'a>(obj: &'a Object, name: &str) -> Option<&'a String> {
    match obj.get_key_value(name) {
        Some((key, _)) => Some(key),
        None => obj.keys().find(|k| k.eq_ignore_ascii_case(name)),
    }
}

pub(crate) fn get_ci<'a>(obj: &'a Object, name: &str) -> Option<&'a Value> {
    key_ci(obj, name).and_then(|k| obj.get(k))
}

/// [`get_ci`], to change the value: the one a reader of the object takes.
pub(crate) fn get_mut_ci<'a>(obj: &'a mut Object, name: &str) -> Option<&'a mut Value> {
    let key = key_ci(obj, name)?.clone();
    obj.get_mut(&key)
}

pub(crate) fn remove_ci(obj: &mut Object, name: &str) -> Option<Value> {
    let key = key_ci(obj, name)?.clone();
    obj.remove(&key)
}

/// The value under the canonical spelling `name`, renaming a differently-cased key so a
/// write never leaves two spellings of one attribute behind. Inserts `null` when absent.
pub(crate) fn slot_ci<'a>(obj: &'a mut Object, name: &str) -> &'a mut Value {
    if !obj.contains_key(name) {
        let existing = remove_ci(obj, name).unwrap_or(Value::Null);
        obj.insert(name.to_owned(), existing);
    }
    obj.entry(name).or_insert(Value::Null)
}

/// A boolean, accepting the strings `"true"`/`"false"` in any case as Entra ID sends them.
pub(crate) fn parse_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

pub(crate) fn parse_datetime(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Whether a value counts as unassigned (RFC 7643 §2.5: null, empty string, empty array).
pub(crate) fn is_unassigned(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.iter().all(is_unassigned),
        Value::Object(o) => o.values().all(is_unassigned),
        _ => false,
    }
}

/// Checks `value` against `def` and returns it in canonical form: attribute names spelled as
/// in the schema, string booleans turned into booleans, a single value of a multi-valued
/// attribute wrapped in an array, `null` sub-attributes and read-only sub-attributes (which
/// the server manages, e.g. `manager.displayName`) dropped.
///
/// `unknown` is the `scimType` for a sub-attribute the schema does not have: PATCH answers
/// `invalidPath`, a POST/PUT body `invalidSyntax`.
pub(crate) fn coerce(
    def: &AttributeDef,
    value: &Value,
    name: &str,
    unknown: ScimType,
) -> Result<Value, ScimError> {
    if value.is_null() || !def.multi_valued {
        return coerce_single(def, value, name, unknown);
    }
    let items: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        single => vec![single],
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items.into_iter().filter(|v| !v.is_null()) {
        out.push(coerce_single(def, item, name, unknown)?);
    }
    let primaries = out.iter().filter(|v| is_primary(v)).count();
    if primaries > 1 {
        return Err(ScimError::bad_request(
            ScimType::InvalidValue,
            format!("{name}: at most one value may have \"primary\": true (RFC 7643 §2.4)"),
        ));
    }
    Ok(Value::Array(out))
}

pub(crate) fn is_primary(value: &Value) -> bool {
    value
        .as_object()
        .and_then(|o| get_ci(o, "primary"))
        .and_then(parse_bool)
        .unwrap_or(false)
}

fn coerce_single(
    def: &AttributeDef,
    value: &Value,
    name: &str,
    unknown: ScimType,
) -> Result<Value, ScimError> {
    let wrong = |expected: &str| {
        ScimError::bad_request(
            ScimType::InvalidValue,
            format!("{name} must be {expected}, not {}", kind(value)),
        )
    };
    match (def.ty, value) {
        (_, Value::Null) => Ok(Value::Null),
        (AttrType::String | AttrType::Reference | AttrType::Binary, Value::String(_)) => {
            Ok(value.clone())
        }
        (AttrType::String | AttrType::Reference | AttrType::Binary, _) => Err(wrong("a string")),
        (AttrType::DateTime, Value::String(s)) if parse_datetime(s).is_some() => Ok(value.clone()),
        (AttrType::DateTime, _) => Err(wrong("an RFC 3339 date-time string")),
        (AttrType::Boolean, _) => parse_bool(value)
            .map(Value::Bool)
            .ok_or_else(|| wrong("a boolean")),
        (AttrType::Integer, Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(value.clone()),
        (AttrType::Integer, _) => Err(wrong("an integer")),
        (AttrType::Decimal, Value::Number(_)) => Ok(value.clone()),
        (AttrType::Decimal, _) => Err(wrong("a number")),
        (AttrType::Complex, Value::Object(obj)) => coerce_complex(def, obj, name, unknown),
        // Entra ID sends the enterprise `manager` as the bare id string; a bare string is the
        // `value` of any complex attribute that has one.
        (AttrType::Complex, Value::String(_)) if def.sub_attribute("value").is_some() => {
            let mut obj = Object::new();
            obj.insert("value".into(), value.clone());
            coerce_complex(def, &obj, name, unknown)
        }
        (AttrType::Complex, _) => Err(wrong("an object")),
    }
}

fn coerce_complex(
    def: &AttributeDef,
    obj: &Object,
    name: &str,
    unknown: ScimType,
) -> Result<Value, ScimError> {
    let mut out = Object::new();
    for (key, value) in obj {
        let full = format!("{name}.{key}");
        let Some(sub) = def.sub_attribute(key) else {
            return Err(ScimError::bad_request(
                unknown,
                format!("{full} is not an attribute of the schema"),
            ));
        };
        if out.contains_key(sub.name) {
            return Err(ScimError::bad_request(
                ScimType::InvalidSyntax,
                format!("{full} is given twice with different letter case"),
            ));
        }
        if value.is_null() || sub.is_read_only() {
            continue;
        }
        out.insert(sub.name.into(), coerce(sub, value, &full, unknown)?);
    }
    Ok(Value::Object(out))
}

/// A JSON type name for error messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::filter::AttrPath;
    use crate::schema::{resolve, ResourceType};

    fn def(name: &str) -> &'static AttributeDef {
        resolve(ResourceType::User, &AttrPath::new(name)).unwrap()
    }

    #[test]
    fn finds_keys_ignoring_case_and_renames_on_write() {
        let mut obj = json!({"UserName": "a", "title": "t"})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(get_ci(&obj, "userName"), Some(&json!("a")));
        *slot_ci(&mut obj, "userName") = json!("b");
        assert_eq!(
            Value::Object(obj.clone()),
            json!({"userName": "b", "title": "t"})
        );
        assert_eq!(remove_ci(&mut obj, "TITLE"), Some(json!("t")));
    }

    #[test]
    fn coerces_entra_strings_and_wraps_single_values() {
        let err = ScimType::InvalidPath;
        assert_eq!(
            coerce(def("active"), &json!("False"), "active", err),
            Ok(json!(false))
        );
        assert_eq!(
            coerce(def("active"), &json!("TRUE"), "active", err),
            Ok(json!(true))
        );
        assert!(coerce(def("active"), &json!("yes"), "active", err).is_err());
        assert_eq!(
            coerce(
                def("emails"),
                &json!({"Value": "a@x", "primary": "true"}),
                "emails",
                err
            ),
            Ok(json!([{"value": "a@x", "primary": true}]))
        );
        let manager = resolve(
            ResourceType::User,
            &AttrPath {
                schema: Some(crate::schema::ENTERPRISE_USER_SCHEMA.into()),
                name: "manager".into(),
                sub_attr: None,
            },
        )
        .unwrap();
        assert_eq!(
            coerce(manager, &json!("m-1"), "manager", err),
            Ok(json!({"value": "m-1"}))
        );
        assert_eq!(
            coerce(
                manager,
                &json!({"value": "m-1", "displayName": "Boss", "$ref": null}),
                "manager",
                err
            ),
            Ok(json!({"value": "m-1"})),
            "read-only and null sub-attributes are dropped"
        );
    }

    #[test]
    fn rejects_wrong_types_unknown_sub_attributes_and_two_primaries() {
        let err = coerce(
            def("userName"),
            &json!(5),
            "userName",
            ScimType::InvalidSyntax,
        );
        assert_eq!(
            err.unwrap_err().detail,
            "userName must be a string, not a number"
        );
        let err = coerce(
            def("name"),
            &json!({"nick": "x"}),
            "name",
            ScimType::InvalidPath,
        );
        let err = err.unwrap_err();
        assert_eq!(err.scim_type, Some(ScimType::InvalidPath));
        assert!(err.detail.contains("name.nick"), "{err}");
        let two = json!([{"value": "a", "primary": true}, {"value": "b", "primary": "True"}]);
        let err = coerce(def("emails"), &two, "emails", ScimType::InvalidPath).unwrap_err();
        assert_eq!(err.scim_type, Some(ScimType::InvalidValue));
        let when = resolve(
            ResourceType::User,
            &AttrPath {
                schema: None,
                name: "meta".into(),
                sub_attr: Some("created".into()),
            },
        )
        .unwrap();
        assert!(coerce(
            when,
            &json!("2024-01-02T03:04:05Z"),
            "c",
            ScimType::InvalidPath
        )
        .is_ok());
        assert!(coerce(when, &json!("yesterday"), "c", ScimType::InvalidPath).is_err());
    }

    #[test]
    fn unassigned_means_null_empty_string_or_empty_array() {
        assert!(is_unassigned(&json!(null)));
        assert!(is_unassigned(&json!("")));
        assert!(is_unassigned(&json!([])));
        assert!(is_unassigned(&json!({"givenName": null})));
        assert!(!is_unassigned(&json!(false)));
        assert!(!is_unassigned(&json!([{"value": "a"}])));
    }
}

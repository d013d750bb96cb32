//! PATCH operation paths (RFC 7644 §3.5.2): `attrPath / valuePath [ "." subAttr ]`.
//!
//! Examples: `members`, `name.familyName`, `members[value eq "2819c223"]`,
//! `emails[type eq "work"].value`,
//! `urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value`.
//! Paths share the filter lexer, parser and bounds ([`MAX_FILTER_LEN`], [`MAX_FILTER_DEPTH`]).
//! What a path points at in a resource is decided where PATCH is applied, not here.
//!
//! [`MAX_FILTER_LEN`]: crate::filter::MAX_FILTER_LEN
//! [`MAX_FILTER_DEPTH`]: crate::filter::MAX_FILTER_DEPTH

use std::fmt;
use std::str::FromStr;

use crate::filter::{AttrPath, Filter, Parser, SyntaxError, Tok};

/// A parsed PATCH `path`.
///
/// `attr.sub_attr` is the targeted sub-attribute wherever it was written: `name.familyName`
/// and `emails[type eq "work"].value` both have one. With `value_filter`, the filter selects
/// which elements of the multi-valued `attr` the operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchPath {
    pub attr: AttrPath,
    pub value_filter: Option<Filter>,
}

impl PatchPath {
    pub fn parse(input: &str) -> Result<Self, PathError> {
        let mut parser = Parser::new(input, "path")?;
        let mut attr = parser.attr_path()?;
        let mut value_filter = None;
        if parser.at(&Tok::LBracket) {
            value_filter = Some(parser.value_filter(&attr)?);
            attr.sub_attr = parser.sub_attr()?;
        }
        let expected = match (&value_filter, &attr.sub_attr) {
            (Some(_), None) => "'.' or the end of the path",
            (None, None) => "'[' or the end of the path",
            (_, Some(_)) => "the end of the path",
        };
        parser.finish(expected)?;
        Ok(Self { attr, value_filter })
    }
}

impl FromStr for PatchPath {
    type Err = PathError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::parse(input)
    }
}

/// Canonical form, such that `PatchPath::parse(&p.to_string()) == Ok(p)`.
impl fmt::Display for PatchPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(filter) = &self.value_filter else {
            return write!(f, "{}", self.attr);
        };
        if let Some(schema) = &self.attr.schema {
            write!(f, "{schema}:")?;
        }
        write!(f, "{}[{filter}]", self.attr.name)?;
        if let Some(sub) = &self.attr.sub_attr {
            write!(f, ".{sub}")?;
        }
        Ok(())
    }
}

/// A path that can't be parsed. Answered as SCIM `400` with `scimType` [`Self::scim_type`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at byte {offset})")]
pub struct PathError {
    pub message: String,
    /// Byte offset into the path where the problem was found.
    pub offset: usize,
}

impl PathError {
    pub fn scim_type(&self) -> &'static str {
        "invalidPath"
    }
}

impl From<SyntaxError> for PathError {
    fn from(e: SyntaxError) -> Self {
        Self {
            message: e.message,
            offset: e.offset,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::filter::tests::{attr_path, name, token_soup, value_filter, value_path_attr};
    use crate::filter::MAX_FILTER_DEPTH;

    /// Paths as Okta, Entra ID and RFC 7644 send them, with their canonical form.
    const GOOD: &[(&str, &str)] = &[
        ("members", "members"),
        ("name.familyName", "name.familyName"),
        (
            r#"members[value eq "2819c223"]"#,
            r#"members[value eq "2819c223"]"#,
        ),
        (
            r#"emails[type eq "work"].value"#,
            r#"emails[type eq "work"].value"#,
        ),
        (
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value",
        ),
        (
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
        ),
        (
            r#"addresses[type EQ "work" AND primary eq True].streetAddress"#,
            r#"addresses[type eq "work" and primary eq true].streetAddress"#,
        ),
        (
            r#" members[ not (value eq "1") ] "#,
            r#"members[not (value eq "1")]"#,
        ),
    ];

    #[test]
    fn parses_real_paths_and_prints_them_canonically() {
        for (input, canonical) in GOOD {
            let path = PatchPath::parse(input)
                .unwrap_or_else(|e| panic!("{input:?} should parse, got {e}"));
            assert_eq!(path.to_string(), *canonical, "printing {input:?}");
            assert_eq!(
                PatchPath::parse(canonical),
                Ok(path),
                "reparsing {canonical:?}"
            );
        }
    }

    #[test]
    fn puts_the_target_sub_attribute_in_one_place() {
        let plain = PatchPath::parse("name.familyName").unwrap();
        assert_eq!(plain.attr.sub_attr.as_deref(), Some("familyName"));
        assert_eq!(plain.value_filter, None);

        let filtered = PatchPath::parse(r#"emails[type eq "work"].value"#).unwrap();
        assert_eq!(filtered.attr.name, "emails");
        assert_eq!(filtered.attr.sub_attr.as_deref(), Some("value"));
        assert_eq!(
            filtered.value_filter,
            Some(Filter::parse(r#"type eq "work""#).unwrap())
        );

        let manager = PatchPath::parse(
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value",
        )
        .unwrap();
        assert_eq!(
            manager.attr.schema.as_deref(),
            Some("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User")
        );
        assert_eq!(manager.attr.name, "manager");
        assert_eq!(manager.attr.sub_attr.as_deref(), Some("value"));
    }

    /// Bad paths, the byte offset reported and a piece of the message.
    const BAD: &[(&str, usize, &str)] = &[
        ("", 0, "path is empty"),
        ("members eq", 8, "expected '[' or the end of the path"),
        (
            r#"members[value eq "1"] x"#,
            22,
            "expected '.' or the end of the path",
        ),
        (
            r#"emails[type eq "w"].value.x"#,
            20,
            "'value.x' is not a valid attribute name",
        ),
        (
            r#"emails[type eq "w"].value x"#,
            26,
            "expected the end of the path",
        ),
        (r#"members[value eq "1""#, 20, "expected 'and', 'or' or ']'"),
        (r#"members[value eq "1]"#, 17, "unterminated string"),
        ("members[]", 8, "expected an attribute name"),
        (r#"members[value zz "1"]"#, 14, "unknown operator 'zz'"),
        (r#"name.givenName[x pr]"#, 14, "not its sub-attribute"),
        (r#"a[b[c pr]]"#, 3, "cannot appear inside another"),
        ("\"members\"", 0, "expected an attribute name"),
        ("name:x", 0, "invalid schema prefix"),
    ];

    #[test]
    fn rejects_bad_paths_with_offset_and_reason() {
        for (input, offset, message) in BAD {
            let err = PatchPath::parse(input).expect_err(input);
            assert!(
                err.message.contains(message),
                "{input:?}: {:?} should contain {message:?}",
                err.message
            );
            assert_eq!(err.offset, *offset, "{input:?}: {err}");
            assert_eq!(err.scim_type(), "invalidPath");
        }
    }

    #[test]
    fn is_bounded_like_filters() {
        let nested =
            |depth: usize| format!("m[{}a pr{}]", "(".repeat(depth - 1), ")".repeat(depth - 1));
        assert!(PatchPath::parse(&nested(MAX_FILTER_DEPTH)).is_ok());
        let err = PatchPath::parse(&nested(MAX_FILTER_DEPTH + 1)).unwrap_err();
        assert!(err.message.contains("path nests deeper"), "{err}");
        let err = PatchPath::parse(&"a".repeat(5000)).unwrap_err();
        assert!(err.message.contains("path is longer"), "{err}");
    }

    fn patch_path() -> impl Strategy<Value = PatchPath> {
        prop_oneof![
            attr_path().prop_map(|attr| PatchPath {
                attr,
                value_filter: None
            }),
            (value_path_attr(), value_filter(), prop::option::of(name())).prop_map(
                |(attr, filter, sub_attr)| PatchPath {
                    attr: AttrPath { sub_attr, ..attr },
                    value_filter: Some(filter),
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn printed_paths_parse_back(path in patch_path()) {
            let printed = path.to_string();
            prop_assert_eq!(PatchPath::parse(&printed), Ok(path), "printed as {}", printed);
        }

        #[test]
        fn arbitrary_text_never_panics(input in any::<String>()) {
            let _ = PatchPath::parse(&input);
        }

        #[test]
        fn token_soup_never_panics_and_round_trips(input in token_soup()) {
            if let Ok(path) = PatchPath::parse(&input) {
                prop_assert_eq!(PatchPath::parse(&path.to_string()), Ok(path));
            }
        }
    }
}

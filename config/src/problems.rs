//! Problems found in a configuration file, each located by key path and line.
//!
//! Every problem — unknown key, value of the wrong type, bad value, missing key — is located the
//! same way: by its key path, looked up in the spanned TOML document by [`line_of`]. The document
//! is also searched ([`value_at`]) and edited ([`remove`]) by key path, for `file::read`.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Everything wrong with a configuration file, in the order found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.problems))]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", at_line(.line), at_path(.path))]
pub struct Problem {
    /// Key path, e.g. `routes[2].to[0]`; empty when the problem is not about one key.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigErrors {
    /// A problem with the file as a whole (unreadable, not TOML, ...).
    pub(crate) fn whole_file(line: Option<usize>, message: String) -> Self {
        Self {
            problems: vec![Problem {
                path: String::new(),
                line,
                message,
            }],
        }
    }
}

fn lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!("line {l}: ")).unwrap_or_default()
}

fn at_path(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

/// The path of a key in the file, e.g. `routes[2].to[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    pub fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    /// Whether this is `ancestor` or a path under it.
    pub fn starts_with(&self, ancestor: &KeyPath) -> bool {
        self.0.starts_with(&ancestor.0)
    }

    /// The path of the table entry holding the value at this path: the path itself when it
    /// ends with a key, else the key of the outermost array around it (`routes[0].to[1]` is held
    /// by `routes[0].to`). Empty for the whole document.
    pub fn entry(&self) -> KeyPath {
        let mut path = self.clone();
        while let Some(Segment::Index(_)) = path.0.last() {
            path.0.pop();
        }
        path
    }

    /// The path `serde_ignored` reports for a key it skipped.
    pub fn from_ignored(path: &serde_ignored::Path<'_>) -> Self {
        use serde_ignored::Path;
        match path {
            Path::Root => Self::default(),
            Path::Seq { parent, index } => Self::from_ignored(parent).index(*index),
            Path::Map { parent, key } => Self::from_ignored(parent).key(key),
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => Self::from_ignored(parent),
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Collects problems, giving each the line of its key in the document.
pub(crate) struct Problems<'a> {
    text: &'a str,
    doc: &'a DeTable<'a>,
    found: Vec<Problem>,
    /// Values left out of the file as read, for being of the wrong type; see [`Problems::skip`].
    skipped: Vec<KeyPath>,
}

impl<'a> Problems<'a> {
    pub fn new(text: &'a str, doc: &'a DeTable<'a>) -> Self {
        Self {
            text,
            doc,
            found: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Adds a problem at `path`, unless it is about a skipped value (see [`Problems::skip`]).
    pub fn add(&mut self, path: &KeyPath, message: impl Into<String>) {
        let about_skipped = self.skipped.iter().any(|skipped| {
            path.starts_with(skipped) || (skipped.starts_with(path) && !path.0.is_empty())
        });
        if about_skipped {
            return;
        }
        self.found.push(Problem {
            path: path.to_string(),
            line: line_of(self.doc, path).map(|offset| line_at(self.text, offset)),
            message: message.into(),
        });
    }

    /// Records that the value at `path` was of the wrong type, already reported, and left out of
    /// the file as read. Problems added afterwards at `path`, under it (a missing key of a table
    /// left out) or above it (a rule that names nobody once its `groups` is left out) are
    /// dropped: they would only repeat that one, and go away with it.
    pub fn skip(&mut self, path: KeyPath) {
        self.skipped.push(path);
    }

    /// Whether the value at `path` was left out for being of the wrong type. Such a key was
    /// given: checks that depend on whether it is given treat it so, lest they report a second,
    /// misleading problem for it.
    pub fn skipped(&self, path: &KeyPath) -> bool {
        self.skipped.contains(path)
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Whether anything at or under `path` was reported or left out: what it was read as may
    /// lack what the file says.
    pub fn troubled(&self, path: &KeyPath) -> bool {
        let at = path.to_string();
        let under = |found: &str| {
            found == at
                || found
                    .strip_prefix(at.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        };
        self.found.iter().any(|problem| under(&problem.path))
            || self.skipped.iter().any(|skipped| skipped.starts_with(path))
    }

    pub fn into_errors(self) -> ConfigErrors {
        ConfigErrors {
            problems: self.found,
        }
    }
}

/// Byte offset where `path` is written, or where its closest written ancestor is (a missing
/// key is reported on the line of the table that should hold it). `None` for top-level keys
/// that are missing.
pub(crate) fn line_of(doc: &DeTable<'_>, path: &KeyPath) -> Option<usize> {
    let mut offset = None;
    let mut table = Some(doc);
    let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
    for segment in &path.0 {
        let value = match segment {
            Segment::Key(key) => {
                let entry = table.and_then(|t| t.iter().find(|(k, _)| k.get_ref() == key));
                let Some((key, value)) = entry else { break };
                offset = Some(key.span().start);
                value
            }
            Segment::Index(index) => {
                let Some(value) = array.and_then(|a| a.get(*index)) else {
                    break;
                };
                offset = Some(value.span().start);
                value
            }
        };
        table = value.get_ref().as_table();
        array = value.get_ref().as_array().map(|a| &a[..]);
    }
    offset
}

/// The path of the value written at `span` in `doc`, and the value. An array of tables and its
/// first table share the span of their `[[header]]`: the array is the one returned.
pub(crate) fn value_at<'d, 'i>(
    doc: &'d DeTable<'i>,
    span: &Range<usize>,
) -> Option<(KeyPath, &'d DeValue<'i>)> {
    fn search<'d, 'i>(
        value: &'d Spanned<DeValue<'i>>,
        path: KeyPath,
        span: &Range<usize>,
    ) -> Option<(KeyPath, &'d DeValue<'i>)> {
        if value.span() == *span {
            return Some((path, value.get_ref()));
        }
        // Not pruned by span: a `[table]`'s span is its header, not the keys under it.
        match value.get_ref() {
            DeValue::Table(table) => table
                .iter()
                .find_map(|(key, value)| search(value, path.key(key.get_ref()), span)),
            DeValue::Array(array) => array
                .iter()
                .enumerate()
                .find_map(|(i, value)| search(value, path.index(i), span)),
            _ => None,
        }
    }
    let root = KeyPath::default();
    doc.iter()
        .find_map(|(key, value)| search(value, root.key(key.get_ref()), span))
}

/// Removes the table entry at `path` (a path ending with a key) from `doc`. `false` if there
/// is none.
pub(crate) fn remove(doc: &mut DeTable<'_>, path: &KeyPath) -> bool {
    fn from_table(table: &mut DeTable<'_>, path: &[Segment]) -> bool {
        match path {
            [Segment::Key(key)] => table.remove(key.as_str()).is_some(),
            [Segment::Key(key), rest @ ..] => table
                .get_mut(key.as_str())
                .is_some_and(|value| from_value(value.get_mut(), rest)),
            _ => false,
        }
    }
    fn from_value(value: &mut DeValue<'_>, path: &[Segment]) -> bool {
        match (value, path) {
            (DeValue::Table(table), _) => from_table(table, path),
            (DeValue::Array(array), [Segment::Index(i), rest @ ..]) => array
                .get_mut(*i)
                .is_some_and(|value| from_value(value.get_mut(), rest)),
            _ => false,
        }
    }
    from_table(doc, &path.0)
}

/// 1-based line number of a byte offset.
pub(crate) fn line_at(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    before.iter().filter(|b| **b == b'\n').count() + 1
}

//! Problems found in a configuration file, each located by key path and line.
//!
//! Every problem — unknown key, bad value, missing key — is located the same way: by its key path,
//! looked up in the spanned TOML document by [`line_of`].

use std::fmt;

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
}

impl<'a> Problems<'a> {
    pub fn new(text: &'a str, doc: &'a DeTable<'a>) -> Self {
        Self {
            text,
            doc,
            found: Vec::new(),
        }
    }

    pub fn add(&mut self, path: &KeyPath, message: impl Into<String>) {
        self.found.push(Problem {
            path: path.to_string(),
            line: line_of(self.doc, path).map(|offset| line_at(self.text, offset)),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
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
fn line_of(doc: &DeTable<'_>, path: &KeyPath) -> Option<usize> {
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

/// 1-based line number of a byte offset.
pub(crate) fn line_at(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    before.iter().filter(|b| **b == b'\n').count() + 1
}

//! SCIM filters (RFC 7644 §3.4.2.2): the AST, the parser and the canonical printer.
//!
//! This module owns the syntax only. What `eq` means for a dateTime or a case-insensitive
//! attribute, and which schema an unqualified name belongs to, is decided where filters are
//! evaluated. The lexer and parser here are shared with [`crate::path`], whose `valuePath`
//! brackets hold a filter.
//!
//! Input is untrusted (it arrives in a query string), so the parser is bounded: at most
//! [`MAX_FILTER_LEN`] bytes and [`MAX_FILTER_DEPTH`] nested groups, and it returns an error
//! rather than panicking on anything.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

/// Longest filter (and PATCH path) accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;

/// Deepest nesting of `( … )`, `not ( … )` and `[ … ]` accepted.
pub const MAX_FILTER_DEPTH: usize = 32;

/// `[schema URN ":"] name ["." subAttr]`, e.g. `name.givenName` or
/// `urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department`.
///
/// Names are kept as written; SCIM compares them case-insensitively, so use
/// [`AttrPath::eq_ignore_case`] or [`AttrPath::name_is`] rather than `==` when resolving them.
/// Whether `userName` and `urn:…:core:2.0:User:userName` are the same attribute is a schema
/// question and is not answered here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrPath {
    /// The schema URN prefix without the final `:`, as written.
    pub schema: Option<String>,
    pub name: String,
    pub sub_attr: Option<String>,
}

impl AttrPath {
    /// A bare attribute name, without schema or sub-attribute.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            schema: None,
            name: name.into(),
            sub_attr: None,
        }
    }

    /// Whether both paths name the same attribute, ignoring ASCII case (names are ASCII by grammar).
    pub fn eq_ignore_case(&self, other: &AttrPath) -> bool {
        fn same(a: Option<&str>, b: Option<&str>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                (None, None) => true,
                _ => false,
            }
        }
        same(self.schema.as_deref(), other.schema.as_deref())
            && self.name.eq_ignore_ascii_case(&other.name)
            && same(self.sub_attr.as_deref(), other.sub_attr.as_deref())
    }

    /// Whether the attribute name (not schema, not sub-attribute) is `name`, ignoring ASCII case.
    pub fn name_is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// Splits one lexed word into schema, name and sub-attribute. `offset` is the word's.
    fn from_word(word: &str, offset: usize) -> Result<Self, SyntaxError> {
        let (schema, rest, rest_offset) = match word.rfind(':') {
            Some(colon) => {
                let schema = &word[..colon];
                let is_urn = schema
                    .get(..4)
                    .is_some_and(|p| p.eq_ignore_ascii_case("urn:"))
                    && !schema.split(':').any(str::is_empty);
                if !is_urn {
                    return Err(SyntaxError::new(
                        format!(
                            "{} has an invalid schema prefix; ':' is only allowed in a URN \
                             such as urn:ietf:params:scim:schemas:core:2.0:User:userName",
                            quote(word)
                        ),
                        offset,
                    ));
                }
                (
                    Some(schema.to_owned()),
                    &word[colon + 1..],
                    offset + colon + 1,
                )
            }
            None => (None, word, offset),
        };
        let (name, sub_attr) = match rest.split_once('.') {
            Some((name, sub)) => (name, Some(sub)),
            None => (rest, None),
        };
        check_name(name, rest_offset)?;
        if let Some(sub) = sub_attr {
            check_name(sub, rest_offset + name.len() + 1)?;
        }
        Ok(Self {
            schema,
            name: name.to_owned(),
            sub_attr: sub_attr.map(str::to_owned),
        })
    }
}

impl fmt::Display for AttrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "{schema}:")?;
        }
        f.write_str(&self.name)?;
        if let Some(sub) = &self.sub_attr {
            write!(f, ".{sub}")?;
        }
        Ok(())
    }
}

/// `ATTRNAME = ALPHA *(ALPHA / DIGIT / "-" / "_")`, plus the `$ref` exception of RFC 7643.
fn check_name(name: &str, offset: usize) -> Result<(), SyntaxError> {
    let mut bytes = name.strip_prefix('$').unwrap_or(name).bytes();
    let valid = bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else if name.is_empty() {
        Err(SyntaxError::new("expected an attribute name", offset))
    } else {
        Err(SyntaxError::new(
            format!("{} is not a valid attribute name", quote(name)),
            offset,
        ))
    }
}

/// A comparison operator. `pr` has no value and is [`AttrOp::Present`] instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CompareOp {
    pub const ALL: [CompareOp; 9] = [
        Self::Eq,
        Self::Ne,
        Self::Co,
        Self::Sw,
        Self::Ew,
        Self::Gt,
        Self::Ge,
        Self::Lt,
        Self::Le,
    ];

    /// The keyword in canonical (lower) case.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::Co => "co",
            Self::Sw => "sw",
            Self::Ew => "ew",
            Self::Gt => "gt",
            Self::Ge => "ge",
            Self::Lt => "lt",
            Self::Le => "le",
        }
    }

    fn from_keyword(word: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(word))
    }
}

impl fmt::Display for CompareOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_operator(word: &str) -> bool {
    word.eq_ignore_ascii_case("pr") || CompareOp::from_keyword(word).is_some()
}

/// `compValue`: a JSON literal. DateTimes are strings here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompValue {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
}

impl fmt::Display for CompValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("null"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Number(n) => write!(f, "{n}"),
            Self::String(s) => f.write_str(&serde_json::to_string(s).map_err(|_| fmt::Error)?),
        }
    }
}

/// What an attribute expression tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrOp {
    /// `pr`: the attribute has a non-empty value.
    Present,
    Compare(CompareOp, CompValue),
}

/// `attrPath pr` or `attrPath compareOp compValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrExpr {
    pub path: AttrPath,
    pub op: AttrOp,
}

impl fmt::Display for AttrExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            AttrOp::Present => write!(f, "{} pr", self.path),
            AttrOp::Compare(op, value) => write!(f, "{} {op} {value}", self.path),
        }
    }
}

/// A parsed filter. Parentheses leave no node of their own: they only shape the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `userName eq "a@x.com"`, `title pr`.
    Attr(AttrExpr),
    /// `emails[type eq "work"]`: some element of the multi-valued `attr` (which has no
    /// sub-attribute) matches `filter`. With `sub`, as Microsoft Entra ID sends
    /// `emails[type eq "work"].value eq "a@x"`, that same element's sub-attribute (a bare name
    /// in `sub.path`) must also pass `sub.op`. Value paths do not nest.
    ValuePath {
        attr: AttrPath,
        filter: Box<Filter>,
        sub: Option<AttrExpr>,
    },
    Not(Box<Filter>),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
}

impl Filter {
    /// Parses a filter as it arrives in `?filter=` (already percent-decoded).
    pub fn parse(input: &str) -> Result<Self, FilterError> {
        let mut parser = Parser::new(input, "filter")?;
        let filter = parser.filter()?;
        parser.finish("'and', 'or' or the end of the filter")?;
        Ok(filter)
    }

    /// Binding strength, for printing only the parentheses the tree needs.
    fn precedence(&self) -> u8 {
        match self {
            Self::Or(..) => 1,
            Self::And(..) => 2,
            Self::Attr(_) | Self::ValuePath { .. } | Self::Not(_) => 3,
        }
    }

    fn fmt_operand(&self, f: &mut fmt::Formatter<'_>, parens: bool) -> fmt::Result {
        if parens {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

impl FromStr for Filter {
    type Err = FilterError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::parse(input)
    }
}

/// Canonical form: lower-case keywords, single spaces, JSON-escaped strings, and parentheses
/// only where the tree needs them, so that `Filter::parse(&f.to_string()) == Ok(f)`.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Attr(expr) => write!(f, "{expr}"),
            Self::ValuePath { attr, filter, sub } => {
                write!(f, "{attr}[{filter}]")?;
                match sub {
                    Some(sub) => write!(f, ".{sub}"),
                    None => Ok(()),
                }
            }
            Self::Not(inner) => write!(f, "not ({inner})"),
            Self::And(left, right) | Self::Or(left, right) => {
                let keyword = if matches!(self, Self::And(..)) {
                    "and"
                } else {
                    "or"
                };
                // Both operators are left-associative: an equal-precedence right operand
                // needs parentheses, an equal-precedence left one does not.
                let own = self.precedence();
                left.fmt_operand(f, left.precedence() < own)?;
                write!(f, " {keyword} ")?;
                right.fmt_operand(f, right.precedence() <= own)
            }
        }
    }
}

/// A filter that can't be parsed. Answered as SCIM `400` with `scimType` [`Self::scim_type`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at byte {offset})")]
pub struct FilterError {
    pub message: String,
    /// Byte offset into the filter where the problem was found.
    pub offset: usize,
}

impl FilterError {
    pub fn scim_type(&self) -> &'static str {
        "invalidFilter"
    }
}

impl From<SyntaxError> for FilterError {
    fn from(e: SyntaxError) -> Self {
        Self {
            message: e.message,
            offset: e.offset,
        }
    }
}

/// The parser's error, turned into [`FilterError`] or [`crate::path::PathError`] by its caller.
#[derive(Debug)]
pub(crate) struct SyntaxError {
    pub(crate) message: String,
    pub(crate) offset: usize,
}

impl SyntaxError {
    fn new(message: impl Into<String>, offset: usize) -> Self {
        Self {
            message: message.into(),
            offset,
        }
    }
}

/// Quotes user text in a message, cut short so an error never echoes a whole attack payload.
fn quote(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("'{}…'", &text[..cut]),
        None => format!("'{text}'"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok<'a> {
    LParen,
    RParen,
    LBracket,
    RBracket,
    Dot,
    /// An attribute path or a keyword; which one depends on where it stands.
    Word(&'a str),
    Str(String),
    Num(serde_json::Number),
}

struct Token<'a> {
    tok: Tok<'a>,
    offset: usize,
}

fn lex(input: &str) -> Result<VecDeque<Token<'_>>, SyntaxError> {
    let bytes = input.as_bytes();
    let scan = |from: usize, ok: fn(u8) -> bool| {
        from + bytes[from..].iter().take_while(|&&b| ok(b)).count()
    };
    let mut tokens = VecDeque::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let start = i;
        let tok = match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'(' | b')' | b'[' | b']' | b'.' => {
                i += 1;
                match b {
                    b'(' => Tok::LParen,
                    b')' => Tok::RParen,
                    b'[' => Tok::LBracket,
                    b']' => Tok::RBracket,
                    _ => Tok::Dot,
                }
            }
            b'"' => {
                i = string_end(bytes, start)
                    .ok_or_else(|| SyntaxError::new("unterminated string", start))?;
                let literal = &input[start..i];
                let value = serde_json::from_str(literal).map_err(|e| {
                    SyntaxError::new(
                        "invalid string: bad escape or unescaped control character",
                        start + e.column().saturating_sub(1),
                    )
                })?;
                Tok::Str(value)
            }
            b'-' | b'0'..=b'9' => {
                i = scan(start, |b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-')
                });
                let literal = &input[start..i];
                let number = serde_json::from_str(literal).map_err(|_| {
                    SyntaxError::new(format!("{} is not a valid number", quote(literal)), start)
                })?;
                Tok::Num(number)
            }
            b'$' | b'a'..=b'z' | b'A'..=b'Z' => {
                i = scan(start, |b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'$')
                });
                Tok::Word(&input[start..i])
            }
            _ => {
                let c = input[start..]
                    .chars()
                    .next()
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                return Err(SyntaxError::new(
                    format!("unexpected character {c:?}"),
                    start,
                ));
            }
        };
        tokens.push_back(Token { tok, offset: start });
    }
    Ok(tokens)
}

/// Index just past the closing quote of the string starting at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match bytes.get(i)? {
            b'"' => return Some(i + 1),
            // Skips the escaped byte; a multi-byte character's other bytes are never `"` or `\`.
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Recursive descent over the tokens. Only groups recurse, and `depth` caps them;
/// `and`/`or` chains are loops.
pub(crate) struct Parser<'a> {
    tokens: VecDeque<Token<'a>>,
    /// Input length: the offset reported at the end of input.
    end: usize,
    /// "filter" or "path", for messages.
    what: &'static str,
    depth: usize,
    in_value_path: bool,
}

impl<'a> Parser<'a> {
    pub(crate) fn new(input: &'a str, what: &'static str) -> Result<Self, SyntaxError> {
        if input.len() > MAX_FILTER_LEN {
            return Err(SyntaxError::new(
                format!("{what} is longer than {MAX_FILTER_LEN} bytes"),
                MAX_FILTER_LEN,
            ));
        }
        let tokens = lex(input)?;
        if tokens.is_empty() {
            return Err(SyntaxError::new(format!("{what} is empty"), 0));
        }
        Ok(Self {
            tokens,
            end: input.len(),
            what,
            depth: 0,
            in_value_path: false,
        })
    }

    fn peek(&self) -> Option<&Tok<'a>> {
        self.tokens.front().map(|t| &t.tok)
    }

    fn offset(&self) -> usize {
        self.tokens.front().map_or(self.end, |t| t.offset)
    }

    fn bump(&mut self) -> Option<Token<'a>> {
        self.tokens.pop_front()
    }

    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(keyword))
    }

    /// An error saying what was expected and what was found instead.
    fn unexpected(&self, expected: &str) -> SyntaxError {
        let found = match self.peek() {
            None => format!("the end of the {}", self.what),
            Some(Tok::LParen) => "'('".to_owned(),
            Some(Tok::RParen) => "')'".to_owned(),
            Some(Tok::LBracket) => "'['".to_owned(),
            Some(Tok::RBracket) => "']'".to_owned(),
            Some(Tok::Dot) => "'.'".to_owned(),
            Some(Tok::Word(w)) => quote(w),
            Some(Tok::Str(_)) => "a string".to_owned(),
            Some(Tok::Num(_)) => "a number".to_owned(),
        };
        SyntaxError::new(format!("expected {expected}, found {found}"), self.offset())
    }

    /// Fails unless all input has been consumed.
    pub(crate) fn finish(&self, expected: &str) -> Result<(), SyntaxError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.unexpected(expected)),
        }
    }

    pub(crate) fn at(&self, tok: &Tok<'_>) -> bool {
        self.peek() == Some(tok)
    }

    /// `or` binds loosest, then `and`; both associate to the left.
    pub(crate) fn filter(&mut self) -> Result<Filter, SyntaxError> {
        let mut left = self.and_chain()?;
        while self.peek_keyword("or") {
            self.bump();
            let right = self.and_chain()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_chain(&mut self) -> Result<Filter, SyntaxError> {
        let mut left = self.operand()?;
        while self.peek_keyword("and") {
            self.bump();
            let right = self.operand()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn operand(&mut self) -> Result<Filter, SyntaxError> {
        if self.at(&Tok::LParen) {
            return self.group(Tok::RParen, "')'");
        }
        if self.peek_keyword("not") {
            // `not` is only a keyword before `(`: `not pr` tests an attribute named "not".
            let second = self.tokens.get(1).map(|t| &t.tok);
            let opens_group = matches!(second, Some(Tok::LParen));
            let misplaced = matches!(second, Some(Tok::Word(w)) if !is_operator(w));
            if opens_group {
                self.bump();
                return Ok(Filter::Not(Box::new(self.group(Tok::RParen, "')'")?)));
            }
            if misplaced {
                self.bump();
                return Err(self.unexpected("'(' after 'not'"));
            }
        }
        let path = self.attr_path()?;
        if !self.at(&Tok::LBracket) {
            let op = self.attr_op()?;
            return Ok(Filter::Attr(AttrExpr { path, op }));
        }
        let filter = self.value_filter(&path)?;
        let sub = match self.sub_attr()? {
            Some(name) => Some(AttrExpr {
                path: AttrPath::new(name),
                op: self.attr_op()?,
            }),
            None => None,
        };
        Ok(Filter::ValuePath {
            attr: path,
            filter: Box::new(filter),
            sub,
        })
    }

    /// Consumes the opening token, then a filter and `close`, one level deeper.
    fn group(&mut self, close: Tok<'_>, close_name: &str) -> Result<Filter, SyntaxError> {
        let open = self.offset();
        self.bump();
        self.depth += 1;
        if self.depth > MAX_FILTER_DEPTH {
            return Err(SyntaxError::new(
                format!("{} nests deeper than {MAX_FILTER_DEPTH} levels", self.what),
                open,
            ));
        }
        let filter = self.filter()?;
        if !self.at(&close) {
            return Err(self.unexpected(&format!("'and', 'or' or {close_name}")));
        }
        self.bump();
        self.depth -= 1;
        Ok(filter)
    }

    pub(crate) fn attr_path(&mut self) -> Result<AttrPath, SyntaxError> {
        match self.peek() {
            Some(&Tok::Word(word)) => {
                let offset = self.offset();
                self.bump();
                AttrPath::from_word(word, offset)
            }
            _ => Err(self.unexpected("an attribute name")),
        }
    }

    /// `[ valFilter ]` after `attr`, the parser being at `[`.
    pub(crate) fn value_filter(&mut self, attr: &AttrPath) -> Result<Filter, SyntaxError> {
        if let Some(sub) = &attr.sub_attr {
            return Err(SyntaxError::new(
                format!(
                    "'[' must follow an attribute, not its sub-attribute {}",
                    quote(sub)
                ),
                self.offset(),
            ));
        }
        if self.in_value_path {
            return Err(SyntaxError::new(
                "'[' cannot appear inside another '[...]'",
                self.offset(),
            ));
        }
        self.in_value_path = true;
        let filter = self.group(Tok::RBracket, "']'")?;
        self.in_value_path = false;
        Ok(filter)
    }

    /// An optional `.subAttr` after `]`.
    pub(crate) fn sub_attr(&mut self) -> Result<Option<String>, SyntaxError> {
        if !self.at(&Tok::Dot) {
            return Ok(None);
        }
        self.bump();
        match self.peek() {
            Some(&Tok::Word(word)) => {
                check_name(word, self.offset())?;
                self.bump();
                Ok(Some(word.to_owned()))
            }
            _ => Err(self.unexpected("a sub-attribute name after '.'")),
        }
    }

    fn attr_op(&mut self) -> Result<AttrOp, SyntaxError> {
        let Some(&Tok::Word(word)) = self.peek() else {
            return Err(self.unexpected("an operator (eq, ne, co, sw, ew, gt, ge, lt, le or pr)"));
        };
        let offset = self.offset();
        if word.eq_ignore_ascii_case("pr") {
            self.bump();
            return Ok(AttrOp::Present);
        }
        let Some(op) = CompareOp::from_keyword(word) else {
            return Err(SyntaxError::new(
                format!(
                    "unknown operator {}; expected eq, ne, co, sw, ew, gt, ge, lt, le or pr",
                    quote(word)
                ),
                offset,
            ));
        };
        self.bump();
        Ok(AttrOp::Compare(op, self.comp_value()?))
    }

    fn comp_value(&mut self) -> Result<CompValue, SyntaxError> {
        let value = match self.peek() {
            Some(Tok::Str(s)) => CompValue::String(s.clone()),
            Some(Tok::Num(n)) => CompValue::Number(n.clone()),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => CompValue::Bool(true),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => CompValue::Bool(false),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => CompValue::Null,
            _ => {
                return Err(self.unexpected("a value (a \"string\", a number, true, false or null)"))
            }
        };
        self.bump();
        Ok(value)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

    fn attr(path: &str, op: CompareOp, value: CompValue) -> Filter {
        Filter::Attr(AttrExpr {
            path: AttrPath::from_word(path, 0).unwrap(),
            op: AttrOp::Compare(op, value),
        })
    }

    fn string(s: &str) -> CompValue {
        CompValue::String(s.to_owned())
    }

    /// Filters as Okta, Entra ID and RFC 7644 send them, with their canonical form.
    const GOOD: &[(&str, &str)] = &[
        (r#"userName eq "a@x.com""#, r#"userName eq "a@x.com""#),
        (r#"externalId eq "abc""#, r#"externalId eq "abc""#),
        (
            r#"emails[type eq "work"].value eq "a@x""#,
            r#"emails[type eq "work"].value eq "a@x""#,
        ),
        (
            r#"displayName eq "Eng" and externalId eq "x""#,
            r#"displayName eq "Eng" and externalId eq "x""#,
        ),
        (
            r#"meta.lastModified gt "2011-05-13T04:42:34Z""#,
            r#"meta.lastModified gt "2011-05-13T04:42:34Z""#,
        ),
        ("title pr", "title pr"),
        (r#"not (userName sw "j")"#, r#"not (userName sw "j")"#),
        (
            r#"userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")"#,
            r#"userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")"#,
        ),
        (
            r#"emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]"#,
            r#"emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]"#,
        ),
        (
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq "Eng""#,
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq "Eng""#,
        ),
        (
            r#"urn:ietf:params:scim:schemas:core:2.0:User:name.familyName co "O'Malley""#,
            r#"urn:ietf:params:scim:schemas:core:2.0:User:name.familyName co "O'Malley""#,
        ),
        // Case-insensitive keywords, loose spacing, redundant parentheses.
        (r#"userName EQ "Bjensen""#, r#"userName eq "Bjensen""#),
        (
            r#"(title Pr)AND(active eq TRUE)"#,
            "title pr and active eq true",
        ),
        (r#"NOT(x pr)"#, "not (x pr)"),
        ("a pr or b pr and c pr", "a pr or b pr and c pr"),
        ("(a pr or b pr) and c pr", "(a pr or b pr) and c pr"),
        ("a pr and (b pr and c pr)", "a pr and (b pr and c pr)"),
        ("((a pr) and b pr) and c pr", "a pr and b pr and c pr"),
        // Values.
        ("age gt 30", "age gt 30"),
        ("score le -1.5", "score le -1.5"),
        ("ratio lt 2.5e3", "ratio lt 2500.0"),
        ("manager eq null", "manager eq null"),
        ("active ne False", "active ne false"),
        (r#"d eq "\"q\" \\ \u00e9 \n""#, r#"d eq "\"q\" \\ é \n""#),
        // Odd but legal names: keywords stand where an attribute does, `$ref`.
        ("not pr", "not pr"),
        ("and eq 1 and or eq 2", "and eq 1 and or eq 2"),
        (
            r#"members[$ref ew "/Users/1"]"#,
            r#"members[$ref ew "/Users/1"]"#,
        ),
    ];

    #[test]
    fn parses_real_filters_and_prints_them_canonically() {
        for (input, canonical) in GOOD {
            let filter =
                Filter::parse(input).unwrap_or_else(|e| panic!("{input:?} should parse, got {e}"));
            assert_eq!(filter.to_string(), *canonical, "printing {input:?}");
            assert_eq!(
                Filter::parse(canonical),
                Ok(filter),
                "reparsing {canonical:?}"
            );
        }
    }

    /// Bad filters, the byte offset reported and a piece of the message.
    const BAD: &[(&str, usize, &str)] = &[
        ("", 0, "filter is empty"),
        ("   ", 0, "filter is empty"),
        (r#"userName eq "abc"#, 12, "unterminated string"),
        (r#"userName eq "a\qb""#, 15, "invalid string"),
        (r#"userName xx "a""#, 9, "unknown operator 'xx'"),
        ("userName eq", 11, "expected a value"),
        ("userName eq and", 12, "expected a value"),
        ("userName", 8, "expected an operator"),
        (
            r#"userName eq "a" garbage"#,
            16,
            "expected 'and', 'or' or the end of the filter",
        ),
        (r#"userName eq "a")"#, 15, "found ')'"),
        (r#"(userName eq "a""#, 16, "expected 'and', 'or' or ')'"),
        (r#"emails[type eq "w""#, 18, "expected 'and', 'or' or ']'"),
        (r#"userName eq "a" and"#, 19, "expected an attribute name"),
        (r#"not userName eq "a""#, 4, "expected '(' after 'not'"),
        ("title pr or", 11, "expected an attribute name"),
        ("x eq 01", 5, "not a valid number"),
        ("x eq 1.", 5, "not a valid number"),
        ("x eq 1e999", 5, "not a valid number"),
        ("x eq yes", 5, "expected a value"),
        ("x eq #", 5, "unexpected character '#'"),
        ("3 eq 3", 0, "expected an attribute name"),
        (
            "name.given.family pr",
            5,
            "'given.family' is not a valid attribute name",
        ),
        ("name: pr", 0, "invalid schema prefix"),
        ("urn:a::b pr", 0, "invalid schema prefix"),
        ("urn:a:b: pr", 8, "expected an attribute name"),
        (r#"name.x[y eq "z"]"#, 6, "not its sub-attribute 'x'"),
        (r#"emails[a[b pr]]"#, 8, "cannot appear inside another"),
        (r#"emails[type eq "w"].value"#, 25, "expected an operator"),
        (
            r#"emails[type eq "w"]."#,
            20,
            "expected a sub-attribute name",
        ),
    ];

    #[test]
    fn rejects_bad_filters_with_offset_and_reason() {
        for (input, offset, message) in BAD {
            let err = Filter::parse(input).expect_err(input);
            assert!(
                err.message.contains(message),
                "{input:?}: {:?} should contain {message:?}",
                err.message
            );
            assert_eq!(err.offset, *offset, "{input:?}: {err}");
            assert_eq!(err.scim_type(), "invalidFilter");
        }
    }

    #[test]
    fn bounds_nesting_depth() {
        let nested = |depth: usize| format!("{}a pr{}", "(".repeat(depth), ")".repeat(depth));
        assert!(Filter::parse(&nested(MAX_FILTER_DEPTH)).is_ok());
        let err = Filter::parse(&nested(MAX_FILTER_DEPTH + 1)).unwrap_err();
        assert_eq!(err.offset, MAX_FILTER_DEPTH);
        assert!(err.message.contains("deeper than 32"), "{err}");

        let nots = format!("{}a pr{}", "not (".repeat(100), ")".repeat(100));
        assert!(Filter::parse(&nots).unwrap_err().message.contains("deeper"));
        // Unbalanced garbage fails on depth, not on the stack.
        assert!(Filter::parse(&"(".repeat(MAX_FILTER_LEN)).is_err());
    }

    #[test]
    fn bounds_length() {
        let long = format!(r#"userName eq "{}""#, "x".repeat(MAX_FILTER_LEN));
        let err = Filter::parse(&long).unwrap_err();
        assert!(err.message.contains("longer than 4096 bytes"), "{err}");
        // A long `and` chain within the limit is a loop, not recursion.
        let chain = vec!["a pr"; MAX_FILTER_LEN / 9].join(" and ");
        assert!(chain.len() <= MAX_FILTER_LEN);
        let parsed = Filter::parse(&chain).unwrap();
        assert_eq!(parsed.to_string(), chain);
    }

    #[test]
    fn builds_the_expected_tree() {
        assert_eq!(
            Filter::parse(r#"emails[type eq "work"].value eq "a@x""#),
            Ok(Filter::ValuePath {
                attr: AttrPath::new("emails"),
                filter: Box::new(attr("type", CompareOp::Eq, string("work"))),
                sub: Some(AttrExpr {
                    path: AttrPath::new("value"),
                    op: AttrOp::Compare(CompareOp::Eq, string("a@x")),
                }),
            })
        );
        // not > and > or
        let (a, b, c) = (
            attr("a", CompareOp::Eq, CompValue::Null),
            attr("b", CompareOp::Eq, CompValue::Null),
            attr("c", CompareOp::Eq, CompValue::Null),
        );
        assert_eq!(
            Filter::parse("a eq null or not (b eq null) and c eq null"),
            Ok(Filter::Or(
                Box::new(a),
                Box::new(Filter::And(Box::new(Filter::Not(Box::new(b))), Box::new(c)))
            ))
        );
        let Ok(Filter::Attr(expr)) = Filter::parse(&format!("{ENTERPRISE}:manager.value pr"))
        else {
            panic!("not an attribute expression");
        };
        assert_eq!(expr.path.schema.as_deref(), Some(ENTERPRISE));
        assert_eq!(expr.path.name, "manager");
        assert_eq!(expr.path.sub_attr.as_deref(), Some("value"));
    }

    #[test]
    fn compares_names_case_insensitively() {
        let written = AttrPath::from_word("URN:a:B:UserName.Given", 0).unwrap();
        assert_eq!(written.name, "UserName", "kept as written");
        assert!(written.name_is("username"));
        assert!(written.eq_ignore_case(&AttrPath::from_word("urn:A:b:userName.given", 0).unwrap()));
        assert!(!written.eq_ignore_case(&AttrPath::from_word("userName.given", 0).unwrap()));
        assert!(!written.eq_ignore_case(&AttrPath::from_word("urn:a:b:userName", 0).unwrap()));
    }

    #[test]
    fn error_displays_offset() {
        let err = Filter::parse("userName xx 1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown operator 'xx'; expected eq, ne, co, sw, ew, gt, ge, lt, le or pr (at byte 9)"
        );
        let long_word = format!("{} pr", "a".repeat(100));
        let err = Filter::parse(&format!("x {long_word}")).unwrap_err();
        assert!(err.message.len() < 150, "user text is cut short: {err}");
    }

    // --- Property tests: random trees print and parse back; random text never panics.

    pub(crate) fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "userName", "emails", "value", "type", "not", "and", "or", "pr", "eq", "true",
                "null", "$ref", "x-y_z",
            ])
            .prop_map(str::to_owned),
            "[a-zA-Z][a-zA-Z0-9_-]{0,8}",
        ]
    }

    pub(crate) fn attr_path() -> impl Strategy<Value = AttrPath> {
        let schema = prop_oneof![
            Just(None),
            Just(Some(ENTERPRISE.to_owned())),
            "[uU][rR][nN](:[a-zA-Z0-9.-]{1,6}){1,4}".prop_map(Some),
        ];
        (schema, name(), prop::option::of(name())).prop_map(|(schema, name, sub_attr)| AttrPath {
            schema,
            name,
            sub_attr,
        })
    }

    fn comp_value() -> impl Strategy<Value = CompValue> {
        prop_oneof![
            Just(CompValue::Null),
            any::<bool>().prop_map(CompValue::Bool),
            any::<i64>().prop_map(|n| CompValue::Number(n.into())),
            any::<u64>().prop_map(|n| CompValue::Number(n.into())),
            any::<f64>().prop_filter_map("finite", |n| {
                serde_json::Number::from_f64(n).map(CompValue::Number)
            }),
            prop::collection::vec(any::<char>(), 0..12)
                .prop_map(|chars| CompValue::String(chars.into_iter().collect())),
        ]
    }

    fn attr_op() -> impl Strategy<Value = AttrOp> {
        prop_oneof![
            Just(AttrOp::Present),
            (prop::sample::select(CompareOp::ALL.to_vec()), comp_value())
                .prop_map(|(op, value)| AttrOp::Compare(op, value)),
        ]
    }

    fn attr_expr(path: impl Strategy<Value = AttrPath>) -> impl Strategy<Value = AttrExpr> {
        (path, attr_op()).prop_map(|(path, op)| AttrExpr { path, op })
    }

    /// Trees of not/and/or over `leaf`.
    fn logic(leaf: BoxedStrategy<Filter>, depth: u32) -> BoxedStrategy<Filter> {
        leaf.prop_recursive(depth, 12, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|f| Filter::Not(Box::new(f))),
                (inner.clone(), inner.clone())
                    .prop_map(|(l, r)| Filter::And(Box::new(l), Box::new(r))),
                (inner.clone(), inner).prop_map(|(l, r)| Filter::Or(Box::new(l), Box::new(r))),
            ]
        })
        .boxed()
    }

    /// A filter valid inside `[...]`: no value paths.
    pub(crate) fn value_filter() -> BoxedStrategy<Filter> {
        logic(attr_expr(attr_path()).prop_map(Filter::Attr).boxed(), 2)
    }

    /// `attr` for a value path: no sub-attribute.
    pub(crate) fn value_path_attr() -> impl Strategy<Value = AttrPath> {
        attr_path().prop_map(|a| AttrPath {
            sub_attr: None,
            ..a
        })
    }

    pub(crate) fn filter() -> BoxedStrategy<Filter> {
        let sub = prop::option::of(attr_expr(name().prop_map(AttrPath::new)));
        let value_path =
            (value_path_attr(), value_filter(), sub).prop_map(|(attr, f, sub)| Filter::ValuePath {
                attr,
                filter: Box::new(f),
                sub,
            });
        let leaf = prop_oneof![
            2 => attr_expr(attr_path()).prop_map(Filter::Attr),
            1 => value_path,
        ];
        logic(leaf.boxed(), 4)
    }

    /// Text made of filter tokens, to reach deep parser states more often than random text.
    pub(crate) fn token_soup() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            "userName",
            "emails",
            "urn:a:b:c",
            "name.x",
            " ",
            "eq",
            "PR",
            "gt",
            "and",
            "or",
            "not",
            "(",
            ")",
            "[",
            "]",
            ".",
            "\"x\"",
            "\"\\",
            "1.5",
            "-",
            "true",
            "null",
            "$ref",
            "é",
            "\"",
        ]);
        prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.concat())
    }

    proptest! {
        #[test]
        fn printed_trees_parse_back(f in filter()) {
            let printed = f.to_string();
            prop_assert!(printed.len() <= MAX_FILTER_LEN);
            prop_assert_eq!(Filter::parse(&printed), Ok(f), "printed as {}", printed);
        }

        #[test]
        fn arbitrary_text_never_panics(input in any::<String>()) {
            let _ = Filter::parse(&input);
        }

        #[test]
        fn token_soup_never_panics_and_round_trips(input in token_soup()) {
            if let Ok(f) = Filter::parse(&input) {
                prop_assert_eq!(Filter::parse(&f.to_string()), Ok(f));
            }
        }
    }
}

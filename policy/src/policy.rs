//! The compiled policy and its evaluation.
//!
//! Compiling numbers the rules, deny rules first, and indexes every name a rule mentions (group,
//! group id, user, email domain) into a table from that name to the set of rules naming it.
//! Evaluating looks each of the subject's names up once, ORs the rule sets it finds into a bit
//! set of "rules whose who-criteria match", and takes the lowest-numbered of those whose
//! conditions (method, path) also hold. Because deny rules have the lowest numbers, any matching
//! deny rule is found before any allow rule: deny wins by construction.

use std::ops::ControlFlow;

use crate::index::{empty_bits, has_bit, set_bit, Compare, RuleBits, StrIndex};
use crate::reason::{Conditions, Decision, Match, Reason};
use crate::spec::{
    email_domain, holds_star, is_token, parse_domain, path_problem, spelling_problem, PolicyError,
    Problem, PREFIXES_NOT_PATTERNS,
};
use crate::{Request, RuleSpec, Subject, SubjectKind};

/// Rules examined per pass over the subject's names: 256 rules fit in a bit set on the stack.
/// A policy with more rules makes one pass per 256 of them.
const CHUNK_WORDS: usize = 4;

/// The methods that get a bit of their own; any other token is compared as a string.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A compiled, immutable set of allow and deny rules for one route. Build it once per
/// configuration load with [`Policy::compile`], share it (it is `Send + Sync`), and call
/// [`Policy::evaluate`] per request; evaluation allocates only for a path read in more than one
/// way (`;` parameters, page names, letters beyond ASCII).
///
/// A policy with no rules refuses everything. Two policies compiled from the same rules are
/// equal.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Deny rules first, then allow rules, each in the order given.
    rules: Box<[Rule]>,
    /// Whether any rule names methods (see [`Policy::names_methods`]).
    names_methods: bool,
    words: usize,
    deny_rules: RuleBits,
    groups: StrIndex,
    group_ids: StrIndex,
    users: StrIndex,
    domains: StrIndex,
    /// `*.corp.example` is stored as `corp.example`.
    subdomains_of: StrIndex,
    any_signed_in: RuleBits,
    machines: RuleBits,
    agents: RuleBits,
    agent_groups: StrIndex,
    agent_owner_groups: StrIndex,
    public: RuleBits,
    /// Indices of the allow rules with `public`.
    public_allow: Box<[usize]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    name: Box<str>,
    effect: Effect,
    methods: Option<MethodSet>,
    /// Longest first, so the prefix a reason names is the most specific one.
    paths: Option<Box<[Prefix]>>,
}

/// A rule's path prefix, and the other names of what it names that deny rules also read it
/// by (see [`denied_within`]), worked out once rather than for every request.
#[derive(Debug, Clone, PartialEq)]
struct Prefix {
    text: Box<str>,
    pages: PageNames,
}

impl Prefix {
    fn new(text: &str) -> Self {
        Self {
            text: text.into(),
            pages: PageNames::of(text),
        }
    }
}

/// The other names servers serve what a path prefix names by, when it names a page's file:
/// worked out once (for a rule, or a route), not for every request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PageNames {
    /// Without the extension of its last segment's page file ([`page_name`]: `/admin` for
    /// `/admin.php`), or of the one its path info follows ([`page_with_info`]: `/admin/users`
    /// for `/admin.php/users`); and what follows `index.php`, as a front controller serves it
    /// by its pretty name ([`script_routed`]: `/admin` for `/index.php/admin`).
    names: Box<[Box<str>]>,
    /// The directory whose index page it names ([`index_of`]: `/admin` for
    /// `/admin/index.php`).
    directory: Option<Box<str>>,
}

impl PageNames {
    pub fn of(prefix: &str) -> Self {
        let clean = page_name(prefix)
            .map(str::to_owned)
            .or_else(|| page_with_info(prefix));
        // The front controller pretty URLs are rewritten to (`index.php`; not another
        // script, which serves its own paths), with something after it (what a route on
        // `/index.php/` names is the script's own, not the site's root).
        let pretty = script_routed(prefix)
            .filter(|(_, end)| {
                let script = prefix[..*end].rsplit('/').next().unwrap_or_default();
                let script = script.split_once(';').map_or(script, |(name, _)| name);
                script.eq_ignore_ascii_case("index.php")
                    && !prefix[*end..].trim_matches('/').is_empty()
            })
            .map(|(routed, _)| routed);
        Self {
            names: clean.into_iter().chain(pretty).map(Into::into).collect(),
            directory: index_of(prefix).map(Into::into),
        }
    }

    /// Whether the prefix names no page's file.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.directory.is_none()
    }

    /// How deep ([`loose_depth`]) the name that holds `path` is, if one does (as
    /// [`loosely_within`] reads paths): `/admin` is 1 for `/index.php/admin`, 2 written so.
    /// The path is read once for every route asked (see [`LoosePath`]).
    pub fn holding(&self, path: &LoosePath<'_>) -> Option<usize> {
        let name = (self.names.iter()).find(|name| path.within(name));
        let named = name.map(|name| loose_depth(name));
        named.or_else(|| {
            let dir = self.directory.as_deref()?;
            is_directory(dir, path).then(|| loose_depth(if dir.is_empty() { "/" } else { dir }))
        })
    }

    /// Whether `path` is what the prefix names, by one of these names, with a format suffix
    /// on the path's last segment with `formats` (as deny rules read it).
    fn hold_with(&self, path: &LoosePath<'_>, formats: bool) -> bool {
        self.names
            .iter()
            .any(|name| path.within_formats(name, formats))
            || (self.directory.as_deref()).is_some_and(|dir| is_directory(dir, path))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct MethodSet {
    /// One bit per entry of `KNOWN_METHODS`.
    known: u16,
    /// Other methods, upper-cased.
    other: Box<[Box<str>]>,
}

#[derive(Clone, Copy)]
enum Method<'r> {
    Known(u16),
    Other(&'r str),
}

impl<'r> Method<'r> {
    fn of(method: &'r str) -> Self {
        KNOWN_METHODS
            .iter()
            .position(|known| known.eq_ignore_ascii_case(method))
            .map_or(Method::Other(method), |i| Method::Known(1 << i))
    }
}

impl MethodSet {
    fn contains(&self, method: Method<'_>) -> bool {
        match method {
            Method::Known(bit) => self.known & bit != 0,
            Method::Other(name) => self.other.iter().any(|m| m.eq_ignore_ascii_case(name)),
        }
    }
}

/// `/admin` matches `/admin` and `/admin/…` but not `/adminx`; `/admin/` matches `/admin/…`
/// only. How allow rules read a path: strictly.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Whether `path` is within `prefix` as the most lenient common upstream could read it: each
/// segment's `;` parameters dropped (Tomcat, Jetty and Spring read `/admin;x` as `/admin`), the
/// segments left empty gone, `%2B` read as the `+` frameworks decode it to in a path, letters
/// compared in any case (Express and ASP.NET read `/ADMIN` as
/// `/admin`, and ASP.NET `/%C3%9Cber` as `/%C3%BCber`), and a prefix's trailing `/` not required of the path (Express, Rails
/// and ASP.NET serve `/admin` as `/admin/`). The boundaries are segments: `/admin` does not
/// hold `/adminx`. This is how route selection reads a path, so that no spelling an upstream
/// understands as another route's lands elsewhere; deny rules read it so too, and more
/// ([`denied_within`]); allow rules read strictly ([`prefix_matches`]).
///
/// `path` is normalized (no empty or dot segments), as everything Portcullis judges is.
pub fn loosely_within(prefix: &str, path: &str) -> bool {
    LoosePath::new(path).within(prefix)
}

/// A path read once for [`loosely_within`] against many prefixes (route selection tries each
/// route of a host, narrowest first): whether it reads plainly is found once, not once a
/// prefix (a 60 KiB path against 50 routes was 3 MB of scanning).
pub struct LoosePath<'a> {
    path: &'a str,
    plain: bool,
    /// Its [`loose_depth`], once asked.
    depth: std::cell::OnceCell<usize>,
    /// Its segments as read so far, and (when it reads otherwise) its reading without the
    /// spaces at its ends: a path that does not read plainly is compared segment by segment,
    /// and each segment is read once, not once a prefix.
    segments: Segments<'a>,
    trimmed: Option<Segments<'a>>,
}

impl<'a> LoosePath<'a> {
    pub fn new(path: &'a str) -> Self {
        let plain = reads_plainly(path);
        // CodeIgniter trims spaces off the path's ends: read it both ways (never the prefix's,
        // whose own `+` is the path's, as in `/c++/`). A plain path has none to trim.
        let trimmed = (!plain)
            .then(|| trim_spaces(path))
            .filter(|trimmed| trimmed.len() < path.trim_matches('/').len())
            .map(Segments::new);
        Self {
            path,
            plain,
            depth: std::cell::OnceCell::new(),
            segments: Segments::new(path),
            trimmed,
        }
    }

    /// [`loosely_within`]`(prefix, path)`.
    pub fn within(&self, prefix: &str) -> bool {
        self.within_formats(prefix, false)
    }

    /// [`LoosePath::within`], with a format suffix on the path's last segment with `formats`.
    fn within_formats(&self, prefix: &str, formats: bool) -> bool {
        let prefix = match prefix.strip_suffix('/') {
            Some(bare) if !bare.is_empty() => bare,
            _ => prefix,
        };
        if self.plain && reads_plainly(prefix) {
            return within_plainly(prefix, self.path, formats);
        }
        within_segments(prefix, &self.segments, formats)
            || (self.trimmed.as_ref())
                .is_some_and(|trimmed| within_segments(prefix, trimmed, formats))
    }

    fn depth(&self) -> usize {
        *self.depth.get_or_init(|| loose_depth(self.path))
    }
}

/// The [`loose_segments`] of a path, read as they are asked for and kept.
struct Segments<'a> {
    /// What is left to read.
    rest: std::cell::Cell<&'a str>,
    read: std::cell::RefCell<Vec<&'a str>>,
}

impl<'a> Segments<'a> {
    fn new(path: &'a str) -> Self {
        Self {
            rest: std::cell::Cell::new(path),
            read: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// The `i`-th segment, if the path has so many.
    fn get(&self, i: usize) -> Option<&'a str> {
        let mut read = self.read.borrow_mut();
        while read.len() <= i {
            let rest = self.rest.get();
            if rest.is_empty() {
                return None;
            }
            let (segment, after) = rest.split_once('/').unwrap_or((rest, ""));
            self.rest.set(after);
            let segment = without_parameters(segment);
            if !segment.is_empty() {
                read.push(segment);
            }
        }
        read.get(i).copied()
    }
}

/// Whether `path` is within `prefix` as written: in its case, with its parameters, at segment
/// boundaries, and with a prefix's trailing `/` not required of the path (`/admin/` holds
/// `/admin`), as an upstream that routes paths strictly reads them.
pub fn strictly_within(prefix: &str, path: &str) -> bool {
    let bare = match prefix.strip_suffix('/') {
        Some(bare) if !bare.is_empty() => bare,
        _ => prefix,
    };
    path.strip_prefix(bare)
        .is_some_and(|rest| bare.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
}

/// [`loosely_within`], and with a format suffix on the path's last segment when it is the
/// prefix's last: Rails routes `/items/export.csv` to `/items/export`, as Spring MVC before 5.3
/// does by default. And as a PHP front controller routes it ([`script_routed`]); and a page
/// the prefix names by its file as served without the file's extension ([`page_name`]). How
/// deny rules read a path, so that a deny only ever refuses more. Route selection reads none
/// of these: it would move `/status.json` from the route that holds it to a `/status` route
/// with other rules, where most frameworks serve another page.
fn denied_within(prefix: &Prefix, path: &str) -> bool {
    let holds = |path: &str| {
        let read = LoosePath::new(path);
        read.within_formats(&prefix.text, true) || prefix.pages.hold_with(&read, true)
    };
    holds(path)
        || script_routed(path).is_some_and(|(routed, _)| holds(&routed))
        || next_data_routed(path).is_some_and(|routed| holds(&routed))
        || page_with_info(path).is_some_and(|page| holds(&page))
}

/// `path` as a server that runs the first page's file among its segments reads it, the rest
/// being the page's path info: with that file's extension taken off. Apache, and nginx with
/// `fastcgi_split_path_info`, run `admin.php` for `/admin.php/x`, IIS runs `admin.aspx` for
/// `/admin.aspx/x`: the page `/admin/x` runs where clean names are served ([`page_name`]);
/// and `/admin.php` itself is the page `/admin` there.
pub fn page_with_info(path: &str) -> Option<String> {
    if !path.contains('.') {
        return None;
    }
    let mut start = 0;
    loop {
        let end = path[start + 1..]
            .find('/')
            .map_or(path.len(), |i| start + 1 + i);
        let segment = &path[start + 1..end];
        let name = segment.split_once(';').map_or(segment, |(name, _)| name);
        let page = name.rsplit_once('.').filter(|(stem, extension)| {
            !stem.is_empty() && PAGES.iter().any(|p| extension.eq_ignore_ascii_case(p))
        });
        if let Some((stem, _)) = page {
            return Some(format!("{}{stem}{}", &path[..=start], &path[end..]));
        }
        if end == path.len() {
            return None;
        }
        start = end;
    }
}

/// The extensions of pages' files, which servers also serve by other names.
const PAGES: [&str; 7] = ["php", "html", "htm", "shtml", "asp", "aspx", "jsp"];

/// `prefix` without its last segment's extension, when that names a page's file (`.php`,
/// `.html`, …; a trailing `/` aside): Apache's MultiViews, nginx's `try_files $uri $uri.php
/// $uri.html` and static hosts' clean URLs serve `/admin` from `admin.php` (and `/admin/x`
/// with `/x` as its path info). Other extensions (a version, `/api/v1.2`) are no file's.
fn page_name(prefix: &str) -> Option<&str> {
    let file = prefix.strip_suffix('/').unwrap_or(prefix);
    let (page, extension) = file.rsplit_once('.')?;
    let named = !extension.contains('/')
        && !page.ends_with('/')
        && PAGES.iter().any(|p| extension.eq_ignore_ascii_case(p));
    named.then_some(page)
}

/// The directory whose index page `prefix` names (`/admin/index.php`, `/default.aspx`): the
/// page servers serve for the directory itself (Apache's `DirectoryIndex`, nginx's `index`,
/// IIS's default documents). `""` for the root.
fn index_of(prefix: &str) -> Option<&str> {
    let (dir, file) = prefix
        .strip_suffix('/')
        .unwrap_or(prefix)
        .rsplit_once('/')?;
    let (stem, extension) = file.split_once('.')?;
    let index = ["index", "default"]
        .iter()
        .any(|i| stem.eq_ignore_ascii_case(i));
    (index && PAGES.iter().any(|p| extension.eq_ignore_ascii_case(p))).then_some(dir)
}

/// Whether `path` is the directory `dir` itself (with or without its trailing `/`), as
/// [`loosely_within`] reads paths: not a path under it.
fn is_directory(dir: &str, path: &LoosePath<'_>) -> bool {
    let dir = if dir.is_empty() { "/" } else { dir };
    path.within(dir) && path.depth() == loose_depth(dir)
}

/// `path` as a PHP front controller routes it, when a segment before its last names a `.php`
/// script: without that segment. Laravel, Symfony, Drupal and WordPress route the path after
/// the script (`PATH_INFO`): `/index.php/admin` is `/admin` to them, and `/app/index.php/admin`
/// is `/app/admin` to one installed under `/app`. Only the first such segment comes off, as
/// the server runs the first script it finds.
///
/// Also where that segment ends in `path` (`path[..end]` is the script's own path).
pub fn script_routed(path: &str) -> Option<(String, usize)> {
    // Most paths name no script: one look for `.php`, in any case, before reading segments.
    let bytes = path.as_bytes();
    let named = path.match_indices('.').any(|(i, _)| {
        bytes
            .get(i + 1..i + 4)
            .is_some_and(|ext| ext.eq_ignore_ascii_case(b"php"))
    });
    if !named {
        return None;
    }
    let mut start = 0;
    while let Some(end) = path[start + 1..].find('/').map(|i| start + 1 + i) {
        let segment = &path[start + 1..end];
        let name = segment.split_once(';').map_or(segment, |(name, _)| name);
        let script =
            name.len() > 4 && name.as_bytes()[name.len() - 4..].eq_ignore_ascii_case(b".php");
        if script {
            return Some((format!("{}{}", &path[..start], &path[end..]), end));
        }
        start = end;
    }
    None
}

/// `path` as Next.js reads it when it names a page's data (its pages router): the page, whose
/// server-side props it answers with. `/_next/data/<build>/admin/users.json` is `/admin/users`,
/// `/_next/data/<build>/index.json` is `/`, and `/app/_next/data/<build>/admin.json` is
/// `/app/admin` to one whose `basePath` is `/app`. The build's id is in every page it serves.
/// (`_next/data` and `.json` read in any case, as a deny reads the rest.)
pub fn next_data_routed(path: &str) -> Option<String> {
    const DATA: &[u8] = b"/_next/data/";
    // Nearly every path has no `/_`: one look for it before the marker is sought.
    let bytes = path.as_bytes();
    let at = (path.match_indices("/_").map(|(i, _)| i)).find(|&i| {
        bytes
            .get(i..i + DATA.len())
            .is_some_and(|m| m.eq_ignore_ascii_case(DATA))
    })?;
    let after = at + DATA.len();
    let (build, rest) = path[after..].split_once('/')?;
    let page = rest.len().checked_sub(5).filter(|&cut| {
        !build.is_empty() && rest.as_bytes()[cut..].eq_ignore_ascii_case(b".json")
    })?;
    // (`.json` is ASCII: `cut` is a character's start.) `index` is the root, and a page under
    // `index/` is the page without it, as Next.js reads one (`index/admin` is `/admin`).
    let page = &rest[..page];
    let page = match page.get(..6) {
        _ if page.eq_ignore_ascii_case("index") => "",
        Some(index) if index.eq_ignore_ascii_case("index/") => &page[6..],
        _ => page,
    };
    Some(format!("{}/{page}", &path[..at]))
}

/// [`LoosePath::within_formats`] of a `path` and a bare `prefix` that both read plainly: no
/// parameters, nothing to trim, so the lenient reading is the strict one, in any ASCII case
/// (with a format suffix).
fn within_plainly(prefix: &str, path: &str, formats: bool) -> bool {
    let (prefix, path) = (prefix.as_bytes(), path.as_bytes());
    if path.len() < prefix.len() || !path[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return false;
    }
    let rest = &path[prefix.len()..];
    prefix.ends_with(b"/") || rest.first().is_none_or(|&b| b == b'/') || {
        let suffix = rest.strip_suffix(b"/").unwrap_or(rest);
        formats && suffix[0] == b'.' && !suffix.contains(&b'/')
    }
}

/// [`LoosePath::within_formats`], read segment by segment.
fn within_segments(prefix: &str, segments: &Segments<'_>, formats: bool) -> bool {
    let mut wants = loose_segments(prefix).peekable();
    let mut next = 0;
    while let Some(want) = wants.next() {
        let Some(got) = segments.get(next) else {
            return false;
        };
        next += 1;
        if same_in_any_case(got.as_bytes(), want.as_bytes()) {
            continue;
        }
        let last = formats && wants.peek().is_none() && segments.get(next).is_none();
        let (got, want) = (got.as_bytes(), want.as_bytes());
        let formatted = last
            && (spelled_by(got, want).is_some_and(|end| got.get(end) == Some(&b'.'))
                || formatted_beyond_ascii(got, want));
        if !formatted {
            return false;
        }
    }
    true
}

/// How many segments a prefix holds as [`loosely_within`] reads it: of two prefixes that both
/// hold a path, the one with more is the narrower, and two with as many are the same prefix.
pub fn loose_depth(prefix: &str) -> usize {
    loose_segments(prefix).count()
}

/// The segments of a path as [`loosely_within`] reads them: each without its `;` parameters
/// (also `%3B`, which nginx decodes as it passes a path on to Tomcat when its `proxy_pass`
/// names a path), empty ones dropped.
fn loose_segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .map(without_parameters)
        .filter(|segment| !segment.is_empty())
}

/// A segment without its `;` (or `%3B`) parameters.
fn without_parameters(segment: &str) -> &str {
    let parameters = segment.find(';').into_iter().chain(segment.find("%3B"));
    &segment[..parameters.min().unwrap_or(segment.len())]
}

/// `path` without the `/` and spaces at either end, as CodeIgniter reads the path it routes:
/// `%20`, and `+` and `%2B`, which it decodes to spaces (`/+/admin` and `/admin%20` are its
/// `admin`).
fn trim_spaces(mut path: &str) -> &str {
    const ENDS: [&str; 4] = ["/", "+", "%20", "%2B"];
    while let Some(rest) = ENDS.iter().find_map(|end| path.strip_prefix(end)) {
        path = rest;
    }
    while let Some(rest) = ENDS.iter().find_map(|end| path.strip_suffix(end)) {
        path = rest;
    }
    path
}

/// Whether [`loose_segments`] reads `path` as it is written: no `;` or `%3B`, no space (`+`,
/// `%20`, `%2B`) it might trim, and no letter beyond ASCII (a byte of 0x80 and up, escaped),
/// whose other case may be spelled in another number of bytes. (One pass: route selection
/// asks this of every path.)
fn reads_plainly(path: &str) -> bool {
    let bytes = path.as_bytes();
    !bytes.iter().enumerate().any(|(i, &b)| {
        b == b';'
            || b == b'+'
            || (b == b'%'
                && (matches!(bytes.get(i + 1..i + 3), Some(b"3B" | b"20" | b"2B"))
                    || bytes.get(i + 1).is_some_and(|&high| high >= b'8')))
    })
}

/// Whether two segments (normalized: every byte beyond ASCII an escape) are one in any case:
/// ASCII letters, and, as ASP.NET Core compares the path it has decoded with its routes
/// (ordinally, ignoring case), letters beyond ASCII too: `%C3%9Cber` (`Über`) is `%C3%BCber`.
/// `want` is the prefix's (the configuration's, short): asked first, so a long segment of a
/// request is read again only against a prefix beyond ASCII, and only when about as long.
fn same_in_any_case(got: &[u8], want: &[u8]) -> bool {
    spelled_by(got, want) == Some(got.len())
        || beyond_ascii(want) && about_as_long(got, want) && beyond_ascii(got) && {
            let (got, want) = (one_case(got), one_case(want));
            got.is_some() && got == want
        }
}

/// How much of segment `got` (from its start) spells segment `want`, both normalized: ASCII
/// letters in any case, and a `+` and its escape `%2B` alike, as frameworks decode a path
/// (Spring, Django, Rails, ASP.NET Core, Go's, and nginx before them all read `/c%2B%2B` as
/// `/c++`: a `+` is a space only in a query). `None` where `want` is not spelled out.
fn spelled_by(got: &[u8], want: &[u8]) -> Option<usize> {
    // One character: a `+` for `+` or `%2B` (normalized escapes are in upper case), else the
    // byte in lower case; and how many bytes it took.
    let char_at = |s: &[u8], i: usize| match s.get(i..i + 3) {
        Some(b"%2B") => Some((b'+', 3)),
        _ => s.get(i).map(|b| (b.to_ascii_lowercase(), 1)),
    };
    let (mut g, mut w) = (0, 0);
    while let Some((wanted, took)) = char_at(want, w) {
        let (read, read_took) = char_at(got, g)?;
        if read != wanted {
            return None;
        }
        (g, w) = (g + read_took, w + took);
    }
    Some(g)
}

/// Whether a normalized segment holds a byte beyond ASCII (escaped: `%80` and up).
fn beyond_ascii(segment: &[u8]) -> bool {
    segment.windows(2).any(|w| w[0] == b'%' && w[1] >= b'8')
}

/// Whether `got` could be `want` in another case: a letter's other case is written in at most
/// one more byte of UTF-8 in two (escaped, thrice as many), so never twice as long.
fn about_as_long(got: &[u8], want: &[u8]) -> bool {
    got.len() < 2 * want.len() && want.len() < 2 * got.len()
}

/// Whether segment `got` is `want` with a format suffix (`.json`, or a bare `.`, as ASCII
/// segments are read), in any case, where both hold letters beyond ASCII (see
/// [`same_in_any_case`]).
fn formatted_beyond_ascii(got: &[u8], want: &[u8]) -> bool {
    // Each `.` of the segment that could end `want` in another case (the prefix may hold one
    // too: `/é.settings` and `/É.SETTINGS.json`): none past twice its length.
    let reach = got.len().min(2 * want.len());
    let mut dots = (got[..reach].iter().enumerate())
        .filter(|&(dot, &b)| b == b'.' && about_as_long(&got[..dot], want))
        .map(|(dot, _)| dot)
        .peekable();
    if !beyond_ascii(want) || dots.peek().is_none() || !beyond_ascii(got) {
        return false;
    }
    let Some(one) = one_case(want).filter(|one| !one.is_empty()) else {
        return false;
    };
    dots.any(|dot| one_case(&got[..dot]).is_some_and(|stem| stem == one))
}

/// A segment decoded, each letter in one case: lower case of its upper case, one letter for
/// one (so `ß`, whose upper case is `SS`, stays), as .NET's ordinal comparison ignoring case
/// reads them, but for `ı` and `ſ`, which are not `i` and `s` there. (It takes a few more as
/// one than .NET does, the Kelvin sign and `k` say, which only a deny rule could tell, by
/// refusing more.) `None` when its escapes are not UTF-8.
fn one_case(segment: &[u8]) -> Option<String> {
    let mut bytes = Vec::with_capacity(segment.len());
    let mut rest = segment;
    while let Some((&b, tail)) = rest.split_first() {
        match (b, tail) {
            (b'%', [h, l, tail @ ..]) => {
                bytes.push(crate::path::hex(*h)? << 4 | crate::path::hex(*l)?);
                rest = tail;
            }
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    let text = String::from_utf8(bytes).ok()?;
    Some(text.chars().map(one_letter_case).collect())
}

/// [`one_case`] of one letter.
fn one_letter_case(c: char) -> char {
    fn single(mut chars: impl Iterator<Item = char>) -> Option<char> {
        let one = chars.next()?;
        chars.next().is_none().then_some(one)
    }
    if matches!(c, 'ı' | 'ſ') {
        return c;
    }
    let upper = single(c.to_uppercase()).unwrap_or(c);
    single(upper.to_lowercase()).unwrap_or(upper)
}

impl Rule {
    /// Whether the rule's conditions hold: its methods, and its paths (read loosely by a deny
    /// rule, strictly by an allow rule; see [`denied_within`]).
    fn conditions_hold(&self, method: Method<'_>, path: &str) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
            && self
                .paths
                .as_ref()
                .is_none_or(|prefixes| prefixes.iter().any(|prefix| self.within(prefix, path)))
    }

    fn within(&self, prefix: &Prefix, path: &str) -> bool {
        match self.effect {
            Effect::Deny => denied_within(prefix, path),
            Effect::Allow => prefix_matches(&prefix.text, path),
        }
    }

    fn matching_prefix(&self, path: &str) -> Option<&str> {
        self.paths
            .as_ref()?
            .iter()
            .find(|prefix| self.within(prefix, path))
            .map(|prefix| &*prefix.text)
    }
}

/// Who is asking, as far as the rules care.
#[derive(Clone, Copy)]
enum Caller<'a> {
    Anonymous,
    /// Deny rules still see its names; allow rules only let it through if they are `public`.
    Inactive(Subject<'a>),
    Active(Subject<'a>),
}

impl Policy {
    /// Checks and compiles the rules. Every problem in every rule is reported, each with the
    /// rule's name and the field at fault.
    pub fn compile(allow: Vec<RuleSpec>, deny: Vec<RuleSpec>) -> Result<Self, Vec<PolicyError>> {
        let total = allow.len() + deny.len();
        let words = total.div_ceil(64);
        let mut builder = Builder {
            policy: Policy {
                rules: Box::default(),
                words,
                deny_rules: empty_bits(words),
                groups: StrIndex::new(Compare::UnicodeCase, words),
                group_ids: StrIndex::new(Compare::Exact, words),
                users: StrIndex::new(Compare::UnicodeCase, words),
                domains: StrIndex::new(Compare::AsciiCase, words),
                subdomains_of: StrIndex::new(Compare::AsciiCase, words),
                any_signed_in: empty_bits(words),
                machines: empty_bits(words),
                agents: empty_bits(words),
                agent_groups: StrIndex::new(Compare::UnicodeCase, words),
                agent_owner_groups: StrIndex::new(Compare::UnicodeCase, words),
                public: empty_bits(words),
                public_allow: Box::default(),
                names_methods: false,
            },
            rules: Vec::with_capacity(total),
            public_allow: Vec::new(),
            errors: Vec::new(),
        };
        for (position, spec) in deny.iter().enumerate() {
            builder.add(Effect::Deny, position, spec);
        }
        for (position, spec) in allow.iter().enumerate() {
            builder.add(Effect::Allow, position, spec);
        }
        if !builder.errors.is_empty() {
            return Err(builder.errors);
        }
        let mut policy = builder.policy;
        policy.rules = builder.rules.into_boxed_slice();
        policy.public_allow = builder.public_allow.into_boxed_slice();
        policy.names_methods = policy.rules.iter().any(|rule| rule.methods.is_some());
        Ok(policy)
    }

    /// The number of rules, allow and deny.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules (and so refuses everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule names methods: only then can a method override (`_method`) change a
    /// decision.
    pub fn names_methods(&self) -> bool {
        self.names_methods
    }

    /// Whether any rule names a group (`groups`, `group_ids`, `agent_groups`,
    /// `agent_owner_groups`): if none does, a subject's groups never change a decision, and
    /// a caller judging many subjects may leave them out.
    pub fn reads_groups(&self) -> bool {
        !(self.groups.is_empty()
            && self.group_ids.is_empty()
            && self.agent_groups.is_empty()
            && self.agent_owner_groups.is_empty())
    }

    /// Decides whether `subject` (`None` when nobody is signed in) may make `request`.
    ///
    /// In order:
    /// 1. a request whose method is not an HTTP token or whose path is not a normalized absolute
    ///    path is refused ([`Reason::Unevaluable`]);
    /// 2. a deactivated subject is refused ([`Reason::Deactivated`]) unless a `public` allow rule
    ///    covers the request: public rules let everyone in, signed in or not, so deactivation
    ///    changes nothing there;
    /// 3. the first deny rule that matches refuses ([`Reason::Denied`]), whatever the allow
    ///    rules say; deny rules match a deactivated subject by its names too (but not by
    ///    `any_signed_in` or `machines`, which mean *active*);
    /// 4. the first allow rule that matches allows ([`Reason::Allowed`]); for an anonymous or
    ///    deactivated caller only `public` rules can match;
    /// 5. otherwise the request is refused ([`Reason::NotSignedIn`], [`Reason::Deactivated`] or
    ///    [`Reason::NoRuleAllows`]).
    pub fn evaluate<'a>(
        &'a self,
        subject: Option<&Subject<'a>>,
        request: &Request<'a>,
    ) -> Decision<'a> {
        if !is_token(request.method) {
            return Decision::deny(Reason::Unevaluable {
                problem: "the method is not an HTTP token",
            });
        }
        if path_problem(request.path).is_some() {
            return Decision::deny(Reason::Unevaluable {
                problem: "the path is not a normalized absolute path",
            });
        }
        let method = Method::of(request.method);
        let caller = match subject {
            None => Caller::Anonymous,
            Some(&subject) if subject.active => Caller::Active(subject),
            Some(&subject) => Caller::Inactive(subject),
        };
        let mut hits = Hits::default();
        let Some(index) = self.first_match(caller, method, request.path, &mut hits) else {
            return Decision::deny(match caller {
                Caller::Anonymous => Reason::NotSignedIn,
                Caller::Inactive(_) => Reason::Deactivated,
                Caller::Active(subject) => Reason::NoRuleAllows {
                    user: subject.user_name,
                    method: request.method,
                    path: request.path,
                },
            });
        };
        self.decide(index, caller, &hits, method, request)
    }

    fn decide<'a>(
        &'a self,
        index: usize,
        caller: Caller<'a>,
        hits: &Hits<'a>,
        method: Method<'_>,
        request: &Request<'a>,
    ) -> Decision<'a> {
        let Some(rule) = self.rules.get(index) else {
            return Decision::deny(Reason::Unevaluable {
                problem: "the policy matched a rule it does not have",
            });
        };
        if rule.effect == Effect::Deny
            && matches!(caller, Caller::Inactive(_))
            && !self.public_allows(method, request.path)
        {
            return Decision::deny(Reason::Deactivated);
        }
        let Some(by) = self.explain(index, caller, hits) else {
            return Decision::deny(Reason::Unevaluable {
                problem: "the policy matched a rule it cannot account for",
            });
        };
        let conditions = Conditions {
            method: rule.methods.as_ref().map(|_| request.method),
            path_prefix: rule.matching_prefix(request.path),
        };
        let name = &*rule.name;
        match rule.effect {
            Effect::Deny => Decision {
                allowed: false,
                rule: Some(name),
                reason: Reason::Denied {
                    rule: name,
                    by,
                    conditions,
                },
            },
            Effect::Allow => Decision {
                allowed: true,
                rule: Some(name),
                reason: Reason::Allowed {
                    rule: name,
                    by,
                    conditions,
                },
            },
        }
    }

    /// The lowest-numbered rule whose who-criteria match `caller` and whose conditions hold;
    /// `hits` is left with the names that matched on the pass that found it.
    fn first_match<'a>(
        &'a self,
        caller: Caller<'a>,
        method: Method<'_>,
        path: &str,
        hits: &mut Hits<'a>,
    ) -> Option<usize> {
        for chunk in 0..self.words.div_ceil(CHUNK_WORDS) {
            let base = chunk * CHUNK_WORDS;
            hits.clear();
            let who = self.who_matches(caller, base, hits);
            for (offset, &word) in who.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let index = (base + offset) * 64 + word.trailing_zeros() as usize;
                    word &= word - 1;
                    if self
                        .rules
                        .get(index)
                        .is_some_and(|rule| rule.conditions_hold(method, path))
                    {
                        return Some(index);
                    }
                }
            }
        }
        None
    }

    /// The rules in words `base..base + CHUNK_WORDS` whose who-criteria match `caller`.
    fn who_matches<'a>(
        &'a self,
        caller: Caller<'a>,
        base: usize,
        hits: &mut Hits<'a>,
    ) -> [u64; CHUNK_WORDS] {
        let mut who = [0; CHUNK_WORDS];
        let mut add = |bits: &[u64], only: Option<&[u64]>| {
            for (i, word) in who.iter_mut().enumerate() {
                let bits = bits.get(base + i).copied().unwrap_or(0);
                let only = only.map_or(u64::MAX, |only| only.get(base + i).copied().unwrap_or(0));
                *word |= bits & only;
            }
        };
        match caller {
            Caller::Anonymous => {}
            Caller::Inactive(subject) => {
                let _: ControlFlow<()> = self.names_matching(&subject, |by, bits| {
                    add(bits, Some(&self.deny_rules));
                    hits.record(by, bits);
                    ControlFlow::Continue(())
                });
            }
            Caller::Active(subject) => {
                let _: ControlFlow<()> = self.names_matching(&subject, |by, bits| {
                    // An agent's own names (its groups, its name) count in deny rules only.
                    let allows = subject.kind != SubjectKind::Agent || by.names_an_agent();
                    add(bits, (!allows).then_some(&*self.deny_rules));
                    hits.record(by, bits);
                    ControlFlow::Continue(())
                });
                match subject.kind {
                    SubjectKind::Person => add(&self.any_signed_in, None),
                    SubjectKind::Machine => {
                        add(&self.any_signed_in, None);
                        add(&self.machines, None);
                    }
                    SubjectKind::Agent => {
                        add(&self.agents, None);
                        add(&self.any_signed_in, Some(&self.deny_rules));
                    }
                }
            }
        }
        add(&self.public, None);
        who
    }

    /// Which criterion of rule `index` matched `caller`, in the order user, group (by name or
    /// id, in the subject's group order), email domain, machine, any signed-in, public.
    fn explain<'a>(
        &'a self,
        index: usize,
        caller: Caller<'a>,
        hits: &Hits<'a>,
    ) -> Option<Match<'a>> {
        let is_deny = has_bit(&self.deny_rules, index);
        // Which of the subject's names can have matched this rule (see `who_matches`).
        let counts = |subject: &Subject<'a>, by: Match<'a>| {
            is_deny || subject.kind != SubjectKind::Agent || by.names_an_agent()
        };
        let named = |subject: &Subject<'a>| {
            if let Some(known) = hits.find(index, |by| counts(subject, by)) {
                return known;
            }
            match self.names_matching(subject, |by, bits| {
                if has_bit(bits, index) && counts(subject, by) {
                    ControlFlow::Break(by)
                } else {
                    ControlFlow::Continue(())
                }
            }) {
                ControlFlow::Break(by) => Some(by),
                ControlFlow::Continue(()) => None,
            }
        };
        let by = match caller {
            Caller::Anonymous => None,
            Caller::Inactive(subject) if is_deny => named(&subject),
            Caller::Inactive(_) => None,
            Caller::Active(subject) if subject.kind == SubjectKind::Agent => named(&subject)
                .or_else(|| has_bit(&self.agents, index).then_some(Match::Agent(subject.user_name)))
                .or_else(|| {
                    (is_deny && has_bit(&self.any_signed_in, index))
                        .then_some(Match::SignedIn(subject.user_name))
                }),
            Caller::Active(subject) => named(&subject)
                .or_else(|| {
                    (subject.kind == SubjectKind::Machine && has_bit(&self.machines, index))
                        .then_some(Match::Machine(subject.user_name))
                })
                .or_else(|| {
                    has_bit(&self.any_signed_in, index)
                        .then_some(Match::SignedIn(subject.user_name))
                }),
        };
        by.or_else(|| has_bit(&self.public, index).then_some(Match::Public))
    }

    /// Calls `visit` with every entry of the name tables that one of the subject's own names
    /// (userName, group displayNames and externalIds, email domain; for an agent, first its
    /// groups and its owners' groups in the agent tables) finds.
    fn names_matching<'a, B>(
        &'a self,
        subject: &Subject<'a>,
        mut visit: impl FnMut(Match<'a>, &'a [u64]) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        if subject.kind == SubjectKind::Agent {
            for (groups, table, by) in [
                (
                    subject.groups,
                    &self.agent_groups,
                    Match::AgentGroup as fn(_) -> _,
                ),
                (
                    subject.owner_groups,
                    &self.agent_owner_groups,
                    Match::AgentOwnerGroup,
                ),
            ] {
                if table.is_empty() {
                    continue;
                }
                for group in groups {
                    if let Some(entry) = table.get(group.display_name) {
                        visit(by(group.display_name), &entry.rules)?;
                    }
                }
            }
        }
        if let Some(entry) = self.users.get(subject.user_name) {
            visit(Match::User(subject.user_name), &entry.rules)?;
        }
        if !self.groups.is_empty() || !self.group_ids.is_empty() {
            for group in subject.groups {
                if let Some(entry) = self.groups.get(group.display_name) {
                    visit(Match::Group(group.display_name), &entry.rules)?;
                }
                if let Some(id) = group.external_id {
                    if let Some(entry) = self.group_ids.get(id) {
                        visit(Match::GroupId(id), &entry.rules)?;
                    }
                }
            }
        }
        if self.domains.is_empty() && self.subdomains_of.is_empty() {
            return ControlFlow::Continue(());
        }
        let Some(domain) = subject.email.and_then(email_domain) else {
            return ControlFlow::Continue(());
        };
        if let Some(entry) = self.domains.get(domain) {
            let by = Match::EmailDomain {
                domain,
                entry: &entry.key,
                wildcard: false,
            };
            visit(by, &entry.rules)?;
        }
        if !self.subdomains_of.is_empty() {
            // Every parent of the domain below a non-empty label: for `a.b.corp.example`, that is
            // `b.corp.example`, `corp.example` and `example`, never the domain itself.
            let mut previous = b'.';
            for (i, byte) in domain.bytes().enumerate() {
                if byte == b'.' && previous != b'.' {
                    let parent = domain.get(i + 1..).unwrap_or_default();
                    if let Some(entry) = self.subdomains_of.get(parent) {
                        let by = Match::EmailDomain {
                            domain,
                            entry: &entry.key,
                            wildcard: true,
                        };
                        visit(by, &entry.rules)?;
                    }
                }
                previous = byte;
            }
        }
        ControlFlow::Continue(())
    }

    fn public_allows(&self, method: Method<'_>, path: &str) -> bool {
        self.public_allow.iter().any(|&index| {
            self.rules
                .get(index)
                .is_some_and(|rule| rule.conditions_hold(method, path))
        })
    }
}

/// The names the collecting pass found, in the order it found them, so that naming the criterion
/// of the deciding rule does not look every name up again. Only the first few are kept; past
/// that, the reason is found by looking the names up again.
struct Hits<'a> {
    found: [(Match<'a>, &'a [u64]); HIT_CAPACITY],
    len: usize,
    complete: bool,
}

const HIT_CAPACITY: usize = 8;

impl Default for Hits<'_> {
    fn default() -> Self {
        Self {
            found: [(Match::Public, &[]); HIT_CAPACITY],
            len: 0,
            complete: true,
        }
    }
}

impl<'a> Hits<'a> {
    fn clear(&mut self) {
        self.len = 0;
        self.complete = true;
    }

    fn record(&mut self, by: Match<'a>, bits: &'a [u64]) {
        match self.found.get_mut(self.len) {
            Some(slot) => {
                *slot = (by, bits);
                self.len += 1;
            }
            None => self.complete = false,
        }
    }

    /// `Some(answer)` when the recorded names settle which name of rule `index` matched
    /// (`Some(None)`: none did), of those `counts` lets match it; `None` when some names were
    /// not recorded.
    fn find(&self, index: usize, counts: impl Fn(Match<'a>) -> bool) -> Option<Option<Match<'a>>> {
        let recorded = self.found.get(..self.len).unwrap_or_default();
        match recorded
            .iter()
            .find(|&&(by, bits)| has_bit(bits, index) && counts(by))
        {
            Some(&(by, _)) => Some(Some(by)),
            None if self.complete => Some(None),
            None => None,
        }
    }
}

struct Builder {
    policy: Policy,
    rules: Vec<Rule>,
    public_allow: Vec<usize>,
    errors: Vec<PolicyError>,
}

impl Builder {
    fn add(&mut self, effect: Effect, position: usize, spec: &RuleSpec) {
        let index = self.rules.len();
        let label = match (spec.name.trim().is_empty(), effect) {
            (false, _) => spec.name.clone(),
            (true, Effect::Allow) => format!("allow[{position}]"),
            (true, Effect::Deny) => format!("deny[{position}]"),
        };
        let mut errors = Vec::new();
        let mut error = |field: String, problem: Problem| {
            errors.push(PolicyError {
                rule: label.clone(),
                field,
                problem,
            });
        };
        if spec.name.trim().is_empty() {
            error(String::new(), Problem::NoName);
        }
        let names_someone = !spec.groups.is_empty()
            || !spec.group_ids.is_empty()
            || !spec.users.is_empty()
            || !spec.email_domains.is_empty()
            || spec.any_signed_in
            || spec.machines
            || spec.agents
            || !spec.agent_groups.is_empty()
            || !spec.agent_owner_groups.is_empty()
            || spec.public;
        if !names_someone {
            error(String::new(), Problem::NoWho);
        }
        if spec.public && effect == Effect::Deny {
            error(".public".into(), Problem::PublicInDeny);
        }

        let policy = &mut self.policy;
        for (field, values, table) in [
            ("groups", &spec.groups, &mut policy.groups),
            ("group_ids", &spec.group_ids, &mut policy.group_ids),
            ("users", &spec.users, &mut policy.users),
            ("agent_groups", &spec.agent_groups, &mut policy.agent_groups),
            (
                "agent_owner_groups",
                &spec.agent_owner_groups,
                &mut policy.agent_owner_groups,
            ),
        ] {
            for (i, value) in values.iter().enumerate() {
                if value.trim().is_empty() {
                    error(format!(".{field}[{i}]"), Problem::Empty);
                } else if value.trim() != value {
                    // A deny naming `"contractors "` would deny nobody.
                    let (value, trimmed) = (value.clone(), value.trim().to_owned());
                    error(format!(".{field}[{i}]"), Problem::Padded { value, trimmed });
                } else if field == "users"
                    && value
                        .get(..6)
                        .is_some_and(|p| p.eq_ignore_ascii_case("agent:"))
                {
                    // As the audit log and the 403 page name it: a deny that denies nobody.
                    let (value, bare) = (value.clone(), value[6..].to_owned());
                    error(
                        format!(".{field}[{i}]"),
                        Problem::AgentPrefixed { value, bare },
                    );
                } else if value == "*" || (field == "users" && value.starts_with("*@")) {
                    // As Cloudflare Access or IAP would read them: a deny that denies nobody.
                    // `any_signed_in` lets in people and machines, and refuses agents too.
                    let instead = match (field, effect) {
                        ("agent_groups" | "agent_owner_groups", _) => {
                            "name each group, or write `agents = true` for every agent"
                        }
                        ("users", Effect::Allow) => {
                            "name each user, or the domain in `email_domains`, or write \
                             `any_signed_in = true` for every person and machine"
                        }
                        ("users", Effect::Deny) => {
                            "name each user, or the domain in `email_domains`, or write \
                             `any_signed_in = true` for everyone signed in, agents too"
                        }
                        (_, Effect::Allow) => {
                            "name each group, or write `any_signed_in = true` for every person \
                             and machine"
                        }
                        (_, Effect::Deny) => {
                            "name each group, or write `any_signed_in = true` for everyone \
                             signed in, agents too"
                        }
                    };
                    let value = value.clone();
                    error(
                        format!(".{field}[{i}]"),
                        Problem::Pattern { value, instead },
                    );
                } else {
                    table.insert(value, index);
                }
            }
        }
        for (i, value) in spec.email_domains.iter().enumerate() {
            let field = format!(".email_domains[{i}]");
            if value.trim().is_empty() {
                error(field, Problem::Empty);
                continue;
            }
            match parse_domain(value) {
                Ok((domain, false)) => policy.domains.insert(&domain, index),
                Ok((domain, true)) => policy.subdomains_of.insert(&domain, index),
                Err(why) => error(
                    field,
                    Problem::BadDomain {
                        value: value.clone(),
                        why,
                    },
                ),
            }
        }
        if spec.any_signed_in {
            set_bit(&mut policy.any_signed_in, index);
        }
        if spec.machines {
            set_bit(&mut policy.machines, index);
        }
        if spec.agents {
            set_bit(&mut policy.agents, index);
        }
        if spec.public {
            set_bit(&mut policy.public, index);
            if effect == Effect::Allow {
                self.public_allow.push(index);
            }
        }
        if effect == Effect::Deny {
            set_bit(&mut policy.deny_rules, index);
        }

        let methods = spec.methods.as_ref().map(|methods| {
            if methods.is_empty() {
                error(".methods".into(), Problem::EmptyList);
            }
            let mut set = MethodSet::default();
            let mut other: Vec<Box<str>> = Vec::new();
            for (i, value) in methods.iter().enumerate() {
                let field = format!(".methods[{i}]");
                if value.trim().is_empty() {
                    error(field, Problem::Empty);
                } else if value == "*" {
                    let instead = "leave `methods` out for every method";
                    let value = value.clone();
                    error(field, Problem::Pattern { value, instead });
                } else if !is_token(value) {
                    error(
                        field,
                        Problem::BadMethod {
                            value: value.clone(),
                        },
                    );
                } else if let Method::Known(bit) = Method::of(value) {
                    set.known |= bit;
                } else {
                    let upper = value.to_ascii_uppercase();
                    if !other.iter().any(|m| **m == *upper) {
                        other.push(upper.into_boxed_str());
                    }
                }
            }
            // Express, Flask, Spring and Go's ServeMux answer HEAD with the GET handler: its
            // side effects happen and its headers tell. A deny of GET is a deny of HEAD.
            // So an allow of HEAD alone would let in GET's handler, for less than it says.
            let (get, head) = (Method::of("GET"), Method::of("HEAD"));
            if let (Method::Known(get), Method::Known(head)) = (get, head) {
                match effect {
                    Effect::Deny if set.known & get != 0 => set.known |= head,
                    Effect::Allow if set.known & head != 0 && set.known & get == 0 => {
                        error(".methods".into(), Problem::HeadWithoutGet);
                    }
                    _ => {}
                }
            }
            set.other = other.into_boxed_slice();
            set
        });

        let paths = spec.paths.as_ref().map(|paths| {
            if paths.is_empty() {
                error(".paths".into(), Problem::EmptyList);
            }
            let mut prefixes: Vec<Box<str>> = Vec::with_capacity(paths.len());
            for (i, value) in paths.iter().enumerate() {
                let field = format!(".paths[{i}]");
                if value.is_empty() {
                    error(field, Problem::Empty);
                } else if let Some(why) = path_problem(value) {
                    error(
                        field,
                        Problem::BadPath {
                            value: value.clone(),
                            why,
                        },
                    );
                } else if holds_star(value) {
                    // `/admin/*`, as Cloudflare Access or an ALB writes it, would be a path
                    // whose segment is `*`: a deny on it would refuse nobody.
                    error(
                        field,
                        Problem::Pattern {
                            value: value.clone(),
                            instead: PREFIXES_NOT_PATTERNS,
                        },
                    );
                } else if let Some(problem) = spelling_problem(value) {
                    error(field, problem);
                } else {
                    prefixes.push(value.as_str().into());
                }
            }
            prefixes.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
            prefixes.dedup();
            prefixes.iter().map(|prefix| Prefix::new(prefix)).collect()
        });

        self.errors.append(&mut errors);
        self.rules.push(Rule {
            name: label.into_boxed_str(),
            effect,
            methods,
            paths,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path read once answers every prefix, in any order, as it would alone: its segments,
    /// read as asked and kept, are the same whichever prefix asked first.
    #[test]
    fn a_path_read_once_answers_every_prefix_as_alone() {
        let prefixes = [
            "/admin",
            "/ADMIN/users/",
            "/admin/users",
            "/a",
            "/admin/users/x",
            "/",
            "/c++/",
            "/c++",
            "/reports;x",
        ];
        for path in [
            "/admin;jsessionid=1/users",
            "/+/admin/users%20",
            "/admin/users;x",
            "/c++/x",
            "/admin%3Bx/users/x",
            "/reports",
        ] {
            for order in [prefixes.to_vec(), prefixes.iter().rev().copied().collect()] {
                let read = LoosePath::new(path);
                for prefix in order {
                    assert_eq!(
                        read.within(prefix),
                        LoosePath::new(path).within(prefix),
                        "{path} in {prefix}"
                    );
                }
            }
        }
        // As a fresh reading, and as the definition reads it.
        assert!(LoosePath::new("/admin;jsessionid=1/users").within("/admin/users"));
        assert!(LoosePath::new("/+/admin/users%20").within("/admin/users"));
        assert!(!LoosePath::new("/admin/users;x").within("/admin/users/x"));
    }
    use crate::GroupRef;

    /// [`super::denied_within`] of a prefix as a rule compiles it.
    fn denied_within(prefix: &str, path: &str) -> bool {
        super::denied_within(&Prefix::new(prefix), path)
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    fn rule(name: &str) -> RuleSpec {
        RuleSpec::new(name)
    }

    fn groups(name: &str, names: &[&str]) -> RuleSpec {
        RuleSpec {
            groups: strings(names),
            ..rule(name)
        }
    }

    fn compile(allow: Vec<RuleSpec>, deny: Vec<RuleSpec>) -> Policy {
        match Policy::compile(allow, deny) {
            Ok(policy) => policy,
            Err(errors) => panic!("{errors:?}"),
        }
    }

    fn errors(allow: Vec<RuleSpec>, deny: Vec<RuleSpec>) -> Vec<String> {
        match Policy::compile(allow, deny) {
            Ok(_) => panic!("compiled"),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    const SRE: [GroupRef<'static>; 2] = [
        GroupRef {
            display_name: "Everyone",
            external_id: None,
        },
        GroupRef {
            display_name: "SRE",
            external_id: Some("00gSRE"),
        },
    ];

    fn alice() -> Subject<'static> {
        Subject {
            kind: SubjectKind::Person,
            user_name: "alice@corp.example",
            email: Some("alice@corp.example"),
            active: true,
            groups: &SRE,
            owner_groups: &[],
        }
    }

    fn with_email(email: &'static str) -> Subject<'static> {
        Subject {
            email: Some(email),
            groups: &[],
            owner_groups: &[],
            ..alice()
        }
    }

    fn get(path: &'static str) -> Request<'static> {
        Request {
            method: "GET",
            path,
        }
    }

    fn allowed(policy: &Policy, subject: Option<&Subject<'_>>, request: &Request<'_>) -> bool {
        policy.evaluate(subject, request).allowed
    }

    fn why(policy: &Policy, subject: Option<&Subject<'_>>, request: &Request<'_>) -> String {
        policy.evaluate(subject, request).reason.to_string()
    }

    #[test]
    fn groups_match_by_display_name_in_any_case() {
        let policy = compile(vec![groups("allow[0]", &["sre"])], vec![]);
        let decision = policy.evaluate(Some(&alice()), &get("/"));
        assert!(decision.allowed);
        assert_eq!(decision.rule, Some("allow[0]"));
        assert_eq!(
            decision.reason.to_string(),
            "allowed by allow[0]: member of group SRE"
        );
        let policy = compile(vec![groups("allow[0]", &["SR", "sre-leads"])], vec![]);
        assert!(!allowed(&policy, Some(&alice()), &get("/")));
    }

    #[test]
    fn group_ids_match_external_ids_exactly() {
        let by_id = |id: &str| {
            compile(
                vec![RuleSpec {
                    group_ids: strings(&[id]),
                    ..rule("r")
                }],
                vec![],
            )
        };
        let policy = by_id("00gSRE");
        assert_eq!(
            why(&policy, Some(&alice()), &get("/")),
            "allowed by r: member of the group with externalId 00gSRE"
        );
        assert!(!allowed(&by_id("00gsre"), Some(&alice()), &get("/")));
        // A display name is not an externalId.
        assert!(!allowed(&by_id("SRE"), Some(&alice()), &get("/")));
    }

    #[test]
    fn users_match_user_name_in_any_case() {
        let policy = compile(
            vec![RuleSpec {
                users: strings(&["Alice@Corp.Example"]),
                ..rule("r")
            }],
            vec![],
        );
        assert_eq!(
            why(&policy, Some(&alice()), &get("/")),
            "allowed by r: user alice@corp.example"
        );
        let bob = Subject {
            user_name: "bob@corp.example",
            ..alice()
        };
        assert!(!allowed(&policy, Some(&bob), &get("/")));
        // The email is not the userName.
        let machine = Subject {
            kind: SubjectKind::Machine,
            user_name: "ci-bot",
            email: Some("alice@corp.example"),
            ..alice()
        };
        assert!(!allowed(&policy, Some(&machine), &get("/")));
    }

    fn domains(entries: &[&str]) -> Policy {
        compile(
            vec![RuleSpec {
                email_domains: strings(entries),
                ..rule("r")
            }],
            vec![],
        )
    }

    #[test]
    fn email_domains_match_after_the_only_at() {
        let exact = domains(&["corp.example"]);
        for ok in [
            "alice@corp.example",
            "ALICE@CORP.EXAMPLE",
            "a+b@Corp.Example",
        ] {
            assert!(allowed(&exact, Some(&with_email(ok)), &get("/")), "{ok}");
        }
        for no in [
            "a@b@corp.example",
            "corp.example",
            "@corp.example",
            "alice@x.corp.example",
            "alice@evilcorp.example",
            "alice@corp.example.evil",
            "alice@corp.example.",
            "alice@\u{212A}orp.example",
        ] {
            assert!(!allowed(&exact, Some(&with_email(no)), &get("/")), "{no}");
        }
        let no_email = Subject {
            email: None,
            ..alice()
        };
        assert!(!allowed(&exact, Some(&no_email), &get("/")));
        assert_eq!(
            why(&exact, Some(&with_email("Alice@CORP.example")), &get("/")),
            "allowed by r: email domain CORP.example"
        );
    }

    #[test]
    fn subdomain_wildcards_match_below_but_not_the_apex_or_look_alikes() {
        let wildcard = domains(&["*.Corp.Example"]);
        for ok in ["a@x.corp.example", "a@a.b.corp.example", "a@X.CORP.EXAMPLE"] {
            assert!(allowed(&wildcard, Some(&with_email(ok)), &get("/")), "{ok}");
        }
        for no in [
            "a@corp.example",
            "a@evilcorp.example",
            "a@x.evilcorp.example",
            "a@.corp.example",
            "a@x..corp.example",
            "a@x.corp.example.evil",
            "a@b@x.corp.example",
            "x.corp.example",
        ] {
            assert!(
                !allowed(&wildcard, Some(&with_email(no)), &get("/")),
                "{no}"
            );
        }
        assert_eq!(
            why(&wildcard, Some(&with_email("a@eu.corp.example")), &get("/")),
            "allowed by r: email domain eu.corp.example, under *.corp.example"
        );
        let both = domains(&["corp.example", "*.corp.example"]);
        assert!(allowed(
            &both,
            Some(&with_email("a@corp.example")),
            &get("/")
        ));
        assert!(allowed(
            &both,
            Some(&with_email("a@x.corp.example")),
            &get("/")
        ));
    }

    #[test]
    fn any_signed_in_means_any_active_subject() {
        let policy = compile(
            vec![RuleSpec {
                any_signed_in: true,
                ..rule("r")
            }],
            vec![],
        );
        let nobody_special = Subject {
            kind: SubjectKind::Machine,
            user_name: "ci-bot",
            email: None,
            active: true,
            groups: &[],
            owner_groups: &[],
        };
        assert_eq!(
            why(&policy, Some(&nobody_special), &get("/x")),
            "allowed by r: signed in as ci-bot"
        );
        assert_eq!(
            why(&policy, None, &get("/x")),
            "no rule allows this: not signed in"
        );
        let inactive = Subject {
            active: false,
            ..alice()
        };
        assert_eq!(
            why(&policy, Some(&inactive), &get("/x")),
            "the account is deactivated"
        );
    }

    fn ci_bot() -> Subject<'static> {
        Subject {
            kind: SubjectKind::Machine,
            user_name: "ci-bot",
            email: None,
            active: true,
            groups: &[],
            owner_groups: &[],
        }
    }

    const ENG: [GroupRef<'static>; 1] = [GroupRef {
        display_name: "Eng",
        external_id: None,
    }];

    /// An agent in group SRE whose owners are in Eng.
    fn helper_bot() -> Subject<'static> {
        Subject {
            kind: SubjectKind::Agent,
            user_name: "helper-bot",
            email: None,
            active: true,
            groups: &SRE,
            owner_groups: &ENG,
        }
    }

    #[test]
    fn agents_are_let_in_by_the_agent_criteria_alone() {
        let policy = compile(
            vec![
                groups("people", &["sre"]),
                RuleSpec {
                    any_signed_in: true,
                    machines: true,
                    email_domains: strings(&["corp.example"]),
                    ..rule("anyone")
                },
                RuleSpec {
                    agent_owner_groups: strings(&["eng"]),
                    paths: Some(strings(&["/owned"])),
                    ..rule("owned")
                },
                RuleSpec {
                    agent_groups: strings(&["sre"]),
                    paths: Some(strings(&["/grouped"])),
                    ..rule("grouped")
                },
                RuleSpec {
                    agents: true,
                    paths: Some(strings(&["/agents"])),
                    ..rule("agents")
                },
            ],
            vec![],
        );
        let bot = helper_bot();
        // The people's rules name SRE and anyone signed in: not an agent.
        assert_eq!(
            why(&policy, Some(&bot), &get("/x")),
            "no rule allows helper-bot to GET /x"
        );
        assert_eq!(
            why(&policy, Some(&bot), &get("/owned")),
            "allowed by owned: agent owned by a member of group Eng, path under /owned"
        );
        assert_eq!(
            why(&policy, Some(&bot), &get("/grouped")),
            "allowed by grouped: agent in group SRE, path under /grouped"
        );
        assert_eq!(
            why(&policy, Some(&bot), &get("/agents")),
            "allowed by agents: agent helper-bot, path under /agents"
        );
        // Nobody else is let in by the agent criteria: alice is in SRE, yet only as a person.
        assert_eq!(
            why(&policy, Some(&alice()), &get("/grouped")),
            "allowed by people: member of group SRE"
        );
        let person_in_eng = Subject {
            groups: &ENG,
            email: None,
            ..alice()
        };
        let decision = policy.evaluate(Some(&person_in_eng), &get("/owned"));
        assert_eq!(decision.rule, Some("anyone"), "{}", decision.reason);
        // An agent whose owner chain broke is deactivated.
        let broken = Subject {
            active: false,
            ..bot
        };
        assert_eq!(
            why(&policy, Some(&broken), &get("/agents")),
            "the account is deactivated"
        );
    }

    #[test]
    fn agent_criteria_in_deny_rules_keep_agents_out() {
        let policy = compile(
            vec![RuleSpec {
                agents: true,
                ..rule("agents")
            }],
            vec![RuleSpec {
                agent_owner_groups: strings(&["ENG"]),
                methods: Some(strings(&["DELETE"])),
                ..rule("no-deletes")
            }],
        );
        let delete = Request {
            method: "DELETE",
            path: "/x",
        };
        assert_eq!(
            why(&policy, Some(&helper_bot()), &delete),
            "denied by no-deletes: agent owned by a member of group Eng, method DELETE"
        );
        assert!(allowed(&policy, Some(&helper_bot()), &get("/x")));

        // A deny rule written for people refuses an agent by its own groups, and by
        // `any_signed_in`, though no allow rule for people lets it in.
        let policy = compile(
            vec![RuleSpec {
                agents: true,
                ..rule("agents")
            }],
            vec![
                groups("quarantine", &["sre"]),
                RuleSpec {
                    any_signed_in: true,
                    paths: Some(strings(&["/admin"])),
                    ..rule("no-admin")
                },
            ],
        );
        assert_eq!(
            why(&policy, Some(&helper_bot()), &get("/x")),
            "denied by quarantine: member of group SRE"
        );
        let ungrouped = Subject {
            groups: &[],
            ..helper_bot()
        };
        assert!(allowed(&policy, Some(&ungrouped), &get("/x")));
        assert_eq!(
            why(&policy, Some(&ungrouped), &get("/admin")),
            "denied by no-admin: signed in as helper-bot, path under /admin"
        );
    }

    #[test]
    fn machines_means_any_active_machine_and_no_person() {
        let policy = compile(
            vec![RuleSpec {
                machines: true,
                ..rule("r")
            }],
            vec![],
        );
        assert_eq!(
            why(&policy, Some(&ci_bot()), &get("/x")),
            "allowed by r: machine ci-bot"
        );
        // A machine in groups is still a machine.
        let grouped = Subject {
            groups: &SRE,
            owner_groups: &[],
            ..ci_bot()
        };
        assert!(allowed(&policy, Some(&grouped), &get("/x")));
        assert_eq!(
            why(&policy, Some(&alice()), &get("/x")),
            "no rule allows alice@corp.example to GET /x"
        );
        assert_eq!(
            why(&policy, None, &get("/x")),
            "no rule allows this: not signed in"
        );
        let inactive = Subject {
            active: false,
            ..ci_bot()
        };
        assert_eq!(
            why(&policy, Some(&inactive), &get("/x")),
            "the account is deactivated"
        );
    }

    #[test]
    fn machines_in_deny_rules_keep_machines_out_and_people_in() {
        let policy = compile(
            vec![
                RuleSpec {
                    any_signed_in: true,
                    ..rule("allow")
                },
                RuleSpec {
                    public: true,
                    paths: Some(strings(&["/status"])),
                    ..rule("status")
                },
            ],
            vec![RuleSpec {
                machines: true,
                methods: Some(strings(&["DELETE"])),
                ..rule("no-machine-deletes")
            }],
        );
        let delete = Request {
            method: "DELETE",
            path: "/status/x",
        };
        assert_eq!(
            why(&policy, Some(&ci_bot()), &delete),
            "denied by no-machine-deletes: machine ci-bot, method DELETE"
        );
        assert!(allowed(&policy, Some(&ci_bot()), &get("/x")));
        assert!(allowed(&policy, Some(&alice()), &delete));
        // Like `any_signed_in`, `machines` means active: a deactivated machine is not named by
        // it, and where a public rule lets everyone in, it is let in like anyone.
        let inactive = Subject {
            active: false,
            ..ci_bot()
        };
        assert_eq!(
            why(&policy, Some(&inactive), &delete),
            "allowed by status: open to everyone, path under /status"
        );
    }

    #[test]
    fn a_machine_is_named_before_signed_in_and_after_its_names() {
        let policy = compile(
            vec![RuleSpec {
                machines: true,
                any_signed_in: true,
                ..groups("r", &["sre"])
            }],
            vec![],
        );
        assert_eq!(
            why(&policy, Some(&ci_bot()), &get("/")),
            "allowed by r: machine ci-bot"
        );
        let grouped = Subject {
            groups: &SRE,
            owner_groups: &[],
            ..ci_bot()
        };
        assert_eq!(
            why(&policy, Some(&grouped), &get("/")),
            "allowed by r: member of group SRE"
        );
        let nobody = Subject {
            groups: &[],
            owner_groups: &[],
            ..alice()
        };
        assert_eq!(
            why(&policy, Some(&nobody), &get("/")),
            "allowed by r: signed in as alice@corp.example"
        );
    }

    #[test]
    fn public_lets_everyone_in() {
        let policy = compile(
            vec![RuleSpec {
                public: true,
                ..rule("r")
            }],
            vec![],
        );
        for subject in [None, Some(alice())] {
            let decision = policy.evaluate(subject.as_ref(), &get("/"));
            assert!(decision.allowed);
            assert_eq!(
                decision.reason.to_string(),
                "allowed by r: open to everyone"
            );
        }
    }

    #[test]
    fn methods_are_case_insensitive_and_absent_means_all() {
        let policy = compile(
            vec![RuleSpec {
                methods: Some(strings(&["get", "HEAD", "propfind"])),
                ..groups("r", &["sre"])
            }],
            vec![],
        );
        for method in ["GET", "get", "HEAD", "PROPFIND", "PropFind"] {
            let request = Request { method, path: "/" };
            assert!(allowed(&policy, Some(&alice()), &request), "{method}");
        }
        for method in ["POST", "DELETE", "PROP", "MKCOL"] {
            let request = Request { method, path: "/" };
            assert!(!allowed(&policy, Some(&alice()), &request), "{method}");
        }
        assert_eq!(
            why(&policy, Some(&alice()), &get("/")),
            "allowed by r: member of group SRE, method GET"
        );
        let everything = compile(vec![groups("r", &["sre"])], vec![]);
        let request = Request {
            method: "X-ANYTHING",
            path: "/",
        };
        assert!(allowed(&everything, Some(&alice()), &request));
        assert!(policy.names_methods() && !everything.names_methods());
    }

    #[test]
    fn a_deny_of_get_is_a_deny_of_head_and_an_allow_of_get_is_not_an_allow_of_head() {
        // Frameworks answer HEAD with the GET handler.
        let policy = compile(
            vec![RuleSpec {
                methods: Some(strings(&["GET"])),
                ..groups("in", &["sre"])
            }],
            vec![RuleSpec {
                methods: Some(strings(&["get"])),
                paths: Some(strings(&["/export"])),
                ..groups("out", &["sre"])
            }],
        );
        let request = |method, path| Request { method, path };
        for method in ["GET", "HEAD", "head"] {
            let decision = policy.evaluate(Some(&alice()), &request(method, "/export"));
            assert_eq!(decision.rule, Some("out"), "{method}");
        }
        assert!(allowed(&policy, Some(&alice()), &request("GET", "/")));
        assert!(!allowed(&policy, Some(&alice()), &request("HEAD", "/")));
        // An allow of HEAD alone would let GET's handler run: refused, as it says less.
        let head_only = RuleSpec {
            methods: Some(strings(&["HEAD", "OPTIONS"])),
            ..groups("monitor", &["sre"])
        };
        let errors = Policy::compile(vec![head_only.clone()], vec![]).expect_err("HEAD alone");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].problem, Problem::HeadWithoutGet, "{errors:?}");
        let with_get = RuleSpec {
            methods: Some(strings(&["head", "get"])),
            ..head_only
        };
        assert!(Policy::compile(vec![with_get], vec![]).is_ok());
    }

    #[test]
    fn deny_rules_read_paths_as_the_most_lenient_upstream_would() {
        let policy = compile(
            vec![groups("in", &["sre"])],
            vec![RuleSpec {
                paths: Some(strings(&["/admin", "/api/", "/lang/c++/", "/c%2B%2B"])),
                ..groups("out", &["sre"])
            }],
        );
        for denied in [
            // `+` and `%2B` alike, as frameworks decode a path.
            "/lang/c%2B%2B/x",
            "/lang/C+%2B",
            "/c++",
            "/c++.json",
            "/admin",
            "/ADMIN",
            "/Admin/users",
            "/admin;jsessionid=1",
            "/admin;x/y",
            "/;x/admin",
            "/API/v1",
            "/api;v=2/",
            // Express, Rails and ASP.NET serve `/api` as `/api/`.
            "/api",
            "/Api;v=2",
            // Rails serves `/admin.json` as `/admin`.
            "/admin.json",
            "/api.xml;v=2/",
        ] {
            let decision = policy.evaluate(Some(&alice()), &get(denied));
            assert_eq!(decision.rule, Some("out"), "{denied}");
        }
        for allowed_path in [
            "/adminx",
            "/admin2/x",
            "/x/admin",
            "/apix",
            "/apix;a/",
            "/admin.json/x",
        ] {
            assert!(
                allowed(&policy, Some(&alice()), &get(allowed_path)),
                "{allowed_path}"
            );
        }
    }

    /// ASP.NET Core compares the path it has decoded with its routes in any case, letters
    /// beyond ASCII too: `/Über` is its `/über`.
    #[test]
    fn the_lenient_reading_takes_letters_beyond_ascii_in_any_case() {
        assert!(loosely_within("/%C3%BCber/", "/%C3%9Cber/x"));
        assert!(loosely_within("/%C3%BCber/", "/%C3%9CBER"));
        assert!(loosely_within("/caf%C3%A9", "/CAF%C3%89;x/y"));
        assert!(denied_within("/caf%C3%A9", "/CAF%C3%89/x"));
        assert!(denied_within("/caf%C3%A9", "/Caf%C3%89.json"));
        assert!(denied_within("/%D0%B0%D0%B4", "/%D0%90%D0%94/x"));
        // One letter for one, as .NET reads them: `ß` is not `SS`, nor `ı` `I`; `ᾳ` is `ᾼ`
        // (whose upper case is `ΑΙ` in full).
        assert!(!loosely_within("/stra%C3%9Fe/", "/STRASSE/x"));
        assert!(!loosely_within("/%C3%A9stra%C3%9Fe/", "/%C3%89STRASSE/x"));
        assert!(loosely_within("/%E1%BE%B3/", "/%E1%BE%BC/x"));
        // A bare `.` after the name is a format suffix, as for ASCII names.
        assert!(denied_within("/%C3%BCber", "/%C3%9Cber."));
        assert!(denied_within("/%C3%A9.settings", "/%C3%89.SETTINGS.json"));
        assert!(!denied_within("/%C3%A9.settings", "/%C3%89.json"));
        assert!(denied_within("/%C3%A9", "/%C3%89.json"));
        assert!(denied_within("/admin", "/ADMIN."));
        assert!(!loosely_within("/%C4%B1d/", "/ID%C3%A9/x"));
        assert!(!loosely_within("/%C4%B1d%C3%A9/", "/ID%C3%A9/x"));
        assert!(!loosely_within("/caf%C3%A9", "/cafe/x"));
        assert!(!loosely_within("/caf%C3%A9", "/caf%C3%A8/x"));
        assert!(!denied_within("/caf%C3%A9", "/caf%C3%A9s/x"));
        // Escapes that are not UTF-8 are compared as written.
        assert!(loosely_within("/%FF", "/%FF/x"));
        assert!(loosely_within("/%FFa", "/%FFA/x"));
        assert!(!loosely_within("/%FF", "/%FE/x"));
    }

    #[test]
    fn the_lenient_reading_keeps_segment_boundaries() {
        assert!(loosely_within("/", "/anything"));
        assert!(loosely_within("/v1", "/V1;x"));
        assert!(loosely_within("/v1", "/v1;x/y"));
        assert!(!loosely_within("/v1", "/v1x"));
        assert!(!loosely_within("/v1", "/v1x;y"));
        assert!(loosely_within("/v1/", "/v1;x/"));
        assert!(loosely_within("/v1/", "/V1/a"));
        // A prefix's trailing `/` is not required: Express serves `/v1` as `/v1/`.
        for path in ["/v1", "/V1", "/v1;x"] {
            assert!(loosely_within("/v1/", path), "{path}");
        }
        assert!(!loosely_within("/v1/", "/v1x"));
        assert!(!loosely_within("/v1/", "/v"));
        assert!(loosely_within("/a/b", "/a;p/;q/B"));
        // A last segment of parameters only reads as a trailing `/`.
        for path in [
            "/admin/;x",
            "/ADMIN/;jsessionid=1",
            "/admin;a/;b",
            "/admin/;",
        ] {
            assert!(loosely_within("/admin/", path), "{path}");
        }
        assert!(loosely_within("/admin/", "/admin;x"));
        // `%3B` too: nginx passes it on as `;` when its `proxy_pass` names a path.
        assert!(loosely_within("/admin", "/admin%3Bx/y"));
        assert!(loosely_within("/a/b", "/a%3Bp/B"));
        assert!(!loosely_within("/admin", "/admin%3A"));
        // Spaces CodeIgniter trims off the path's ends (`+` and `%2B` it decodes to spaces).
        for path in [
            "/+/admin/x",
            "/%20/admin",
            "/+admin",
            "/admin%20",
            "/admin+/",
            "/%2B/admin%2B",
        ] {
            assert!(loosely_within("/admin/", path), "{path}");
        }
        assert!(!loosely_within("/admin/", "/x/+/admin"));
        assert!(!loosely_within("/admin/", "/ad+min"));
        // A prefix's own spaces are not trimmed: they are its paths'.
        assert!(loosely_within("/tags/c++/", "/tags/c++/edit"));
        assert!(loosely_within("/c%2B%2B/", "/c%2B%2B/x"));
        // A `+` in a path is a `+` to frameworks, which decode `%2B` to it: either spelling
        // of a prefix holds the other's paths.
        for path in ["/c%2B%2B/x", "/C+%2B/x", "/c++"] {
            assert!(loosely_within("/c++/", path), "{path}");
            assert!(loosely_within("/c%2B%2B/", path), "{path}");
        }
        assert!(!loosely_within("/c++/", "/c%2B/x"));
        assert!(!loosely_within("/c++/", "/c%2B%2B%2B/x"));
        assert!(!loosely_within("/c++/", "/c%2Bx/x"));
        assert!(loosely_within("/docs%20/", "/docs%20/x"));
        assert!(!loosely_within("/c++/", "/c/x"));
        // For deny rules, a format suffix on the path's last segment, when it is the
        // prefix's last; not for routes.
        for path in [
            "/items/export.csv",
            "/Items/Export.CSV/",
            "/items/export.tar.gz",
            "/items/export.csv;x",
            "/items;a/export;b.json",
            "/items;a/export.json;b/",
        ] {
            assert!(denied_within("/items/export", path), "{path}");
            assert!(denied_within("/items/export/", path), "{path}");
            let parameters = path.contains(";b.json");
            assert_eq!(loosely_within("/items/export", path), parameters, "{path}");
        }
        for path in [
            "/items/exports.csv",
            "/items/export.csv/x",
            "/items.csv/export",
            "/items/export.csv;x/y",
            "/items/exportcsv",
        ] {
            assert!(!denied_within("/items/export", path), "{path}");
        }
        // For deny rules, as a PHP front controller routes the path after its script; not for
        // routes.
        for (prefix, path) in [
            ("/admin", "/index.php/admin"),
            ("/admin", "/INDEX.PHP/Admin/users"),
            ("/admin", "/index.php;x/admin.json"),
            ("/app/admin", "/app/index.php/admin"),
            ("/", "/index.php/"),
        ] {
            assert!(denied_within(prefix, path), "{prefix} {path}");
            assert!(!loosely_within(prefix, path) || prefix == "/", "{path}");
        }
        // And as Next.js serves a page's data: its server-side props.
        for (prefix, path) in [
            ("/admin", "/_next/data/b1/admin.json"),
            ("/admin", "/_next/data/b1/Admin/users.json"),
            ("/admin", "/_NEXT/Data/b1/admin/users.JSON"),
            ("/app/admin", "/app/_next/data/b1/admin.json"),
            ("/posts/1", "/_next/data/b1/posts/1.json"),
            ("/admin", "/_next/data/b1/index/admin.json"),
            ("/admin", "/_next/data/b1/Index/admin/users.json"),
        ] {
            assert!(denied_within(prefix, path), "{prefix} {path}");
        }
        for (prefix, path) in [
            ("/admin", "/_next/data/b1/admins.json"),
            ("/admin", "/_next/data/admin.json"),
            ("/admin", "/_next/data//admin.json"),
            ("/admin", "/_next/data/b1/admin.js"),
            ("/admin", "/_next/static/b1/admin.json"),
        ] {
            assert!(!denied_within(prefix, path), "{prefix} {path}");
        }
        assert_eq!(
            next_data_routed("/_next/data/b1/index.json"),
            Some("/".to_owned())
        );
        assert_eq!(
            next_data_routed("/_next/data/b1/index/.json"),
            Some("/".to_owned())
        );
        assert_eq!(next_data_routed("/caf\u{e9}/_x"), None);
        // A page named by its file, for servers that serve it without the extension.
        for (prefix, path) in [
            ("/admin.php", "/admin"),
            ("/admin.php", "/Admin/x"),
            ("/reports/q3.html", "/reports/q3"),
            ("/admin.php", "/admin.php"),
        ] {
            assert!(denied_within(prefix, path), "{prefix} {path}");
        }
        // A page's file with path info, which Apache, nginx with `fastcgi_split_path_info` and
        // IIS run as that page: the page's clean name (`/admin/x`) where servers serve those.
        for (prefix, path) in [
            ("/admin", "/admin.php/x"),
            ("/admin", "/ADMIN.PHP/x"),
            ("/admin", "/admin.aspx/x"),
            ("/admin", "/admin.php;s=1/x"),
            ("/admin/x", "/admin.html/x"),
            ("/app/admin", "/app/admin.php/"),
        ] {
            assert!(denied_within(prefix, path), "{prefix} {path}");
            assert!(!loosely_within(prefix, path), "{path}");
        }
        // And the other way round: a deny on a page's file with path info refuses the path
        // by its page's clean name.
        for (prefix, path) in [
            ("/admin.php/users", "/admin/users"),
            ("/admin.php/users", "/Admin/users/x"),
            ("/app/admin.aspx/x/", "/app/admin/x"),
        ] {
            assert!(denied_within(prefix, path), "{prefix} {path}");
        }
        assert!(!denied_within("/admin.php/users", "/admin/x"));
        // A deny on what follows a front controller refuses it by its pretty name, which
        // servers rewrite to `index.php`; what another script serves is its own.
        for (prefix, path) in [
            ("/index.php/admin", "/admin"),
            ("/index.php/admin", "/Admin/x"),
            ("/app/INDEX.PHP/admin/", "/app/admin"),
        ] {
            assert!(denied_within(prefix, path), "{prefix} {path}");
        }
        for (prefix, path) in [
            ("/index.php/", "/x"),
            ("/remote.php/dav", "/dav"),
            ("/admin.php/x", "/x"),
        ] {
            assert!(!denied_within(prefix, path), "{prefix} {path}");
        }
        for (prefix, path) in [
            ("/admin", "/admin.json/x"),
            ("/admin", "/admins.php/x"),
            ("/admin", "/x/admin.php"),
            ("/admin", "/.php/admin"),
            ("/admin/y", "/admin.php/x"),
        ] {
            assert!(!denied_within(prefix, path), "{prefix} {path}");
        }
        // A directory's index page: the directory itself, and nothing under it.
        for (prefix, path) in [
            ("/admin/index.php", "/admin/"),
            ("/admin/index.php", "/ADMIN"),
            ("/admin/index.php", "/admin;x/"),
            ("/Default.aspx", "/"),
            ("/admin.php/", "/admin"),
            ("/admin/index.php/", "/admin/"),
            ("/admin/index.php", "/index.php/admin"),
        ] {
            assert!(denied_within(prefix, path), "{prefix} {path}");
        }
        for (prefix, path) in [
            ("/api/v1.2", "/api/v1"),
            ("/admin.php", "/adminx"),
            ("/.php", "/"),
            ("/admin/index.php", "/admin/x"),
            ("/admin/index.php", "/admin.json"),
            ("/admin/index.php", "/"),
            ("/admin/indexes.php", "/admin/"),
        ] {
            assert!(!denied_within(prefix, path), "{prefix} {path}");
        }
        for (prefix, path) in [
            ("/admin", "/index.php"),
            ("/admin", "/index.php/x/admin"),
            ("/admin", "/a.php/b.php/admin"),
            ("/admin", "/.php/admin"),
            ("/admin", "/index.phpx/admin"),
            ("/app/admin", "/index.php/admin"),
        ] {
            assert!(!denied_within(prefix, path), "{prefix} {path}");
        }
    }

    #[test]
    fn paths_match_at_segment_boundaries_and_case_sensitively() {
        let policy = compile(
            vec![RuleSpec {
                paths: Some(strings(&["/admin", "/api/"])),
                ..groups("r", &["sre"])
            }],
            vec![],
        );
        for ok in ["/admin", "/admin/", "/admin/x", "/api/", "/api/v1"] {
            assert!(allowed(&policy, Some(&alice()), &get(ok)), "{ok}");
        }
        for no in [
            "/adminx", "/Admin", "/ADMIN/x", "/api", "/apix", "/", "/x/admin",
        ] {
            assert!(!allowed(&policy, Some(&alice()), &get(no)), "{no}");
        }
        assert_eq!(
            why(&policy, Some(&alice()), &get("/admin/users")),
            "allowed by r: member of group SRE, path under /admin"
        );
        let root = compile(
            vec![RuleSpec {
                paths: Some(strings(&["/", "/a"])),
                ..groups("r", &["sre"])
            }],
            vec![],
        );
        assert!(allowed(&root, Some(&alice()), &get("/anything/at/all")));
        // The most specific prefix is the one named.
        assert_eq!(
            why(&root, Some(&alice()), &get("/a/b")),
            "allowed by r: member of group SRE, path under /a"
        );
    }

    #[test]
    fn deny_wins_over_allow_and_the_first_of_each_decides() {
        let policy = compile(
            vec![
                groups("routes[0].allow[0]", &["eng"]),
                groups("routes[0].allow[1]", &["sre"]),
                RuleSpec {
                    any_signed_in: true,
                    ..rule("routes[0].allow[2]")
                },
            ],
            vec![
                RuleSpec {
                    methods: Some(strings(&["DELETE"])),
                    ..groups("routes[0].deny[0]", &["contractors", "sre"])
                },
                groups("routes[0].deny[1]", &["everyone"]),
            ],
        );
        let deleting = Request {
            method: "DELETE",
            path: "/v1/x",
        };
        let decision = policy.evaluate(Some(&alice()), &deleting);
        assert!(!decision.allowed);
        assert_eq!(decision.rule, Some("routes[0].deny[0]"));
        assert_eq!(
            decision.reason.to_string(),
            "denied by routes[0].deny[0]: member of group SRE, method DELETE"
        );
        assert_eq!(
            why(&policy, Some(&alice()), &get("/")),
            "denied by routes[0].deny[1]: member of group Everyone"
        );
        let only_sre = Subject {
            groups: &SRE[1..],
            owner_groups: &[],
            ..alice()
        };
        assert_eq!(
            why(&policy, Some(&only_sre), &get("/")),
            "allowed by routes[0].allow[1]: member of group SRE"
        );
        let nobody = Subject {
            groups: &[],
            owner_groups: &[],
            ..alice()
        };
        assert_eq!(
            why(&policy, Some(&nobody), &get("/")),
            "allowed by routes[0].allow[2]: signed in as alice@corp.example"
        );
    }

    #[test]
    fn a_deny_rule_beats_public() {
        let policy = compile(
            vec![RuleSpec {
                public: true,
                ..rule("allow")
            }],
            vec![RuleSpec {
                paths: Some(strings(&["/admin"])),
                ..groups("deny", &["sre"])
            }],
        );
        assert!(!allowed(&policy, Some(&alice()), &get("/admin")));
        assert!(allowed(&policy, Some(&alice()), &get("/other")));
        // Nothing in a deny rule can name an anonymous caller.
        assert!(allowed(&policy, None, &get("/admin")));
    }

    #[test]
    fn anonymous_callers_only_get_public_rules() {
        let policy = compile(
            vec![
                RuleSpec {
                    any_signed_in: true,
                    users: strings(&["alice@corp.example"]),
                    email_domains: strings(&["corp.example"]),
                    ..groups("signed-in", &["everyone"])
                },
                RuleSpec {
                    public: true,
                    paths: Some(strings(&["/public"])),
                    ..rule("public")
                },
            ],
            vec![],
        );
        let decision = policy.evaluate(None, &get("/"));
        assert_eq!(decision.rule, None);
        assert_eq!(decision.reason, Reason::NotSignedIn);
        assert!(allowed(&policy, None, &get("/public/logo.png")));
    }

    #[test]
    fn deactivated_subjects_are_refused_except_on_public_rules() {
        let inactive = Subject {
            active: false,
            ..alice()
        };
        let policy = compile(
            vec![
                groups("sre", &["sre"]),
                RuleSpec {
                    users: strings(&["alice@corp.example"]),
                    ..rule("alice")
                },
                RuleSpec {
                    public: true,
                    paths: Some(strings(&["/status"])),
                    ..rule("status")
                },
            ],
            vec![RuleSpec {
                paths: Some(strings(&["/status/internal"])),
                ..groups("no-internal", &["everyone"])
            }],
        );
        let decision = policy.evaluate(Some(&inactive), &get("/"));
        assert!(!decision.allowed);
        assert_eq!(decision.rule, None);
        assert_eq!(decision.reason, Reason::Deactivated);
        assert_eq!(
            why(&policy, Some(&inactive), &get("/status")),
            "allowed by status: open to everyone, path under /status"
        );
        // On a public route, deny rules still apply to the subject's own names.
        assert_eq!(
            why(&policy, Some(&inactive), &get("/status/internal")),
            "denied by no-internal: member of group Everyone, path under /status/internal"
        );
        // Off it, deactivation is the reason, even where a deny rule matches too.
        let deny_everywhere = compile(
            vec![groups("sre", &["sre"])],
            vec![groups("deny", &["everyone"])],
        );
        assert_eq!(
            deny_everywhere.evaluate(Some(&inactive), &get("/")).reason,
            Reason::Deactivated
        );
    }

    #[test]
    fn refusals_name_the_caller_and_nothing_about_anyone_else() {
        let policy = compile(
            vec![RuleSpec {
                users: strings(&["bob@corp.example"]),
                email_domains: strings(&["partner.example"]),
                ..groups("routes[1].allow[0]", &["finance", "sre"])
            }],
            vec![RuleSpec {
                users: strings(&["carol@corp.example"]),
                ..groups("routes[1].deny[0]", &["contractors"])
            }],
        );
        let nobody = Subject {
            groups: &SRE[..1],
            owner_groups: &[],
            ..alice()
        };
        let reason = why(&policy, Some(&nobody), &get("/admin"));
        assert_eq!(reason, "no rule allows alice@corp.example to GET /admin");
        let reason = why(&policy, Some(&alice()), &get("/admin"));
        assert_eq!(reason, "allowed by routes[1].allow[0]: member of group SRE");
        for secret in [
            "bob",
            "carol",
            "finance",
            "partner",
            "contractors",
            "Everyone",
        ] {
            assert!(!reason.contains(secret), "{reason}");
        }
    }

    #[test]
    fn requests_that_cannot_be_evaluated_are_refused_even_when_public() {
        let policy = compile(
            vec![RuleSpec {
                public: true,
                ..rule("r")
            }],
            vec![RuleSpec {
                paths: Some(strings(&["/admin"])),
                ..groups("d", &["sre"])
            }],
        );
        for (method, path) in [
            ("GET", "admin"),
            ("GET", "//admin"),
            ("GET", "/./admin"),
            ("GET", "/x/../admin"),
            ("GET", "/admin?x=1"),
            ("GET", ""),
            ("", "/"),
            ("G ET", "/"),
        ] {
            let decision = policy.evaluate(Some(&alice()), &Request { method, path });
            assert!(!decision.allowed, "{method} {path}");
            assert!(
                matches!(decision.reason, Reason::Unevaluable { .. }),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn the_reason_is_found_past_the_first_few_matching_names() {
        // Ten names match something; the deciding rule is named by the tenth.
        let names: Vec<String> = (0..10).map(|i| format!("g{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let policy = compile(
            vec![
                RuleSpec {
                    paths: Some(strings(&["/elsewhere"])),
                    ..groups("elsewhere", &refs[..9])
                },
                groups("decides", &["G9"]),
            ],
            vec![],
        );
        let member_of: Vec<GroupRef<'_>> = names
            .iter()
            .map(|name| GroupRef {
                display_name: name,
                external_id: None,
            })
            .collect();
        let subject = Subject {
            groups: &member_of,
            owner_groups: &[],
            ..alice()
        };
        assert_eq!(
            why(&policy, Some(&subject), &get("/")),
            "allowed by decides: member of group g9"
        );
        assert_eq!(
            why(&policy, Some(&subject), &get("/elsewhere")),
            "allowed by elsewhere: member of group g0, path under /elsewhere"
        );
    }

    #[test]
    fn an_empty_policy_refuses_everything() {
        let policy = compile(vec![], vec![]);
        assert!(policy.is_empty());
        assert!(!allowed(&policy, Some(&alice()), &get("/")));
        assert!(!allowed(&policy, None, &get("/")));
    }

    #[test]
    fn policies_beyond_one_chunk_keep_their_order() {
        // 300 allow rules and 300 deny rules: three passes of 256.
        let mut allow: Vec<RuleSpec> = (0..300)
            .map(|i| groups(&format!("allow[{i}]"), &[&format!("g{i}")]))
            .collect();
        let mut deny: Vec<RuleSpec> = (0..300)
            .map(|i| groups(&format!("deny[{i}]"), &[&format!("d{i}")]))
            .collect();
        allow.push(groups("allow[300]", &["sre"]));
        deny.push(RuleSpec {
            paths: Some(strings(&["/admin"])),
            ..groups("deny[300]", &["sre"])
        });
        let policy = compile(allow, deny);
        assert_eq!(policy.len(), 602);
        assert_eq!(
            policy.evaluate(Some(&alice()), &get("/admin")).rule,
            Some("deny[300]")
        );
        assert_eq!(
            policy.evaluate(Some(&alice()), &get("/")).rule,
            Some("allow[300]")
        );
        let in_many = [
            GroupRef {
                display_name: "g299",
                external_id: None,
            },
            GroupRef {
                display_name: "g7",
                external_id: None,
            },
            GroupRef {
                display_name: "d280",
                external_id: None,
            },
        ];
        let subject = Subject {
            groups: &in_many,
            owner_groups: &[],
            ..alice()
        };
        assert_eq!(
            policy.evaluate(Some(&subject), &get("/")).rule,
            Some("deny[280]")
        );
        let subject = Subject {
            groups: &in_many[..2],
            owner_groups: &[],
            ..alice()
        };
        assert_eq!(
            policy.evaluate(Some(&subject), &get("/")).rule,
            Some("allow[7]")
        );
    }

    #[test]
    fn compile_reports_every_problem_with_its_place() {
        let found = errors(
            vec![
                rule("routes[0].allow[0]"),
                RuleSpec {
                    groups: strings(&["sre", " "]),
                    group_ids: strings(&[""]),
                    users: strings(&[""]),
                    email_domains: strings(&["*.corp.*", "corp.example", ""]),
                    methods: Some(strings(&["GET", "BAD METHOD", ""])),
                    paths: Some(strings(&["admin", "/ok", "", "/a//b"])),
                    ..rule("routes[0].allow[1]")
                },
                RuleSpec {
                    any_signed_in: true,
                    methods: Some(vec![]),
                    paths: Some(vec![]),
                    ..rule("")
                },
            ],
            vec![RuleSpec {
                public: true,
                ..rule("routes[0].deny[0]")
            }],
        );
        let expected = [
            "routes[0].deny[0].public: `public` is only allowed in allow rules",
            "routes[0].allow[0]: the rule names nobody: give at least one of groups, group_ids, \
             users, email_domains, any_signed_in, machines, agents, agent_groups, agent_owner_groups or public",
            "routes[0].allow[1].groups[1]: is empty",
            "routes[0].allow[1].group_ids[0]: is empty",
            "routes[0].allow[1].users[0]: is empty",
            "routes[0].allow[1].email_domains[0]: \"*.corp.*\" is not a valid email domain: * is \
             only allowed as the whole first label, as in *.corp.example",
            "routes[0].allow[1].email_domains[2]: is empty",
            "routes[0].allow[1].methods[1]: \"BAD METHOD\" is not a valid HTTP method",
            "routes[0].allow[1].methods[2]: is empty",
            "routes[0].allow[1].paths[0]: \"admin\" is not a valid path prefix: it does not start \
             with /",
            "routes[0].allow[1].paths[2]: is empty",
            "routes[0].allow[1].paths[3]: \"/a//b\" is not a valid path prefix: it holds an empty \
             segment (//)",
            "allow[2]: the rule has no name",
            "allow[2].methods: is an empty list, which would match nothing; leave it out to match \
             everything",
            "allow[2].paths: is an empty list, which would match nothing; leave it out to match \
             everything",
        ];
        assert_eq!(found, expected);
    }

    #[test]
    fn policies_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Policy>();
    }

    #[test]
    fn a_policy_says_whether_it_reads_groups() {
        let rule = |name: &str| RuleSpec::new(name);
        let anyone = RuleSpec {
            any_signed_in: true,
            ..rule("a")
        };
        let eng = RuleSpec {
            groups: vec!["eng".to_owned()],
            ..rule("b")
        };
        let owners = RuleSpec {
            agent_owner_groups: vec!["eng".to_owned()],
            ..rule("c")
        };
        let compile = |allow, deny| Policy::compile(allow, deny).unwrap();
        assert!(!compile(vec![anyone.clone()], vec![]).reads_groups());
        assert!(compile(vec![anyone.clone()], vec![eng]).reads_groups());
        assert!(compile(vec![owners], vec![]).reads_groups());
    }
}

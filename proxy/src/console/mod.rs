//! The console: pages under `/.portcullis/console/` on the auth host that show the live
//! directory (users, groups, agents) to the people `[console]` lets in.
//!
//! Who may look is decided by the gate, exactly as for a route (the console is a route in the
//! configuration, `Config::console`): the pingora glue in `proxy.rs` admits the caller, then
//! asks [`Console::get`] for the page. Everything here is a plain function of the directory,
//! the sessions and the configuration as they are at that moment: no copies, no caches.
//!
//! Pages are server-rendered HTML in the one template ([`crate::reply::document`]), work
//! without JavaScript, and escape every value ([`escape`]). Lists are paged and searched in
//! memory; a page holds the directory's read lock only while it walks the index.

mod access;
mod actions;
mod audit;
mod directory;

pub use actions::{csrf_token, Act};

use std::path::PathBuf;
use std::sync::Arc;

use http::StatusCode;

use portcullis_scim::store::Directory;

use crate::audit::Audit;
use crate::auth::sessions::Sessions;
use crate::reply::{cut, Reply};
use crate::state::Runtime;

/// Rows on one page of a list.
pub const PAGE_SIZE: usize = 50;
/// Longest search text taken.
const MAX_SEARCH: usize = 256;

/// What a console page is made from: owned, so that a page is made off the proxy's worker
/// threads (see [`Console::get`]).
pub struct Console {
    pub runtime: Arc<Runtime>,
    pub directory: Arc<Directory>,
    pub sessions: Sessions,
    /// The audit log: read for the timeline, and where actions are recorded.
    pub audit: Arc<Audit>,
    /// The configuration file, which the reload action reads.
    pub config_path: PathBuf,
    /// The CSRF token of the viewer's session (see [`csrf_token`]): every form carries it.
    pub csrf: String,
    /// The `userName` of the person looking.
    pub viewer: String,
    /// The address they look from.
    pub viewer_ip: Option<std::net::IpAddr>,
    /// Unix seconds.
    pub now: i64,
}

/// The query parameters the pages take.
#[derive(Debug, Default)]
pub struct Params {
    /// Search text, trimmed, at most [`MAX_SEARCH`] bytes.
    pub q: String,
    /// 1-based page number.
    pub page: usize,
}

impl Params {
    pub fn parse(query: &str) -> Params {
        let mut params = Params {
            q: String::new(),
            page: 1,
        };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "q" => {
                    params.q = cut(value.trim(), MAX_SEARCH).to_owned();
                }
                "page" => params.page = value.parse().unwrap_or(1).clamp(1, 1 << 24),
                _ => {}
            }
        }
        params
    }
}

/// The sections in the top bar, by path under the console.
const SECTIONS: [(&str, &str); 7] = [
    ("", "Overview"),
    ("users", "Users"),
    ("groups", "Groups"),
    ("agents", "Agents"),
    ("routes", "Routes"),
    ("explain", "Explain"),
    ("audit", "Audit"),
];

/// `text` as HTML, with the characters that would show it otherwise (a direction mark that
/// reverses the rest of its line, a control) written as escapes: names, paths and reasons come
/// from the IdP and from clients, and an operator reads them to judge who may reach what.
pub(super) fn escape(text: &str) -> String {
    crate::reply::escape(&crate::human::printable(text))
}

/// A form field's value as HTML: as it was typed, to be sent back so (not shown as [`escape`]
/// shows text, which would send its escapes instead), but for the characters that would show
/// it otherwise (a direction mark, a control), which are left out: a link to the console can
/// fill a field, and its value must read as what it is.
pub(super) fn field(text: &str) -> String {
    let shown: String = text.chars().filter(|&c| !crate::human::hidden(c)).collect();
    crate::reply::escape(&shown)
}

/// A console page: [`crate::reply::document`], its title shown as [`escape`] shows text.
pub(super) fn document(title: &str, nav: &str, content: &str) -> String {
    crate::reply::document(&crate::human::printable(title), nav, content)
}

impl Console {
    /// The page at `page` (the path after `/.portcullis/console/`) for `query`.
    pub fn get(&self, page: &str, query: &str) -> Reply {
        let params = Params::parse(query);
        if let Some(act) = self.action(page.trim_end_matches('/')) {
            let shown = self.confirm(&act);
            return Reply::html(
                StatusCode::OK,
                document(&shown.title, &self.bar(""), &shown.content),
            );
        }
        let mut parts = page.trim_end_matches('/').splitn(2, '/');
        let section = parts.next().unwrap_or_default();
        let rest = parts.next();
        let shown = match (section, rest) {
            ("", None) => Some(self.overview()),
            ("users", None) => Some(self.users(&params)),
            ("users", Some(id)) => self.user(id),
            ("groups", None) => Some(self.groups(&params)),
            ("groups", Some(id)) => self.group(id, &params),
            ("agents", None) => Some(self.agents(&params)),
            ("agents", Some(id)) => self.agent(id),
            ("routes", None) => Some(self.routes()),
            ("routes", Some(index)) => self.route(index, query, &params),
            ("explain", None) => Some(self.explain_page(query)),
            ("audit", None) => Some(self.audit_page(query, &params)),
            _ => None,
        };
        match shown {
            Some(shown) => Reply::html(
                StatusCode::OK,
                document(&shown.title, &self.bar(section), &shown.content),
            ),
            None => Reply::html(
                StatusCode::NOT_FOUND,
                document(
                    "Not found",
                    &self.bar(section),
                    "<p>Nothing in the directory is at this address.</p>",
                ),
            ),
        }
    }

    /// The top bar: the sections, the current one marked, and who is looking.
    fn bar(&self, current: &str) -> String {
        let mut nav = String::from("<nav>");
        for (path, name) in SECTIONS {
            let mark = if path == current {
                " aria-current=\"page\""
            } else {
                ""
            };
            nav.push_str(&format!("<a href=\"{}\"{mark}>{name}</a>", link(path)));
        }
        nav.push_str("</nav>");
        nav.push_str(&format!(
            "<a class=\"who\" href=\"/.portcullis/me\">{}</a>",
            escape(&self.viewer)
        ));
        nav
    }
}

/// A page's title (plain text) and content (HTML).
struct Shown {
    title: String,
    content: String,
}

/// The URL of `path` under the console.
fn link(path: &str) -> String {
    format!("{}{path}", portcullis_config::CONSOLE_PATH)
}

/// `n` with thousands separated: `1,000,000`.
fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether `haystack` contains `needle` (already case-folded), ignoring case.
fn contains_folded(haystack: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    if haystack.is_ascii() && needle.is_ascii() {
        return haystack
            .as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()));
    }
    portcullis_policy::fold(haystack).contains(needle)
}

/// How many of `total` rows come before the page `params` asks for: a page past the last is
/// the last (as [`pager`] shows it).
fn page_skip(params: &Params, total: usize) -> usize {
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    (params.page.clamp(1, pages) - 1) * PAGE_SIZE
}

/// The previous/next links of a list of `total` items at `params`, for the list at `path`
/// with the query parameters `fixed`.
fn pager(path: &str, fixed: &[(&str, &str)], params: &Params, total: usize, noun: &str) -> String {
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let here = |page: usize| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.extend_pairs(fixed);
        if !params.q.is_empty() {
            query.append_pair("q", &params.q);
        }
        query.append_pair("page", &page.to_string());
        format!("{}?{}", link(path), escape(&query.finish()))
    };
    // A page past the last is shown as the last (the audit log's reading stops there), and
    // its neighbours are the last one's.
    let page = params.page.clamp(1, pages);
    let mut html = format!(
        "<div class=\"pager\"><span>{} {noun}{} · page {} of {}</span>",
        count(total),
        if total == 1 { "" } else { "s" },
        count(page),
        count(pages)
    );
    if page > 1 {
        html.push_str(&format!(
            "<a rel=\"prev\" href=\"{}\">Previous</a>",
            here(page - 1)
        ));
    }
    if page < pages {
        html.push_str(&format!(
            "<a rel=\"next\" href=\"{}\">Next</a>",
            here(page + 1)
        ));
    }
    html.push_str("</div>");
    html
}

/// The search form of the list at `path`.
fn search_form(path: &str, params: &Params, placeholder: &str) -> String {
    format!(
        "<form class=\"search\" method=\"get\" action=\"{}\"><input type=\"search\" name=\"q\" \
         value=\"{}\" placeholder=\"{}\" aria-label=\"Search\"><button type=\"submit\">Search</button></form>",
        link(path),
        field(&params.q),
        escape(placeholder)
    )
}

/// A yes/no cell.
fn flag(on: bool, yes: &str, no: &str) -> String {
    if on {
        format!("<span class=\"yes\">{yes}</span>")
    } else {
        format!("<span class=\"no\">{no}</span>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_bounded() {
        let p = Params::parse("q=%20Alice%20&page=3");
        assert_eq!((p.q.as_str(), p.page), ("Alice", 3));
        let p = Params::parse(&format!("q={}&page=-1", "é".repeat(200)));
        assert!(p.q.len() <= MAX_SEARCH && p.page == 1);
        assert_eq!(Params::parse("page=99999999999").page, 1 << 24);
    }

    #[test]
    fn counts_and_search_read_as_people_expect() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000_000), "1,000,000");
        assert!(contains_folded("Alice@Example.com", "alice@"));
        assert!(contains_folded("ÉMILE", "émile"));
        assert!(!contains_folded("bob", "alice"));
    }

    #[test]
    fn the_pager_keeps_the_search() {
        let params = Params {
            q: "a&b".to_owned(),
            page: 2,
        };
        let html = pager("users", &[], &params, 120, "user");
        assert!(html.contains("120 users · page 2 of 3"), "{html}");
        assert!(html.contains("q=a%26b&amp;page=1"), "{html}");
        assert!(html.contains("q=a%26b&amp;page=3"), "{html}");
        // Past the last page: shown as the last, its Previous the one before it.
        let past = Params {
            q: String::new(),
            page: 5000,
        };
        let html = pager("audit", &[], &past, 120, "record");
        assert!(html.contains("page 3 of 3"), "{html}");
        assert!(html.contains("page=2\">Previous"), "{html}");
        assert!(!html.contains("Next"), "{html}");
    }
}

#[cfg(test)]
mod pages {
    use super::*;
    use crate::testing::World;

    fn text(reply: &Reply) -> &str {
        std::str::from_utf8(&reply.body).unwrap()
    }

    /// The console of `world`, looked at by alice, with an audit log in `dir`.
    fn console_of(world: &World, dir: &std::path::Path) -> Console {
        let log = || crate::audit::Destination::of(dir, None);
        Console {
            runtime: Arc::new(world.runtime()),
            directory: world.directory.clone(),
            sessions: world.sessions.clone(),
            audit: Arc::new(Audit::open(log(), log()).unwrap()),
            config_path: dir.join("portcullis.toml"),
            csrf: "the-token".to_owned(),
            viewer: "alice@corp.example".to_owned(),
            viewer_ip: None,
            now: crate::clock::now_unix() as i64,
        }
    }

    /// Where the proxy refuses every credential an http route's callers could present (plain
    /// HTTP off loopback), the route reaches no one but where it is public, as explain says.
    #[tokio::test]
    async fn credentials_in_clear_off_loopback_reach_only_what_is_public() {
        for (config, in_clear) in crate::testing::off_loopback() {
            let dir = tempfile::tempdir().unwrap();
            let world = World::with(config);
            let alice = world.user("alice@corp.example").await;
            world.group("eng", &[&alice]).await;
            world.agent("helper", &[&alice], &[], None).await;
            let console = console_of(&world, dir.path());
            let routes = &console.runtime.config.routes;
            let (app, bots) = (&routes[0], routes.last().unwrap());
            let reach = console.reach(app, "GET", "/work");
            assert_eq!(reach.users.is_empty(), in_clear);
            assert_eq!(console.reach(bots, "GET", "/x").agents.is_empty(), in_clear);
            assert_eq!(console.reach(app, "GET", "/public").users.len(), 1);
        }
    }

    /// An agent is let in wherever a public rule lets anyone in, on a route that takes no
    /// bearer tokens too (its token goes unread there): the route's page lists it there, as
    /// `explain` judges it, and not where a rule asks for a signed-in person.
    #[tokio::test]
    async fn a_route_that_takes_no_tokens_lists_the_agents_its_public_rule_lets_in() {
        let docs = "[[routes]]\nfrom = \"http://docs.test\"\nto = [\"http://127.0.0.1:3\"]\n\
                    accept = [\"session\"]\n\
                    allow = [{ public = true, paths = [\"/open\"] }, { groups = [\"eng\"] }]";
        let world = World::with(crate::testing::config(docs));
        let alice = world.user("alice@corp.example").await;
        world.group("eng", &[&alice]).await;
        world.agent("helper", &[&alice], &[], None).await;
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let routes = &console.runtime.config.routes;
        let docs = routes
            .iter()
            .find(|r| r.name == "http://docs.test")
            .unwrap();
        let open = console.reach(docs, "GET", "/open");
        let names: Vec<&str> = open.agents.iter().map(|(_, name)| name.as_str()).collect();
        assert_eq!(names, ["helper"]);
        assert!(console.reach(docs, "GET", "/").agents.is_empty());
    }

    /// A name holding a direction mark or a control (the IdP sends any text) is shown with
    /// them written as escapes, on every page that names it and in its title: U+202E would
    /// show `\u{202e}moc.elpmaxe@ecila` as `alice@example.com`, to an operator judging who
    /// can reach a route.
    #[tokio::test]
    async fn names_are_shown_with_their_direction_marks_escaped() {
        let world = World::with(crate::testing::config(""));
        let mallory = world.user("\u{202e}moc.elpmaxe@ecila").await;
        let group = world.group("ops\u{202e}x\u{1b}[2A", &[&mallory]).await;
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        for page in [
            "users".to_owned(),
            format!("users/{mallory}"),
            format!("groups/{group}"),
            "groups".to_owned(),
            format!("users/{mallory}/end_sessions"),
        ] {
            let shown = console.get(&page, "");
            let html = text(&shown);
            assert!(!html.contains(['\u{202e}', '\u{1b}']), "{page}: {html}");
            assert!(html.contains("\\u{202e}"), "{page}: {html}");
        }
        // A field a link filled holds what it asked, less such marks.
        let html = text(&console.get("users", "q=%E2%80%AEmoc")).to_owned();
        assert!(html.contains("value=\"moc\""), "{html}");
        assert!(!html.contains('\u{202e}'), "{html}");
    }

    /// A route's page lists every agent it lets in, paged as its users are.
    #[tokio::test]
    async fn a_route_page_pages_its_agents() {
        let bots = "[[routes]]\nfrom = \"http://bots.test\"\nto = [\"http://127.0.0.1:3\"]\n\
                    accept = [\"bearer\"]\n\
                    allow = [{ agent_groups = [\"bots\"] }, { users = [\"alice@corp.example\"] }]";
        let world = World::with(crate::testing::config(bots));
        let alice = world.user("alice@corp.example").await;
        let app = world.application("assistant").await;
        let mut agents = Vec::new();
        for i in 0..60 {
            agents.push(
                world
                    .agent(&format!("bot-{i:02}"), &[&alice], &[&app], None)
                    .await,
            );
        }
        let members: Vec<&str> = agents.iter().map(String::as_str).collect();
        world.group("bots", &members).await;
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let route = console.runtime.config.routes.len() - 1;
        let first = console.get(&format!("routes/{route}"), "");
        let first = text(&first);
        assert!(first.contains("<strong>60</strong> agents"), "{first}");
        assert!(
            first.contains(">bot-49<") && !first.contains(">bot-50<"),
            "{first}"
        );
        assert!(first.contains("60 agents · page 1 of 2"), "{first}");
        let second = console.get(&format!("routes/{route}"), "page=2");
        let second = text(&second);
        assert!(
            second.contains(">bot-59<") && !second.contains(">bot-49<"),
            "{second}"
        );
        // Each list shows the page its pager names: the one user's last page is its first.
        assert!(
            second.contains(">alice@corp.example</a></td>")
                && second.contains("1 user · page 1 of 1"),
            "{second}"
        );
    }

    /// A route's page judges a path only where the proxy gives that path to the route: one
    /// another route serves, or the proxy refuses before it asks who calls, reaches nobody
    /// through it, however its rules read.
    #[tokio::test]
    async fn a_route_page_judges_only_the_paths_the_route_serves() {
        let reports = "[[routes]]\nfrom = \"http://app.test/reports\"\n\
                       to = [\"http://127.0.0.1:3\"]\nallow = { any_signed_in = true }";
        let world = World::with(crate::testing::config(reports));
        let alice = world.user("alice@corp.example").await;
        world.user("bob@corp.example").await;
        world.group("eng", &[&alice]).await;
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let page = |route: usize, path: &str| {
            let query = format!("path={}", path.replace('/', "%2F"));
            text(&console.get(&format!("routes/{route}"), &query)).to_owned()
        };
        let html = page(0, "/x");
        assert!(html.contains("<strong>1</strong> of 2 users"), "{html}");
        let nobody = [
            (0, "/reports/q3", "route http://app.test/reports serves it"),
            (0, "/index.php/reports/q3", "the proxy refuses it with 400"),
            // Nor one the proxy refuses as it reads it (shown as asked, not as the prefix).
            (7, "/reports/..;/q3", "the proxy refuses it with 400"),
            (7, "/reports\\q3", "GET /reports\\q3: the proxy refuses it"),
            (7, "reports", "the proxy refuses it with 400"),
            (0, "/.portcullis/console/", "Portcullis&#39; own endpoint"),
            // A path outside a route's prefix is not the route's either.
            (6, "/x", "route http://app.test serves it"),
        ];
        for (route, path, why) in nobody {
            let html = page(route, path);
            assert!(
                html.contains("Nobody reaches this route at GET"),
                "{path}: {html}"
            );
            assert!(html.contains(why), "{path}: {html}");
            assert!(!html.contains("<th>User</th>"), "nobody judged: {html}");
        }
        let html = page(6, "/v1/x");
        assert!(html.contains("<strong>1</strong> of 2 users"), "{html}");
        let html = page(7, "/reports/q3");
        assert!(html.contains("<strong>2</strong> of 2 users"), "{html}");
        // The box emptied: the route's prefix, as with none.
        let html = page(7, "");
        assert!(html.contains("<strong>2</strong> of 2 users"), "{html}");
    }

    #[tokio::test]
    async fn the_directory_is_shown_live_searched_and_paged() {
        let world = World::new();
        let alice = world.user("alice@corp.example").await;
        let bob = world.user("<b>bob</b>@corp.example").await;
        let platform = world.group("platform", &[&alice]).await;
        let eng = world.group("eng", &[&platform, &bob]).await;
        let app = world.application("assistant").await;
        let agent = world.agent("helper", &[&alice], &[&app], None).await;
        for i in 0..120 {
            world.user(&format!("user{i:03}@corp.example")).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());

        let overview = console.get("", "");
        assert!(
            text(&overview).contains("<strong>122</strong>Users"),
            "{}",
            text(&overview)
        );

        // Search by any identifier, case-insensitively; values escaped.
        let found = console.get("users", "q=ALICE");
        assert!(text(&found).contains("alice@corp.example"));
        assert!(
            text(&found).contains("1 user · page 1 of 1"),
            "{}",
            text(&found)
        );
        let escaped = console.get("users", "q=bob");
        assert!(text(&escaped).contains("&lt;b&gt;bob&lt;/b&gt;@corp.example"));
        assert!(!text(&escaped).contains("<b>bob</b>"));

        // Paging: 122 users, 50 a page.
        let page3 = console.get("users", "page=3");
        assert!(
            text(&page3).contains("122 users · page 3 of 3"),
            "{}",
            text(&page3)
        );
        assert!(text(&page3).contains("user119@corp.example"));
        assert!(!text(&page3).contains("user000@corp.example"));
        // Past the last page: the last page's users, not an empty table.
        let page9 = console.get("users", "page=9");
        assert!(text(&page9).contains("page 3 of 3"), "{}", text(&page9));
        assert!(
            text(&page9).contains("user119@corp.example"),
            "{}",
            text(&page9)
        );

        // alice: in platform directly, in eng through platform; no session yet.
        let page = console.get(&format!("users/{alice}"), "");
        let html = text(&page);
        assert!(html.contains("<h1>alice@corp.example</h1>"), "{html}");
        assert!(html.contains("through platform"), "{html}");
        assert!(html.contains("No session."), "{html}");
        world
            .sessions
            .create(
                // Begun a second ago: before a re-activation below.
                crate::caller::Identity {
                    created: crate::clock::now_unix() - 1,
                    ..world.person("alice@corp.example")
                },
                None,
                "portcullis_session",
                crate::clock::now_unix(),
            )
            .await
            .unwrap();
        let page = console.get(&format!("users/{alice}"), "");
        assert!(
            text(&page).contains("1 session, last seen"),
            "{}",
            text(&page)
        );
        // bob's, idled out, lets nobody in: none to show (the sweep forgets it later).
        let idle = console.runtime.config.oidc.as_ref().unwrap();
        let idle = idle.session_idle_timeout.as_secs();
        let long_ago = crate::clock::now_unix() - idle - 60;
        let who = crate::caller::Identity {
            created: long_ago,
            ..world.person("<b>bob</b>@corp.example")
        };
        let cookie = "portcullis_session";
        world
            .sessions
            .create(who, None, cookie, long_ago)
            .await
            .unwrap();
        let page = console.get(&format!("users/{bob}"), "");
        assert!(text(&page).contains("No session."), "{}", text(&page));
        let page = console.get(&format!("users/{bob}/end_sessions"), "");
        let ended_too = "has 0 sessions at Portcullis (and 1 that no longer lets them in";
        assert!(text(&page).contains(ended_too), "{}", text(&page));

        // eng's members: the group platform and bob.
        let page = console.get(&format!("groups/{eng}"), "");
        let html = text(&page);
        assert!(html.contains(">platform</a></td><td>Group"), "{html}");
        assert!(html.contains("2 direct members"), "{html}");
        // A large group's members, found a few rows at a time, are the same, in the same order.
        let row = world.directory.read(|index| index.row_of(&eng)).unwrap().1;
        let copied = directory::members_of(&world.directory, row, usize::MAX);
        assert_eq!(copied.len(), 2);
        assert_eq!(directory::members_of(&world.directory, row, 0), copied);

        // The agent stands through alice; once she is deactivated, it may not act.
        let page = console.get(&format!("agents/{agent}"), "");
        assert!(
            text(&page).contains("<span class=\"yes\">yes</span>"),
            "{}",
            text(&page)
        );
        world.set_active(&alice, false).await;
        let page = console.get(&format!("agents/{agent}"), "");
        assert!(text(&page).contains("no owner"), "{}", text(&page));
        // Her session is refused now, and still once she is re-activated (it began before):
        // it is no session of hers to show or end.
        for active in [false, true] {
            world.set_active(&alice, active).await;
            let page = console.get(&format!("users/{alice}"), "");
            assert!(text(&page).contains("No session."), "{}", text(&page));
            let page = console.get(&format!("users/{alice}/end_sessions"), "");
            assert!(text(&page).contains("has 0 sessions"), "{}", text(&page));
        }

        // Unknown pages and ids, and an id of another type.
        for page in ["nope", "users/not-an-id", &format!("groups/{alice}")] {
            assert_eq!(
                console.get(page, "").status,
                StatusCode::NOT_FOUND,
                "{page}"
            );
        }
    }

    #[tokio::test]
    async fn routes_say_who_can_reach_them_as_explain_does() {
        let world = World::new();
        let alice = world.user("alice@corp.example").await;
        let bob = world.user("bob@corp.example").await;
        world.group("eng", &[&alice]).await;
        world.group("contractors", &[&bob]).await;
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let routes = console.get("routes", "");
        assert!(
            text(&routes).contains(">http://odysseus.test</a>"),
            "{}",
            text(&routes)
        );

        // routes[0]: eng may, except under /admin.
        let html = text(&console.get("routes/0", "")).to_owned();
        assert!(html.contains("<strong>1</strong> of 2 users"), "{html}");
        assert!(
            html.contains(">alice@corp.example</a></td><td>signed in, or as a machine</td></tr>"),
            "{html}"
        );
        assert!(!html.contains(">bob@corp.example</a>"), "{html}");
        let html = text(&console.get("routes/0", "method=DELETE&path=/admin/x")).to_owned();
        assert!(html.contains("<strong>0</strong> of 2 users"), "{html}");
        assert!(
            html.contains("routes[0].deny"),
            "the rules are shown: {html}"
        );
        assert!(
            html.contains(">eng</a></td><td>routes[0].allow[0] (allow, groups)</td><td>1</td>"),
            "the groups the rules name: {html}"
        );
        assert_eq!(console.get("routes/99", "").status, StatusCode::NOT_FOUND);

        // The explain form answers as explain does.
        let html = text(&console.get(
            "explain",
            "user=bob%40corp.example&url=http%3A%2F%2Fapp.test%2F",
        ))
        .to_owned();
        assert!(html.contains("class=\"no\">Refused"), "{html}");
        let html = text(&console.get(
            "explain",
            "user=alice%40corp.example&url=http%3A%2F%2Fapp.test%2Fx&method=GET",
        ))
        .to_owned();
        assert!(html.contains("class=\"yes\">Allowed"), "{html}");
        assert!(html.contains("routes[0].allow"), "{html}");
        // What was asked stays in the form; a question explain does not take is told so.
        let html = text(&console.get("explain", "machine=build-bot&url=http%3A%2F%2Fapp.test%2F"))
            .to_owned();
        assert!(
            html.contains("name=\"machine\" value=\"build-bot\""),
            "{html}"
        );
        assert!(html.contains("class=\"no\">Refused"), "{html}");
        let html = text(&console.get(
            "explain",
            "user=bob%40corp.example&machine=build-bot&url=http%3A%2F%2Fapp.test%2F",
        ))
        .to_owned();
        assert!(html.contains("Give a URL, and a user"), "{html}");
        assert!(!html.contains("Refused"), "{html}");
        let html = text(&console.get("explain", "")).to_owned();
        assert!(!html.contains("Give a URL"), "an empty form: {html}");
        // The method as given: the proxy refuses a `get`, as `explain` says.
        let html = text(&console.get(
            "explain",
            "user=alice%40corp.example&url=http%3A%2F%2Fapp.test%2F&method=get",
        ))
        .to_owned();
        assert!(
            html.contains("class=\"no\">Refused") && html.contains("lower case"),
            "{html}"
        );
        assert!(html.contains("<option selected>get</option>"), "{html}");
        // So does a route's page.
        let html = text(&console.get("routes/0", "method=get")).to_owned();
        assert!(
            html.contains("Nobody reaches this route at get /")
                && html.contains("refuses it with 400, get is a method in lower case"),
            "{html}"
        );

        // A user's page lists the routes they can reach.
        let html = text(&console.get(&format!("users/{alice}"), "")).to_owned();
        assert!(
            html.contains(">http://app.test</a></td><td><span class=\"yes\">allowed"),
            "{html}"
        );
    }

    /// A user's page says a route is refused at its root where the proxy refuses the request
    /// before it asks who calls, as `explain` says: `/admin/` beside a route for its index
    /// page, which servers read as one path.
    #[tokio::test]
    async fn a_user_s_routes_are_refused_where_the_proxy_refuses_the_request() {
        let routes =
            "[[routes]]\nfrom = \"http://pages.test/admin/\"\nto = [\"http://127.0.0.1:3\"]\n\
                      allow = { groups = [\"eng\"] }\n\
                      [[routes]]\nfrom = \"http://pages.test/admin/index.php\"\n\
                      to = [\"http://127.0.0.1:3\"]\nallow = { groups = [\"ops\"] }";
        let world = World::with(crate::testing::config(routes));
        let alice = world.user("alice@corp.example").await;
        world.group("eng", &[&alice]).await;
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let answer = crate::explain::explain(
            &console.runtime,
            &world.directory,
            None,
            crate::explain::Who::Person("alice@corp.example"),
            "http://pages.test/admin/",
            "GET",
        )
        .unwrap();
        assert!(!answer.allowed, "{}", answer.reason);
        let html = text(&console.get(&format!("users/{alice}"), "")).to_owned();
        assert!(
            html.contains(">http://pages.test/admin/</a></td><td><span class=\"no\">refused"),
            "{html}"
        );
    }

    /// Anyone can make the log grow (refusals are recorded): a page reads it from the newest
    /// record back, and no further than it needs or than a bound, whatever its size.
    #[tokio::test]
    async fn the_timeline_reads_the_log_from_its_end_and_no_further_than_a_bound() {
        use crate::audit::Entry;
        let world = World::new();
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let refusal = |ago: i64, path: &str| {
            let time = time::OffsetDateTime::from_unix_timestamp(console.now - ago).unwrap();
            let entry = Entry::Refusal {
                time: time
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap(),
                user: "anonymous".to_owned(),
                route: "-".to_owned(),
                rule: None,
                reason: "a malformed request".to_owned(),
                method: "GET".to_owned(),
                path: path.to_owned(),
                client: None,
                agent: None,
            };
            serde_json::to_string(&entry).unwrap() + "\n"
        };
        // Two days of a flood, then the last minutes.
        let old = 3 * 86_400;
        let mut log = refusal(old + 1, "/the-oldest");
        for i in 0..audit::READ_LIMIT {
            log.push_str(&refusal(old - (i as i64) % 86_400, "/flood"));
        }
        for i in 0..60 {
            log.push_str(&refusal(120 - i, &format!("/recent-{i}")));
        }
        // A change a full queue left unwritten, written at the next start with its own time.
        let late = Entry::Change {
            seq: 1,
            time: time::OffsetDateTime::from_unix_timestamp(console.now - old)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            actor: "okta".to_owned(),
            client: None,
            op: "create".to_owned(),
            resource_type: "User".to_owned(),
            id: "u1".to_owned(),
            summary: "created".to_owned(),
        };
        log.push_str(&(serde_json::to_string(&late).unwrap() + "\n"));
        std::fs::write(dir.path().join(crate::audit::FILE_NAME), log).unwrap();

        // The landing page: the newest records and the last day, read no further (the 62nd
        // record is older than the day; the late change before the 60 is no sign of it).
        let overview = console.get("", "");
        let html = text(&overview);
        assert!(
            html.contains("/recent-59") && !html.contains("/flood"),
            "{html}"
        );
        assert!(html.contains("60 refusals"), "{html}");
        assert!(!html.contains("of the newest"), "{html}");
        let all = crate::audit::Filter::default();
        assert_eq!(console.newest(&all, 1, false).unwrap().read, 62);

        // The timeline counts what it reads, and says where it stopped.
        let page = console.get("audit", "");
        let html = text(&page);
        assert!(html.contains("/recent-59"), "{html}");
        assert!(html.contains("100,000 records"), "{html}");
        assert!(
            html.contains("Only the newest 100,000 records are read here"),
            "{html}"
        );
        assert!(!html.contains("/the-oldest"), "{html}");
        let page = console.get("audit", "page=2000");
        assert!(text(&page).contains("/flood"), "{}", text(&page));
        // `since` ends the reading where the records get older.
        let html = text(&console.get("audit", "since=1h&kind=refusal")).to_owned();
        assert!(html.contains("60 records"), "{html}");
        assert!(!html.contains("Only the newest"), "{html}");
        // A page past the last shows the last, as its pager says.
        let html = text(&console.get("audit", "since=1h&kind=refusal&page=5")).to_owned();
        assert!(html.contains("page 2 of 2"), "{html}");
        assert!(html.contains("GET /recent-0 on"), "{html}");
        // Each time not understood is named by its own field.
        let html = text(&console.get("audit", "since=soon&until=yesterday")).to_owned();
        for field in [
            "since &quot;soon&quot;: expected",
            "until &quot;yesterday&quot;: expected",
        ] {
            assert!(html.contains(field), "{field}: {html}");
        }
        assert_eq!(
            console.newest(&all, 1, true).unwrap().read,
            audit::READ_LIMIT
        );
        // A user's page found none of theirs in what it read: it says where it stopped, not
        // that they have no record.
        let dana = world.user("dana@corp.example").await;
        let html = text(&console.get(&format!("users/{dana}"), "")).to_owned();
        assert!(!html.contains("No record."), "{html}");
        assert!(
            html.contains("No record among the newest 100,000 read"),
            "{html}"
        );
    }

    /// A delegated token's refusal is the person's record, with the agent beside them: the
    /// timeline names the agent, also where it is asked for the agent's records.
    #[tokio::test]
    async fn the_timeline_names_the_agent_a_request_came_through() {
        use crate::audit::{AgentRecord, Entry};
        const VIEWER: &str = "alice@corp.example";
        let world = World::new();
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let time = time::OffsetDateTime::from_unix_timestamp(console.now - 60)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let agent = Some(AgentRecord {
            name: "helper".to_owned(),
            owners: vec![VIEWER.to_owned()],
            on_behalf_of: Some(VIEWER.to_owned()),
        });
        let refusal = Entry::Refusal {
            time: time.clone(),
            user: VIEWER.to_owned(),
            route: "http://app.test".to_owned(),
            rule: None,
            reason: "not in the groups".to_owned(),
            method: "GET".to_owned(),
            path: "/refused".to_owned(),
            client: None,
            agent: agent.clone(),
        };
        let allow = Entry::Allow {
            time,
            user: VIEWER.to_owned(),
            route: "http://app.test".to_owned(),
            method: "GET".to_owned(),
            path: "/allowed".to_owned(),
            client: None,
            agent,
        };
        let log: String = [refusal, allow]
            .iter()
            .map(|entry| serde_json::to_string(entry).unwrap() + "\n")
            .collect();
        std::fs::write(dir.path().join(crate::audit::FILE_NAME), log).unwrap();
        for query in ["", "who=agent%3Ahelper"] {
            let html = text(&console.get("audit", query)).to_owned();
            for path in ["/refused", "/allowed"] {
                let row = html
                    .split("<tr>")
                    .find(|row| row.contains(path))
                    .unwrap_or_else(|| panic!("{query}: no {path} in {html}"));
                assert!(
                    row.contains(&format!(
                        "through the agent helper (owners: {VIEWER}) for {VIEWER}"
                    )),
                    "{query}: {row}"
                );
            }
        }
    }

    #[tokio::test]
    async fn actions_are_confirmed_guarded_and_audited() {
        let world = World::new();
        let bob = world.user("bob@corp.example").await;
        let dir = tempfile::tempdir().unwrap();
        let console = console_of(&world, dir.path());
        let now = crate::clock::now_unix();
        for _ in 0..2 {
            world
                .sessions
                .create(
                    crate::caller::Identity {
                        created: now,
                        ..world.person("bob@corp.example")
                    },
                    None,
                    "portcullis_session",
                    now,
                )
                .await
                .unwrap();
        }
        let live = || world.sessions.find(|_| true).len();
        assert_eq!(live(), 2);

        // The confirmation page carries the form, with the token.
        let page = console.get(&format!("users/{bob}/end_sessions"), "");
        let html = text(&page);
        assert!(html.contains("bob@corp.example has 2 sessions"), "{html}");
        assert!(html.contains("name=\"csrf\" value=\"the-token\""), "{html}");
        assert!(html.contains("method=\"post\""), "{html}");

        // Without the token, or from another origin: refused, nothing done.
        let act = || {
            console
                .action(&format!("users/{bob}/end_sessions"))
                .unwrap()
        };
        let never = || async { panic!("no reload") };
        let refused = console.post(act(), b"csrf=wrong", true, never).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        let refused = console.post(act(), b"csrf=the-token", false, never).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(live(), 2);

        let done = console.post(act(), b"csrf=the-token", true, never).await;
        assert_eq!(done.status, StatusCode::OK);
        assert!(text(&done).contains("ended 2 sessions"), "{}", text(&done));
        assert_eq!(live(), 0);

        // A reload whose file has problems says so.
        let failed = || async { Err(vec!["routes[0].to: missing".to_owned()]) };
        let done = console
            .post(Act::Reload, b"csrf=the-token", true, failed)
            .await;
        assert!(
            text(&done).contains("routes[0].to: missing"),
            "{}",
            text(&done)
        );

        // A reload that installs settings read only at start names them.
        let waiting = || async { Ok(vec!["server.threads", "log"]) };
        let done = console
            .post(Act::Reload, b"csrf=the-token", true, waiting)
            .await;
        assert!(
            text(&done).contains("take effect only after a restart")
                && text(&done).contains("<li><code>server.threads</code></li>"),
            "{}",
            text(&done)
        );

        // Audited: the two refusals and the three actions.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let audit = text(&console.get("audit", "")).to_owned();
            if audit.contains("ended 2 sessions")
                && audit.contains("not reloaded: 1 problem")
                && audit.contains("reloaded; waiting for a restart: server.threads, log")
            {
                assert!(audit.contains("5 records"), "{audit}");
                assert!(
                    audit.contains("not sent from the console itself"),
                    "{audit}"
                );
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{audit}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let only = text(&console.get("audit", "kind=action")).to_owned();
        assert!(only.contains("3 records"), "{only}");
    }

    /// Who can reach each route, as the console works it out, against the gate as `explain`
    /// asks it, for every user, signed in and as a machine, under each way `[identity]` finds
    /// people and service accounts: emails and `externalId`s that several users share, users
    /// without one, deactivated users.
    #[tokio::test]
    async fn who_can_reach_agrees_with_the_gate_under_every_mapping() {
        use crate::explain::{lets_in, Who};
        // (`[identity]`, how people are found, how service accounts are found).
        for (mapping, attribute, machine_attribute) in [
            ("", "userName", "userName"),
            (
                "[identity]\nscim_attribute = \"emails\"",
                "emails",
                "userName",
            ),
            (
                "[identity]\nclaim = \"sub\"\nscim_attribute = \"externalId\"\n\
                 machine_scim_attribute = \"externalId\"",
                "externalId",
                "externalId",
            ),
        ] {
            // And a route for any machine: only service accounts get in.
            let bots = "[[routes]]\nfrom = \"http://bots.test\"\nto = [\"http://127.0.0.1:3\"]\n\
                        accept = [\"bearer\"]\nallow = { machines = true }";
            // And one whose deny rule holds on a public path too.
            let docs = "[[routes]]\nfrom = \"http://docs.test\"\nto = [\"http://127.0.0.1:3\"]\n\
                        accept = [\"session\", \"bearer\"]\n\
                        allow = [{ public = true, paths = [\"/open\"] }, { groups = [\"eng\"] }]\n\
                        deny = { groups = [\"contractors\"] }";
            let world = World::with(crate::testing::config(&format!(
                "{mapping}\n{bots}\n{docs}"
            )));
            let a = world
                .user_with_emails("a@corp.example", "x-1", &[("a@corp.example", true)])
                .await;
            let b = world
                .user_with_emails("b@corp.example", "x-2", &[("shared@corp.example", true)])
                .await;
            let c = world
                .user_with_emails("c@corp.example", "x-2", &[("shared@corp.example", true)])
                .await;
            let d = world.user_with_emails("ΟΔΥΣΣΕΥΣ", "x-3", &[]).await;
            let e = world.user("e@other.example").await;
            world.set_active(&e, false).await;
            // f is in eng only through platform.
            let f = world.user("f@corp.example").await;
            let platform = world.group("platform", &[&f]).await;
            // g's name and h's email the identity headers cannot carry; i is named as agents.
            let g = world
                .user_with_emails("g@corp.example ", "x-4", &[("g@corp.example", true)])
                .await;
            let h = world
                .user_with_emails("h@corp.example", "x-5", &[("h@corp\u{7}.example", true)])
                .await;
            let i = world
                .user_with_emails("agent:i", "x-6", &[("i@corp.example", true)])
                .await;
            world
                .group("eng", &[&a, &b, &d, &platform, &g, &h, &i])
                .await;
            world.group("contractors", &[&c, &g, &i]).await;
            let dir = tempfile::tempdir().unwrap();
            let console = console_of(&world, dir.path());
            let gate = console.gate_for_tests();
            let users = [
                "a@corp.example",
                "b@corp.example",
                "c@corp.example",
                "ΟΔΥΣΣΕΥΣ",
                "e@other.example",
                "f@corp.example",
                "g@corp.example ",
                "h@corp.example",
                "agent:i",
            ];
            let mut admitted = 0;
            for route in &console.runtime.config.routes {
                for (method, path) in [("GET", "/"), ("DELETE", "/admin/x"), ("GET", "/open")] {
                    let reach = console.reach(route, method, path);
                    for user in users {
                        let (row, entry) = world.directory.read(|index| {
                            let row = index.user_by_name(user).unwrap();
                            (row, index.user(row).unwrap().clone())
                        });
                        let presents = |attribute: &str| match attribute {
                            "userName" => Some(entry.user_name.to_string()),
                            "emails" => entry.emails.first().map(|e| e.to_string()),
                            _ => entry.external_id.as_deref().map(str::to_owned),
                        };
                        let (person_presents, machine_presents) =
                            (presents(attribute), presents(machine_attribute));
                        let judged = |who: Option<Who<'_>>| match who {
                            Some(who) => lets_in(&console.runtime, &gate, who, route, method, path),
                            // Nobody presents this: they are anyone.
                            None => {
                                let request = portcullis_policy::Request { method, path };
                                route.policy.evaluate(None, &request).allowed
                            }
                        };
                        let person = judged(person_presents.as_deref().map(Who::Person));
                        let machine = route
                            .accept
                            .contains(&portcullis_config::Credential::Bearer)
                            && judged(machine_presents.as_deref().map(Who::Machine));
                        let via = reach
                            .users
                            .iter()
                            .find(|(r, _)| *r == row)
                            .map(|(_, via)| *via);
                        let expected =
                            (person || machine).then_some(access::Via { person, machine });
                        assert_eq!(
                            via, expected,
                            "{attribute}: {} {method} {path} for {user}",
                            route.name
                        );
                        admitted += usize::from(expected.is_some());
                    }
                }
            }
            assert!(
                admitted > 5,
                "{attribute}: a check needs both answers ({admitted})"
            );
        }
    }
}

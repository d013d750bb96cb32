//! Upstreams see only what was authorized (issue #12), tested the way an attacker with a valid
//! low-privilege session would try it, against an upstream that records the raw bytes of every
//! request line and header it receives:
//!
//! - request targets an upstream framework reads differently from Portcullis are refused, and
//!   the upstream gets exactly the path that was judged, never the client's raw target;
//! - Portcullis' own credentials (its session cookie, a bearer token it verified) and client
//!   headers only a proxy may set (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, `X-Original-URL`,
//!   `X-Rewrite-URL`, method overrides), and every header named with `_` (`SCRIPT_NAME`),
//!   never reach the upstream;
//! - a group name with a comma cannot pose as two groups in the groups header;
//! - an unverified email identifies nobody;
//! - an open websocket ends when its grant does: a token's `exp`, a reload that now denies.

use std::time::Duration;

use serde_json::json;

use portcullis_tests::idp::{jwt_claims, query_param, random_token};

use portcullis_tests::raw_upstream::{RawRequest, RawUpstream};
use portcullis_tests::{
    raw_request, ConfigBuilder, IdpUser, JwtIssuer, Oidc, Portcullis, Route, ScimClient, Upstream,
};

use crate::signin::{
    bare_client, client, idp_setup, Fixture, ALICE, ALICE_PASSWORD, API, API_AUD, CLIENT_ID,
    CLIENT_SECRET, MACHINE_ID, MACHINE_SECRET, SESSION_COOKIE, SHORT_API,
};
use crate::{SCIM_HOST, SCIM_TOKEN};

/// A SCIM token of the hardened configuration that holds spaces and a comma, as a token
/// typed by hand may: Portcullis reads all that follows `Bearer` as its token.
const SPACED_TOKEN: &str = "provisioning token, typed by hand 2026";

/// The `[admin]` token of the hardened configuration.
const ADMIN_TOKEN: &str = "admin-token-of-the-hardened-fixture";

/// Provisioned in `eng`, but the IdP has not verified the email her account has.
const CAROL: &str = "carol@corp.test";
const CAROL_PASSWORD: &str = "carol's password, long enough";
/// In `eng` by her IdP account's `groups` claim; provisioned, but in no group.
const DORA: &str = "dora@corp.test";
const DORA_PASSWORD: &str = "dora's password, long enough";
/// Her IdP subject is her login, as Okta's are, and her SCIM userName too.
const OLGA: &str = "olga@corp.test";
const OLGA_PASSWORD: &str = "olga's password, long enough";
/// Provisioned in `eng` by his work login, which his IdP account has as `preferred_username`;
/// his email there is a personal one.
const QUINN: &str = "quinn@corp.test";
const QUINN_EMAIL: &str = "quinn.personal@mail.test";
const QUINN_PASSWORD: &str = "quinn's password, long enough";
/// In `eng` by his IdP account's `groups` claim; never provisioned.
const ERIK: &str = "erik@partner.test";
const ERIK_PASSWORD: &str = "erik's password, long enough";

/// Portcullis in front of one raw upstream:
/// - `http://app.test`: sessions; group `eng` allowed, `/admin`, `/wiki/Special:Export` and
///   `/@root` denied to everyone in it;
/// - `http://api.test`: bearer tokens of group `eng`;
/// - `http://pass.test`: the same, with `pass_authorization = true`, and `/status` public;
/// - `http://app.test/v1/`: bearer tokens of group `eng` only;
/// - `http://app.test/contractors/`: sessions of group `eng`, with `token_groups`;
/// - `http://bots.test`: bearer tokens of any machine (`machines = true`);
/// - `http://*.pages.test`: public.
///
/// alice, carol and the build-agent machine are in `eng`; dora is provisioned in no group;
/// dora and erik have `eng` in their IdP accounts' `groups` claim.
struct Hardened {
    fx: Fixture,
    raw: RawUpstream,
}

impl Hardened {
    async fn start() -> Hardened {
        let raw = RawUpstream::start().await;
        let app = portcullis_tests::Upstream::start("unused-app").await;
        let api = portcullis_tests::Upstream::start("unused-api").await;
        let cfg = ConfigBuilder::new().http_listener();
        let port = cfg.http_addr().port();
        // carol's IdP account has an email the IdP has not verified.
        let mut carol = IdpUser::new("carol", CAROL, CAROL_PASSWORD);
        carol.email_verified = false;
        let idp = idp_setup(
            &[format!("http://app.test:{port}/.portcullis/callback")],
            &format!("http://127.0.0.1:{port}/.portcullis/backchannel_logout"),
        )
        .user(carol)
        .user(IdpUser::new("dora", DORA, DORA_PASSWORD).groups(&["eng"]))
        .user(IdpUser::new("erik", ERIK, ERIK_PASSWORD).groups(&["eng"]))
        .user(IdpUser::new(OLGA, OLGA, OLGA_PASSWORD))
        .user(IdpUser::new("quinn", QUINN_EMAIL, QUINN_PASSWORD).preferred_username(QUINN))
        .start()
        .await;
        let cfg = cfg
            .route(
                Route::to_urls("http://app.test", vec![raw.url()])
                    .set("allow = { groups = [\"eng\"] }")
                    .set(
                        "deny = { groups = [\"eng\"], paths = [\"/admin\", \"/wiki/Special:Export\", \"/@root\", \"/ops/\", \"/lang/c++/\"] }",
                    ),
            )
            .route(
                Route::to_urls("http://api.test", vec![raw.url()])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            .route(
                Route::to_urls("http://app.test/items/", vec![raw.url()])
                    .set("allow = { groups = [\"eng\"] }")
                    .set(
                        "deny = [{ groups = [\"eng\"], methods = [\"DELETE\"] }, \
                         { groups = [\"eng\"], methods = [\"GET\"], paths = [\"/items/export\"] }]",
                    ),
            )
            .route(
                Route::to_urls("http://app.test/reports/", vec![raw.url()])
                    .set("allow = { groups = [\"eng\"], methods = [\"GET\", \"HEAD\"] }"),
            )
            .route(
                Route::to_urls("http://app.test/v1/", vec![raw.url()])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            .route(
                Route::to_urls("http://app.test/tags/c++/", vec![raw.url()])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            // Nextcloud's DAV clients, routed by their script.
            .route(
                Route::to_urls("http://app.test/remote.php/", vec![raw.url()])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            .route(
                Route::to_urls("http://app.test/contractors/", vec![raw.url()])
                    .set("allow = { groups = [\"eng\"] }")
                    .set("token_groups = true"),
            )
            .route(
                Route::to_urls("http://bots.test", vec![raw.url()])
                    .accept(&["bearer"])
                    .set("allow = { machines = true }"),
            )
            .route(Route::to_urls("http://*.pages.test", vec![raw.url()]).accept(&["public"]))
            .route(
                Route::to_urls("http://sockets.pages.test", vec![raw.url()])
                    .accept(&["public"])
                    .websockets(true),
            )
            .route(
                Route::to_urls("http://pass.test", vec![raw.url()])
                    .accept(&["bearer"])
                    .set("allow = [{ groups = [\"eng\"] }, { public = true, paths = [\"/status\"] }]")
                    .set("pass_authorization = true"),
            )
            .oidc(
                Oidc::new(
                    idp.issuer(),
                    CLIENT_ID,
                    CLIENT_SECRET,
                    &format!("app.test:{port}"),
                )
                // The IdP's groups for the token_groups route: a scope of their own.
                .set("scopes", r#"["openid", "email", "profile", "groups"]"#),
            )
            .jwt_issuer(JwtIssuer::new(idp.issuer(), &[API_AUD]))
            .scim(SCIM_HOST, &[("okta", SCIM_TOKEN), ("spaced", SPACED_TOKEN)])
            .admin_token(ADMIN_TOKEN);
        let px = Portcullis::start(&cfg.toml()).await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let alice = scim.create_user(ALICE).await.id();
        let machine = scim.create_user(MACHINE_ID).await.id();
        let carol = scim.create_user(CAROL).await.id();
        let quinn = scim.create_user(QUINN).await.id();
        scim.create_user(DORA).await;
        scim.create_user(OLGA).await;
        scim.create_group("eng", &[&alice, &machine, &carol, &quinn])
            .await;
        scim.create_group("eng, admins", &[&alice]).await;
        let fx = Fixture {
            cfg,
            idp,
            px,
            app,
            api,
        };
        fx.wait_sign_in_available(std::time::Duration::from_secs(40))
            .await;
        Hardened { fx, raw }
    }

    async fn sign_in(&self) -> String {
        self.fx
            .sign_in(&client(), &self.fx.app_url("/"), ALICE, ALICE_PASSWORD)
            .await
            .cookie
    }

    async fn machine_token(&self) -> String {
        self.fx
            .idp
            .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
            .await
    }

    /// Sends `request_line` and `headers` (each `Name: value`) as raw bytes; returns the status
    /// and what the upstream received for it, if anything.
    async fn send(&self, request_line: &str, headers: &[String]) -> (u16, Option<RawRequest>) {
        let before = self.raw.count();
        let mut bytes = format!("{request_line}\r\n");
        for header in headers {
            bytes.push_str(header);
            bytes.push_str("\r\n");
        }
        bytes.push_str("Connection: close\r\n\r\n");
        let addr = self.fx.cfg.http_addr();
        let response = raw_request(addr, bytes.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{request_line}: {e}"));
        let received = (self.raw.count() > before).then(|| self.raw.last());
        (response.status, received)
    }

    fn host(&self, host: &str) -> String {
        format!("Host: {host}:{}", self.fx.cfg.http_addr().port())
    }

    fn session(&self, cookie: &str) -> String {
        format!("Cookie: {SESSION_COOKIE}={cookie}")
    }
}

/// The access log shows a path's characters that would move or reorder a terminal's text
/// escaped, as it shows a host's: a mark reversing the rest of the line (U+202E) would show its
/// status, route and user in another order.
#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_shows_a_path_s_direction_marks_escaped() {
    let up = Upstream::start("app").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let px = cfg.start().await;
    let addr = cfg.http_addr();
    let request = format!(
        "GET /rtl-\u{202e}txt.exe HTTP/1.1\r\nHost: app.test:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    raw_request(addr, request.as_bytes())
        .await
        .expect("answered");
    let log = px
        .log_until(|log| {
            log.lines()
                .any(|l| l.contains(" access: ") && l.contains("/rtl-"))
        })
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("/rtl-"))
        .unwrap_or_default();
    assert!(!line.contains('\u{202e}'), "{line}");
    assert!(line.contains("/rtl-\\u{202e}txt.exe"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn targets_an_upstream_reads_differently_are_refused_and_judged_paths_go_upstream() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    let port = t.fx.cfg.http_addr().port();
    let (host, session) = (t.host("app.test"), t.session(&cookie));

    // Refused before anything reaches the upstream: Go's net/http serves `foo:/admin` as
    // /admin, and none of these is a path or a URL of a host served here.
    for target in [
        "foo:/admin".to_owned(),
        "*".to_owned(),
        "app.test:443".to_owned(),
        "http://elsewhere.test/admin".to_owned(),
        format!("http://api.test:{port}/admin"),
        // Credentials in a refused target are not recorded (below): pingora refuses userinfo
        // before Portcullis sees it, and the fragment is not part of the path it records.
        format!("http://u:s3cret@app.test:{port}/admin"),
        "/x/..%2fwork#access_token=s3cret".to_owned(),
    ] {
        let (status, received) = t
            .send(
                &format!("GET {target} HTTP/1.1"),
                &[host.clone(), session.clone()],
            )
            .await;
        assert_eq!(status, 400, "GET {target}");
        assert_eq!(received, None, "GET {target} reached the upstream");
    }
    let audited =
        t.fx.px
            .audit_log_until(Duration::from_secs(10), |text| {
                text.contains("/x/..%2fwork")
            })
            .await;
    assert!(!audited.contains("s3cret"), "{audited}");
    assert!(audited.contains(r#""path":"/x/..%2fwork""#), "{audited}");

    // What is let in reaches the upstream as the path that was judged, with the query as sent.
    for (target, upstream) in [
        ("/work?q=1", "/work?q=1".to_owned()),
        ("/x/../work/./a?q=%2F", "/work/a?q=%2F".to_owned()),
        ("/%77ork//b", "/work/b".to_owned()),
        // A fragment is the client's alone.
        ("/work#/../admin", "/work".to_owned()),
        (
            &*format!("http://app.test:{port}/w%6Frk?abs=1"),
            "/work?abs=1".to_owned(),
        ),
    ] {
        let (status, received) = t
            .send(
                &format!("GET {target} HTTP/1.1"),
                &[host.clone(), session.clone()],
            )
            .await;
        assert_eq!(status, 200, "GET {target}");
        let received =
            received.unwrap_or_else(|| panic!("GET {target} did not reach the upstream"));
        assert_eq!(
            received.line,
            format!("GET {upstream} HTTP/1.1"),
            "GET {target}"
        );
    }

    // The deny rule holds however the path is spelled in the target.
    for target in [
        "/admin",
        "/x/../admin",
        &*format!("http://app.test:{port}/%61dmin"),
    ] {
        let (status, received) = t
            .send(
                &format!("GET {target} HTTP/1.1"),
                &[host.clone(), session.clone()],
            )
            .await;
        assert_eq!(status, 403, "GET {target}");
        assert_eq!(received, None, "GET {target} reached the upstream");
    }
}

/// A body coded before its chunks (`gzip, chunked`) is refused, 501 (RFC 9112 §6.1): the
/// upstream would have been sent its coded bytes as the body, labelled plain `chunked`.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_with_a_transfer_coding_besides_its_chunks_is_refused() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    for (coding, status) in [
        ("gzip, chunked", 501),
        ("chunked, chunked", 501),
        ("Chunked", 200),
    ] {
        let before = t.raw.count();
        let bytes = format!(
            "POST /work HTTP/1.1\r\n{}\r\n{}\r\nTransfer-Encoding: {coding}\r\n\
             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            t.host("app.test"),
            t.session(&cookie)
        );
        let response = raw_request(t.fx.cfg.http_addr(), bytes.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{coding}: {e}"));
        assert_eq!(response.status, status, "{coding}");
        assert_eq!(t.raw.count() > before, status == 200, "{coding}");
    }
}

/// A method rule holds however a framework could read the method: HEAD runs the GET handler
/// (Express, Flask, Spring, Go), and Laravel and Symfony take a POST's `_method` parameter
/// (ASP.NET MVC its `X-HTTP-Method-Override`). A method is case-sensitive: Go and PHP keep
/// `get` as sent, which is not GET (a handler's `if r.Method == "GET" { show } else { act }`
/// acts), so one with lower case is refused. TRACE is refused everywhere: it would echo what
/// the upstream is told.
#[tokio::test(flavor = "multi_thread")]
async fn method_rules_hold_for_head_and_for_a_method_override_in_the_query() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    let (host, session) = (t.host("app.test"), t.session(&cookie));
    let json = "Accept: application/json".to_owned();
    let table: &[(&str, u16)] = &[
        ("GET /items/export HTTP/1.1", 403),
        ("HEAD /items/export HTTP/1.1", 403),
        ("HEAD /items/Export;x HTTP/1.1", 403),
        // Its route's prefix spelled otherwise, with a wider route beside it: refused.
        ("HEAD /Items/Export;x HTTP/1.1", 400),
        ("HEAD /items/1 HTTP/1.1", 200),
        ("DELETE /items/1 HTTP/1.1", 403),
        ("POST /items/1?_method=DELETE HTTP/1.1", 400),
        ("POST /items/1?a=1&%5Fmethod=delete HTTP/1.1", 400),
        ("POST /items/1?.method=DELETE HTTP/1.1", 400),
        ("POST /items/1?+_method=DELETE HTTP/1.1", 400),
        ("POST /items/1?method=DELETE HTTP/1.1", 200),
        // ASP.NET MVC reads its override from the query too.
        ("POST /items/1?X-HTTP-Method-Override=DELETE HTTP/1.1", 400),
        (
            "POST /items/1?x%u002Dhttp-method-override=delete HTTP/1.1",
            400,
        ),
        // A route whose rules name no method: an override changes no decision there.
        ("POST /work?_method=DELETE HTTP/1.1", 200),
        // Allowed for GET and HEAD only.
        ("GET /reports/q3 HTTP/1.1", 200),
        ("POST /reports/q3 HTTP/1.1", 403),
        ("get /reports/q3 HTTP/1.1", 400),
        ("Get /reports/q3 HTTP/1.1", 400),
        ("delete /items/1 HTTP/1.1", 400),
        // An upstream that echoes a TRACE would hand back the signed assertion.
        ("TRACE /work HTTP/1.1", 405),
        ("TRACK /work HTTP/1.1", 405),
    ];
    for &(line, status) in table {
        let (got, received) = t
            .send(
                line,
                &[
                    host.clone(),
                    session.clone(),
                    json.clone(),
                    "Content-Length: 0".to_owned(),
                ],
            )
            .await;
        assert_eq!(got, status, "{line}");
        assert_eq!(
            received.is_some(),
            status == 200,
            "{line}: reached the upstream?"
        );
    }
    // An override is an attempt on the rules: recorded, as a request that names nobody.
    audited(
        &t.fx.px,
        &[
            "method override (_method, X-HTTP-Method-Override)",
            "/items/1",
            "\"anonymous\"",
        ],
    )
    .await;
    audited(&t.fx.px, &["a method in lower case", "/reports/q3"]).await;
    audited(&t.fx.px, &["TRACE echoes", "/work"]).await;
    // A 405 says which methods are taken (RFC 9110 §15.5.6).
    let trace = format!("TRACE /work HTTP/1.1\r\n{host}\r\nConnection: close\r\n\r\n");
    let answer = raw_request(t.fx.cfg.http_addr(), trace.as_bytes())
        .await
        .unwrap();
    assert_eq!(answer.status, 405);
    let allowed = answer.header("allow").unwrap_or_default();
    assert!(
        allowed.contains("GET") && !allowed.contains("TRACE"),
        "{allowed}"
    );
}

/// Another app's cookie that is not ASCII (`lang=français`, set by an upstream on this host or
/// by a sibling host) hid the session beside it, a sign-in loop, and went upstream with none of
/// the other cookies. Cookies sent as several headers (HTTP/2's crumbs, one cookie a header)
/// reach the upstream as one.
#[tokio::test(flavor = "multi_thread")]
async fn a_cookie_that_is_not_ascii_hides_no_session_and_loses_no_cookie() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    let host = t.host("app.test");
    let json = "Accept: application/json".to_owned();
    let (status, received) = t
        .send(
            "GET /work HTTP/1.1",
            &[
                host.clone(),
                format!("Cookie: lang=français; {SESSION_COOKIE}={cookie}; theme=dark"),
                json.clone(),
            ],
        )
        .await;
    assert_eq!(status, 200);
    let received = received.expect("the upstream saw the request");
    assert_eq!(received.header_all("cookie"), ["lang=français; theme=dark"]);

    let (status, received) = t
        .send(
            "GET /work HTTP/1.1",
            &[
                host,
                "Cookie: a=1".to_owned(),
                t.session(&cookie),
                "Cookie: csrftoken=x".to_owned(),
                json,
            ],
        )
        .await;
    assert_eq!(status, 200);
    let received = received.expect("the upstream saw the request");
    assert_eq!(received.header_all("cookie"), ["a=1; csrftoken=x"]);
}

/// A `Host` that is not a host name or address is refused: `evil.test/x.pages.test` ends in
/// a wildcard route's suffix, and an application that builds links from `X-Forwarded-Host`
/// would send its users to `evil.test`.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_header_that_is_not_a_host_never_reaches_the_upstream() {
    let t = Hardened::start().await;
    let port = t.fx.cfg.http_addr().port();
    for host in [
        format!("evil.test/x.pages.test:{port}"),
        format!("evil.test?.pages.test:{port}"),
        format!("evil.test#.pages.test:{port}"),
        format!("evil.test\\.pages.test:{port}"),
        format!("a.pages.test:{port}x"),
    ] {
        let (status, received) = t
            .send("GET /page HTTP/1.1", &[format!("Host: {host}")])
            .await;
        assert_eq!(status, 400, "Host: {host}");
        assert_eq!(received, None, "Host: {host} reached the upstream");
    }

    let host = format!("A.Pages.test:{port}");
    let (status, received) = t
        .send("GET /page HTTP/1.1", &[format!("Host: {host}")])
        .await;
    assert_eq!(status, 200, "Host: {host}");
    let received = received.expect("the page reached the upstream");
    assert_eq!(received.header_all("x-forwarded-host"), [host.as_str()]);
}

/// Windows authentication logs in the connection it comes on, not the request: IIS serves
/// what else comes on that connection as whoever logged in. So a connection that carried a
/// `Negotiate` or `NTLM` login is never handed to another caller's request; one that carried
/// a login of a scheme that holds for its request alone (`Basic`) is pooled as any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_an_upstream_logged_in_carries_no_other_callers_request() {
    let t = Hardened::start().await;
    let port = t.fx.cfg.http_addr().port();
    let url = |path: &str| format!("http://intranet.pages.test:{port}{path}");
    // The connection a login came on, and those the requests after it came on: the login's
    // caller's next one (on the same connection to Portcullis, so read once the login's
    // upstream connection is back in the pool, if it goes back), then another caller's.
    let after = |login: &'static str| {
        let (t, url) = (&t, &url);
        async move {
            let first = t.raw.count();
            let (caller, other) = (bare_client(), bare_client());
            let resp = caller
                .get(url("/login"))
                .header(reqwest::header::AUTHORIZATION, login)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{login}");
            assert_eq!(caller.get(url("/page")).send().await.unwrap().status(), 200);
            for _ in 0..4 {
                assert_eq!(other.get(url("/page")).send().await.unwrap().status(), 200);
            }
            let requests = t.raw.requests().split_off(first);
            let (login, others) = requests
                .split_first()
                .expect("the login reached the upstream");
            assert_eq!(login.target(), "/login");
            (
                login.connection,
                others.iter().map(|r| r.connection).collect::<Vec<_>>(),
            )
        }
    };
    // Connections are pooled here: the requests after a `Basic` login share connections (its
    // own, unless the next request came before it was back in the pool): fewer than one each.
    let (basic, others) = after("Basic YWxpY2U6cGFzc3dvcmQ=").await;
    let mut used = others.clone();
    used.push(basic);
    used.sort_unstable();
    used.dedup();
    assert!(
        used.len() <= others.len(),
        "pooled: {basic} then {others:?}"
    );
    for login in [
        "Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnag",
        "NTLM TlRMTVNTUAADAAAAGAAYAEAAAAA=",
    ] {
        let (logged_in, others) = after(login).await;
        assert!(
            !others.contains(&logged_in),
            "{login}: {logged_in} then {others:?}"
        );
    }
    // Nor one a websocket handshake logged in, which the upstream refused (200): it kept its
    // connection open for the upgrade.
    let first = t.raw.count();
    let handshake = format!(
        "GET /socket HTTP/1.1\r\nHost: sockets.pages.test:{port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnag\r\n\r\n"
    );
    let refused = raw_request(t.fx.cfg.http_addr(), handshake.as_bytes())
        .await
        .unwrap();
    assert_eq!(refused.status, 200, "{}", refused.body_text());
    let other = bare_client();
    for _ in 0..4 {
        assert_eq!(other.get(url("/page")).send().await.unwrap().status(), 200);
    }
    let requests = t.raw.requests().split_off(first);
    let (login, others) = requests.split_first().expect("the handshake reached it");
    assert_eq!(login.target(), "/socket");
    assert!(
        others.iter().all(|r| r.connection != login.connection),
        "{} then {:?}",
        login.connection,
        others.iter().map(|r| r.connection).collect::<Vec<_>>()
    );
}

/// WebDAV's COPY and MOVE write where their `Destination` says (nginx's DAV module takes
/// `/admin/page` there as it stands): it is judged as the path is, for the same caller on the
/// same route, and goes upstream as judged.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_or_move_destination_is_judged_as_the_path_is() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    let port = t.fx.cfg.http_addr().port();
    let app = format!("http://app.test:{port}");
    let cases = [
        ("COPY", "/admin/page".to_owned(), 403, None),
        ("MOVE", "/ADMIN;x/page".to_owned(), 403, None),
        ("MOVE", format!("{app}/x/../admin/page"), 403, None),
        ("COPY", "/v1/builds".to_owned(), 400, None),
        ("COPY", "http://other.test/page".to_owned(), 400, None),
        ("COPY", "/a%0A".to_owned(), 400, None),
        (
            "COPY",
            "/x/../page2".to_owned(),
            200,
            Some("/page2".to_owned()),
        ),
        (
            "MOVE",
            format!("{app}/./page2"),
            200,
            Some(format!("{app}/page2")),
        ),
    ];
    for (method, destination, want, sent) in cases {
        let headers = [
            t.host("app.test"),
            t.session(&cookie),
            format!("Destination: {destination}"),
        ];
        let (status, received) = t.send(&format!("{method} /page HTTP/1.1"), &headers).await;
        assert_eq!(status, want, "{method} to {destination}");
        match sent {
            Some(sent) => {
                let received = received.expect("the request reached the upstream");
                assert_eq!(received.header("destination"), Some(sent.as_str()));
            }
            None => assert!(received.is_none(), "{method} to {destination} reached it"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn portcullis_credentials_and_proxy_headers_never_reach_the_upstream() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    let host = t.host("app.test");
    let spoofed = [
        "Forwarded: for=10.9.9.9;host=admin.internal;proto=https",
        "X-Forwarded-For: 10.9.9.9",
        "X-Forwarded-Host: admin.internal",
        "X-Forwarded-Prefix: /admin",
        "X-Forwarded: for=10.9.9.9",
        "Forwarded-For: 10.9.9.9",
        "Via: 1.1 10.9.9.9",
        "X-Real-IP: 10.9.9.9",
        "Client-IP: 10.9.9.9",
        "X-Client-IP: 10.9.9.9",
        "True-Client-IP: 10.9.9.9",
        "X-Cluster-Client-IP: 10.9.9.9",
        "CF-Connecting-IP: 10.9.9.9",
        "Fastly-Client-IP: 10.9.9.9",
        "X-Original-URL: /admin",
        "X-Rewrite-URL: /admin",
        "X-HTTP-Method-Override: DELETE",
        "X-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Script-Name: /admin",
        // Tornado (`xheaders=True`) reads it before X-Forwarded-Proto.
        "X-Scheme: https",
        // gunicorn before 22 strips SCRIPT_NAME from the path the application routes.
        "SCRIPT_NAME: /page",
        "script_name: /page",
        "Legacy_Api_Key: 10.9.9.9",
        // PHP reads `.` in a name as `_` too ($_SERVER['HTTP_X_PORTCULLIS_USER']), and a
        // front end such as Caddy's php_fastcgi passes such names on.
        "X.Portcullis.User: mallory@corp.test",
        "X-Portcullis.Agent: deploy-bot",
        "X.HTTP.Method.Override: DELETE",
        "X.Real.IP: 10.9.9.9",
        // lighttpd's CGI and FastCGI read every character but letters and digits as `_`.
        "X~Portcullis~Email: mallory@corp.test",
        "X!Real!IP: 10.9.9.9",
        // httpoxy: CGI stacks make it HTTP_PROXY, which HTTP clients take as their proxy.
        "Proxy: http://10.9.9.9:3128",
    ];
    let mut headers = vec![
        host.clone(),
        format!("Cookie: theme=dark; {SESSION_COOKIE}={cookie}; lang=en"),
        "Cookie: portcullis_signin_0123456789abcdef=pending; other=1".to_owned(),
    ];
    headers.extend(spoofed.iter().map(|h| (*h).to_owned()));
    let (status, received) = t.send("GET /page HTTP/1.1", &headers).await;
    assert_eq!(status, 200);
    let received = received.expect("the request reached the upstream");

    let everything = received.headers.join("\n");
    assert!(
        !everything.contains(&cookie),
        "the session id reached the upstream:\n{everything}"
    );
    assert_eq!(
        received.header_all("cookie"),
        ["theme=dark; lang=en; other=1"]
    );
    for name in [
        "x-forwarded-prefix",
        "x-real-ip",
        "client-ip",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
        "x-http-method",
        "x-script-name",
        "x-scheme",
    ] {
        assert_eq!(
            received.header(name),
            None,
            "{name} reached the upstream:\n{everything}"
        );
    }
    assert!(
        !everything.contains("10.9.9.9"),
        "a spoofed address:\n{everything}"
    );
    assert!(
        received.headers.iter().all(|h| h
            .split(':')
            .next()
            .unwrap_or("")
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')),
        "a header named with another character than letters, digits and `-`:\n{everything}"
    );
    assert_eq!(received.header("proxy"), None, "{everything}");
    assert!(
        !everything.contains("mallory"),
        "a spoofed user:\n{everything}"
    );
    assert!(
        !everything.contains("admin.internal"),
        "a spoofed host:\n{everything}"
    );
    // Portcullis' own forwarding headers, one of each.
    let port = t.fx.cfg.http_addr().port();
    assert_eq!(
        received.header_all("forwarded"),
        [format!("for=127.0.0.1;host=\"app.test:{port}\";proto=http")]
    );
    assert_eq!(received.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(
        received.header_all("x-forwarded-host"),
        [format!("app.test:{port}")]
    );

    // A bearer token Portcullis verified is its credential: not passed on, unless the route
    // says so.
    let token = t.machine_token().await;
    let authorization = format!("Authorization: Bearer {token}");
    let (status, received) = t
        .send(
            "GET /v1/builds HTTP/1.1",
            &[t.host("api.test"), authorization.clone()],
        )
        .await;
    assert_eq!(status, 200);
    let received = received.expect("the machine's request reached the upstream");
    assert_eq!(received.header("authorization"), None);
    assert!(!received.headers.join("\n").contains(&token));
    let (status, received) = t
        .send(
            "GET /v1/builds HTTP/1.1",
            &[t.host("pass.test"), authorization],
        )
        .await;
    assert_eq!(status, 200);
    let received = received.expect("the machine's request reached the upstream");
    assert_eq!(
        received.header("authorization"),
        Some(format!("Bearer {token}").as_str()),
        "pass_authorization = true passes the verified token on"
    );
    // A token that does not verify is never passed on, even where the path lets anyone in: it
    // may be a good token Portcullis could not check just then (its key not fetched yet).
    let signature = token.rfind('.').expect("a JWT") + 10;
    let flipped = if &token[signature..=signature] == "A" {
        "B"
    } else {
        "A"
    };
    let forged = format!(
        "{}{flipped}{}",
        &token[..signature],
        &token[signature + 1..]
    );
    for host in ["pass.test", "api.test"] {
        let (status, received) = t
            .send(
                "GET /status HTTP/1.1",
                &[t.host(host), format!("Authorization: Bearer {forged}")],
            )
            .await;
        if host == "pass.test" {
            assert_eq!(status, 200, "a public path");
            let received = received.expect("the request reached the upstream");
            assert_eq!(received.header("authorization"), None, "{host}");
            assert!(!received.headers.join("\n").contains(&forged[..40]));
            // Nor in a list, which Portcullis does not read as a token and an upstream that
            // splits at commas (Flask-JWT-Extended) does.
            let (status, received) = t
                .send(
                    "GET /status HTTP/1.1",
                    &[t.host(host), format!("Authorization: x, Bearer {forged}")],
                )
                .await;
            assert_eq!(status, 200, "a public path");
            let received = received.expect("the request reached the upstream");
            assert_eq!(received.header("authorization"), None, "{host}: in a list");
        } else {
            assert_eq!(status, 401, "{host}: refused, not passed");
            assert!(received.is_none());
        }
    }
    // A route that takes sessions only does not read bearer tokens, but one for Portcullis
    // (its issuer's, for its audience) is still not handed to that upstream, which could replay
    // it at api.test; the upstream's own tokens and other schemes pass.
    let cookie = t.sign_in().await;
    for (authorization, passed) in [
        (format!("Bearer {token}"), false),
        (format!("bearer  {token}"), false),
        (format!("Basic dXNlcjpwYXNz, Bearer {token}"), false),
        // A SCIM token sent to a mistyped base URL is Portcullis' too, and so is the admin's.
        (format!("Bearer {SCIM_TOKEN}"), false),
        (format!("Bearer {ADMIN_TOKEN}"), false),
        (format!("Bearer {SPACED_TOKEN}"), false),
        ("Bearer the-upstream-s-own-token".to_owned(), true),
        ("Basic dXNlcjpwYXNz".to_owned(), true),
    ] {
        let (status, received) = t
            .send(
                "GET /work HTTP/1.1",
                &[
                    t.host("app.test"),
                    t.session(&cookie),
                    format!("Authorization: {authorization}"),
                ],
            )
            .await;
        assert_eq!(status, 200, "{authorization}");
        let received = received.expect("the request reached the upstream");
        let expected = passed.then_some(authorization.as_str());
        assert_eq!(received.header("authorization"), expected);
    }
}

/// A SCIM or admin token a reload takes out is still Portcullis' own, never an upstream's: an
/// IdP goes on sending a SCIM token taken out (to a route on its host once `[scim]` is gone),
/// and the same token may be put back, to write the directory again.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_a_reload_takes_out_is_still_kept_from_upstreams() {
    const NEW_SCIM_TOKEN: &str = "the-scim-token-that-replaced-the-first-one";
    const NEW_ADMIN_TOKEN: &str = "the-admin-token-that-replaced-the-first";
    let hardened = Hardened::start().await;
    let t = &hardened;
    let cookie = &t.sign_in().await;
    let passed = |authorization: String| {
        let headers = [
            t.host("app.test"),
            t.session(cookie),
            format!("Authorization: {authorization}"),
        ];
        async move {
            let (status, received) = t.send("GET /work HTTP/1.1", &headers).await;
            assert_eq!(status, 200, "{authorization}");
            let received = received.expect("the request reached the upstream");
            received.header("authorization").map(str::to_owned)
        }
    };
    let px = &t.fx.px;
    let replaced = px
        .config_with("[[scim.tokens]]", SCIM_TOKEN, NEW_SCIM_TOKEN)
        .replacen(ADMIN_TOKEN, NEW_ADMIN_TOKEN, 1);
    px.rewrite_config(&replaced);
    px.reload_and_wait().await;
    let scim = ScimClient::new(&t.fx.cfg.scim_base_url(), SCIM_TOKEN);
    scim.get("/Users").await.expect(401);
    for token in [SCIM_TOKEN, ADMIN_TOKEN, NEW_SCIM_TOKEN, NEW_ADMIN_TOKEN] {
        assert_eq!(passed(format!("Bearer {token}")).await, None, "{token}");
    }
    // `[scim]` taken out: its tokens, held a moment ago, are kept from upstreams too.
    let (kept, _scim) = replaced.split_once("\n[scim]\n").expect("a [scim] table");
    px.rewrite_config(kept);
    px.reload_and_wait().await;
    for token in [SCIM_TOKEN, NEW_SCIM_TOKEN, SPACED_TOKEN] {
        assert_eq!(passed(format!("Bearer {token}")).await, None, "{token}");
    }
    let own = "Bearer the-upstream-s-own-token".to_owned();
    assert_eq!(passed(own.clone()).await, Some(own), "the upstream's own");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deactivated_machine_on_a_public_path_is_anyone_and_its_token_stays_here() {
    let t = Hardened::start().await;
    let token = t.machine_token().await;
    let authorization = format!("Authorization: Bearer {token}");
    let (code, received) = t
        .send(
            "GET /status HTTP/1.1",
            &[t.host("pass.test"), authorization.clone()],
        )
        .await;
    assert_eq!(code, 200);
    let received = received.expect("the request reached the upstream");
    assert_eq!(received.header("x-portcullis-user"), Some(MACHINE_ID));
    assert!(received.header("authorization").is_some(), "passed on");

    // The IdP deactivates it; its token is still valid at the IdP.
    let scim = ScimClient::new(&t.fx.cfg.scim_base_url(), SCIM_TOKEN);
    let found = scim
        .filter("/Users", &format!("userName eq \"{MACHINE_ID}\""))
        .await
        .resources();
    let id = found[0]["id"].as_str().expect("the machine's id");
    scim.patch(
        &format!("/Users/{id}"),
        &portcullis_tests::scim::patch_ops(json!([{"op": "replace", "value": {"active": false}}])),
    )
    .await
    .expect_success();
    let (code, received) = t
        .send(
            "GET /v1/builds HTTP/1.1",
            &[t.host("pass.test"), authorization.clone()],
        )
        .await;
    assert_eq!(code, 403, "refused where a group is needed");
    assert!(received.is_none());
    // The public path lets it in as it lets anyone in: the upstream is told of no caller, and
    // the token, which it could replay while it lasts, is not handed over.
    let (code, received) = t
        .send(
            "GET /status HTTP/1.1",
            &[t.host("pass.test"), authorization.clone()],
        )
        .await;
    assert_eq!(code, 200);
    let received = received.expect("the request reached the upstream");
    let everything = received.headers.join("\n");
    for name in [
        "x-portcullis-user",
        "x-portcullis-groups",
        "x-portcullis-assertion",
        "authorization",
    ] {
        assert_eq!(received.header(name), None, "{name}:\n{everything}");
    }
    assert!(!everything.contains(&token[..40]), "{everything}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_name_with_a_comma_is_one_group_in_the_header() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    let (status, received) = t
        .send(
            "GET /page HTTP/1.1",
            &[t.host("app.test"), t.session(&cookie)],
        )
        .await;
    assert_eq!(status, 200);
    let received = received.expect("the request reached the upstream");
    let groups = received.header("x-portcullis-groups").unwrap_or_default();
    let mut names: Vec<&str> = groups.split(", ").collect();
    names.sort_unstable();
    assert_eq!(names, ["eng", "eng%2C%20admins"], "{groups}");
    // The assertion carries the names as they are.
    let assertion = received
        .header("x-portcullis-assertion")
        .unwrap_or_default();
    let claims = portcullis_tests::idp::jwt_claims(assertion);
    let mut claimed: Vec<String> = serde_json::from_value(claims["groups"].clone()).unwrap();
    claimed.sort_unstable();
    assert_eq!(claimed, ["eng", "eng, admins"], "{}", json!(claims));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_email_the_idp_has_not_verified_identifies_nobody() {
    let t = Hardened::start().await;
    // carol signs in: the IdP vouches for her account, not for the email it carries.
    let carol =
        t.fx.sign_in(&client(), &t.fx.app_url("/"), CAROL, CAROL_PASSWORD)
            .await
            .cookie;
    let (status, received) = t
        .send(
            "GET /page HTTP/1.1",
            &[
                t.host("app.test"),
                t.session(&carol),
                "Accept: application/json".to_owned(),
            ],
        )
        .await;
    assert_eq!(status, 403, "an unverified email found a directory user");
    assert_eq!(received, None);
    // Nor does it name her in the audit log: her sign-in and her refusal are recorded under
    // her IdP subject, never under the address anyone could have typed into a profile (the
    // console and `portcullis audit --user` would show them as that person's).
    let audited =
        t.fx.px
            .audit_log_until(Duration::from_secs(10), |text| {
                text.contains(r#""event":"refusal""#) && text.contains(r#""what":"sign_in""#)
            })
            .await;
    assert!(
        !audited.contains(&format!(r#""user":"{CAROL}""#)),
        "records name carol by her unverified email:\n{audited}"
    );
    for event in [r#""event":"refusal""#, r#""what":"sign_in""#] {
        assert!(
            audited
                .lines()
                .any(|line| line.contains(event) && line.contains(r#""user":"carol""#)),
            "no {event} record names carol by her subject:\n{audited}"
        );
    }
    // Nor does Portcullis' own page say she is signed in as it.
    let me = t.fx.app_url("/.portcullis/me");
    for accept in ["application/json", "text/html"] {
        let resp = crate::signin::get_with_session(&me, &carol, accept).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(!text.contains(CAROL), "{accept}: {text}");
        assert!(text.contains("carol"), "{accept}: {text}");
    }
    // alice's verified email finds her.
    let alice = t.sign_in().await;
    let (status, _) = t
        .send(
            "GET /page HTTP/1.1",
            &[t.host("app.test"), t.session(&alice)],
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_groups_never_admit_someone_the_directory_deleted() {
    async fn get(t: &Hardened, cookie: &str) -> (u16, Option<RawRequest>) {
        let headers = [
            t.host("app.test"),
            t.session(cookie),
            "Accept: application/json".to_owned(),
        ];
        t.send("GET /contractors/plan HTTP/1.1", &headers).await
    }
    let mut t = Hardened::start().await;
    let page = t.fx.app_url("/contractors/");
    let dora =
        t.fx.sign_in(&client(), &page, DORA, DORA_PASSWORD)
            .await
            .cookie;
    let erik =
        t.fx.sign_in(&client(), &page, ERIK, ERIK_PASSWORD)
            .await
            .cookie;
    // The directory knows dora, in no group: her token's groups do not count.
    assert_eq!(get(&t, &dora).await.0, 403);
    // erik is a stranger to the directory: judged on his token's groups.
    let (status, received) = get(&t, &erik).await;
    assert_eq!(status, 200);
    assert!(received.is_some());

    let scim = ScimClient::new(&t.fx.cfg.scim_base_url(), SCIM_TOKEN);
    let found = scim
        .get(&format!("/Users?filter=userName%20eq%20%22{DORA}%22"))
        .await;
    let id = found.body["Resources"][0]["id"]
        .as_str()
        .expect("dora's id")
        .to_owned();
    // The IdP renames dora; her session still names her by her former login. The directory
    // knew her by it: her token's groups do not count.
    let rename = portcullis_tests::scim::patch_ops(
        json!([{"op": "replace", "path": "userName", "value": "dora.renamed@corp.test"}]),
    );
    scim.patch(&format!("/Users/{id}"), &rename)
        .await
        .expect_success();
    let (status, received) = get(&t, &dora).await;
    assert_eq!(status, 403, "a renamed user got in on her token's groups");
    assert_eq!(received, None);

    // The IdP deletes dora. The directory remembers whom it removed: her token's groups still
    // do not count, after a restart too.
    assert_eq!(scim.delete(&format!("/Users/{id}")).await.status, 204);
    let (status, received) = get(&t, &dora).await;
    assert_eq!(status, 403, "a deleted user got in on her token's groups");
    assert_eq!(received, None);
    t.fx.px.kill_hard();
    t.fx.px.restart().await;
    assert_eq!(get(&t, &dora).await.0, 403, "after a restart");
    assert_eq!(get(&t, &erik).await.0, 200, "after a restart");
}

/// `[identity] claim` may be any string claim. Looked up by email, quinn (whose IdP email is a
/// personal one) is nobody, and the refusal says which claim and value were looked up against
/// which SCIM attribute; with `claim = "preferred_username"` (served at UserInfo only, as the
/// provider ships) he is the provisioned `quinn@corp.test`.
#[tokio::test(flavor = "multi_thread")]
async fn any_string_claim_finds_a_person_and_a_miss_says_which_value_was_looked_up() {
    let t = Hardened::start().await;
    let page = t.fx.app_url("/page");
    let quinn =
        t.fx.sign_in(&client(), &page, QUINN_EMAIL, QUINN_PASSWORD)
            .await
            .cookie;
    let resp = crate::signin::get_with_session(&page, &quinn, "text/html").await;
    assert_eq!(resp.status(), 403);
    let body = resp.text().await.unwrap_or_default();
    assert!(
        body.contains("its email claim, &quot;quinn.personal@mail.test&quot;, was looked up as the SCIM userName"),
        "{body}"
    );

    let by_login = format!(
        "{}\n[identity]\nclaim = \"preferred_username\"\n",
        t.fx.cfg.toml()
    );
    t.fx.px.rewrite_config(&by_login);
    t.fx.px.reload_and_wait().await;
    let quinn =
        t.fx.sign_in(&client(), &page, QUINN_EMAIL, QUINN_PASSWORD)
            .await
            .cookie;
    let headers = [t.host("app.test"), t.session(&quinn)];
    let (status, received) = t.send("GET /page HTTP/1.1", &headers).await;
    assert_eq!(status, 200);
    let received = received.expect("reached the upstream");
    assert_eq!(received.header_all("x-portcullis-user"), [QUINN]);
}

/// A person's access token (the code flow, for the API as a resource) is not a machine's,
/// although the machine mapping (`sub` → `userName`) would find her: `machines = true` does
/// not name it. The machine's client-credentials token passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_person_s_access_token_never_passes_a_machine_only_rule() {
    let t = Hardened::start().await;
    let idp = &t.fx.idp;
    let redirect_uri = t.fx.app_url("/.portcullis/callback");
    let pkce = portcullis_tests::idp::Pkce::new();
    let (state, nonce) = (random_token(16), random_token(16));
    let authorize = idp.authorization_url(
        CLIENT_ID,
        &redirect_uri,
        "openid api:read",
        &state,
        &nonce,
        &pkce,
    ) + &format!("&resource={}", urlencoding(API));
    let back = idp.sign_in_http(&authorize, OLGA, OLGA_PASSWORD).await;
    let code = query_param(&back, "code").expect("a code");
    let tokens = idp
        .token_request(
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("grant_type", "authorization_code".to_owned()),
                ("code", code),
                ("redirect_uri", redirect_uri.clone()),
                ("code_verifier", pkce.verifier.clone()),
                ("resource", API.to_owned()),
            ],
        )
        .await;
    let hers = tokens["access_token"].as_str().expect("an access token");
    let claims = jwt_claims(hers);
    assert_eq!(claims["sub"], OLGA, "{claims}");
    assert_eq!(claims["client_id"], CLIENT_ID, "{claims}");

    let bearer = |token: &str| format!("Authorization: Bearer {token}");
    let (status, received) = t
        .send("GET /deploy HTTP/1.1", &[t.host("bots.test"), bearer(hers)])
        .await;
    assert_eq!(status, 403, "a person's token passed `machines = true`");
    assert_eq!(received, None);
    let machine = t.machine_token().await;
    let (status, _) = t
        .send(
            "GET /deploy HTTP/1.1",
            &[t.host("bots.test"), bearer(&machine)],
        )
        .await;
    assert_eq!(status, 200, "the machine's own token");
}

/// `value` percent-encoded for a query.
fn urlencoding(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

// ----- open connections end when their grant ends (item 8) ----------------------------------

/// Portcullis with websockets on a session route (`app.test`, group `eng`) and a bearer route
/// (`api.test`, group `eng`, the IdP's tokens with no leeway), in front of echo upstreams.
struct Streaming {
    fx: Fixture,
    /// The configuration with `deny` added to the app route, for a reload.
    denying: String,
    /// The configuration with a route of its own for app.test's `/ws`, for `sre` only.
    narrowed: String,
    /// The configuration with the app route taking bearer tokens only.
    bearer_only: String,
}

impl Streaming {
    /// Alice's idle websocket on app.test's `/ws` is closed by a reload to `config` (nothing
    /// said on it, nothing changed in the directory), and the closing audited with `reasons`.
    async fn reload_closes_alice_s_websocket(&self, config: &str, reasons: &[&str]) {
        let cookie = self
            .fx
            .sign_in(&client(), &self.fx.app_url("/"), ALICE, ALICE_PASSWORD)
            .await
            .cookie;
        let mut idle = self
            .websocket(
                "app.test",
                "/ws",
                ("cookie", format!("{SESSION_COOKIE}={cookie}")),
            )
            .await;
        self.fx.px.rewrite_config(config);
        self.fx.px.reload();
        let closed =
            portcullis_tests::client::closed_within(&mut idle, std::time::Duration::from_secs(15))
                .await;
        assert!(closed, "the websocket stayed open after the reload");
        let mut audited = vec!["open connection closed", ALICE];
        audited.extend_from_slice(reasons);
        self.audited(&audited).await;
    }

    async fn start() -> Streaming {
        let app = portcullis_tests::Upstream::start("app").await;
        let api = portcullis_tests::Upstream::start("api").await;
        // A drain that outlasts what its tests wait for.
        let base = (ConfigBuilder::new().http_listener()).server("shutdown_timeout", "\"60s\"");
        let port = base.http_addr().port();
        let idp = idp_setup(
            &[format!("http://app.test:{port}/.portcullis/callback")],
            &format!("http://127.0.0.1:{port}/.portcullis/backchannel_logout"),
        )
        .start()
        .await;
        let app_route = || {
            Route::new("http://app.test", &[&app])
                .websockets(true)
                .set("allow = { groups = [\"eng\"] }")
        };
        let with = |app_route: Route| {
            base.clone()
                .route(app_route)
                .route(
                    Route::new("http://api.test", &[&api])
                        .websockets(true)
                        .accept(&["bearer"])
                        .set("allow = { groups = [\"eng\"] }"),
                )
                .oidc(Oidc::new(
                    idp.issuer(),
                    CLIENT_ID,
                    CLIENT_SECRET,
                    &format!("app.test:{port}"),
                ))
                .jwt_issuer(JwtIssuer::new(idp.issuer(), &[API_AUD]).leeway("0s"))
                .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)])
        };
        let cfg = with(app_route());
        let denying =
            with(app_route().set("deny = { groups = [\"eng\"], paths = [\"/ws\"] }")).toml();
        let narrowed = with(app_route())
            .route(
                Route::new("http://app.test/ws", &[&app])
                    .websockets(true)
                    .set("allow = { groups = [\"sre\"] }"),
            )
            .toml();
        let bearer_only = with(app_route().accept(&["bearer"])).toml();
        let px = Portcullis::start(&cfg.toml()).await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let alice = scim.create_user(ALICE).await.id();
        let machine = scim.create_user(MACHINE_ID).await.id();
        scim.create_group("eng", &[&alice, &machine]).await;
        let fx = Fixture {
            cfg,
            idp,
            px,
            app,
            api,
        };
        fx.wait_sign_in_available(std::time::Duration::from_secs(40))
            .await;
        Streaming {
            fx,
            denying,
            narrowed,
            bearer_only,
        }
    }

    /// Opens a websocket to `ws://<host><path>` with one extra request header.
    async fn websocket(
        &self,
        host: &str,
        path: &str,
        header: (&'static str, String),
    ) -> portcullis_tests::client::Websocket {
        portcullis_tests::client::websocket(
            self.fx.cfg.http_addr(),
            host,
            path,
            (header.0, &header.1),
        )
        .await
    }

    /// Waits (bounded) until the audit log has a record containing every one of `words`.
    async fn audited(&self, words: &[&str]) -> String {
        audited(&self.fx.px, words).await
    }
}

/// The first line of `px`'s audit log that holds every one of `words`, once there is one.
async fn audited(px: &Portcullis, words: &[&str]) -> String {
    let has = |line: &str| words.iter().all(|w| line.contains(w));
    let text = px
        .audit_log_until(Duration::from_secs(10), |text| text.lines().any(has))
        .await;
    text.lines().find(|l| has(l)).unwrap_or_default().to_owned()
}

/// From now until 10 s after the Unix second `exp`.
fn until_10_s_past(exp: u64) -> Duration {
    Duration::from_secs(exp.saturating_sub(crate::signin::now_unix()) + 10)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_s_websocket_ends_when_its_token_expires() {
    let t = Streaming::start().await;
    // A token that lives 8 s (the IdP's short resource), and no leeway.
    let token =
        t.fx.idp
            .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(SHORT_API))
            .await;
    let exp = portcullis_tests::idp::jwt_claims(&token)["exp"]
        .as_u64()
        .expect("the token has an exp");
    let mut ticks = t
        .websocket(
            "api.test",
            "/ws-ticks",
            ("authorization", format!("Bearer {token}")),
        )
        .await;
    let closed = portcullis_tests::client::closed_within(&mut ticks, until_10_s_past(exp)).await;
    assert!(closed, "the websocket outlived its token by more than 10 s");
    assert!(
        crate::signin::now_unix() >= exp,
        "the websocket was closed before its token expired"
    );
    t.audited(&["open connection closed", "bearer token has expired"])
        .await;
}

/// A graceful stop keeps open websockets while it drains (up to `shutdown_timeout`, 60 s
/// here), and they are still cut the moment their callers lose access: an idle one, which has
/// no frame to be judged by, as well.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_websocket_is_cut_when_its_token_expires_during_a_drain() {
    let t = Streaming::start().await;
    let token =
        t.fx.idp
            .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(SHORT_API))
            .await;
    let exp = jwt_claims(&token)["exp"].as_u64().expect("an exp");
    let mut ws = t
        .websocket(
            "api.test",
            "/ws",
            ("authorization", format!("Bearer {token}")),
        )
        .await;
    t.fx.px.signal(nix::sys::signal::Signal::SIGTERM);
    let closed = portcullis_tests::client::closed_within(&mut ws, until_10_s_past(exp)).await;
    assert!(
        closed,
        "the idle websocket outlived its token by more than 10 s during the drain"
    );
    assert!(
        crate::signin::now_unix() >= exp,
        "closed before its token expired"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_now_denies_the_caller_ends_their_websocket() {
    let t = Streaming::start().await;
    t.reload_closes_alice_s_websocket(&t.denying, &["routes[0].deny"])
        .await;
}

/// A reload can also give the websocket's path a route of its own, for others: the route the
/// connection was let in on is still there, but a request to the same place would not reach
/// it, so the connection is judged as such a request, and ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_gives_the_websocket_s_path_another_route_ends_it() {
    let t = Streaming::start().await;
    t.reload_closes_alice_s_websocket(&t.narrowed, &["no longer in the configuration"])
        .await;
}

/// A reload after which the route takes no sessions ends a session's websocket, and the
/// record says so (not only that the session ended, which it did not).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_takes_no_more_sessions_ends_a_session_s_websocket() {
    let t = Streaming::start().await;
    t.reload_closes_alice_s_websocket(&t.bearer_only, &["the route no longer takes sessions"])
        .await;
}

// ----- plain HTTP (item 12) -----------------------------------------------------------------

/// A SCIM token or a sign-in on a plain-HTTP listener that is not on loopback would cross the
/// network in clear: refused, unless the listener says a TLS-terminating proxy is in front.
#[tokio::test(flavor = "multi_thread")]
async fn scim_and_sign_in_need_https_on_a_listener_off_loopback() {
    for allowed in [false, true] {
        let app = portcullis_tests::Upstream::start("app").await;
        let mut cfg = ConfigBuilder::new().http_listener_on_all_interfaces();
        if allowed {
            cfg = cfg.allow_plain_http();
        }
        let port = cfg.http_addr().port();
        let idp = idp_setup(
            &[format!("http://app.test:{port}/.portcullis/callback")],
            "http://127.0.0.1:9/unused",
        )
        .start()
        .await;
        let cfg = cfg
            .route(Route::new("http://app.test", &[&app]).any_signed_in())
            .route(
                Route::new("http://bots.test", &[&app])
                    .accept(&["bearer"])
                    .set("allow = { machines = true }"),
            )
            .route(
                Route::new("http://open.test", &[&app])
                    .accept(&["bearer"])
                    .set("allow = { public = true, paths = [\"/open/\"] }"),
            )
            .oidc(Oidc::new(
                idp.issuer(),
                CLIENT_ID,
                CLIENT_SECRET,
                &format!("app.test:{port}"),
            ))
            .jwt_issuer(JwtIssuer::new(idp.issuer(), &[API_AUD]))
            .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)]);
        let px = Portcullis::start(&cfg.toml()).await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let created = scim
            .post("/Users", &portcullis_tests::scim::user("dana@corp.test"))
            .await;
        // The machine, known where SCIM is served.
        scim.post("/Users", &portcullis_tests::scim::user(MACHINE_ID))
            .await;
        let fx = Fixture {
            cfg: cfg.clone(),
            idp,
            px,
            app,
            api: portcullis_tests::Upstream::start("unused").await,
        };
        // A machine's bearer token, which anyone on the way could replay.
        let token = fx
            .idp
            .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
            .await;
        let called = client()
            .get(fx.url("bots.test", "/jobs"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if allowed {
            assert_eq!(called.status(), 200, "allow_plain_http = true takes tokens");
            assert_eq!(
                created.status, 201,
                "allow_plain_http = true lets SCIM through"
            );
            fx.wait_sign_in_available(std::time::Duration::from_secs(40))
                .await;
            // A person signs in there, and is let in with the session.
            scim.post("/Users", &portcullis_tests::scim::user(ALICE))
                .await;
            let signed = fx
                .sign_in(&client(), &fx.app_url("/page"), ALICE, ALICE_PASSWORD)
                .await;
            let page = fx.app_url("/page");
            let with_session = || {
                crate::signin::get_with_session(
                    &page,
                    &signed.cookie,
                    crate::signin::BROWSER_ACCEPT,
                )
            };
            assert_eq!(with_session().await.status(), 200, "signed in");
            // An event stream the machine holds open there.
            let mut stream = client()
                .get(fx.url("bots.test", "/idle-events"))
                .bearer_auth(&token)
                .header("accept", "text/event-stream")
                .send()
                .await
                .unwrap();
            assert_eq!(stream.status(), 200);
            let first = tokio::time::timeout(std::time::Duration::from_secs(10), stream.chunk())
                .await
                .expect("the first event arrives");
            assert_eq!(first.unwrap().as_deref(), Some(&b"data: hello\n\n"[..]));
            // Once plain HTTP is no longer allowed there, the session's cookie crosses the
            // network in clear, and is not taken (as no sign-in is) until it comes over HTTPS.
            let refusing = fx.cfg.toml().replace("allow_plain_http = true\n", "");
            assert_ne!(refusing, fx.cfg.toml());
            fx.px.rewrite_config(&refusing);
            fx.px.reload_and_wait().await;
            // Nor is the machine's token, on the stream it opened before: it is closed.
            let ended =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.chunk()).await;
            assert!(
                matches!(ended, Ok(Err(_) | Ok(None))),
                "the stream is still open: {ended:?}"
            );
            audited(
                &fx.px,
                &["no longer takes credentials over plain HTTP", "bots.test"],
            )
            .await;
            let sent = fx.app.count();
            let resp = with_session().await;
            assert_eq!(resp.status(), 403, "a session over plain HTTP off loopback");
            let page = resp.text().await.unwrap();
            assert!(page.contains("need HTTPS"), "{page}");
            assert_eq!(fx.app.count(), sent, "nothing was sent upstream");
            continue;
        }
        assert_eq!(
            called.status(),
            401,
            "a bearer token over plain HTTP off loopback"
        );
        let challenge = called.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("invalid_request"), "{challenge}");
        let body = called.text().await.unwrap();
        assert!(body.contains("need HTTPS"), "{body}");
        audited(
            &fx.px,
            &[
                "\"route\":\"http://bots.test\"",
                "sent over plain HTTP off loopback",
            ],
        )
        .await;
        assert_eq!(fx.app.count(), 0, "nothing was sent upstream");
        // On a path open to anyone, it is dropped unread: the request goes on as anyone's,
        // and the upstream never sees it.
        let open = client()
            .get(fx.url("open.test", "/open/x"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(open.status(), 200, "a public path");
        let seen = open.text().await.unwrap();
        let echo = portcullis_tests::Echo::parse(seen.as_bytes());
        assert_eq!(echo.header("authorization"), None, "{seen}");
        assert!(!seen.contains(&token), "{seen}");
        // As said at start.
        fx.px
            .log_until(|log| log.contains("bearer tokens sent here are refused"))
            .await;
        // Nor is one read by Portcullis' own `/me`.
        let me = client()
            .get(fx.app_url("/.portcullis/me"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), 401, "/me");
        let challenge = me.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("invalid_request"), "/me: {challenge}");
        assert_eq!(created.status, 403, "SCIM over plain HTTP off loopback");
        let detail = created.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("need HTTPS"), "{}", created.body);
        // Its token crossed the network in clear: the operator hears of it.
        audited(
            &fx.px,
            &["\"route\":\"scim\"", "its token crossed in clear"],
        )
        .await;
        for url in [
            fx.app_url("/.portcullis/sign_in?rd=%2F"),
            fx.app_url("/.portcullis/callback?state=x&code=y"),
            fx.app_url("/page"),
        ] {
            let resp = client()
                .get(&url)
                .header("accept", crate::signin::BROWSER_ACCEPT)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 403, "{url}");
            let page = resp.text().await.unwrap();
            assert!(page.contains("need HTTPS"), "{url}: {page}");
        }
        // The callback's code crossed the network in clear too.
        audited(
            &fx.px,
            &[
                "\"route\":\"oidc\"",
                "callback over plain HTTP off loopback",
            ],
        )
        .await;
    }
}

// ----- paths as any upstream reads them (item 2) --------------------------------------------

/// Routes are chosen reading the path leniently, so that no spelling a lenient upstream reads
/// as a route's lands on another. But a narrower route may be the more open one: a public
/// `/public/` beside a `/` for staff. A spelling only the lenient reading puts on it
/// (`/PUBLIC/x`, `/public;x/y`, `/;a/public/y`), which an upstream reading paths as written
/// (Go, Django, nginx) serves as a path of the staff route, is refused, not let in as public.
#[tokio::test(flavor = "multi_thread")]
async fn a_spelling_that_only_a_lenient_reading_puts_on_a_public_route_is_refused() {
    let up = portcullis_tests::Upstream::start("app").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(
            Route::new("http://app.test", &[&up])
                .accept(&["public"])
                .set("allow = { public = true, paths = [\"/open/\"] }"),
        )
        .route(Route::new("http://app.test/public/", &[&up]).accept(&["public"]))
        // The same behind a `*.` route for the whole domain.
        .route(
            Route::new("http://*.corp.test", &[&up])
                .accept(&["public"])
                .set("allow = { public = true, paths = [\"/open/\"] }"),
        )
        .route(Route::new("http://wiki.corp.test/public/", &[&up]).accept(&["public"]));
    let _px = cfg.start().await;
    for host in ["app.test", "wiki.corp.test"] {
        let status = |path: &str| {
            let url = cfg.http_url(host, path);
            async move {
                let resp = bare_client().get(&url).send().await.expect("GET");
                resp.status().as_u16()
            }
        };
        assert_eq!(status("/public/x").await, 200, "{host}");
        assert_eq!(status("/public").await, 200, "{host}");
        assert_eq!(status("/open/x").await, 200, "{host}");
        assert_eq!(status("/staff/x").await, 403, "{host}");
        for path in ["/PUBLIC/x", "/Public", "/public;x/y", "/;a/public/y"] {
            assert_eq!(status(path).await, 400, "{host}{path}");
        }
    }
}

/// Tomcat, Jetty and Spring drop `;` parameters and resolve `..;`; Express and ASP.NET route
/// paths in any case, and ASP.NET cuts out a cookieless session's `(S(x))`; Rails drops a
/// format suffix. No such spelling gets past a deny rule or
/// (but a format suffix) lands on another route.
#[tokio::test(flavor = "multi_thread")]
async fn deny_rules_and_routes_hold_for_any_upstream_s_reading_of_the_path() {
    let t = Hardened::start().await;
    let cookie = t.sign_in().await;
    let (host, session) = (t.host("app.test"), t.session(&cookie));
    let json = "Accept: application/json".to_owned();
    // (target, status; what the upstream receives when let in)
    let table: &[(&str, u16, Option<&str>)] = &[
        ("/admin;x", 403, None),
        ("/admin;jsessionid=1/users", 403, None),
        ("/ADMIN", 403, None),
        ("/Admin/users", 403, None),
        ("/;x/admin", 403, None),
        // A dot segment with parameters is `..` to some servers and a name to others.
        ("/public/..;/admin", 400, None),
        ("/public/..;x=1/admin", 400, None),
        ("/public/.;/admin", 400, None),
        ("/public/%2e%2e;/admin", 400, None),
        // So is one whose `;` is escaped: an nginx in front of Tomcat passes `%3B` on as `;`.
        ("/public/..%3B/admin", 400, None),
        ("/public/%2e%2e%3bx/admin", 400, None),
        ("/public/.%3B/admin", 400, None),
        // ASP.NET cuts a cookieless session's segment out of every path before it routes.
        ("/(S(x))/admin/users", 400, None),
        ("/%28S%28x%29%29/admin", 400, None),
        ("/public/(A(x)F(y))/", 400, None),
        // An escape of a character a path may hold as it is reads as that character to every
        // framework: one spelling, judged and sent.
        ("/wiki/Special%3AExport", 403, None),
        ("/wiki/Special%3aExport/history", 403, None),
        ("/%40root", 403, None),
        ("/%61dmin", 403, None),
        ("/wiki/Talk%3AMain", 200, Some("/wiki/Talk:Main")),
        ("/caf%c3%a9|%7c", 200, Some("/caf%C3%A9%7C%7C")),
        // Parameters are kept where nothing is denied.
        ("/work;jsessionid=1", 200, Some("/work;jsessionid=1")),
        // /v1/ takes bearer tokens only: a session is no caller there. Its prefix spelled
        // otherwise (which Express reads as /v1/, Go as a path of the wider route) is refused.
        ("/v1/builds", 401, None),
        ("/V1/builds", 400, None),
        ("/v1;x/builds", 400, None),
        ("/v1x", 200, Some("/v1x")),
        // A prefix's trailing `/` is not asked of the path: Express, Rails and ASP.NET serve
        // `/ops` as `/ops/`, and `/v1` as `/v1/`.
        ("/ops", 403, None),
        ("/OPS;x", 403, None),
        ("/opsx", 200, Some("/opsx")),
        ("/v1", 401, None),
        ("/V1;x", 400, None),
        // A `+` in a path is a `+` to frameworks, which decode `%2B` to it.
        ("/lang/c%2B%2B/x", 403, None),
        ("/lang/C+%2b", 403, None),
        ("/lang/c/x", 200, Some("/lang/c/x")),
        ("/tags/c++/x", 401, None),
        ("/tags/c%2B%2B/x", 400, None),
        ("/tags/c+%2b", 400, None),
        // Rails routes `/items/export.csv` to `/items/export` (`(.:format)`), as Spring MVC
        // before 5.3 does: a format suffix on the last segment is no other path.
        ("/items/export.csv", 403, None),
        ("/Items/Export.json;x", 400, None),
        ("/admin.json", 403, None),
        ("/items/exports.csv", 200, Some("/items/exports.csv")),
        // Laravel, Symfony, Drupal and WordPress route what follows their script:
        // `/index.php/admin` is `/admin` to them.
        ("/index.php/admin", 403, None),
        ("/Index.php;x/ADMIN/users", 403, None),
        ("/index.php/work", 200, Some("/index.php/work")),
        // Read so, it is another route's (/v1/ takes bearer tokens only): refused as written
        // two ways.
        ("/index.php/v1/builds", 400, None),
        ("/INDEX.PHP;x/V1", 400, None),
        // Apache, nginx's `fastcgi_split_path_info` and IIS run a page's file with path
        // info as the page: `/admin.php/users` is what `/admin/users` runs, where clean names
        // are served. Read so, it is denied, or another route's.
        ("/admin.php/users", 403, None),
        ("/ADMIN.aspx;x/users", 403, None),
        ("/v1.php/builds", 400, None),
        // And the page's own file is the page: `/v1.php` is what `/v1` runs there.
        ("/v1.php", 400, None),
        // Unless the route taken names the script itself: its operator routed it.
        ("/remote.php/dav/files", 200, Some("/remote.php/dav/files")),
        ("/remote.php/v1/x", 200, Some("/remote.php/v1/x")),
        // Routes do not read suffixes: `/v1.json` is the `/` route's, as most frameworks
        // serve another page there.
        ("/v1.json", 200, Some("/v1.json")),
        // Next.js answers `/_next/data/<build>/admin.json` with the page `/admin`'s
        // server-side props: denied as that page (`index/admin` is `/admin` too).
        ("/_next/data/b1/admin.json", 403, None),
        ("/_next/data/b1/Admin/users.json", 403, None),
        ("/_next/data/b1/index/admin.json", 403, None),
        // Route selection does not read it: an app's data for a page a narrower route holds
        // (one it navigates to on every click there) is not refused as that route's.
        (
            "/_next/data/b1/v1/builds.json",
            200,
            Some("/_next/data/b1/v1/builds.json"),
        ),
        (
            "/_next/data/b1/work.json",
            200,
            Some("/_next/data/b1/work.json"),
        ),
    ];
    for &(target, status, upstream) in table {
        let (got, received) = t
            .send(
                &format!("GET {target} HTTP/1.1"),
                &[host.clone(), session.clone(), json.clone()],
            )
            .await;
        assert_eq!(got, status, "GET {target}");
        match upstream {
            Some(path) => {
                let line = received.map(|r| r.line);
                assert_eq!(line, Some(format!("GET {path} HTTP/1.1")), "GET {target}");
            }
            None => assert_eq!(received, None, "GET {target} reached the upstream"),
        }
    }
}

/// A route that passes callers' bearer tokens on to an upstream over plain HTTP off loopback
/// sends them across the network in clear: the operator hears of it at start and at a reload,
/// named by route and upstream, and not of one on loopback or over https.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_passed_on_in_clear_are_said_at_start_and_at_a_reload() {
    // Never called: what is said at start is read off the file.
    let passing = |from: &str, to: &str| {
        Route::to_urls(from, vec![to.to_owned()])
            .accept(&["bearer"])
            .set("pass_authorization = true")
            .set("allow = { machines = true }")
    };
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(passing("http://far.test", "http://192.0.2.7:8080"))
        .route(passing("http://near.test", "http://127.0.0.1:9"))
        .route(passing("http://safe.test", "https://192.0.2.8"))
        .jwt_issuer(JwtIssuer::new("http://127.0.0.1:9", &[API_AUD]));
    let px = cfg.start().await;
    let said = "sends the callers' bearer tokens to this upstream over plain HTTP";
    let log = px.log_until(|log| log.contains(said)).await;
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(said)).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("http://far.test") && warnings[0].contains("192.0.2.7:8080"),
        "{log}"
    );
    // A route a reload adds.
    let later = cfg.route(passing("http://later.test", "http://192.0.2.9:8080"));
    px.rewrite_config(&later.toml());
    px.reload_and_wait().await;
    px.log_until(|log| {
        log.lines()
            .any(|line| line.contains("192.0.2.9:8080") && line.contains(said))
    })
    .await;
}

/// A bearer token sent over plain HTTP, off loopback, to an https route's address has crossed
/// the network in clear: refused unread and recorded, as one sent to an http route there is,
/// not redirected to https with it (clients that keep `Authorization` across that redirect
/// would have it taken there, its replay by anyone on the way unnoticed). Without one, the
/// redirect stands.
#[tokio::test(flavor = "multi_thread")]
async fn a_bearer_token_sent_in_clear_to_an_https_route_is_refused_not_redirected() {
    let ca = portcullis_tests::TestCa::new();
    let app = Upstream::start("app").await;
    let cfg = ConfigBuilder::new()
        .http_listener_on_all_interfaces()
        .https_listener(vec![ca.leaf("bots", &["bots.test"])])
        .route(
            Route::new("https://bots.test", &[&app])
                .accept(&["bearer"])
                .set("allow = { machines = true }"),
        )
        .jwt_issuer(JwtIssuer::new("https://idp.invalid", &["api"]));
    let px = cfg.start().await;
    let url = cfg.http_url("bots.test", "/jobs");
    let http = portcullis_tests::client::plain_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client");
    let redirected = http.get(&url).send().await.expect("an answer");
    assert_eq!(redirected.status(), 308);
    let forged = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJl";
    let refused = http
        .get(&url)
        .bearer_auth(forged)
        .send()
        .await
        .expect("an answer");
    assert_eq!(refused.status(), 401, "a bearer token in clear");
    assert!(refused.headers().get("location").is_none());
    let challenge = refused.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("invalid_request"), "{challenge}");
    audited(
        &px,
        &[
            "\"route\":\"https://bots.test\"",
            "sent over plain HTTP off loopback",
        ],
    )
    .await;
    assert_eq!(app.count(), 0, "nothing was sent upstream");
}

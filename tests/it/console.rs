//! The console (issue 16), end to end: the real binary, the real oidc-provider for sign-in and
//! SCIM provisioning over HTTP, and headless Chromium for the pages.
//!
//! - bob, in `sre` (the `[console]` rule), signs in from the browser and finds alice in `eng`,
//!   with scripts turned off: the pages are plain HTML, links and GET forms;
//! - alice, in `eng` only, is refused with the gate's 403 page, and the refusal is audited;
//! - the pages show the directory as it is: a deactivation is on the next page load.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use portcullis_tests::rng::Rng;
use portcullis_tests::scim::patch_ops;
use portcullis_tests::{
    Browser, BrowserOptions, ConfigBuilder, Portcullis, Route, ScimClient, Upstream,
};
use reqwest::header::ACCEPT;
use reqwest::StatusCode;
use serde_json::json;

use crate::audit::refusal_where;
use crate::signin::{
    assert_session_refused, assert_session_works, client, get_with_session, idp_for_app_test,
    navigate, Fixture, ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD, BROWSER_ACCEPT,
};
use crate::{SCIM_HOST, SCIM_TOKEN};

const WAIT: Duration = Duration::from_secs(40);

/// A running IdP, Portcullis with `app.test` (for `eng`) and the console (for `sre`) on the
/// auth host `app.test`, and the directory: alice in `eng`, bob in `sre`.
struct Console {
    fx: Fixture,
    scim: ScimClient,
    alice_id: String,
    bob_id: String,
    eng_id: String,
    sre_id: String,
}

impl Console {
    async fn start() -> Console {
        let app = Upstream::start("app").await;
        let api = Upstream::start("api").await;
        let cfg = ConfigBuilder::new().http_listener();
        let (idp, oidc) = idp_for_app_test(&cfg).await;
        let cfg = cfg
            .route(
                Route::new("http://app.test", &[&app])
                    .set(
                        "allow = [{ groups = [\"eng\"] }, \
                         { email_domains = [\"partner.test\"], methods = [\"GET\"] }]",
                    )
                    .set("deny = { groups = [\"contractors\"], paths = [\"/admin\"] }"),
            )
            .oidc(oidc)
            .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)])
            .console("allow = { groups = [\"sre\"] }");
        let px: Portcullis = cfg.start().await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let fx = Fixture {
            cfg,
            idp,
            px,
            app,
            api,
        };
        fx.wait_sign_in_available(WAIT).await;
        let alice_id = scim.create_user(ALICE).await.id();
        let bob_id = scim.create_user(BOB).await.id();
        let eng_id = scim.create_group("eng", &[&alice_id]).await.id();
        let sre_id = scim.create_group("sre", &[&bob_id]).await.id();
        Console {
            fx,
            scim,
            alice_id,
            bob_id,
            eng_id,
            sre_id,
        }
    }

    /// The session cookies of alice and bob, each signed in.
    async fn sign_in_alice_and_bob(&self) -> (String, String) {
        let app = self.fx.app_url("/");
        let alice = self
            .fx
            .sign_in(&client(), &app, ALICE, ALICE_PASSWORD)
            .await;
        let bob = self.fx.sign_in(&client(), &app, BOB, BOB_PASSWORD).await;
        (alice.cookie, bob.cookie)
    }

    fn console_url(&self, path: &str) -> String {
        self.fx.app_url(&format!("/.portcullis/console/{path}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_an_operator_signs_in_and_finds_alice_in_eng_with_scripts_off() {
    let t = Console::start().await;
    let browser = Browser::start_with(BrowserOptions {
        javascript: false,
        ..BrowserOptions::default()
    })
    .await;

    // Signing in from the console's own address lands back on it.
    let overview = t.console_url("");
    browser.goto(&overview).await;
    browser
        .wait_for_url(|u| u.contains("/interaction/"), WAIT)
        .await;
    browser.fill("input[name=login]", BOB).await;
    browser.fill("input[name=password]", BOB_PASSWORD).await;
    browser.click("button[type=submit]").await;
    browser.wait_for_url(|u| u == overview, WAIT).await;
    let text = browser.wait_for_text("Sessions", WAIT).await;
    assert!(text.contains("Users"), "{text}");
    assert!(
        text.contains(BOB),
        "the top bar names who is looking: {text}"
    );

    // Users → search (a GET form) → alice → her groups.
    browser.click("nav a[href$='/console/users']").await;
    browser.wait_for_text("userName", WAIT).await;
    browser.fill("input[name=q]", "alice").await;
    browser.click("form.search button[type=submit]").await;
    browser
        .wait_for_url(|u| u.contains("/console/users?q=alice"), WAIT)
        .await;
    let list = browser.wait_for_text("1 user · page 1 of 1", WAIT).await;
    assert!(list.contains(ALICE), "{list}");
    browser
        .click(&format!("a[href$='/console/users/{}']", t.alice_id))
        .await;
    let page = browser.wait_for_text("Groups", WAIT).await;
    assert!(page.contains(ALICE), "{page}");
    assert!(page.contains("eng"), "alice is shown in eng: {page}");
    assert!(page.contains("active"), "{page}");

    // alice has a session; bob ends it from her page, confirming on the next.
    let alice =
        t.fx.sign_in(&client(), &t.fx.app_url("/"), ALICE, ALICE_PASSWORD)
            .await
            .cookie;
    assert_session_works(&t.fx.app_url("/work"), &alice).await;
    browser
        .goto(&t.console_url(&format!("users/{}", t.alice_id)))
        .await;
    browser.wait_for_text("1 session, last seen", WAIT).await;
    browser.click("a[href$='/end_sessions']").await;
    let confirm = browser.wait_for_text("Ending them signs", WAIT).await;
    assert!(confirm.contains("has 1 session"), "{confirm}");
    browser.click("button[type=submit]").await;
    let done = browser.wait_for_text("ended 1 session", WAIT).await;
    assert!(done.contains(ALICE), "{done}");
    assert_session_refused(&t.fx, &t.fx.app_url("/work"), &alice).await;

    // The stylesheet is Portcullis' own, served from the same origin.
    let source = browser.page_source().await;
    assert!(
        source.contains("href=\"/.portcullis/style.css\""),
        "{source}"
    );
    assert!(
        !source.contains("<script"),
        "no script on the page: {source}"
    );
    browser.quit().await;

    let css = client()
        .get(t.fx.app_url("/.portcullis/style.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.status(), StatusCode::OK);
    assert!(css.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/css"));
    assert!(css
        .text()
        .await
        .unwrap()
        .contains("prefers-color-scheme: dark"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_outside_the_console_rule_is_refused_and_audited() {
    let t = Console::start().await;

    // Nobody signed in: a browser is sent to sign in, an API client gets 401.
    let resp = navigate(&client(), &t.console_url("users")).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let resp = client().get(t.console_url("users")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // alice is in eng, not sre: the gate's 403, for pages and lists alike.
    let alice =
        t.fx.sign_in(&client(), &t.fx.app_url("/"), ALICE, ALICE_PASSWORD)
            .await
            .cookie;
    for path in ["", "users", &format!("users/{}", t.alice_id)] {
        let resp = get_with_session(&t.console_url(path), &alice, BROWSER_ACCEPT).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        let page = resp.text().await.unwrap();
        assert!(page.contains(ALICE), "the 403 says who: {page}");
        assert!(!page.contains("Sessions"), "{page}");
    }
    t.fx.px
        .audit_log_until(WAIT, |text| {
            text.lines().any(|line| {
                line.contains("\"refusal\"")
                    && line.contains(ALICE)
                    && line.contains("\"route\":\"console\"")
            })
        })
        .await;

    // Only on the auth host, and only for reading.
    let bob =
        t.fx.sign_in(&client(), &t.fx.app_url("/"), BOB, BOB_PASSWORD)
            .await;
    let resp = client()
        .post(t.console_url("users"))
        .header("cookie", format!("portcullis_session={}", bob.cookie))
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    // Recorded as sent: with no origin named, not from another.
    let said = "(sent with neither Origin nor Referer)";
    let text =
        t.fx.px
            .audit_log_until(WAIT, |text| text.contains(said))
            .await;
    let line = text.lines().find(|l| l.contains(said)).unwrap_or_default();
    assert!(line.contains("\"user\":\"bob@"), "{line}");
    assert!(!text.contains("another origin"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pages_show_the_directory_as_it_is_now() {
    let t = Console::start().await;
    let bob =
        t.fx.sign_in(&client(), &t.fx.app_url("/"), BOB, BOB_PASSWORD)
            .await
            .cookie;
    let alice_page = t.console_url(&format!("users/{}", t.alice_id));
    let resp = get_with_session(&alice_page, &bob, BROWSER_ACCEPT).await;
    // Never framed, no script, and no console address in a Referer.
    for (name, want) in [
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(resp.headers()[name], want, "{name}");
    }
    let policy = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("frame-ancestors 'none'") && policy.contains("default-src 'none'"));
    let page = resp.text().await.unwrap();
    assert!(page.contains("class=\"yes\">active"), "{page}");
    assert!(page.contains("No session."), "{page}");

    // alice signs in: her session is on her page.
    t.fx.sign_in(&client(), &t.fx.app_url("/"), ALICE, ALICE_PASSWORD)
        .await;
    let page = get_with_session(&alice_page, &bob, BROWSER_ACCEPT)
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("1 session, last seen"), "{page}");

    // The IdP deactivates her: the next page load says so.
    let resp = t
        .scim
        .patch(
            &format!("/Users/{}", t.alice_id),
            &patch_ops(json!([{"op": "replace", "value": {"active": false}}])),
        )
        .await;
    assert!((200..300).contains(&resp.status), "{}", resp.text);
    let page = get_with_session(&alice_page, &bob, BROWSER_ACCEPT)
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("class=\"no\">deactivated"), "{page}");

    // Her removal from eng is on her page too, beside her deactivation: both are about her,
    // though made by the IdP's token, to her record and to the group's.
    let resp = t
        .scim
        .patch(
            &format!("/Groups/{}", t.eng_id),
            &patch_ops(json!([{
                "op": "remove",
                "path": format!("members[value eq \"{}\"]", t.alice_id)
            }])),
        )
        .await;
    assert!((200..300).contains(&resp.status), "{}", resp.text);
    let removed = format!("-[{}]", t.alice_id);
    let deadline = Instant::now() + WAIT;
    loop {
        let page = get_with_session(&alice_page, &bob, BROWSER_ACCEPT)
            .await
            .text()
            .await
            .unwrap();
        let records = page.split("Recent records").nth(1).unwrap_or_default();
        if records.contains(&removed) {
            assert!(records.contains("attributes, deactivated"), "{page}");
            break;
        }
        assert!(Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A person's page shows their sign-ins, recorded under the email they sign in with, where
/// their `userName` is another (Entra ID's user principal name, say).
#[tokio::test(flavor = "multi_thread")]
async fn a_user_s_page_shows_the_sign_ins_recorded_under_their_email() {
    let t = Console::start().await;
    let bob =
        t.fx.sign_in(&client(), &t.fx.app_url("/"), BOB, BOB_PASSWORD)
            .await
            .cookie;
    // alice's userName becomes her user principal name; her email stays the one she signs
    // in with.
    let renamed = t
        .scim
        .patch(
            &format!("/Users/{}", t.alice_id),
            &patch_ops(json!([{"op": "replace", "value": {
                "userName": "a.liddell@corp.onmicrosoft.test",
                "emails": [{"value": ALICE, "primary": true}],
            }}])),
        )
        .await;
    assert!((200..300).contains(&renamed.status), "{}", renamed.text);
    t.fx.sign_in(&client(), &t.fx.app_url("/"), ALICE, ALICE_PASSWORD)
        .await;
    let page_url = t.console_url(&format!("users/{}", t.alice_id));
    let deadline = Instant::now() + WAIT;
    loop {
        let page = get_with_session(&page_url, &bob, BROWSER_ACCEPT)
            .await
            .text()
            .await
            .unwrap();
        let records = page.split("Recent records").nth(1).unwrap_or_default();
        if records.contains("sign_in") {
            break;
        }
        assert!(Instant::now() < deadline, "no sign-in on the page: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another user who lists the same email: her records are not taken for his.
    let mallory = t
        .scim
        .post(
            "/Users",
            &json!({
                "schemas": [portcullis_tests::scim::USER_SCHEMA],
                "userName": "mallory@corp.test",
                "emails": [{"value": ALICE}],
            }),
        )
        .await
        .expect(201)
        .id();
    let resp = get_with_session(
        &t.console_url(&format!("users/{mallory}")),
        &bob,
        BROWSER_ACCEPT,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let page = resp.text().await.unwrap();
    let (_, records) =
        (page.split_once("Recent records")).unwrap_or_else(|| panic!("no records section: {page}"));
    assert!(!records.contains("sign_in"), "{page}");
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

/// The user names in the "who can reach" table of a route page (the only links to users
/// there).
fn reach_rows(page: &str) -> Vec<String> {
    const LINK: &str = "<a href=\"/.portcullis/console/users/";
    page.split(LINK)
        .skip(1)
        .filter_map(|rest| {
            let (_, after) = rest.split_once("\">")?;
            let (name, _) = after.split_once("</a>")?;
            Some(name.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn who_can_reach_a_route_matches_explain_for_every_user() {
    let t = Console::start().await;
    let seed = Rng::seed_from_env("CONSOLE_SEED");
    println!("CONSOLE_SEED={seed}");
    let mut rng = Rng::new(seed);

    // 200 users at two domains, some deactivated, in eng, in platform (nested in eng) and in
    // contractors at random.
    let mut everyone = vec![ALICE.to_owned(), BOB.to_owned()];
    let (mut eng, mut platform, mut contractors) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..200 {
        let domain = if rng.next_u64().is_multiple_of(3) {
            "partner.test"
        } else {
            "corp.test"
        };
        let name = format!("user{i:03}@{domain}");
        let id = t.scim.create_user(&name).await.id();
        if rng.next_u64().is_multiple_of(8) {
            let resp = t
                .scim
                .patch(
                    &format!("/Users/{id}"),
                    &patch_ops(json!([{"op": "replace", "value": {"active": false}}])),
                )
                .await;
            assert!((200..300).contains(&resp.status), "{}", resp.text);
        }
        for (group, one_in) in [(&mut eng, 3), (&mut platform, 4), (&mut contractors, 6)] {
            if rng.next_u64().is_multiple_of(one_in) {
                group.push(id.clone());
            }
        }
        everyone.push(name);
    }
    let platform_id = t.scim.create_group("platform", &refs(&platform)).await.id();
    eng.push(platform_id);
    // The rule names `eng`, which holds `engineering` (and so, through it, `platform`).
    let engineering = t.scim.create_group("engineering", &refs(&eng)).await.id();
    t.scim
        .create_group("contractors", &refs(&contractors))
        .await
        .id();
    let resp = t
        .scim
        .patch(
            &format!("/Groups/{}", t.eng_id),
            &patch_ops(
                json!([{"op": "add", "path": "members", "value": [{"value": engineering}]}]),
            ),
        )
        .await;
    assert!((200..300).contains(&resp.status), "{}", resp.text);

    let bob =
        t.fx.sign_in(&client(), &t.fx.app_url("/"), BOB, BOB_PASSWORD)
            .await
            .cookie;
    let admin = portcullis_tests::client::plain_client_builder()
        .build()
        .unwrap();
    for (method, path) in [("GET", "/"), ("POST", "/"), ("GET", "/admin/x")] {
        // Every page of the console's list.
        let mut listed = Vec::new();
        for page in 1.. {
            let url = t.console_url(&format!(
                "routes/0?method={method}&path={}&page={page}",
                url::form_urlencoded::byte_serialize(path.as_bytes()).collect::<String>()
            ));
            let html = get_with_session(&url, &bob, BROWSER_ACCEPT)
                .await
                .text()
                .await
                .unwrap();
            listed.extend(reach_rows(&html));
            if !html.contains("rel=\"next\"") {
                break;
            }
            assert!(page < 20, "the pager never ends: {html}");
        }
        let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
        assert_eq!(listed.len(), listed_set.len(), "listed twice: {listed:?}");

        // explain, over the admin listener, for every user.
        let target = t.fx.app_url(path);
        let mut allowed = BTreeSet::new();
        for user in &everyone {
            let answer = admin
                .get(format!("http://{}/explain", t.fx.cfg.admin_addr()))
                .query(&[
                    ("user", user.as_str()),
                    ("url", &target),
                    ("method", method),
                ])
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
            if answer["allowed"] == json!(true) {
                allowed.insert(user.clone());
            }
        }
        assert_eq!(
            listed_set, allowed,
            "{method} {path}: the console's list differs from explain (seed {seed})"
        );
        assert!(
            !allowed.is_empty() && allowed.len() < everyone.len(),
            "{method} {path}: a property check needs both answers: {allowed:?}"
        );
    }
}

/// The CSRF token in a console page's form.
fn form_token(page: &str) -> String {
    let (_, rest) = page
        .split_once("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no form token: {page}"));
    rest.split('"').next().unwrap_or_default().to_owned()
}

/// Bob posts the form of `action` (a console address) once its head is judged, with
/// `meanwhile` done between the two (he asks for `100 Continue`, which Portcullis sends once
/// it has let the head in); the answer, once the whole body was read.
async fn post_held_back(
    t: &Console,
    bob: &str,
    action: &str,
    meanwhile: impl std::future::Future<Output = ()>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let page = get_with_session(&t.fx.app_url(action), bob, BROWSER_ACCEPT)
        .await
        .text()
        .await
        .unwrap();
    let form = format!("csrf={}", form_token(&page));
    let mut stream = tokio::net::TcpStream::connect(t.fx.cfg.http_addr())
        .await
        .unwrap();
    let head = format!(
        "POST {action} HTTP/1.1\r\nHost: app.test:{}\r\nCookie: portcullis_session={bob}\r\n\
         Origin: {}\r\nAccept: text/html\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        t.fx.cfg.http_addr().port(),
        t.fx.app_origin(),
        form.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The interim answer, read to its end (bounded: the server answers at once).
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") && interim.len() < 4096 {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte)).await {
            Ok(Ok(1)) => interim.push(byte[0]),
            _ => break,
        }
    }
    let interim = String::from_utf8_lossy(&interim).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    meanwhile.await;
    let _ = stream.write_all(form.as_bytes()).await;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

/// An action is judged again once its form is in: bob, removed from the console's group while
/// his post was on its way (a slow link, or one held back), acts no more.
#[tokio::test(flavor = "multi_thread")]
async fn an_action_whose_poster_is_removed_while_it_arrives_is_refused() {
    let t = Console::start().await;
    let (alice, bob) = t.sign_in_alice_and_bob().await;
    let action = format!("/.portcullis/console/users/{}/end_sessions", t.alice_id);
    // The IdP takes bob out of `sre` meanwhile, and is answered.
    let remove_bob = async {
        let removed = t
            .scim
            .patch(
                &format!("/Groups/{}", t.sre_id),
                &portcullis_tests::scim::patch_ops(serde_json::json!([{
                    "op": "remove",
                    "path": format!("members[value eq \"{}\"]", t.bob_id),
                }])),
            )
            .await;
        assert_eq!(removed.status, 204, "{removed:?}");
    };
    // Refused: 403.
    let answer = post_held_back(&t, &bob, &action, remove_bob).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_session_works(&t.fx.app_url("/still"), &alice).await;
}

/// So is one whose poster a reload takes out of `[console] allow` while it arrives.
#[tokio::test(flavor = "multi_thread")]
async fn an_action_whose_poster_a_reload_removes_while_it_arrives_is_refused() {
    let t = Console::start().await;
    let (alice, bob) = t.sign_in_alice_and_bob().await;
    let action = format!("/.portcullis/console/users/{}/end_sessions", t.alice_id);
    let sre = "allow = { groups = [\"sre\"] }";
    let eng_only = "allow = { groups = [\"eng\"] }";
    let reload = t.fx.px.reload_with("[console]", sre, eng_only);
    let answer = post_held_back(&t, &bob, &action, reload).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_session_works(&t.fx.app_url("/still"), &alice).await;
}

/// And one whose console a reload takes away while it arrives: refused (404), and recorded
/// as every console refusal is.
#[tokio::test(flavor = "multi_thread")]
async fn an_action_whose_console_a_reload_takes_away_while_it_arrives_is_refused_and_recorded() {
    let t = Console::start().await;
    let (alice, bob) = t.sign_in_alice_and_bob().await;
    let action = format!("/.portcullis/console/users/{}/end_sessions", t.alice_id);
    let config = t.fx.px.config();
    let without = config.replacen("\n[console]\nallow = { groups = [\"sre\"] }\n", "\n", 1);
    assert_ne!(without, config, "no [console] in:\n{config}");
    let reload = async {
        t.fx.px.rewrite_config(&without);
        t.fx.px.reload_and_wait().await;
    };
    let answer = post_held_back(&t, &bob, &action, reload).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let why = "a reload took the console off this host";
    let refusal = refusal_where(&t.fx.px, |reason| reason.contains(why)).await;
    assert_eq!(refusal["user"], BOB, "{refusal:#}");
    assert_eq!(refusal["route"], "console", "{refusal:#}");
    assert_session_works(&t.fx.app_url("/still"), &alice).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cross_site_or_forged_post_is_refused_and_changes_nothing() {
    let t = Console::start().await;
    let (alice, bob) = t.sign_in_alice_and_bob().await;
    let action = t.console_url(&format!("users/{}/end_sessions", t.alice_id));
    let page = get_with_session(&action, &bob, BROWSER_ACCEPT)
        .await
        .text()
        .await
        .unwrap();
    let token = form_token(&page);
    let post = |origin: &str, form: String| {
        client()
            .post(&action)
            .header("cookie", format!("portcullis_session={bob}"))
            .header(ACCEPT, BROWSER_ACCEPT)
            .header("origin", origin.to_owned())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
    };
    let own = t.fx.app_origin();
    // Another site's page posting the whole form, token and all; the console's own origin
    // without the token, or with another session's.
    for (origin, form) in [
        ("http://evil.test", format!("csrf={token}")),
        ("null", format!("csrf={token}")),
        (own.as_str(), String::new()),
        (own.as_str(), format!("csrf={}", "0".repeat(64))),
    ] {
        let resp = post(origin, form.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin} {form}");
        assert_session_works(&t.fx.app_url("/still"), &alice).await;
    }
    // The token is the session's: the same on every form of bob's pages.
    let bobs_page = form_token(
        &get_with_session(&t.console_url("reload"), &bob, BROWSER_ACCEPT)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(bobs_page, token, "one token per session");

    // A form larger than the console takes (64 KiB) is refused, changes nothing, and is
    // recorded as bob's.
    let padded = format!("csrf={token}&pad={}", "x".repeat(70_000));
    let resp = post(&own, padded).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_session_works(&t.fx.app_url("/still"), &alice).await;
    // Posts the console has no action for, from another site: refused and recorded as bob's,
    // saying where they came from.
    let unknown = t.console_url("users/00000000-0000-4000-8000-000000000000/end_sessions");
    for (url, status) in [
        (unknown, StatusCode::NOT_FOUND),
        (t.console_url("users"), StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let resp = client()
            .post(&url)
            .header("cookie", format!("portcullis_session={bob}"))
            .header(ACCEPT, BROWSER_ACCEPT)
            .header("origin", "http://evil.test")
            .body(format!("csrf={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{url}");
    }

    // The same post from the console's origin does it.
    let resp = post(&own, format!("csrf={token}")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_session_refused(&t.fx, &t.fx.app_url("/after"), &alice).await;

    // Re-reading the configuration from the console, audited with the refusals.
    let reload = t.console_url("reload");
    let resp = client()
        .post(&reload)
        .header("cookie", format!("portcullis_session={bob}"))
        .header(ACCEPT, BROWSER_ACCEPT)
        .header("origin", own.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().contains("is in use"));
    let text =
        t.fx.px
            .audit_log_until(WAIT, |text| {
                let actions = text.lines().filter(|l| l.contains("\"action\"")).count();
                let forged = text
                    .lines()
                    .filter(|l| l.contains("not sent from the console itself"))
                    .count();
                let too_large = text.contains("larger than the console takes");
                let elsewhere = text
                    .lines()
                    .filter(|l| l.contains("(sent from another origin)"))
                    .count();
                actions == 2 && forged == 4 && too_large && elsewhere == 2
            })
            .await;
    for line in text
        .lines()
        .filter(|l| l.contains("(sent from another origin)"))
    {
        assert!(line.contains("\"user\":\"bob@"), "{line}");
    }
    assert!(text.contains("\"action\":\"end_sessions\""), "{text}");
    assert!(text.contains("\"outcome\":\"reloaded\""), "{text}");
    // Each with where the console was used from.
    for line in text.lines().filter(|l| l.contains("\"action\"")) {
        assert!(line.contains("\"client\":\"127.0.0.1\""), "{line}");
    }
    for line in text
        .lines()
        .filter(|l| l.contains("not sent from the console"))
    {
        assert!(line.contains("\"client\":\"127.0.0.1\""), "{line}");
    }
}

/// Settings a reload cannot apply are named on the console's overview until a restart,
/// whatever made the reload (here `SIGHUP`, not the console's own button).
#[tokio::test(flavor = "multi_thread")]
async fn the_overview_names_settings_that_wait_for_a_restart() {
    let t = Console::start().await;
    let (_, bob) = t.sign_in_alice_and_bob().await;
    let overview = || async {
        get_with_session(&t.console_url(""), &bob, BROWSER_ACCEPT)
            .await
            .text()
            .await
            .unwrap()
    };
    assert!(!overview().await.contains("only after a restart"));
    let debug =
        t.fx.cfg
            .toml()
            .replace("[log]\nlevel = \"info\"", "[log]\nlevel = \"debug\"");
    t.fx.px.rewrite_config(&debug);
    t.fx.px.reload_and_wait().await;
    let page = overview().await;
    assert!(
        page.contains("take effect only after a restart: log."),
        "{page}"
    );
}

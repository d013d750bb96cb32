//! Configuration reload (SIGHUP and file polling): new requests use the new routes, in-flight
//! requests finish, nothing fails meanwhile, and an invalid file keeps the running config.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_tests::client::plain_client;
use portcullis_tests::{ConfigBuilder, Echo, Portcullis, Route, Upstream};
use reqwest::StatusCode;

use crate::get_echo;

/// Waits (bounded) until a request on `url` is answered by `upstream`.
async fn wait_for_upstream(px: &Portcullis, url: &str, upstream: &str, within: Duration) {
    let client = plain_client();
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.get(url).send().await {
            Ok(resp) if resp.status() == 200 => {
                let echo = Echo::parse(&resp.bytes().await.unwrap());
                if echo.upstream == upstream {
                    return;
                }
                last = format!("answered by {}", echo.upstream);
            }
            Ok(resp) => last = format!("status {}", resp.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{url} not answered by {upstream} within {within:?} (last: {last}); output:\n{}",
        px.log()
    );
}

/// Two upstreams, `old` and `new`, and Portcullis routing `app.test` to `old`.
async fn old_and_new() -> (Upstream, Upstream, ConfigBuilder, Portcullis) {
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&old]));
    let px = cfg.start().await;
    (old, new, cfg, px)
}

/// `cfg` with `app.test` routed to `new` instead.
fn to_new(cfg: &ConfigBuilder, new: &Upstream) -> ConfigBuilder {
    cfg.clone()
        .without_routes()
        .route(Route::new("http://app.test", &[new]))
}

#[derive(Default)]
struct LoadStats {
    total: AtomicUsize,
    from_new: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_loses_no_request() {
    let (_old, new, cfg, px) = old_and_new().await;
    let url = cfg.http_url("app.test", "/load");

    const CLIENTS: usize = 4;
    const MAX_REQUESTS: usize = 8000;
    const MAX_TIME: Duration = Duration::from_secs(10);
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut load = Vec::new();
    for _ in 0..CLIENTS {
        let (stats, stop, url) = (stats.clone(), stop.clone(), url.clone());
        load.push(tokio::spawn(async move {
            // Each client keeps its connections alive across the reload.
            let client = plain_client();
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < MAX_TIME
                && stats.total.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS
            {
                match client.get(&url).send().await {
                    Ok(resp) if resp.status() == 200 => match resp.bytes().await {
                        Ok(body) => {
                            if Echo::parse(&body).upstream == "new" {
                                stats.from_new.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => stats.failures.lock().unwrap().push(format!("body: {e}")),
                    },
                    Ok(resp) => stats
                        .failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", resp.status())),
                    Err(e) => stats.failures.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }

    while stats.total.load(Ordering::Relaxed) < 100 && started.elapsed() < MAX_TIME / 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let new_config = to_new(&cfg, &new).toml();
    px.rewrite_config(&new_config);
    for _ in 0..5 {
        px.reload();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Keep the load running until it has seen the new upstream, and a little longer.
    while stats.from_new.load(Ordering::Relaxed) == 0 && started.elapsed() < MAX_TIME {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let failures = stats.failures.lock().unwrap().clone();
    let total = stats.total.load(Ordering::Relaxed).min(MAX_REQUESTS);
    eprintln!(
        "reload under load: ~{total} requests in {:?}, {} answered by the new upstream",
        started.elapsed(),
        stats.from_new.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} of ~{total} requests failed across reloads; first: {:?}",
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        stats.from_new.load(Ordering::Relaxed) > 0,
        "no request was answered by the new upstream during the load ({total} requests)"
    );
    let client = plain_client();
    for _ in 0..20 {
        let echo = get_echo(&client, &url).await;
        assert_eq!(
            echo.upstream, "new",
            "after the reload every request uses the new route"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_request_finishes_across_reload() {
    let (old, new, cfg, px) = old_and_new().await;

    let slow_url = cfg.http_url("app.test", "/slow?ms=1500");
    let slow = tokio::spawn(async move {
        let resp = plain_client().get(&slow_url).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while old.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(old.count(), 1, "the slow request reached the old upstream");

    px.rewrite_config(&to_new(&cfg, &new).toml());
    px.reload();
    wait_for_upstream(
        &px,
        &cfg.http_url("app.test", "/after"),
        "new",
        Duration::from_secs(5),
    )
    .await;

    let (status, body) = slow
        .await
        .unwrap()
        .expect("the in-flight request completes across the reload");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(Echo::parse(&body).upstream, "old");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_new_config_keeps_the_old_one() {
    let (_old, new, cfg, mut px) = old_and_new().await;
    let client = plain_client();
    let url = cfg.http_url("app.test", "/keep");

    let valid_new = to_new(&cfg, &new).toml();
    let invalid = [
        (
            "TOML syntax error",
            format!("{valid_new}\n[[routes]\nfrom = "),
        ),
        (
            "unknown key",
            format!(
                "{valid_new}\n[[routes]]\nfrom = \"http://x.test\"\nto = [\"{}\"]\nbogus = 1\n",
                new.url()
            ),
        ),
        (
            "duplicate route",
            format!(
                "{valid_new}\n[[routes]]\nfrom = \"http://app.test\"\nto = [\"{}\"]\n",
                new.url()
            ),
        ),
    ];
    let refusals = |px: &Portcullis| px.log().matches("configuration not reloaded").count();
    for (what, text) in invalid {
        let before = refusals(&px);
        px.rewrite_config(&text);
        px.reload();
        // Refused (by the signal, or by the file poll before it): a reload not yet made
        // would keep the old configuration too.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while refusals(&px) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: no refusal within 60 s:\n{}",
                px.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            px.try_exit().is_none(),
            "{what}: portcullis exited:\n{}",
            px.log()
        );
        for _ in 0..10 {
            let echo = get_echo(&client, &url).await;
            assert_eq!(
                echo.upstream, "old",
                "{what}: the old config stays in force"
            );
        }
        let resp = client.get(px.admin_url("/readyz")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{what}: still ready");
    }

    // A valid file after the bad ones is still picked up.
    px.rewrite_config(&valid_new);
    px.reload();
    wait_for_upstream(&px, &url, "new", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_change_is_picked_up_without_a_signal() {
    let (_old, new, cfg, px) = old_and_new().await;
    let url = cfg.http_url("app.test", "/poll");
    assert_eq!(get_echo(&plain_client(), &url).await.upstream, "old");

    px.rewrite_config(&to_new(&cfg, &new).toml());
    // reload_poll_interval is 500 ms in the harness' configs.
    wait_for_upstream(&px, &url, "new", Duration::from_secs(5)).await;
}

/// A file whose reload failed for want of something it names (a `file:` secret written after
/// it, as Kubernetes updates a Secret apart from a ConfigMap) is reloaded once that comes,
/// with no further edit or signal.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reload_is_tried_again_until_what_it_lacked_has_come() {
    let (_old, new, cfg, px) = old_and_new().await;
    let url = cfg.http_url("app.test", "/retry");
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("okta-token");
    let reference = format!("file:{}", secret.display());
    let edited = to_new(&cfg, &new).scim("scim.test", &[("okta", &reference)]);
    px.rewrite_config(&edited.toml());
    px.log_until(|log| log.contains("configuration not reloaded"))
        .await;
    assert_eq!(get_echo(&plain_client(), &url).await.upstream, "old");

    std::fs::write(&secret, "okta-scim-token-0123456789abcdef").unwrap();
    // Tried again after one poll (500 ms), then two, four: well within 20 s.
    wait_for_upstream(&px, &url, "new", Duration::from_secs(20)).await;
}

/// A reload that moves a listener (a new port) leaves the socket bound at start serving as it
/// was configured: behind a load balancer that terminates TLS, its requests stay the https
/// ones they were (they were read as plain http, and https routes redirected to themselves).
#[tokio::test(flavor = "multi_thread")]
async fn a_moved_listener_keeps_serving_as_configured_until_the_restart() {
    let up = Upstream::start("app").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .behind_tls_proxy()
        .route(Route::new("https://app.test", &[&up]));
    let px = cfg.start().await;
    let url = cfg.http_url("app.test", "/page");
    let proto = || async {
        let resp = plain_client().get(&url).send().await.expect("an answer");
        assert_eq!(resp.status(), StatusCode::OK, "{}", px.log());
        Echo::parse(&resp.bytes().await.unwrap())
            .header("x-forwarded-proto")
            .map(str::to_owned)
    };
    assert_eq!(proto().await.as_deref(), Some("https"));

    let bound = cfg.http_addr().to_string();
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let moved = elsewhere.local_addr().unwrap().to_string();
    drop(elsewhere);
    let text = cfg.toml();
    assert!(text.contains(&format!("address = \"{bound}\"")), "{text}");
    px.rewrite_config(&text.replace(
        &format!("address = \"{bound}\""),
        &format!("address = \"{moved}\""),
    ));
    px.reload_and_wait().await;
    assert!(
        px.log().contains("after a restart: listeners"),
        "{}",
        px.log()
    );
    assert_eq!(proto().await.as_deref(), Some("https"), "{}", px.log());
}

/// A reload installs what it can at once and names what waits for a restart (threads here),
/// each time, until the file asks again for what is in use.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_names_the_settings_that_wait_for_a_restart() {
    let (_old, new, cfg, px) = old_and_new().await;
    let url = cfg.http_url("app.test", "/restart");
    let waiting = "take effect only after a restart: server.threads";

    let more_threads = to_new(&cfg, &new).server("threads", "1");
    // (The file poll may reload the new file too: counts only grow.)
    let said = || px.log().matches(waiting).count();
    px.rewrite_config(&more_threads.toml());
    px.reload_and_wait().await;
    let once = said();
    assert!(once >= 1, "{}", px.log());
    // The routes changed at once.
    assert_eq!(get_echo(&plain_client(), &url).await.upstream, "new");

    // Still waiting: the process runs as it started.
    px.reload_and_wait().await;
    assert!(said() > once, "{}", px.log());

    // Back to what is in use: nothing waits.
    px.rewrite_config(&cfg.toml());
    px.reload_and_wait().await;
    let log = px.log();
    let last = log.lines().rfind(|l| l.contains("configuration reloaded"));
    assert!(last.is_some_and(|l| !l.contains("restart")), "{log}");
    assert_eq!(get_echo(&plain_client(), &url).await.upstream, "old");
}

/// An edit made while Portcullis starts, after it read its file, is reloaded once it serves:
/// the file poll compares the file with what it started with, not with what it finds later.
/// The start is held in PostgreSQL's handshake: the database is a socket that takes the
/// connection and answers nothing until the file has been edited.
#[tokio::test(flavor = "multi_thread")]
async fn an_edit_made_while_starting_is_reloaded_once_started() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let url = format!(
        "postgres://portcullis@{}/portcullis?sslmode=disable",
        silent.local_addr().unwrap()
    );
    let up = Upstream::start("app").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]))
        .postgres(&url, "5s");
    let px = Portcullis::spawn(&cfg.toml());
    let held = tokio::time::timeout(Duration::from_secs(120), silent.accept())
        .await
        .expect("portcullis connects to its database within 120 s")
        .expect("a connection");
    // Portcullis has read its file: it waits for its database to answer.
    let edited = cfg
        .clone()
        .route(Route::new("http://other.test", &[&up]))
        .toml();
    px.rewrite_config(&edited);
    drop(held);
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !px.log().contains("configuration reloaded") {
        assert!(
            Instant::now() < deadline,
            "the edit was not reloaded within 60 s:\n{}",
            px.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(px.log().contains("config file changed"), "{}", px.log());
}

//! Process lifecycle: `--version`, and SIGTERM draining in-flight requests before exiting 0.

use std::time::{Duration, Instant};

use portcullis_tests::client::plain_client;
use portcullis_tests::process::run;
use portcullis_tests::{ConfigBuilder, Echo, Route, Upstream};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread")]
async fn version_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["--version"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("portcullis") && out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("shutdown_timeout", "\"10s\"")
        .route(Route::new("http://app.test", &[&up]));
    let mut px = cfg.start().await;

    let slow_url = cfg.http_url("app.test", "/slow?ms=1000");
    let slow = tokio::spawn(async move {
        let resp = plain_client().get(&slow_url).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    reached(&up, 1).await;

    let status = px.terminate_within(Duration::from_secs(20)).await;
    let (resp_status, body) = slow
        .await
        .unwrap()
        .expect("the in-flight request completes during shutdown");
    assert_eq!(resp_status, StatusCode::OK);
    assert_eq!(Echo::parse(&body).uri, "/slow?ms=1000");
    assert!(
        status.success(),
        "portcullis exited with {status} after SIGTERM; output:\n{}",
        px.log()
    );
}

/// Ctrl-C (SIGINT) drains as SIGTERM does: the request in flight is answered, and Portcullis
/// exits 0. A second Ctrl-C during the drain stops waiting for what is still in flight.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_drains_and_a_second_one_stops_the_wait() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("shutdown_timeout", "\"120s\"")
        .route(Route::new("http://app.test", &[&up]));
    let in_flight = |ms: u64| {
        let url = cfg.http_url("app.test", &format!("/slow?ms={ms}"));
        tokio::spawn(async move {
            let resp = plain_client().get(&url).send().await?;
            let status = resp.status();
            resp.bytes().await?;
            Ok::<_, reqwest::Error>(status)
        })
    };

    let mut px = cfg.start().await;
    let slow = in_flight(1000);
    reached(&up, 1).await;
    let status = px
        .exit_on(nix::sys::signal::Signal::SIGINT, Duration::from_secs(60))
        .await;
    assert_eq!(slow.await.unwrap().expect("answered"), StatusCode::OK);
    assert!(status.success(), "exited with {status}:\n{}", px.log());

    let mut px = cfg.start().await;
    let _stuck = in_flight(100_000);
    reached(&up, 2).await;
    px.signal(nix::sys::signal::Signal::SIGINT);
    let draining = Instant::now() + Duration::from_secs(10);
    while !px.log().contains("draining before exit") {
        assert!(Instant::now() < draining, "no drain:\n{}", px.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        px.try_exit().is_none(),
        "it waits for the request in flight"
    );
    // Well before the client gives up on the request (30 s).
    let status = px
        .exit_on(nix::sys::signal::Signal::SIGINT, Duration::from_secs(15))
        .await;
    assert!(status.success(), "exited with {status}:\n{}", px.log());
}

/// SIGQUIT (Ctrl-\\, or a `kill -QUIT` for a dump) drains and exits as SIGTERM does. It never
/// hands the listening sockets over (pingora's graceful upgrade) to whoever listens at the
/// upgrade socket: its own process, started with pingora's `-u`, is not Portcullis.
#[tokio::test(flavor = "multi_thread")]
async fn sigquit_drains_and_hands_no_socket_over() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let mut px = cfg.start().await;
    // Where pingora would hand them (`upgrade_sock`, in `data_dir`).
    let upgrade = px.dir().join("data/pingora-upgrade.sock");
    let mallory = std::os::unix::net::UnixListener::bind(&upgrade).expect("the upgrade socket");
    mallory.set_nonblocking(true).unwrap();
    let url = cfg.http_url("app.test", "/slow?ms=1000");
    let slow = tokio::spawn(async move { plain_client().get(&url).send().await });
    reached(&up, 1).await;
    let status = px
        .exit_on(nix::sys::signal::Signal::SIGQUIT, Duration::from_secs(30))
        .await;
    let handed = mallory.accept();
    assert!(
        handed.is_err(),
        "the sockets were handed over:\n{}",
        px.log()
    );
    let answered = slow.await.unwrap().expect("answered");
    assert_eq!(answered.status(), StatusCode::OK, "drained");
    assert!(status.success(), "exited with {status}:\n{}", px.log());
    let log = px.log();
    assert!(
        log.contains("SIGQUIT received: stopping as for SIGTERM") && !log.contains("sending socks"),
        "{log}"
    );
}

/// Waits (bounded) until `up` has seen `count` requests.
async fn reached(up: &Upstream, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.count() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.count(), count, "the slow request reached the upstream");
}

/// A `SIGHUP` while Portcullis reads its configuration (a slow secret file, a slow DNS name:
/// a reload sent right after a start) is no reload and no reason to die: it starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_while_the_configuration_loads_does_not_stop_the_start() {
    use std::os::unix::fs::OpenOptionsExt;
    let secrets = tempfile::tempdir().unwrap();
    let fifo = secrets.path().join("scim-token");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("a fifo");
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]))
        .scim(
            crate::SCIM_HOST,
            &[("okta", &format!("file:{}", fifo.display()))],
        );
    let mut px = portcullis_tests::Portcullis::spawn(&cfg.toml());
    // Opening the fifo to write, without waiting, succeeds once Portcullis opens it to read:
    // it is then loading its configuration, and waits on the secret.
    let bound = Instant::now() + Duration::from_secs(60);
    let mut writer = loop {
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo);
        match opened {
            Ok(writer) => break writer,
            Err(_) => {
                assert!(px.try_exit().is_none(), "exited: {}", px.log());
                assert!(Instant::now() < bound, "the secret is never read");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    px.signal(nix::sys::signal::Signal::SIGHUP);
    std::io::Write::write_all(&mut writer, format!("{}\n", crate::SCIM_TOKEN).as_bytes())
        .expect("the secret is written");
    drop(writer);
    px.wait_ready().await;
    let resp = plain_client()
        .get(cfg.http_url("app.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// `portcullis explain` with no proxy answering opens the directory's file itself, and redb
/// takes the file for the process that opens it: an explain that finds it held says by what,
/// and a start meanwhile waits for it to be let go, not exits.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_waits_for_the_directory_file_another_process_holds() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let mut px = cfg.start().await;
    px.terminate().await;
    let data = px.dir().join("data");
    let held = portcullis_scim::store::redb::RedbStorage::open_as_is(&data).expect("open it");
    let config = px.config_path().display().to_string();
    let explain = [
        "explain",
        "--config",
        &config,
        "--user",
        "a@corp.test",
        "--url",
        "http://app.test/",
    ];
    let out = run(px.dir(), &explain).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("is open in another process")
            && out.stderr.contains("a running Portcullis holds it"),
        "{out:?}"
    );
    // Let go once the start says it waits for it (however long the start takes to get there).
    let log = px.dir().join("portcullis.log");
    let letting_go = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        let waits = || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("is open in another process"))
        };
        while !waits() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(held);
        waits()
    });
    px.restart().await;
    let waited = letting_go.await.expect("let go");
    assert!(waited, "the start did not say it waits: {}", px.log());
    let answer = plain_client()
        .get(cfg.http_url("app.test", "/"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(answer.status(), StatusCode::OK);
}

/// A proxy for calls to identity providers that they cannot go through (SOCKS, which this build
/// does not speak) is refused at start, naming the variable that names it, not taken for an
/// HTTP one to fail every call later.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_calls_to_the_idp_cannot_go_through_is_refused_at_start() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    for (name, proxy) in [
        ("ALL_PROXY", "socks5://127.0.0.1:1"),
        ("https_proxy", "SOCKS5H://proxy.corp.test:1080"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("portcullis.toml");
        std::fs::write(&config, cfg.toml()).expect("write the config");
        let env = [
            ("HTTPS_PROXY", None),
            ("https_proxy", None),
            (name, Some(std::ffi::OsStr::new(proxy))),
        ];
        let (code, stderr) =
            portcullis_tests::process::refused_serve(dir.path(), &config, &env).await;
        assert_eq!(code, Some(1), "{name}={proxy}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{name} in the environment names a proxy other than"
            )),
            "{name}={proxy}: {stderr}"
        );
        assert!(
            !stderr.contains(proxy),
            "the proxy's URL is quoted: {stderr}"
        );
    }
    // One that holds no UTF-8 text is not taken as unset (calls would go direct).
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, cfg.toml()).expect("write the config");
    let unreadable = std::ffi::OsStr::from_bytes(b"http://proxy.corp.test:3128/\xff");
    let env = [("https_proxy", None), ("HTTPS_PROXY", Some(unreadable))];
    let (code, stderr) = portcullis_tests::process::refused_serve(dir.path(), &config, &env).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("HTTPS_PROXY in the environment is not UTF-8 text"),
        "{stderr}"
    );
}

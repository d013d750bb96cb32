//! `portcullis check-config` reports every problem of a bad file with its line and key path,
//! and `serve` refuses the same file before binding any port.

use std::time::{Duration, Instant};

use portcullis_tests::process::{binary, check_config};
use portcullis_tests::{free_port, TestCa};
use tokio::net::TcpStream;

/// A problem the output must report: on the line holding `marker`, at `path`, with a message
/// containing `message` (if given).
struct Expected {
    marker: &'static str,
    path: &'static str,
    message: Option<&'static str>,
}

const fn problem(
    marker: &'static str,
    path: &'static str,
    message: Option<&'static str>,
) -> Expected {
    Expected {
        marker,
        path,
        message,
    }
}

/// 1-based number of the line containing `marker` (markers are TOML comments like `# <A>`).
fn line_of(text: &str, marker: &str) -> usize {
    text.lines()
        .position(|l| l.contains(marker))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("marker {marker} not in config:\n{text}"))
}

/// Asserts `output` has a line `[FILE: ]line N: PATH: MESSAGE` for `expected`.
fn assert_reported(case: &str, text: &str, output: &str, expected: &Expected) {
    let prefix = format!(
        "line {}: {}: ",
        line_of(text, expected.marker),
        expected.path
    );
    // The problem may be prefixed by the file name (`/path/portcullis.toml: line 3: ...`).
    let found = output.lines().map(str::trim).find_map(|l| {
        let at = l.find(&prefix)?;
        (at == 0 || l[..at].ends_with(": ")).then(|| (l, &l[at + prefix.len()..]))
    });
    match found {
        Some((line, message)) => {
            assert!(
                !message.trim().is_empty(),
                "{case}: empty message in {line:?}"
            );
            if let Some(want) = expected.message {
                assert!(
                    message.to_lowercase().contains(&want.to_lowercase()),
                    "{case}: {line:?} should mention {want:?}"
                );
            }
        }
        None => {
            panic!("{case}: no line with {prefix:?} in output:\n{output}\nconfig:\n{text}")
        }
    }
}

fn valid_base(port: u16) -> String {
    format!(
        "data_dir = \"./data\"\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n\
         [[routes]]\nfrom = \"http://app.test\"\nto = [\"http://127.0.0.1:9\"]\n"
    )
}

/// The complete configurations of the setup guides are valid as written, once their
/// placeholders are filled and their files exist.
#[tokio::test(flavor = "multi_thread")]
async fn the_setup_guides_configurations_are_valid() {
    let ca = TestCa::new();
    let cert = ca.leaf("auth", &["auth.corp.example.com"]);
    for guide in ["entra-id.md", "okta.md"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs")
            .join(guide);
        let doc = std::fs::read_to_string(&path).expect("the guide");
        let section = doc
            .split("## 4. A complete configuration")
            .nth(1)
            .expect("a complete configuration section");
        let toml = section
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "a-client-secret-0123456789").unwrap();
        let text = toml
            .replace("/etc/portcullis/tls.pem", &cert.cert.display().to_string())
            .replace(
                "/etc/portcullis/tls-key.pem",
                &cert.key.display().to_string(),
            )
            .replace("/etc/portcullis/entra-client-secret", "secret")
            .replace("/etc/portcullis/okta-client-secret", "secret")
            .replace("<tenant-id>", "72f988bf-86f1-41af-91ab-2d7cd011db47")
            .replace(
                "<application (client) id>",
                "6731de76-14a6-49ae-97bc-6eba6914391e",
            )
            .replace("<sha256 of the secret token>", &"ab".repeat(32))
            .replace("<sha256 of the SCIM token>", &"ab".repeat(32))
            .replace("0.0.0.0:443", &format!("127.0.0.1:{}", free_port()))
            .replace("/var/lib/portcullis", "./data");
        assert!(
            !text.contains('<'),
            "{guide}: a placeholder is left:\n{text}"
        );
        let out = check_config(dir.path(), &text).await;
        assert!(out.status.success(), "{guide}: {out:?}\nconfig:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_accepts_a_valid_file() {
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[admin]\naddress = \"127.0.0.1:{}\"\n\n[[listeners]]\naddress = \"127.0.0.1:{}\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n\n[[routes]]\nfrom = \"https://app.test/v1\"\n\
         to = [\"http://127.0.0.1:9\", \"http://127.0.0.1:10\"]\npreserve_host = true\n",
        valid_base(free_port()),
        free_port(),
        free_port(),
        cert.cert.display(),
        cert.key.display()
    );
    let out = check_config(dir.path(), &text).await;
    assert!(out.status.success(), "{out:?}\nconfig:\n{text}");
    assert_eq!(out.stdout.trim(), "ok", "{out:?}");
    assert!(
        !dir.path().join("data").exists(),
        "check-config must not create data_dir"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_reports_every_problem_with_line_and_path() {
    let port = free_port();
    let base = valid_base(port);
    let cases: Vec<(&str, String, Vec<Expected>)> = vec![
        (
            "unknown key",
            format!("{base}\n[server]\nthreadz = 2 # <A>\n"),
            vec![problem("<A>", "server.threadz", Some("unknown key"))],
        ),
        (
            "two unknown keys",
            format!(
                "colour = \"red\" # <A>\n{base}prezerve_host = true # <B>\n"
            ),
            vec![
                problem("<A>", "colour", Some("unknown key")),
                problem("<B>", "routes[0].prezerve_host", Some("unknown key")),
            ],
        ),
        (
            // A value of the wrong type is reported at its key path, and hides nothing else.
            "a type error beside other problems",
            format!(
                "data_dir = \"./data\"\ncolour = \"red\" # <A>\n\n[[listeners]]\n\
                 address = \"127.0.0.1:{port}\"\n\n[[routes]]\nfrom = 42 # <B>\n\
                 to = [\"http://127.0.0.1:9\"]\n\n[[routes]] # <C>\nfrom = \"http://b.test\"\n\
                 \n[server]\nthreads = \"two\" # <D>\n"
            ),
            vec![
                problem("<A>", "colour", Some("unknown key")),
                problem("<B>", "routes[0].from", Some("expected a string, found an integer")),
                problem("<C>", "routes[1].to", Some("missing")),
                problem("<D>", "server.threads", Some("expected an integer")),
            ],
        ),
        (
            "host name as listener address",
            "data_dir = \"./data\"\n[[listeners]]\naddress = \"localhost:8080\" # <A>\n"
                .to_owned(),
            vec![problem("<A>", "listeners[0].address", None)],
        ),
        (
            "garbage listener address",
            "data_dir = \"./data\"\n[[listeners]]\naddress = \"not an address\" # <A>\n"
                .to_owned(),
            vec![problem("<A>", "listeners[0].address", None)],
        ),
        (
            "missing certificate and key files",
            format!(
                "{base}\n[[listeners]]\naddress = \"127.0.0.1:{}\"\n\
                 tls = {{ cert = \"missing.pem\", key = \"missing-key.pem\" }} # <A>\n",
                free_port()
            ),
            vec![
                problem("<A>", "listeners[1].tls.cert", Some("missing.pem")),
                problem("<A>", "listeners[1].tls.key", Some("missing-key.pem")),
            ],
        ),
        (
            "duplicate route",
            format!("{base}\n[[routes]]\nfrom = \"http://app.test\" # <A>\nto = [\"http://127.0.0.1:9\"]\n"),
            vec![problem("<A>", "routes[1].from", None)],
        ),
        (
            "duplicate listener address",
            format!("{base}\n[[listeners]]\naddress = \"127.0.0.1:{port}\" # <A>\n"),
            vec![problem("<A>", "listeners[1].address", None)],
        ),
        (
            "port in route from",
            format!(
                "data_dir = \"./data\"\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
                 [[routes]]\nfrom = \"http://app.test:8080/x\" # <A>\nto = [\"http://127.0.0.1:9\"]\n"
            ),
            vec![problem("<A>", "routes[0].from", None)],
        ),
        (
            "https route without a TLS listener",
            format!(
                "data_dir = \"./data\"\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
                 [[routes]]\nfrom = \"https://app.test\" # <A>\nto = [\"http://127.0.0.1:9\"]\n"
            ),
            vec![problem("<A>", "routes[0].from", None)],
        ),
        (
            "bad upstream scheme and path",
            format!(
                "data_dir = \"./data\"\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
                 [[routes]]\nfrom = \"http://app.test\"\nto = [\n  \"http://127.0.0.1:9\",\n  \
                 \"ftp://127.0.0.1:21\", # <A>\n  \"http://127.0.0.1:9/base\", # <B>\n]\n"
            ),
            vec![
                problem("<A>", "routes[0].to[1]", None),
                problem("<B>", "routes[0].to[2]", None),
            ],
        ),
        (
            "zero duration",
            format!("{base}\n[server]\nshutdown_timeout = \"0s\" # <A>\n"),
            vec![problem("<A>", "server.shutdown_timeout", None)],
        ),
        (
            "several problems in one file",
            "data_dir = \"./data\"\nbogus = 1 # <A>\n[[listeners]]\naddress = \"nowhere\" # <B>\n\
             [[routes]]\nfrom = \"http://app.test\"\nto = [\"gopher://127.0.0.1\"] # <C>\n\
             websocket = true # <D>\n"
                .to_owned(),
            vec![
                problem("<A>", "bogus", Some("unknown key")),
                problem("<B>", "listeners[0].address", None),
                problem("<C>", "routes[0].to[0]", None),
                problem("<D>", "routes[0].websocket", Some("unknown key")),
            ],
        ),
    ];

    let mut failures = Vec::new();
    for (case, text, expected) in &cases {
        let dir = tempfile::tempdir().unwrap();
        let out = check_config(dir.path(), text).await;
        let output = format!("{}{}", out.stdout, out.stderr);
        let result = std::panic::catch_unwind(|| {
            assert!(!out.status.success(), "{case}: exit status {}", out.status);
            assert!(
                !out.stdout.lines().any(|l| l.trim() == "ok"),
                "{case}: printed ok"
            );
            for e in expected {
                assert_reported(case, text, &output, e);
            }
        });
        if let Err(panic) = result {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(msg);
        }
    }
    // Every case is run and every failing one reported, like the command under test.
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_a_bad_file_before_binding() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}\n[server]\nthreadz = 2 # <A>\n", valid_base(port));
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, &text).unwrap();

    let mut child = tokio::process::Command::new(binary())
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Probe the listener port for as long as the process lives.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut bound = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            bound = true;
        }
        assert!(
            Instant::now() < deadline,
            "serve with a bad config still running after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "serve exited {status} on a bad config");
    assert!(
        !bound,
        "serve bound the listener port before rejecting the config"
    );
    assert!(
        !dir.path().join("data").exists(),
        "serve created data_dir before rejecting the config"
    );
    assert_reported(
        "serve",
        &text,
        &stderr,
        &problem("<A>", "server.threadz", Some("unknown key")),
    );
}

/// `rotate-assertion-key` on a server with its keys in `data_dir` says the key is published
/// within a minute (the server reads the key directory every minute), and warns of a
/// `--publish-for` under two minutes: upstreams caching the key set (60 s) could meet the key
/// signing before they have it.
#[tokio::test(flavor = "multi_thread")]
async fn rotating_the_assertion_key_in_data_dir_says_when_it_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, valid_base(free_port())).unwrap();
    let config = path.display().to_string();
    // Before the first start there is no data_dir: refused, none made.
    let args = ["rotate-assertion-key", "--config", &config];
    let before = portcullis_tests::process::run(dir.path(), &args).await;
    assert_eq!(before.status.code(), Some(1), "{}", before.stderr);
    assert!(before.stderr.contains("first start"), "{}", before.stderr);
    assert!(!dir.path().join("data").exists());
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let rotate = |publish_for: &'static str| {
        let config = config.clone();
        let dir = dir.path().to_owned();
        async move {
            let args = [
                "rotate-assertion-key",
                "--config",
                &config,
                "--publish-for",
                publish_for,
            ];
            portcullis_tests::process::run(&dir, &args).await
        }
    };
    let soon = rotate("30s").await;
    assert_eq!(soon.status.code(), Some(0), "{}", soon.stderr);
    assert!(
        soon.stdout
            .contains("published by the running server within a minute; it signs from"),
        "{}",
        soon.stdout
    );
    assert!(
        soon.stderr.contains("--publish-for 120s or more"),
        "{}",
        soon.stderr
    );
    let later = rotate("3m").await;
    assert_eq!(later.status.code(), Some(0), "{}", later.stderr);
    assert!(!later.stderr.contains("warning"), "{}", later.stderr);
}

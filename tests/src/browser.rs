//! A real headless Chromium (Debian's `chromium`) driven over W3C WebDriver by Debian's
//! `chromedriver`, for tests that need a browser: redirects, cookies, forms, scripts.
//!
//! Each [`Browser`] has its own chromedriver (on a port it picks itself, `--port=0`), its own
//! Chromium with a fresh profile in a temporary directory, and every host name resolved to
//! 127.0.0.1 (`--host-resolver-rules`), so `http://app.test:PORT/` reaches a local server.
//! Both run in a process group of their own that is killed when the `Browser` is dropped.
//! The WebDriver protocol is plain JSON over HTTP, spoken here with reqwest.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long chromedriver may take to listen.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts of chromedriver tried when the port it picked is taken (see [`start_driver`]).
const DRIVER_ATTEMPTS: u32 = 5;
/// How long one WebDriver command may take (a navigation waits for the page load).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(45);
/// Page-load limit inside Chromium, below [`COMMAND_TIMEOUT`].
const PAGE_LOAD_MS: u64 = 30_000;
/// How long `find` keeps looking for an element that is not there yet.
const IMPLICIT_WAIT_MS: u64 = 5_000;
/// The W3C key of an element reference in WebDriver JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Flags every test Chromium gets: headless, no sandbox (we run as root), and no background
/// traffic, which this machine's closed network would refuse noisily.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--password-store=basic",
    "--window-size=1280,900",
    // Tests speak plain http to made-up hosts; never try https first.
    "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable,HttpsFirstModeV2ForEngagedSites",
];

/// What to start a [`Browser`] with.
#[derive(Debug, Clone)]
pub struct BrowserOptions {
    /// `--host-resolver-rules`; default `MAP * 127.0.0.1` (every name is this machine).
    pub host_resolver_rules: String,
    /// More Chromium flags.
    pub extra_args: Vec<String>,
    /// Accept any TLS certificate (default true: tests use throw-away CAs).
    pub accept_insecure_certs: bool,
    /// Run pages' scripts (default true); false starts Chromium with scripts off.
    pub javascript: bool,
}

impl Default for BrowserOptions {
    fn default() -> BrowserOptions {
        BrowserOptions {
            host_resolver_rules: "MAP * 127.0.0.1".to_owned(),
            extra_args: Vec::new(),
            accept_insecure_certs: true,
            javascript: true,
        }
    }
}

/// A cookie as WebDriver reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrowserCookie {
    pub name: String,
    pub value: String,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub secure: bool,
    #[serde(default)]
    pub http_only: bool,
    #[serde(default)]
    pub same_site: Option<String>,
    /// Seconds since the epoch; `None` for a session cookie.
    #[serde(default)]
    pub expiry: Option<u64>,
}

/// A running headless Chromium under chromedriver with one WebDriver session.
pub struct Browser {
    driver: Option<Child>,
    base: String,
    session: String,
    http: reqwest::Client,
    profile: TempDir,
    log_path: PathBuf,
}

/// Starts chromedriver, logging to `log_path`; returns it and the port it listens on.
async fn start_driver(log_path: &Path) -> (Child, u16) {
    'attempts: for attempt in 1..=DRIVER_ATTEMPTS {
        let log = File::create(log_path).expect("create chromedriver log");
        let driver_bin = chromedriver_binary();
        let mut cmd = Command::new(&driver_bin);
        cmd.arg("--port=0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log)
            // Its own process group, so that Drop can end chromedriver and every Chromium
            // process it started, and nothing else.
            .process_group(0);
        let mut driver = cmd.spawn().unwrap_or_else(|e| {
                panic!("spawn {driver_bin}: {e} (install chromium and chromium-driver: scripts/deps.sh test)")
            });

        let deadline = Instant::now() + DRIVER_TIMEOUT;
        let port = loop {
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            if let Some(port) = started_port(&text) {
                break port;
            }
            if let Ok(Some(status)) = driver.try_wait() {
                // With `--port=0` it picks a port for one address family, then binds the
                // same one for the other, where something else may hold it: start again.
                if text.contains("Address already in use") && attempt < DRIVER_ATTEMPTS {
                    continue 'attempts;
                }
                panic!("chromedriver exited with {status} before listening:\n{text}");
            }
            if Instant::now() > deadline {
                let report = crate::diagnose::report(driver.id(), DRIVER_TIMEOUT);
                kill_group(&mut driver);
                panic!(
                    "chromedriver not listening after {DRIVER_TIMEOUT:?}\n{report}\
                         ----- its output -----\n{text}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        return (driver, port);
    }
    unreachable!("the last attempt returns or panics")
}

impl Browser {
    /// Starts chromedriver and Chromium with [`BrowserOptions::default`].
    pub async fn start() -> Browser {
        Browser::start_with(BrowserOptions::default()).await
    }

    pub async fn start_with(options: BrowserOptions) -> Browser {
        let profile = tempfile::tempdir().expect("tempdir for the Chromium profile");
        let log_path = profile.path().join("chromedriver.log");
        let (driver, port) = start_driver(&log_path).await;

        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(COMMAND_TIMEOUT)
            .build()
            .expect("build WebDriver client");
        let base = format!("http://127.0.0.1:{port}");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ));
        args.push(format!(
            "--host-resolver-rules={}",
            options.host_resolver_rules
        ));
        if !options.javascript {
            args.push("--blink-settings=scriptEnabled=false".to_owned());
        }
        args.extend(options.extra_args);
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": options.accept_insecure_certs,
                    "pageLoadStrategy": "normal",
                    "timeouts": { "implicit": IMPLICIT_WAIT_MS, "pageLoad": PAGE_LOAD_MS, "script": 10_000 },
                    "goog:chromeOptions": { "binary": chromium_binary(), "args": args },
                }
            }
        });
        let mut browser = Browser {
            driver: Some(driver),
            base,
            session: String::new(),
            http,
            profile,
            log_path,
        };
        let v = browser
            .command("POST", "/session", Some(capabilities))
            .await;
        browser.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new session answered {v}"))
            .to_owned();
        browser
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.session_cmd("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn current_url(&self) -> String {
        let v = self.session_cmd("GET", "/url", None).await;
        v.as_str().expect("url is a string").to_owned()
    }

    pub async fn title(&self) -> String {
        let v = self.session_cmd("GET", "/title", None).await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Clears the input matching `css` (waiting up to a few seconds for it) and types `text`.
    pub async fn fill(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.session_cmd("POST", &format!("/element/{el}/clear"), Some(json!({})))
            .await;
        self.session_cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Clicks the element matching `css` (waiting up to a few seconds for it).
    pub async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.session_cmd("POST", &format!("/element/{el}/click"), Some(json!({})))
            .await;
    }

    /// Whether an element matches `css` now (no waiting).
    pub async fn exists(&self, css: &str) -> bool {
        let v = self
            .session_cmd_raw(
                "POST",
                "/execute/sync",
                Some(json!({
                    "script": "return document.querySelector(arguments[0]) !== null;",
                    "args": [css],
                })),
            )
            .await;
        v.1["value"].as_bool().unwrap_or(false)
    }

    /// The visible text of the page (`document.body.innerText`).
    pub async fn page_text(&self) -> String {
        let v = self
            .execute(
                "return document.body ? document.body.innerText : '';",
                json!([]),
            )
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The page's HTML as the browser has it now.
    pub async fn page_source(&self) -> String {
        let v = self.session_cmd("GET", "/source", None).await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page; returns its value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.session_cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// The cookies the current page can see (`HttpOnly` ones included).
    pub async fn cookies(&self) -> Vec<BrowserCookie> {
        let v = self.session_cmd("GET", "/cookie", None).await;
        serde_json::from_value(v).expect("cookies parse")
    }

    /// Every cookie in the profile, whatever the current page (through the DevTools protocol).
    pub async fn all_cookies(&self) -> Vec<BrowserCookie> {
        let v = self
            .session_cmd(
                "POST",
                "/goog/cdp/execute",
                Some(json!({ "cmd": "Network.getAllCookies", "params": {} })),
            )
            .await;
        v["cookies"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|c| BrowserCookie {
                        name: c["name"].as_str().unwrap_or_default().to_owned(),
                        value: c["value"].as_str().unwrap_or_default().to_owned(),
                        domain: c["domain"].as_str().unwrap_or_default().to_owned(),
                        path: c["path"].as_str().unwrap_or_default().to_owned(),
                        secure: c["secure"].as_bool().unwrap_or(false),
                        http_only: c["httpOnly"].as_bool().unwrap_or(false),
                        same_site: c["sameSite"].as_str().map(str::to_owned),
                        expiry: c["expires"].as_f64().filter(|e| *e > 0.0).map(|e| e as u64),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cookie named `name` visible to the current page.
    pub async fn cookie(&self, name: &str) -> Option<BrowserCookie> {
        self.cookies().await.into_iter().find(|c| c.name == name)
    }

    /// Deletes every cookie of the current page's domain.
    pub async fn delete_cookies(&self) {
        self.session_cmd("DELETE", "/cookie", None).await;
    }

    /// Polls the current URL until `predicate` holds or `timeout` passes (then panics with
    /// the URL and the page text). Returns the URL that matched.
    pub async fn wait_for_url(
        &self,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let url = self.current_url().await;
            if predicate(&url) {
                return url;
            }
            if Instant::now() > deadline {
                panic!(
                    "the browser's URL did not match within {timeout:?}; it is {url}, showing:\n{}",
                    self.page_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the page text until it contains `needle` or `timeout` passes (then panics).
    pub async fn wait_for_text(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.page_text().await;
            if text.contains(needle) {
                return text;
            }
            if Instant::now() > deadline {
                panic!(
                    "the page at {} did not show {needle:?} within {timeout:?}; it shows:\n{text}",
                    self.current_url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes a PNG screenshot of the viewport to `path` (to look at when a test fails).
    pub async fn screenshot(&self, path: &Path) {
        let v = self.session_cmd("GET", "/screenshot", None).await;
        let png = STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// What chromedriver printed so far.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The profile's temporary directory.
    pub fn profile_dir(&self) -> &Path {
        self.profile.path()
    }

    /// Ends the WebDriver session (Chromium quits) and chromedriver.
    pub async fn quit(mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = self.try_command("DELETE", &path, None).await;
            self.session.clear();
        }
        if let Some(mut driver) = self.driver.take() {
            kill_group(&mut driver);
        }
    }

    async fn find(&self, css: &str) -> String {
        let (status, v) = self
            .session_cmd_raw(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        if status != 200 {
            panic!(
                "no element matches {css:?} at {} ({}); the page shows:\n{}",
                self.current_url().await,
                v["value"]["message"].as_str().unwrap_or_default(),
                self.page_text().await
            );
        }
        v["value"][ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("element reference missing in {v}"))
            .to_owned()
    }

    async fn session_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let full = format!("/session/{}{path}", self.session);
        self.command(method, &full, body).await
    }

    async fn session_cmd_raw(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let full = format!("/session/{}{path}", self.session);
        match self.try_command(method, &full, body).await {
            Ok(answer) => answer,
            Err(e) => panic!("WebDriver {method} {full}: {e}"),
        }
    }

    /// Sends one WebDriver command and returns its `value`; panics on a WebDriver error.
    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        match self.try_command(method, path, body).await {
            Ok((200, mut v)) => v["value"].take(),
            Ok((status, v)) => panic!(
                "WebDriver {method} {path} failed ({status}): {} {}\nchromedriver log:\n{}",
                v["value"]["error"].as_str().unwrap_or_default(),
                v["value"]["message"].as_str().unwrap_or_default(),
                self.driver_log()
            ),
            Err(e) => panic!(
                "WebDriver {method} {path}: {e}\nchromedriver log:\n{}",
                self.driver_log()
            ),
        }
    }

    async fn try_command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
        let mut req = self.http.request(method, url);
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- chromedriver log -----\n{}\n-----", self.driver_log());
        }
        if !self.session.is_empty() {
            // Ask Chromium to quit cleanly first (a blocking request: Drop cannot await).
            delete_session_blocking(&self.base, &self.session);
        }
        if let Some(mut driver) = self.driver.take() {
            kill_group(&mut driver);
        }
    }
}

/// Kills chromedriver's process group (chromedriver and the Chromium it started) and reaps it.
fn kill_group(driver: &mut Child) {
    if let Ok(pid) = i32::try_from(driver.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = driver.kill();
    let _ = driver.wait();
}

fn delete_session_blocking(base: &str, session: &str) {
    let Some(addr) = base.strip_prefix("http://") else {
        return;
    };
    let Ok(addr) = addr.parse() else { return };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }
}

/// The port in chromedriver's "ChromeDriver was started successfully on port N." line.
fn started_port(log: &str) -> Option<u16> {
    log.lines().find_map(|l| {
        let rest = l.split("started successfully on port ").nth(1)?;
        rest.trim_end_matches('.').trim().parse().ok()
    })
}

fn chromedriver_binary() -> String {
    std::env::var("PORTCULLIS_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned())
}

/// Debian's Chromium: the real binary rather than the `/usr/bin/chromium` shell wrapper, so
/// the process chromedriver watches is Chromium itself.
fn chromium_binary() -> String {
    if let Ok(path) = std::env::var("PORTCULLIS_CHROMIUM") {
        return path;
    }
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .iter()
        .find(|p| Path::new(p).is_file())
        .map_or_else(|| "chromium".to_owned(), |p| (*p).to_owned())
}

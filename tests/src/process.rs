//! Running the real `portcullis` binary: `serve` as a child process killed on drop, and the
//! one-shot commands (`check-config`, `--version`).

use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long `start` waits for `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(40);
/// How long a one-shot command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// The `portcullis` binary built next to this test executable
/// (`target/debug/deps/it-…` → `target/debug/portcullis`), or `$PORTCULLIS_BIN`.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTCULLIS_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidate = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(format!("portcullis{}", std::env::consts::EXE_SUFFIX)))
        .find(|p| p.is_file());
    match candidate {
        Some(path) => path,
        None => panic!(
            "the portcullis binary was not found next to {} (looked in target/debug/): \
             run `cargo build -p portcullis` first, or set PORTCULLIS_BIN",
            exe.display()
        ),
    }
}

/// A running `portcullis serve`. Killed (SIGKILL) when dropped; if the test is panicking, its
/// output is printed first.
pub struct Portcullis {
    child: Option<Child>,
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    admin: SocketAddr,
    exit: Option<ExitStatus>,
    /// Added to the process' environment, at every start.
    env: Vec<(String, String)>,
}

impl Portcullis {
    /// Waits, up to `timeout`, until the audit log (`data/audit.jsonl`) satisfies `done`;
    /// returns its text. Records reach the log just after what they record, from the audit
    /// writer thread. Panics with the log when the time is up.
    pub async fn audit_log_until(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let log = self.dir().join("data/audit.jsonl");
        let until = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < until,
                "the audit log never got there:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes `config` to a temporary directory, spawns `portcullis serve --config FILE` and
    /// waits (bounded) until `GET /readyz` on the config's `[admin] address` answers 200.
    /// The process runs in that directory, so a relative `data_dir` lives there too.
    pub async fn start(config: &str) -> Portcullis {
        let mut px = Portcullis::spawn(config);
        px.wait_ready().await;
        px
    }

    /// Like [`Portcullis::start`], with `env` added to the process' environment.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Portcullis {
        let mut px = Portcullis::spawn_with_env(config, env);
        px.wait_ready().await;
        px
    }

    /// Like [`Portcullis::start`], without waiting for `/readyz`.
    pub fn spawn(config: &str) -> Portcullis {
        Portcullis::spawn_with_env(config, &[])
    }

    fn spawn_with_env(config: &str, env: &[(&str, &str)]) -> Portcullis {
        let admin = admin_address(config);
        let dir = tempfile::tempdir().expect("tempdir for portcullis");
        let config_path = dir.path().join("portcullis.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.path().join("portcullis.log");
        File::create(&log_path).expect("create log file");
        let env: Vec<_> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let child = spawn_serve(dir.path(), &config_path, &log_path, &env);
        Portcullis {
            env,
            child: Some(child),
            dir,
            config_path,
            log_path,
            admin,
            exit: None,
        }
    }

    /// Kills the process with `SIGKILL`, as a crash would, and reaps it. Nothing is flushed
    /// or closed by the process itself.
    pub fn kill_hard(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        let mut child = self.child.take().expect("portcullis was already reaped");
        let _ = kill(
            Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32")),
            Signal::SIGKILL,
        );
        let status = child.wait().expect("wait for killed portcullis");
        self.exit = Some(status);
        status
    }

    /// Starts `portcullis serve` again on the same config file in the same directory (so the
    /// same `data_dir` and ports) after the previous process exited, and waits until ready.
    /// Its output is appended to the same log.
    pub async fn restart(&mut self) {
        if self.child.is_some() && self.try_exit().is_none() {
            panic!("Portcullis::restart: the previous process is still running");
        }
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .expect("open log file");
        let _ = writeln!(log, "----- harness: restarting portcullis -----");
        self.child = Some(spawn_serve(
            self.dir.path(),
            &self.config_path,
            &self.log_path,
            &self.env,
        ));
        self.exit = None;
        self.admin = admin_address(&self.config());
        self.wait_ready().await;
    }

    /// Waits (bounded) until `GET /readyz` answers 200; panics with a diagnosis otherwise.
    pub async fn wait_ready(&mut self) {
        let client = crate::client::plain_client();
        let url = self.admin_url("/readyz");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "portcullis exited with {status} before becoming ready; config:\n{}\noutput:\n{}",
                    self.config(),
                    self.log()
                );
            }
            if let Ok(resp) = client.get(&url).send().await {
                if resp.status() == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                let report = self
                    .child
                    .as_ref()
                    .map(|c| crate::diagnose::report(c.id(), READY_TIMEOUT))
                    .unwrap_or_default();
                panic!(
                    "portcullis not ready after {READY_TIMEOUT:?} ({url})\n{report}config:\n{}\n\
                     output:\n{}",
                    self.config(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://<admin address><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The config file as it is now.
    pub fn config(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits, up to 10 s, until its output satisfies `done`; returns it. Log lines are written
    /// in batches, a moment after what they say. Panics with the output when the time is up.
    pub async fn log_until(&self, done: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if done(&log) {
                return log;
            }
            assert!(Instant::now() < until, "the log never got there:\n{log}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn pid(&self) -> Pid {
        let child = self.child.as_ref().expect("portcullis was already reaped");
        Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"))
    }

    /// Replaces the config file atomically (write + rename), so the file poller never reads a
    /// half-written file. Does not signal the process.
    pub fn rewrite_config(&self, text: &str) {
        let tmp = self.dir.path().join("portcullis.toml.new");
        std::fs::write(&tmp, text).expect("write new config");
        std::fs::rename(&tmp, &self.config_path).expect("replace config");
    }

    /// The config file with `old` replaced by `new` in its section `[section]` (which must have
    /// it), from that section's header on.
    pub fn config_with(&self, section: &str, old: &str, new: &str) -> String {
        let config = self.config();
        let (head, rest) = config
            .split_once(section)
            .unwrap_or_else(|| panic!("no {section} in:\n{config}"));
        assert!(rest.contains(old), "no `{old}` in {section}:\n{config}");
        format!("{head}{section}{}", rest.replacen(old, new, 1))
    }

    /// Rewrites the config file as [`Portcullis::config_with`] says and reloads it, waiting
    /// until it is installed.
    pub async fn reload_with(&self, section: &str, old: &str, new: &str) {
        self.rewrite_config(&self.config_with(section, old, new));
        self.reload_and_wait().await;
    }

    /// Sends `SIGHUP`.
    pub fn reload(&self) {
        self.signal(Signal::SIGHUP);
    }

    /// Sends `SIGHUP` and waits (bounded) until the log says the configuration was reloaded;
    /// panics, with the log, if it was refused or nothing was said in time.
    pub async fn reload_and_wait(&self) {
        let count = |log: &str, what: &str| log.matches(what).count();
        let before = self.log();
        let (done, refused) = ("configuration reloaded", "configuration not reloaded");
        self.reload();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.log();
            if count(&log, refused) > count(&before, refused) {
                panic!("the reload was refused:\n{log}");
            }
            if count(&log, done) > count(&before, done) {
                return;
            }
            if Instant::now() > deadline {
                panic!("no reload within {READY_TIMEOUT:?}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal portcullis");
    }

    /// The exit status if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exit = child.try_wait().expect("try_wait portcullis");
            }
        }
        self.exit
    }

    /// Sends `SIGTERM` and waits up to `timeout` for the process to exit.
    pub async fn terminate_within(&mut self, timeout: Duration) -> ExitStatus {
        self.exit_on(Signal::SIGTERM, timeout).await
    }

    /// Sends `signal` and waits up to `timeout` for the process to exit.
    pub async fn exit_on(&mut self, signal: Signal, timeout: Duration) -> ExitStatus {
        self.signal(signal);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "portcullis still running {timeout:?} after {signal:?}; output:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `SIGTERM` and waits up to 30 s for the process to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(30)).await
    }
}

impl Drop for Portcullis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- portcullis config ({}) -----\n{}\n----- portcullis output -----\n{}\n-----",
                self.config_path.display(),
                self.config(),
                self.log()
            );
        }
        if let Some(mut child) = self.child.take() {
            if self.exit.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Spawns `portcullis serve --config <config_path>` in `dir`, appending its output to `log_path`.
fn spawn_serve(dir: &Path, config_path: &Path, log_path: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log_path)
        .expect("open log file");
    Command::new(binary())
        .arg("serve")
        .arg("--config")
        .arg(config_path)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log file"))
        .stderr(log)
        .spawn()
        .expect("spawn portcullis")
}

/// The `[admin] address` of a config text; the harness needs it to probe readiness.
fn admin_address(config: &str) -> SocketAddr {
    let table: toml::Table = match config.parse() {
        Ok(t) => t,
        Err(e) => panic!("Portcullis::start needs a parseable config ({e}):\n{config}"),
    };
    table
        .get("admin")
        .and_then(|a| a.get("address"))
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("Portcullis::start needs `[admin] address = \"IP:port\"`"))
}

/// The result of a one-shot command.
#[derive(Debug)]
pub struct CommandResult {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandResult {
    fn from_output(out: Output) -> CommandResult {
        CommandResult {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `portcullis <args>` in `dir` with a time limit.
pub async fn run(dir: &Path, args: &[&str]) -> CommandResult {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => CommandResult::from_output(out),
        Ok(Err(e)) => panic!("running portcullis {args:?}: {e}"),
        Err(_) => panic!("portcullis {args:?} did not finish within {COMMAND_TIMEOUT:?}"),
    }
}

/// Runs `portcullis serve` on `config` in `dir`, with `env` set (`None`: removed), and waits
/// for it to stop (it must, within a minute, refusing to start): its exit code and stderr.
pub async fn refused_serve(
    dir: &Path,
    config: &Path,
    env: &[(&str, Option<&std::ffi::OsStr>)],
) -> (Option<i32>, String) {
    let mut serve = tokio::process::Command::new(binary());
    serve
        .arg("serve")
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        match value {
            Some(value) => serve.env(name, value),
            None => serve.env_remove(name),
        };
    }
    let out = tokio::time::timeout(Duration::from_secs(60), serve.output())
        .await
        .expect("serve stops")
        .expect("serve runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    (out.status.code(), stderr)
}

/// Writes `config` to `<dir>/portcullis.toml` and runs `portcullis check-config` on it.
pub async fn check_config(dir: &Path, config: &str) -> CommandResult {
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.display().to_string();
    run(dir, &["check-config", &path]).await
}

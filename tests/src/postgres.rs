//! A throw-away PostgreSQL server: Debian's `postgresql` binaries, a cluster `initdb` makes in a
//! temporary directory, listening on a free loopback port with its socket in that directory.
//! Run as the `postgres` user when the tests run as root (PostgreSQL refuses to run as root).
//! Stopped (fast shutdown) and removed when dropped; [`Postgres::stop`] and
//! [`Postgres::start_again`] restart it on the same data and port, as an outage would.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a cluster may take to accept connections (a loaded 2-core machine is slow to
/// fsync a fresh cluster).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Postgres {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (/usr/lib/postgresql): run scripts/deps.sh test")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program`, run as the `postgres` user when this process is root (no wrapper process, so
/// signals reach the server itself).
fn command(program: &Path) -> Command {
    let mut command = Command::new(program);
    if let Some(user) = postgres_user() {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        command.env("HOME", &user.dir);
    }
    command
}

/// The `postgres` account, when this process is root.
fn postgres_user() -> Option<nix::unistd::User> {
    if !is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .expect("read the user database")
        .expect("no `postgres` user: is the postgresql package installed?");
    Some(user)
}

/// A temporary directory for a cluster, owned by the user the server runs as.
fn cluster_dir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir for PostgreSQL");
    if let Some(user) = postgres_user() {
        nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))
            .expect("chown the PostgreSQL directory");
    }
    dir
}

impl Postgres {
    /// Creates a cluster and starts it; returns once it accepts connections.
    pub async fn start() -> Postgres {
        let dir = cluster_dir("portcullis-pg-");
        let data = dir.path().join("data");
        let output = command(&bin_dir().join("initdb"))
            .arg("-D")
            .arg(&data)
            // No locale: the caller's (`LANG` passed through ssh) may not exist here.
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut pg = Postgres {
            dir,
            port: crate::free_port(),
            child: None,
        };
        pg.start_again().await;
        pg
    }

    /// A connection URL for the `postgres` database (trust authentication, no TLS).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server (again) on the same data and port; returns once it accepts
    /// connections.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "PostgreSQL is already running");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.log_path())
            .expect("open the PostgreSQL log");
        let child = command(&bin_dir().join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("postgres exited with {status}:\n{}", self.log());
            }
            if self.query("SELECT 1").await.is_ok() {
                return;
            }
            if Instant::now() > deadline {
                let report = self
                    .child
                    .as_ref()
                    .map(|c| crate::diagnose::report(c.id(), READY_TIMEOUT))
                    .unwrap_or_default();
                panic!(
                    "PostgreSQL did not accept connections within {READY_TIMEOUT:?}\n{report}{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Copies the stopped server's data aside, for [`Postgres::restore_copy`].
    pub fn keep_copy(&self) {
        self.copy_data("data", "data.kept");
    }

    /// A standby of this server as it was when [`Postgres::keep_copy`] kept its data: started
    /// on that copy, on a port of its own, in recovery (read-only) and never receiving what
    /// this server commits since, as a standby far behind its primary.
    pub async fn start_standby(&self) -> Postgres {
        let dir = cluster_dir("portcullis-pg-standby-");
        let status = command(Path::new("cp"))
            .arg("-a")
            .arg(self.dir.path().join("data.kept"))
            .arg(dir.path().join("data"))
            .status()
            .expect("run cp");
        assert!(status.success(), "cp -a of the kept data failed");
        let signal = command(Path::new("touch"))
            .arg(dir.path().join("data").join("standby.signal"))
            .status()
            .expect("run touch");
        assert!(signal.success(), "touch standby.signal failed");
        let mut standby = Postgres {
            dir,
            port: crate::free_port(),
            child: None,
        };
        standby.start_again().await;
        standby
    }

    /// Puts the data [`Postgres::keep_copy`] kept back in place of the stopped server's: what
    /// was committed since is lost, as when a backup is restored, or a standby that had not
    /// received it is promoted.
    pub fn restore_copy(&self) {
        let data = self.dir.path().join("data");
        std::fs::remove_dir_all(&data).expect("remove the PostgreSQL data");
        self.copy_data("data.kept", "data");
    }

    /// `cp -a` (owner and modes kept, as the server requires) of `from` to `to` in the cluster's
    /// directory, while the server is stopped.
    fn copy_data(&self, from: &str, to: &str) {
        assert!(self.child.is_none(), "PostgreSQL is running");
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.dir.path().join(from))
            .arg(self.dir.path().join(to))
            .status()
            .expect("run cp");
        assert!(status.success(), "cp -a {from} {to} failed");
    }

    /// Stops the server with a fast shutdown (clients are disconnected) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
            let _ = kill(pid, Signal::SIGINT);
            let _ = child.wait();
        }
    }

    /// Runs `sql` on a fresh connection; the rows as text.
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let messages = client.simple_query(sql).await.map_err(|e| e.to_string())?;
        drop(client);
        let _ = driver.await;
        Ok(messages
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

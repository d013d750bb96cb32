//! The shared backend: one PostgreSQL database behind several replicas.
//!
//! Every replica keeps the whole directory in its own in-memory index, as with redb, and
//! decides requests from it alone. What PostgreSQL adds is one order of changes for the fleet
//! and a way to know that every replica has them:
//!
//! - **One sequence, no gaps.** A batch commits in one statement (one implicit transaction)
//!   that locks the `seq` row of `directory_meta` (`FOR UPDATE`) and writes only if the batch
//!   was built on that sequence. The lock is held until the commit, so batches commit one at
//!   a time in sequence order: once a reader sees sequence N, every batch below N is visible
//!   too. A batch built on an older directory is refused ([`StoreError::Behind`]); its writer
//!   catches up and builds it again.
//! - **The feed.** Each batch is also kept whole in `directory_feed`, keyed by its sequence,
//!   and its commit notifies `portcullis_feed`. Replicas apply the feed in order; one that
//!   finds a hole (the rows were pruned) reloads in full.
//! - **Leases.** Each replica has a row in `portcullis_replicas`: the sequence it has applied
//!   and a lease, `lease_until`. [`Fleet::follow`] renews the lease only in a statement that
//!   also checks the replica has applied everything committed, and the replica counts its own
//!   lease from *before* it sent the renewal ([`Freshness`]), so it lapses locally no later
//!   than the database says. A replica whose lease has lapsed refuses callers until renewed.
//! - **Settling.** A write is answered once every other replica has applied it or has a
//!   lapsed lease ([`Storage::settle`]); both are judged by the database's clock, which the
//!   leases were set with, or, for a lease that clock counts live too long (stepped back), by
//!   the writer's: once the longest lease granted has passed since the commit, every replica
//!   without the write has stopped counting on its own. So once a write is answered, no
//!   replica can admit anyone on a directory without it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, IsolationLevel, NoTls};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Batch, Change, Entry, Feed, Loaded, Record, Row, Seq, Storage, StoreError};
use crate::schema::ResourceType;

/// The schema version this build knows. A database of a newer version is refused.
///
/// - 1: the directory (resources, memberships, changes, feed) and the replicas' leases.
/// - 2: the entries kept beside the directory ([`super::Entry`]: sessions, sign-in keys), and
///   the audit log ([`AuditLog`]).
/// - 3: Agents and AgenticApplications.
pub const SCHEMA_VERSION: i32 = 3;

/// `sql`, sent by pgpool to the primary whatever its load balancing (a query that begins
/// with a comment is never balanced, unless `allow_sql_comments` is on); PostgreSQL ignores
/// the comment. For the reads of a [`snapshot`], and the other reads of what was committed
/// (the directory's entries and changes, the audit log).
macro_rules! on_primary {
    ($sql:literal) => {
        concat!("/*NO LOAD BALANCE*/ ", $sql)
    };
}

/// The migrations, in order: `MIGRATIONS[v - 1]` takes the schema from `v - 1` to `v`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    r#"
CREATE TABLE directory_meta (key text PRIMARY KEY, value bigint NOT NULL);
INSERT INTO directory_meta VALUES ('seq', 0), ('next_row', 1);
CREATE TABLE directory_users (row_id bigint PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE directory_groups (row_id bigint PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE directory_members (
    group_row bigint NOT NULL,
    member_row bigint NOT NULL,
    PRIMARY KEY (group_row, member_row)
);
CREATE TABLE directory_changes (seq bigint PRIMARY KEY, change bytea NOT NULL);
CREATE TABLE directory_feed (
    seq bigint PRIMARY KEY,
    base bigint NOT NULL,
    batch bytea NOT NULL,
    committed timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE portcullis_replicas (
    id text PRIMARY KEY,
    applied_seq bigint NOT NULL,
    lease_until timestamptz NOT NULL,
    seen timestamptz NOT NULL DEFAULT now()
);
"#,
    r#"
CREATE TABLE directory_entries (
    kind text NOT NULL,
    key text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE portcullis_audit (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    record text NOT NULL
);
"#,
    r#"
CREATE TABLE directory_agents (row_id bigint PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE directory_agentic_applications (row_id bigint PRIMARY KEY, record bytea NOT NULL);
"#,
];

/// Serializes migrations across replicas starting at once (a session advisory lock).
pub const MIGRATION_LOCK: i64 = 0x706f_7274_6375_6c6c; // "portcull"

/// Feed batches read per query while catching up.
const FEED_PAGE: i64 = 64;

/// How long feed batches are kept: a replica that was away longer reloads in full.
const FEED_RETENTION: &str = "1 hour";

/// Slack added to a lease when judging, from this side, that it must have lapsed: more than a
/// clock step (ntpd steps a clock 128 ms or more off; chrony's usual `makestep 1 3` past 1 s,
/// at start). It delays only a write waiting on a replica that stopped renewing.
const CLOCK_MARGIN: Duration = Duration::from_millis(1000);

/// The longest lease a replica is granted: the longest `max_staleness` its file may set (the
/// bound `portcullis_config` checks it against: keep the two the same).
const MAX_LEASE: Duration = Duration::from_secs(60);

/// Settings for [`PgStorage::open`].
#[derive(Clone)]
pub struct PgOptions {
    /// A connection string or URL (it may hold a password: never log it).
    pub url: String,
    pub pool_size: usize,
    pub max_staleness: Duration,
}

/// The shortest silence a connection is given up after (see [`Connector::new`]).
const SILENCE_FLOOR: Duration = Duration::from_millis(500);

fn lock_timeout_setup(max_staleness: Duration) -> String {
    let quarter = (max_staleness / 4).max(Duration::from_millis(50));
    format!("SET lock_timeout = {}", quarter.as_millis())
}

/// The error with its causes (`postgres::Error` alone says only "db error"). Server messages
/// name objects and options, never the connection's password.
fn backend(e: impl std::error::Error) -> StoreError {
    StoreError::Backend(crate::error::with_causes(&e))
}

/// Connects as the URL asks: over TLS (verified against the system's roots) unless
/// `sslmode=disable`.
struct Connector {
    config: postgres::Config,
    /// The longest a connection may go silent: a quarter of `max_staleness`, at least
    /// [`SILENCE_FLOOR`] (see [`Connector::new`]).
    silence: Duration,
    /// `idle_in_transaction_session_timeout` as asked for, in milliseconds.
    idle_ms: u128,
    tls: Option<MakeRustlsConnect>,
}

impl Connector {
    /// `max_staleness` bounds how long a stalled peer may hold anything up.
    fn new(url: &str, max_staleness: Duration) -> Result<Self, StoreError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("the PostgreSQL URL does not parse: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // A replica that stops (paused, partitioned) inside a transaction would keep the
        // sequence row locked, and every other replica's commits and lease renewals would wait
        // on it: the server ends such a session after a quarter of `max_staleness`. A connection
        // whose peer went silent (a firewall or NAT that forgot it, a host cut off) is dropped
        // as quickly: what it sent left unacknowledged that long (slow statements and lock
        // waits are acknowledged, and go on), or a check of an idle one unanswered. The lease
        // is renewed every quarter, over the feed's connection after a catch-up over the
        // writer's: both are given up and made again within the lease. Never sooner than
        // `SILENCE_FLOOR`, though: one lost packet is resent after 200 ms at the soonest, and
        // a link that loses a few would otherwise drop connections (a commit's among them)
        // it keeps. Below a `max_staleness` of 2 s, a silent drop may then lapse the lease.
        let quarter = (max_staleness / 4).max(Duration::from_millis(50));
        let silence = quarter.max(SILENCE_FLOOR);
        // A change is answered once its commit is flushed: a database or role whose default is
        // `synchronous_commit = off` (or `local`, past a synchronous standby) would lose
        // answered changes in a crash (or a failover). Options in the URL come after, and win.
        let options = format!(
            "-c idle_in_transaction_session_timeout={} -c synchronous_commit=on {}",
            quarter.as_millis(),
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim());
        config.tcp_user_timeout(silence);
        config.keepalives_idle(Duration::from_secs(1));
        config.keepalives_interval(Duration::from_secs(1));
        config.keepalives_retries(3);
        config.application_name("portcullis");
        let tls = match config.get_ssl_mode() {
            SslMode::Disable => None,
            _ => {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(backend)?
                .with_root_certificates(roots)
                .with_no_client_auth();
                Some(MakeRustlsConnect::new(tls))
            }
        };
        Ok(Self {
            config,
            silence,
            idle_ms: quarter.as_millis(),
            tls,
        })
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let mut client = self.connect_as_is()?;
        self.check_settings(&mut client)?;
        Ok(client)
    }

    /// A connection, whatever its session's settings (see [`Connector::check_settings`]).
    fn connect_as_is(&self) -> Result<Client, StoreError> {
        let client = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        // With its causes: tokio-postgres says only "error performing TLS handshake" or "db
        // error" itself, not the certificate refused nor the password.
        client.map_err(|e| {
            StoreError::Backend(format!(
                "cannot reach PostgreSQL: {}",
                crate::error::with_causes(&e)
            ))
        })
    }

    /// Whether the session has the settings asked for at connection: a pooler in front may
    /// drop them (PgBouncer's `ignore_startup_parameters = options` does), and the database's
    /// or the role's defaults then stand, `synchronous_commit = off` among them, under which a
    /// change answered could be lost in a crash. Such a connection is refused, saying why.
    ///
    /// So is one whose `search_path` holds a schema where roles other than its owner and this
    /// one may create objects (`public` before PostgreSQL 15): a function made there with
    /// argument types closer to a call's than PostgreSQL's own (`unnest(text[])`) is the one
    /// called (CVE-2018-1058), with this role's rights, by every statement sent here. The
    /// check itself runs with `pg_catalog` alone on the path, so that no such function can
    /// answer it.
    fn check_settings(&self, client: &mut Client) -> Result<(), StoreError> {
        let path = client
            .query_one(
                "SELECT pg_catalog.current_schemas(false)::pg_catalog.text[]",
                &[],
            )
            .map_err(backend)?;
        let path: Vec<String> = path.try_get(0).map_err(backend)?;
        let mut checking = client.transaction().map_err(backend)?;
        checking
            .batch_execute("SET LOCAL search_path = pg_catalog, pg_temp")
            .map_err(backend)?;
        let settings = checking
            .query_one(
                "SELECT current_setting('synchronous_commit'), \
                 (SELECT setting FROM pg_settings \
                  WHERE name = 'idle_in_transaction_session_timeout'), \
                 quote_ident(current_user)",
                &[],
            )
            .map_err(backend)?;
        // Each schema on the path with a role, other than its owner and this one, that may
        // create objects there (`PUBLIC`: anyone), as SQL names them.
        let open = checking
            .query(
                "SELECT DISTINCT quote_ident(n.nspname), \
                 CASE WHEN a.grantee = 0 THEN 'PUBLIC' \
                 ELSE quote_ident(pg_get_userbyid(a.grantee)) END \
                 FROM pg_namespace n \
                 CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a \
                 WHERE n.nspname::text = ANY ($1) AND a.privilege_type = 'CREATE' \
                 AND a.grantee <> n.nspowner \
                 AND a.grantee <> (SELECT oid FROM pg_roles WHERE rolname = current_user) \
                 ORDER BY 1, 2",
                &[&path],
            )
            .map_err(backend)?;
        checking.commit().map_err(backend)?;
        let commit: String = settings.try_get(0).map_err(backend)?;
        let idle: String = settings.try_get(1).map_err(backend)?;
        let user: String = settings.try_get(2).map_err(backend)?;
        if !open.is_empty() {
            let mut schemas = Vec::new();
            let mut revoke = Vec::new();
            for row in &open {
                let schema: String = row.try_get(0).map_err(backend)?;
                let role: String = row.try_get(1).map_err(backend)?;
                schemas.push(format!("{schema} to {role}"));
                revoke.push(format!("REVOKE CREATE ON SCHEMA {schema} FROM {role};"));
            }
            return Err(StoreError::Unsuitable(format!(
                "the session's search_path holds schemas where other roles may create objects \
                 ({}): a function made there could be called by Portcullis' statements in place \
                 of PostgreSQL's own, with this role's rights (CVE-2018-1058); revoke that ({} \
                 and, where a role that does not own the schema makes Portcullis' tables, GRANT \
                 CREATE ON SCHEMA <schema> TO {}), or give Portcullis a schema of its own",
                schemas.join(", "),
                revoke.join(" "),
                user
            )));
        }
        if !matches!(commit.as_str(), "on" | "remote_apply") {
            return Err(StoreError::Unsuitable(format!(
                "the session's synchronous_commit is {commit}, not on: a change answered could \
                 be lost in a crash (a pooler in front that drops startup options, such as \
                 PgBouncer's ignore_startup_parameters = options, leaves the database's default)"
            )));
        }
        if idle.parse::<u128>().ok() != Some(self.idle_ms) {
            return Err(StoreError::Unsuitable(format!(
                "the session's idle_in_transaction_session_timeout is {idle} ms, not the {} ms \
                 asked for at connection (a pooler in front that drops startup options?)",
                self.idle_ms
            )));
        }
        Ok(())
    }
}

/// A connection and when it was last used.
struct Conn {
    client: Client,
    used: Instant,
    /// Statements prepared on this connection (parsed and planned once, not per call).
    prepared: HashMap<&'static str, postgres::Statement>,
}

/// A connection idle this long is checked (one round trip) before it is used: after a
/// server restart, its first query would fail.
const IDLE_CHECK: Duration = Duration::from_millis(100);

impl Conn {
    fn new(client: Client) -> Self {
        Self {
            client,
            used: Instant::now(),
            prepared: HashMap::new(),
        }
    }

    /// `sql`, prepared on this connection the first time it is asked for.
    fn prepare(&mut self, sql: &'static str) -> Result<postgres::Statement, StoreError> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).map_err(backend)?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Whether it is still open: one idle for a while is checked, waiting at most `wait`.
    fn usable(&mut self, wait: Duration) -> bool {
        if self.client.is_closed() {
            return false;
        }
        self.used.elapsed() < IDLE_CHECK || self.client.is_valid(wait).is_ok()
    }
}

/// A few connections for reads, opened on demand and dropped when they fail.
struct Pool {
    connector: Arc<Connector>,
    idle: Mutex<Vec<Conn>>,
    size: usize,
}

impl Pool {
    /// Runs `f` on a pooled connection. The synchronous client drives its own small runtime,
    /// which cannot run on an async runtime's thread: from a thread in a runtime's context,
    /// `f` runs on a short-lived thread of its own, and the caller waits, as it would for a
    /// disk read. (SCIM reads come from blocking tasks, whose threads have that context too,
    /// though they could run it themselves; tokio does not tell the two apart.)
    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.with_here(f);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.with_here(f))
                .join()
                .unwrap_or_else(|_| {
                    Err(StoreError::Backend("a PostgreSQL read panicked".to_owned()))
                })
        })
    }

    fn with_here<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = lock(&self.idle).pop();
        let wait = self.connector.silence;
        let mut conn = match pooled.and_then(|mut conn| conn.usable(wait).then_some(conn)) {
            Some(conn) => conn,
            None => Conn::new(self.connector.connect()?),
        };
        let result = f(&mut conn.client);
        conn.used = Instant::now();
        let mut idle = lock(&self.idle);
        if result.is_ok() && !conn.client.is_closed() && idle.len() < self.size {
            idle.push(conn);
        }
        result
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values (connections) stay usable after a panic elsewhere.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A dedicated connection, reopened after it fails.
struct Dedicated {
    connector: Arc<Connector>,
    client: Option<Conn>,
    /// Run on every new connection (a `LISTEN`, a `SET`).
    setup: String,
}

impl Dedicated {
    fn get(&mut self) -> Result<&mut Conn, StoreError> {
        let wait = self.connector.silence;
        if !self.client.as_mut().is_some_and(|conn| conn.usable(wait)) {
            self.client = None;
            let mut client = self.connector.connect()?;
            if !self.setup.is_empty() {
                client.batch_execute(&self.setup).map_err(backend)?;
            }
            self.client = Some(Conn::new(client));
        }
        let conn = self
            .client
            .as_mut()
            .ok_or_else(|| StoreError::Backend("no connection".to_owned()))?;
        conn.used = Instant::now();
        Ok(conn)
    }

    /// Runs `f`, dropping the connection if it fails (it may be half-way through something).
    fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = f(self.get()?);
        // A refused batch leaves the connection as it was; any other failure may not.
        if matches!(&result, Err(e) if !matches!(e, StoreError::Behind)) {
            self.client = None;
        }
        result
    }
}

/// This replica's lease, as it judges it itself: counted from before the renewal was sent, so
/// it never outlasts the lease the database granted, on `CLOCK_BOOTTIME`, which (unlike the
/// monotonic clock `Instant` reads) keeps counting while the machine is suspended: a host
/// that wakes after a long pause finds its lease over.
pub struct Freshness {
    /// The boot-clock nanoseconds when the lease lapses; 0 while there is none.
    until: AtomicU64,
    max_staleness: Duration,
    /// Why there is no lease, for `/readyz`.
    problem: Mutex<String>,
    /// Asked to leave the fleet ([`Freshness::leave`]), and gone.
    leaving: AtomicBool,
    left: AtomicBool,
}

impl Freshness {
    fn new(max_staleness: Duration) -> Self {
        // In whole milliseconds, as the database grants the lease (`RENEW`): counted here to
        // the nanosecond, `2s 500us` outlived the database's lease by half a millisecond, in
        // which a writer may answer without waiting for this replica.
        let whole_ms = u64::try_from(max_staleness.as_millis()).unwrap_or(u64::MAX);
        Self {
            until: AtomicU64::new(0),
            leaving: AtomicBool::new(false),
            left: AtomicBool::new(false),
            max_staleness: Duration::from_millis(whole_ms),
            problem: Mutex::new("not yet caught up with the directory".to_owned()),
        }
    }

    /// Why the directory is not known to be current (meaningful when it is not).
    pub fn problem(&self) -> String {
        lock(&self.problem).clone()
    }

    /// Whether this replica's directory is known to be current within `max_staleness`.
    pub fn is_current(&self) -> bool {
        boot_nanos() < self.until.load(Ordering::Acquire)
    }

    /// Renewed by a statement sent at `sent` ([`boot_nanos`]). Should it lapse before the
    /// next renewal without a failure to say why, that renewal was late.
    fn renewed(&self, sent: u64) {
        let staleness = u64::try_from(self.max_staleness.as_nanos()).unwrap_or(u64::MAX);
        self.until
            .store(sent.saturating_add(staleness), Ordering::Release);
        *lock(&self.problem) = format!(
            "the lease was not renewed within {:?} (PostgreSQL slow to answer, or this \
             process stalled)",
            self.max_staleness
        );
    }

    /// The feed was lost (`problem` says how): the lease is not renewed until it is back, and
    /// lapses when its time is up, not before. Until then the index still holds every change
    /// answered anywhere: another replica's writer answers without this one only once this
    /// lease has lapsed in the database too (see [`PgStorage::settle`]), which is no sooner.
    /// So a dropped connection (a pooler restarting, a terminated backend) refuses nobody
    /// when it is back within the lease.
    fn lost(&self, problem: String) {
        *lock(&self.problem) = problem;
    }

    /// What is left of the lease as the database now holds it, asked at `sent`
    /// ([`boot_nanos`]): `None` if it holds none. The lease here ends no later: after a
    /// failover, the database that judges this replica's lease may have lost the last renewal,
    /// or run on another clock. True if that cut short a lease that still held here.
    fn held_by_database(&self, sent: u64, left: Option<Duration>) -> bool {
        let ends = left.map_or(0, |left| {
            sent.saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
        });
        let was = self.until.fetch_min(ends, Ordering::AcqRel);
        was > ends && was > boot_nanos()
    }

    fn lapse(&self, problem: String) {
        self.until.store(0, Ordering::Release);
        *lock(&self.problem) = problem;
    }

    pub fn max_staleness(&self) -> Duration {
        self.max_staleness
    }

    /// Whether this replica is leaving the fleet ([`Freshness::leave`]): its process exits.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Leaves the fleet, at shutdown: the lease lapses here, and this replica's row is deleted
    /// so that no writer waits for it to lapse there (up to `max_staleness` per answer during
    /// a rolling restart). Waits (at most `wait`) for the feed's thread to do it; false if it
    /// did not (then writers wait out the lease).
    pub fn leave(&self, wait: Duration) -> bool {
        self.leaving.store(true, Ordering::Release);
        let deadline = Instant::now() + wait;
        while !self.left.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Nanoseconds on `CLOCK_BOOTTIME`; `u64::MAX` (no lease holds) if it cannot be read.
fn boot_nanos() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(t) => u64::try_from(t.tv_sec())
            .ok()
            .and_then(|s| s.checked_mul(1_000_000_000))
            .and_then(|ns| ns.checked_add(u64::try_from(t.tv_nsec()).ok()?))
            .unwrap_or(u64::MAX),
        Err(_) => u64::MAX,
    }
}

pub struct PgStorage {
    /// This process in `portcullis_replicas`.
    replica: String,
    /// The last batch brought into this process' index, and when the database committed it
    /// (its feed row's `committed`, in microseconds; `None` when it has no feed row). The same
    /// sequence number committed at another time is another history: the database lost batches
    /// this replica applied (a restored backup, or a failover to a standby that had not received
    /// them), and then took others in their place. See [`PgStorage::feed`].
    applied: Mutex<(Seq, Option<i64>)>,
    /// The batches this replica committed, or answered a write at without a commit of its own
    /// ([`Storage::answering_at`]), and has not settled yet, with when the database committed
    /// each (as `applied`): settling one asks for that commit, not just its sequence number,
    /// which a failover that lost it may have given another batch. In the order they are
    /// settled (one writer thread adds each as it sends it to be settled; a reload after a
    /// failover can bring a number back). As many as wait to be settled, as the writer's
    /// channel to the settler holds: one dropped could not be told from another commit of its
    /// number.
    unsettled: Mutex<std::collections::VecDeque<(Seq, Option<i64>)>>,
    pool: Pool,
    writer: Mutex<Dedicated>,
    settler: Mutex<Dedicated>,
    freshness: Arc<Freshness>,
    /// The longest lease, in microseconds, a settle has read another replica to hold (at most
    /// the longest `max_staleness` a file may set): each replica's file sets its own (a rolling
    /// restart changes it one replica at a time), and a settle that cannot read their table
    /// asks again until the longest it knows has passed.
    longest_lease_us: AtomicU64,
}

fn table(rt: ResourceType) -> &'static str {
    match rt {
        ResourceType::User => "directory_users",
        ResourceType::Group => "directory_groups",
        ResourceType::Agent => "directory_agents",
        ResourceType::AgenticApplication => "directory_agentic_applications",
    }
}

fn to_sql(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{n} is out of range")))
}

fn from_sql(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{n} is out of range")))
}

/// A feed row's `committed`, in microseconds.
const COMMITTED_US: &str = "(extract(epoch FROM committed) * 1000000)::bigint";

/// When the batch of sequence number `seq` was committed ([`COMMITTED_US`]); `None` without a
/// feed row for it (none yet, or pruned by a build that pruned the last).
fn committed_at(
    client: &mut impl postgres::GenericClient,
    seq: i64,
) -> Result<Option<i64>, StoreError> {
    let query = format!(
        on_primary!("SELECT {COMMITTED_US} FROM directory_feed WHERE seq = $1"),
        COMMITTED_US = COMMITTED_US
    );
    client
        .query_opt(query.as_str(), &[&seq])
        .map_err(backend)?
        .map(|row| row.try_get(0).map_err(backend))
        .transpose()
}

impl PgStorage {
    /// Keeps `seq`'s commit time, `committed` (if known), for its settle (see `unsettled`).
    fn unsettled(&self, seq: Seq, committed: Option<i64>) {
        lock(&self.unsettled).push_back((seq, committed));
    }

    /// The commit time `unsettled` kept for `seq`, taken with those before it: settles come in
    /// the order of `unsettled`, and one before this is not waited for any more. Those after
    /// it are kept for their own. (`None` for a number none was kept for: every commit this
    /// replica settles has one, none dropped; a settle asked for by hand has none.)
    fn settling(&self, seq: Seq) -> Option<i64> {
        let mut unsettled = lock(&self.unsettled);
        let at = unsettled.iter().position(|(s, _)| *s == seq)?;
        let committed = unsettled[at].1;
        unsettled.drain(..=at);
        committed
    }

    /// Whether the primary holds the batch `seq` this replica committed (at `committed_us`, as
    /// [`PgStorage::settling`] has it), read apart from the replicas' table: a `settle` that
    /// cannot read their progress tells a change saved from one that may not be.
    fn holds(
        &self,
        settler: &mut Dedicated,
        seq: i64,
        committed_us: Option<i64>,
    ) -> Result<bool, StoreError> {
        settler.run(|conn| {
            // NULL: a standby, which cannot say what the primary holds.
            let holds = conn.prepare(on_primary!(
                "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
                 WHEN (SELECT value FROM directory_meta WHERE key = 'seq') < $1 THEN false \
                 ELSE $2::bigint IS NULL OR (SELECT \
                 (extract(epoch FROM committed) * 1000000)::bigint FROM directory_feed \
                 WHERE seq = $1) IS NOT DISTINCT FROM $2::bigint END"
            ))?;
            let row = (conn.client)
                .query_one(&holds, &[&seq, &committed_us])
                .map_err(backend)?;
            let holds: Option<bool> = row.try_get(0).map_err(backend)?;
            holds
                .ok_or_else(|| StoreError::Backend("PostgreSQL answered from a standby".to_owned()))
        })
    }

    /// Prepares the connections; connects only when used. See [`PgStorage::migrate`].
    pub fn open(options: &PgOptions) -> Result<Self, StoreError> {
        let connector = Arc::new(Connector::new(&options.url, options.max_staleness)?);
        Ok(Self {
            replica: uuid::Uuid::new_v4().to_string(),
            applied: Mutex::new((0, None)),
            unsettled: Mutex::new(std::collections::VecDeque::new()),
            pool: Pool {
                connector: connector.clone(),
                idle: Mutex::new(Vec::new()),
                size: options.pool_size.max(1),
            },
            writer: Mutex::new(Dedicated {
                connector: connector.clone(),
                client: None,
                // A commit waits this long at most for another replica's to finish.
                setup: lock_timeout_setup(options.max_staleness),
            }),
            // Listening only while it waits (see `settle`). Its reads of the replicas' progress
            // wait on a table another session has locked (an operator's `LOCK TABLE`, `VACUUM
            // FULL`) as long as a commit's do at most: then they are asked again, until the
            // write's answer is given up on (503), not held for as long as the lock is.
            settler: Mutex::new(Dedicated {
                connector,
                client: None,
                setup: lock_timeout_setup(options.max_staleness),
            }),
            freshness: Arc::new(Freshness::new(options.max_staleness)),
            longest_lease_us: AtomicU64::new(0),
        })
    }

    /// Brings the schema up to date, under a lock so that replicas may start at once, and
    /// refuses a database whose schema is newer than this build's ([`StoreError::Version`]).
    /// [`Fleet::follow`] does the same whenever it connects.
    pub fn migrate(&self) -> Result<(), StoreError> {
        self.pool.with(migrate)
    }

    /// Whether the database holds a directory (false before a replica's first start), and
    /// refuses one whose schema is not this build's, changing nothing (for a command that
    /// only reads: migrating would stop the replicas of an older build).
    pub fn check_schema(&self) -> Result<bool, StoreError> {
        // The first migration commits its tables and its version at once: its tables read
        // before the version, a version of 0 with them is a schema copied without its rows,
        // not one being made.
        let (tables, version) = self.pool.with(|client| {
            let tables = table_exists(client, "directory_meta")?;
            Ok((tables, schema_version(client)?))
        })?;
        match version {
            Some(SCHEMA_VERSION) => Ok(true),
            None => Ok(false),
            Some(0) if tables => Err(copied_without_data()),
            Some(0) => Ok(false),
            Some(found) => Err(StoreError::Version {
                found: u64::try_from(found).unwrap_or(0),
                expected: SCHEMA_VERSION as u64,
            }),
        }
    }

    /// The entries of `kind` kept beside the directory, `(key, value)`.
    pub fn entries(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.pool.with(|client| {
            let rows = client
                .query(
                    on_primary!(
                        "SELECT key, value FROM directory_entries WHERE kind = $1 ORDER BY key"
                    ),
                    &[&kind],
                )
                .map_err(backend)?;
            pairs(&rows)
        })
    }

    /// Commits `entries` as a batch of their own, without a directory loaded (for the CLI):
    /// built on the sequence as it is, and again if another replica commits first. Every
    /// replica applies it from the feed; this does not wait for them.
    pub fn put_entries(&self, entries: Vec<super::Entry>) -> Result<Seq, StoreError> {
        for _ in 0..16 {
            let (base, next_row) = self.pool.with(|client| {
                let mut txn = snapshot(client)?;
                let seq = meta(&mut txn, "seq")?;
                let next_row = meta(&mut txn, "next_row")?;
                txn.commit().map_err(backend)?;
                Ok((seq, next_row))
            })?;
            let batch = Batch {
                base,
                seq: base + 1,
                next_row,
                entries: entries.clone(),
                ..Batch::default()
            };
            match self.commit(&batch) {
                Err(StoreError::Behind) => continue,
                result => return result.map(|()| batch.seq),
            }
        }
        Err(StoreError::Backend(
            "the directory is too busy with other writes; retry".to_owned(),
        ))
    }

    /// The audit log's table, on a connection of its own. No statement waits long (on a
    /// lock another session holds on the table, say): its one writer would wait with it,
    /// while records queue up, rather than keep them aside (the audit spool).
    pub fn audit_log(&self) -> AuditLog {
        AuditLog {
            conn: Dedicated {
                connector: self.pool.connector.clone(),
                client: None,
                setup: "SET statement_timeout = '10s'; SET lock_timeout = '2s'".to_owned(),
            },
        }
    }

    pub fn freshness(&self) -> Arc<Freshness> {
        self.freshness.clone()
    }

    /// Follows the feed for `catch_up`, renewing this replica's lease: see [`Fleet`].
    pub fn fleet(&self) -> Fleet {
        Fleet {
            replica: self.replica.clone(),
            connector: self.pool.connector.clone(),
            freshness: self.freshness.clone(),
        }
    }
}

/// Applies the migrations this database lacks, holding an advisory lock meanwhile. A schema
/// already up to date takes no lock: the feed connects through here each time, and waited,
/// with no bound, on a replica that held the lock and stalled (a frozen host), which no
/// server timeout ends (it waits outside a transaction).
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    // Records, sessions and audit records are UTF-8 text: a database in another encoding
    // (LATIN1, WIN1252, ...) refuses any character it lacks, such as a name's, or one a
    // stranger's refused request put in an audit record, and stalls what is queued behind it.
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .map_err(backend)?
        .try_get(0)
        .map_err(backend)?;
    if !matches!(encoding.as_str(), "UTF8" | "SQL_ASCII") {
        return Err(StoreError::Unsuitable(format!(
            "its encoding is {encoding}; create it with ENCODING 'UTF8'"
        )));
    }
    match schema_version(client)? {
        Some(SCHEMA_VERSION) => return Ok(()),
        // Versions only go up: a newer one is refused without waiting on the lock either.
        Some(found) if found > SCHEMA_VERSION => {
            return Err(StoreError::Version {
                found: u64::try_from(found).unwrap_or(0),
                expected: SCHEMA_VERSION as u64,
            })
        }
        _ => {}
    }
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(backend)?;
    let result = migrate_locked(client);
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    result?;
    unlocked.map_err(backend)?;
    Ok(())
}

/// A database holding Portcullis' tables without their rows.
fn copied_without_data() -> StoreError {
    StoreError::Unsuitable(
        "it holds Portcullis' tables but not their version or sequence: the schema was copied \
         without its data (pg_dump --schema-only?); use an empty database, or restore a full dump"
            .to_owned(),
    )
}

/// Whether the database has the table `name`.
fn table_exists(client: &mut Client, name: &str) -> Result<bool, StoreError> {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .map_err(backend)?
        .try_get(0)
        .map_err(backend)
}

/// The schema's version; `None` before the first migration made its table.
fn schema_version(client: &mut Client) -> Result<Option<i32>, StoreError> {
    if !table_exists(client, "portcullis_schema")? {
        return Ok(None);
    }
    let found: Option<i32> = client
        .query_one("SELECT max(version) FROM portcullis_schema", &[])
        .map_err(backend)?
        .try_get(0)
        .map_err(backend)?;
    Ok(Some(found.unwrap_or(0)))
}

fn migrate_locked(client: &mut Client) -> Result<(), StoreError> {
    let found = match schema_version(client)? {
        // No version, yet the first migration's tables: the schema was copied without its
        // rows (`pg_dump --schema-only`). Migrating would fail on what exists, and read as an
        // outage for ever.
        Some(0) if table_exists(client, "directory_meta")? => return Err(copied_without_data()),
        Some(found) => found,
        None => {
            client
                .batch_execute("CREATE TABLE portcullis_schema (version integer NOT NULL)")
                .map_err(backend)?;
            0
        }
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::Version {
            found: u64::try_from(found).unwrap_or(0),
            expected: SCHEMA_VERSION as u64,
        });
    }
    for version in found + 1..=SCHEMA_VERSION {
        let Some(sql) = usize::try_from(version - 1)
            .ok()
            .and_then(|i| MIGRATIONS.get(i))
        else {
            break;
        };
        let mut txn = client.transaction().map_err(backend)?;
        txn.batch_execute(sql).map_err(backend)?;
        txn.execute("DELETE FROM portcullis_schema", &[])
            .map_err(backend)?;
        txn.execute(
            "INSERT INTO portcullis_schema (version) VALUES ($1)",
            &[&version],
        )
        .map_err(backend)?;
        txn.commit().map_err(backend)?;
        tracing::info!(version, "PostgreSQL schema migrated");
    }
    Ok(())
}

/// The records at `rows` of `rt`'s table, in the order asked for (as the redb backend answers).
fn read_records(
    client: &mut impl postgres::GenericClient,
    rt: ResourceType,
    rows: &[Row],
) -> Result<Vec<(Row, Record)>, StoreError> {
    let wanted = rows
        .iter()
        .map(|&row| to_sql(row))
        .collect::<Result<Vec<i64>, _>>()?;
    let query = format!(
        on_primary!("SELECT row_id, record FROM {} WHERE row_id = ANY($1)"),
        table(rt)
    );
    let mut found = HashMap::with_capacity(rows.len());
    for row in client.query(query.as_str(), &[&wanted]).map_err(backend)? {
        let id = from_sql(row.try_get(0).map_err(backend)?)?;
        let bytes: &[u8] = row.try_get(1).map_err(backend)?;
        found.insert(id, decode(id, bytes)?);
    }
    Ok(rows
        .iter()
        .filter_map(|row| found.remove(row).map(|record| (*row, record)))
        .collect())
}

fn decode(row: Row, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("row {row}: {e}")))
}

fn meta(client: &mut impl postgres::GenericClient, key: &str) -> Result<u64, StoreError> {
    let row = client
        .query_one(
            on_primary!("SELECT value FROM directory_meta WHERE key = $1"),
            &[&key],
        )
        .map_err(backend)?;
    from_sql(row.try_get(0).map_err(backend)?)
}

/// The first two columns of `rows`.
fn pairs<A, B>(rows: &[postgres::Row]) -> Result<Vec<(A, B)>, StoreError>
where
    A: for<'a> postgres::types::FromSql<'a>,
    B: for<'a> postgres::types::FromSql<'a>,
{
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get(0).map_err(backend)?,
                row.try_get(1).map_err(backend)?,
            ))
        })
        .collect()
}

/// Up to `limit` changes with a sequence above `after`, in order.
fn read_changes(client: &mut Client, after: Seq, limit: i64) -> Result<Vec<Change>, StoreError> {
    let rows = client
        .query(
            on_primary!(
                "SELECT seq, change FROM directory_changes WHERE seq > $1 ORDER BY seq LIMIT $2"
            ),
            &[&to_sql(after)?, &limit],
        )
        .map_err(backend)?;
    parse_changes(&rows)
}

fn parse_changes(rows: &[postgres::Row]) -> Result<Vec<Change>, StoreError> {
    rows.iter()
        .map(|row| {
            let seq: i64 = row.try_get(0).map_err(backend)?;
            let bytes: &[u8] = row.try_get(1).map_err(backend)?;
            serde_json::from_slice(bytes)
                .map_err(|e| StoreError::Corrupt(format!("change {seq}: {e}")))
        })
        .collect()
}

/// A read-only transaction whose every query sees the same committed state: the primary's.
///
/// Not a standby's, which may be behind its primary (pgpool balances reads onto one, and a URL
/// listing several hosts can connect to one): the directory loaded from it, or a record the
/// writer builds a change on, would lack writes already answered, an acknowledged
/// deactivation say. Its reads are sent [`on_primary!`], and the first asks whether the
/// connection is to a standby (as a URL listing several hosts may make it).
fn snapshot(client: &mut Client) -> Result<postgres::Transaction<'_>, StoreError> {
    let mut txn = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(backend)?;
    let row = txn
        .query_one(on_primary!("SELECT pg_is_in_recovery()"), &[])
        .map_err(backend)?;
    if row.try_get::<_, bool>(0).map_err(backend)? {
        return Err(StoreError::Backend(
            "PostgreSQL answered from a standby, which may be behind its primary: the \
             directory is read from the primary only (with several hosts in the URL, add \
             target_session_attrs=read-write)"
                .to_owned(),
        ));
    }
    Ok(txn)
}

impl Storage for PgStorage {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        // Called by the directory's writer (or `portcullis explain`), never on a runtime.
        self.pool.with_here(|client| {
            // One snapshot for everything, so the rows match the sequence number.
            let mut txn = snapshot(client)?;
            let seq = meta(&mut txn, "seq")?;
            let next_row = meta(&mut txn, "next_row")?;
            let committed = committed_at(&mut txn, to_sql(seq)?)?;
            for rt in ResourceType::ALL {
                let query = format!(on_primary!("SELECT row_id, record FROM {}"), table(rt));
                let mut rows = txn
                    .query_raw(query.as_str(), std::iter::empty::<i64>())
                    .map_err(backend)?;
                while let Some(row) = rows.next().map_err(backend)? {
                    let id = from_sql(row.try_get(0).map_err(backend)?)?;
                    let bytes: &[u8] = row.try_get(1).map_err(backend)?;
                    visit(Loaded::Resource(rt, id, bytes));
                }
            }
            let mut rows = txn
                .query_raw(
                    on_primary!("SELECT group_row, member_row FROM directory_members"),
                    std::iter::empty::<i64>(),
                )
                .map_err(backend)?;
            while let Some(row) = rows.next().map_err(backend)? {
                let group = from_sql(row.try_get(0).map_err(backend)?)?;
                let member = from_sql(row.try_get(1).map_err(backend)?)?;
                visit(Loaded::Member { group, member });
            }
            drop(rows);
            let mut rows = txn
                .query_raw(
                    on_primary!("SELECT kind, key, value FROM directory_entries"),
                    std::iter::empty::<i64>(),
                )
                .map_err(backend)?;
            while let Some(row) = rows.next().map_err(backend)? {
                visit(Loaded::Entry(Entry {
                    kind: row.try_get(0).map_err(backend)?,
                    key: row.try_get(1).map_err(backend)?,
                    value: Some(row.try_get(2).map_err(backend)?),
                }));
            }
            drop(rows);
            txn.commit().map_err(backend)?;
            *lock(&self.applied) = (seq, committed);
            Ok((seq, next_row))
        })
    }

    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.pool.with(|client| read_records(client, rt, rows))
    }

    /// On the writer's own connection, whose statements wait at most a quarter of
    /// `max_staleness` for a lock (see [`lock_timeout_setup`]): an operator's `LOCK TABLE`,
    /// `VACUUM FULL` or `ALTER TABLE` fails the write that needs the table, and the lease is
    /// kept, where a read from the pool would have waited on it and let the lease lapse.
    fn records_for_writer(
        &self,
        rt: ResourceType,
        rows: &[Row],
    ) -> Result<Vec<(Row, Record)>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // In a snapshot of the primary: a change built on a standby's older copy of a record
        // would write it back over what the primary holds (see `snapshot`).
        lock(&self.writer).run(|conn| {
            let mut txn = snapshot(&mut conn.client)?;
            let records = read_records(&mut txn, rt, rows)?;
            txn.commit().map_err(backend)?;
            Ok(records)
        })
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() || batch.seq <= batch.base {
            return Err(StoreError::Backend(
                "a batch that changes nothing cannot be committed".to_owned(),
            ));
        }
        let feed = serde_json::to_vec(batch).map_err(backend)?;
        // By `ResourceType as usize`.
        let mut upserts: [(Vec<i64>, Vec<Vec<u8>>); 4] = Default::default();
        let mut deletes: [Vec<i64>; 4] = Default::default();
        // A row appears once per statement (ON CONFLICT may not touch a row twice): the last
        // state of each wins, as in the batch.
        let mut last: HashMap<(usize, Row), usize> = HashMap::new();
        for (i, (rt, row, _)) in batch.records.iter().enumerate() {
            last.insert((*rt as usize, *row), i);
        }
        for (i, (rt, row, record)) in batch.records.iter().enumerate() {
            let slot = *rt as usize;
            if last.get(&(slot, *row)) != Some(&i) {
                continue;
            }
            let (Some(upsert), Some(delete)) = (upserts.get_mut(slot), deletes.get_mut(slot))
            else {
                return Err(StoreError::Backend(
                    "no table for this resource type".to_owned(),
                ));
            };
            match record {
                Some(record) => {
                    upsert.0.push(to_sql(*row)?);
                    upsert.1.push(serde_json::to_vec(record).map_err(backend)?);
                }
                None => delete.push(to_sql(*row)?),
            }
        }
        let mut members: HashMap<(Row, Row), bool> = HashMap::new();
        for &(group, member, present) in &batch.members {
            members.insert((group, member), present);
        }
        let (mut added, mut removed) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for ((group, member), present) in members {
            let into = if present { &mut added } else { &mut removed };
            into.0.push(to_sql(group)?);
            into.1.push(to_sql(member)?);
        }
        let mut change_seqs = Vec::with_capacity(batch.changes.len());
        let mut change_bytes = Vec::with_capacity(batch.changes.len());
        for change in &batch.changes {
            change_seqs.push(to_sql(change.seq)?);
            change_bytes.push(serde_json::to_vec(change).map_err(backend)?);
        }
        // Entries, likewise the last state of each.
        let mut kept: HashMap<(&str, &str), Option<&str>> = HashMap::new();
        for entry in &batch.entries {
            kept.insert((&entry.kind, &entry.key), entry.value.as_deref());
        }
        let (mut put, mut forgotten) = ((vec![], vec![], vec![]), (vec![], vec![]));
        for ((kind, key), value) in kept {
            match value {
                Some(value) => {
                    put.0.push(kind);
                    put.1.push(key);
                    put.2.push(value);
                }
                None => {
                    forgotten.0.push(kind);
                    forgotten.1.push(key);
                }
            }
        }
        let (base, seq, next_row) = (
            to_sql(batch.base)?,
            to_sql(batch.seq)?,
            to_sql(batch.next_row)?,
        );

        // One statement, so one round trip and one implicit transaction: it locks the `seq`
        // row (`FOR UPDATE`: it waits for a commit in progress, then reads the latest value)
        // and writes only if the batch was built on that value. Every part is gated on `ok`.
        const COMMIT: &str = "\
            WITH lock AS (SELECT value FROM directory_meta WHERE key = 'seq' FOR UPDATE), \
            ok AS (SELECT 1 FROM lock WHERE value = $1 AND (NOT $29::boolean OR \
                (SELECT (extract(epoch FROM committed) * 1000000)::bigint FROM directory_feed \
                 WHERE seq = $1) IS NOT DISTINCT FROM $28::bigint)), \
            users AS (INSERT INTO directory_users (row_id, record) \
                SELECT * FROM unnest($2::bigint[], $3::bytea[]) WHERE EXISTS (SELECT 1 FROM ok) \
                ON CONFLICT (row_id) DO UPDATE SET record = excluded.record), \
            gone_users AS (DELETE FROM directory_users \
                WHERE row_id = ANY($4::bigint[]) AND EXISTS (SELECT 1 FROM ok)), \
            groups AS (INSERT INTO directory_groups (row_id, record) \
                SELECT * FROM unnest($5::bigint[], $6::bytea[]) WHERE EXISTS (SELECT 1 FROM ok) \
                ON CONFLICT (row_id) DO UPDATE SET record = excluded.record), \
            gone_groups AS (DELETE FROM directory_groups \
                WHERE row_id = ANY($7::bigint[]) AND EXISTS (SELECT 1 FROM ok)), \
            agents AS (INSERT INTO directory_agents (row_id, record) \
                SELECT * FROM unnest($22::bigint[], $23::bytea[]) WHERE EXISTS (SELECT 1 FROM ok) \
                ON CONFLICT (row_id) DO UPDATE SET record = excluded.record), \
            gone_agents AS (DELETE FROM directory_agents \
                WHERE row_id = ANY($24::bigint[]) AND EXISTS (SELECT 1 FROM ok)), \
            applications AS (INSERT INTO directory_agentic_applications (row_id, record) \
                SELECT * FROM unnest($25::bigint[], $26::bytea[]) WHERE EXISTS (SELECT 1 FROM ok) \
                ON CONFLICT (row_id) DO UPDATE SET record = excluded.record), \
            gone_applications AS (DELETE FROM directory_agentic_applications \
                WHERE row_id = ANY($27::bigint[]) AND EXISTS (SELECT 1 FROM ok)), \
            added AS (INSERT INTO directory_members (group_row, member_row) \
                SELECT * FROM unnest($8::bigint[], $9::bigint[]) WHERE EXISTS (SELECT 1 FROM ok) \
                ON CONFLICT DO NOTHING), \
            removed AS (DELETE FROM directory_members m \
                USING unnest($10::bigint[], $11::bigint[]) AS gone(group_row, member_row) \
                WHERE m.group_row = gone.group_row AND m.member_row = gone.member_row \
                  AND EXISTS (SELECT 1 FROM ok)), \
            changes AS (INSERT INTO directory_changes (seq, change) \
                SELECT * FROM unnest($12::bigint[], $13::bytea[]) WHERE EXISTS (SELECT 1 FROM ok)), \
            put AS (INSERT INTO directory_entries (kind, key, value) \
                SELECT * FROM unnest($17::text[], $18::text[], $19::text[]) \
                WHERE EXISTS (SELECT 1 FROM ok) \
                ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value), \
            forgotten AS (DELETE FROM directory_entries e \
                USING unnest($20::text[], $21::text[]) AS gone(kind, key) \
                WHERE e.kind = gone.kind AND e.key = gone.key AND EXISTS (SELECT 1 FROM ok)), \
            feed AS (INSERT INTO directory_feed (seq, base, batch) \
                SELECT $14::bigint, $1::bigint, $15::bytea WHERE EXISTS (SELECT 1 FROM ok) \
                RETURNING (extract(epoch FROM committed) * 1000000)::bigint AS committed_us), \
            meta AS (UPDATE directory_meta \
                SET value = CASE key WHEN 'seq' THEN $14::bigint ELSE $16::bigint END \
                WHERE key IN ('seq', 'next_row') AND EXISTS (SELECT 1 FROM ok)), \
            notify AS (SELECT pg_notify('portcullis_feed', $14::bigint::text) FROM ok) \
            SELECT value, (SELECT count(*) FROM notify), (SELECT committed_us FROM feed) FROM lock";
        let [user_upserts, group_upserts, agent_upserts, application_upserts] = &upserts;
        let [user_deletes, group_deletes, agent_deletes, application_deletes] = &deletes;
        // A batch of the writer, built on the index: committed only on the history the index
        // holds (`applied`), and then the index's. (Entries written beside it, on whatever the
        // database holds, go unchecked; the index gets them from the feed.)
        let (known_seq, known) = *lock(&self.applied);
        let on_index = known_seq == batch.base;
        lock(&self.writer).run(|conn| {
            let commit = conn.prepare(COMMIT)?;
            let row = conn
                .client
                .query_one(
                    &commit,
                    &[
                        &base,
                        &user_upserts.0,
                        &user_upserts.1,
                        user_deletes,
                        &group_upserts.0,
                        &group_upserts.1,
                        group_deletes,
                        &added.0,
                        &added.1,
                        &removed.0,
                        &removed.1,
                        &change_seqs,
                        &change_bytes,
                        &seq,
                        &feed,
                        &next_row,
                        &put.0,
                        &put.1,
                        &put.2,
                        &forgotten.0,
                        &forgotten.1,
                        &agent_upserts.0,
                        &agent_upserts.1,
                        agent_deletes,
                        &application_upserts.0,
                        &application_upserts.1,
                        application_deletes,
                        &known,
                        &on_index,
                    ],
                )
                .map_err(backend)?;
            let current: i64 = row.try_get(0).map_err(backend)?;
            let committed: Option<i64> = row.try_get(2).map_err(backend)?;
            // Not written: another batch came first, or the index's last batch is not the
            // database's (catching up reloads it, see `feed`).
            let Some(committed) = committed.filter(|_| current == base) else {
                return Err(StoreError::Behind);
            };
            if on_index {
                *lock(&self.applied) = (batch.seq, Some(committed));
            }
            self.unsettled(batch.seq, Some(committed));
            Ok(())
        })
    }

    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.pool.with(|client| read_changes(client, after, limit))
    }

    fn is_shared(&self) -> bool {
        true
    }
    fn feed(&self, after: Seq) -> Result<Feed, StoreError> {
        let after_sql = to_sql(after)?;
        // Read by the writer (catching up): on its connection, as `records_for_writer`.
        lock(&self.writer).run(|conn| {
            // The batches and the sequence from one snapshot: a commit in between would look
            // like a gap.
            let mut txn = snapshot(&mut conn.client)?;
            let seq = meta(&mut txn, "seq")?;
            let last = committed_at(&mut txn, after_sql)?;
            let query = format!(
                on_primary!(
                    "SELECT seq, base, batch, {COMMITTED_US} FROM directory_feed WHERE seq > $1 \
                     ORDER BY seq LIMIT $2"
                ),
                COMMITTED_US = COMMITTED_US
            );
            let rows = txn
                .query(query.as_str(), &[&after_sql, &FEED_PAGE])
                .map_err(backend)?;
            txn.commit().map_err(backend)?;
            // The batch the index was last brought to, committed at another time: the database
            // lost it (and maybe more), and took others under the same numbers. The batches
            // after it would apply on the wrong state, and "nothing new" would be false: the
            // index is read again from the tables.
            let mut applied = lock(&self.applied);
            if applied.0 == after && applied.1 != last {
                tracing::warn!(
                    seq = after,
                    "PostgreSQL no longer holds the directory batch this replica applied last \
                     (a restored backup, or a failover to a standby that lacked it): reloading"
                );
                return Ok(Feed::Gap);
            }
            if rows.is_empty() {
                // Nothing new; or the batches after `after` were pruned; or the store is
                // behind this index (restored from a backup): reload it as it is.
                return Ok(if seq == after {
                    Feed::Batches(Vec::new())
                } else {
                    Feed::Gap
                });
            }
            let mut expected = after;
            let mut batches = Vec::with_capacity(rows.len());
            for row in &rows {
                let base = from_sql(row.try_get(1).map_err(backend)?)?;
                let bytes: &[u8] = row.try_get(2).map_err(backend)?;
                // A batch this build cannot read (another version wrote it) is a gap too:
                // the tables themselves are read by the full reload.
                match serde_json::from_slice::<Batch>(bytes) {
                    Ok(batch) if base == expected && batch.base == base => {
                        expected = batch.seq;
                        batches.push(batch);
                    }
                    _ => return Ok(Feed::Gap),
                }
            }
            if let Some(row) = rows.last() {
                *applied = (expected, row.try_get(3).map_err(backend)?);
            }
            Ok(Feed::Batches(batches))
        })
    }

    fn answering_at(&self, seq: Seq) {
        let applied = *lock(&self.applied);
        self.unsettled(seq, applied.1.filter(|_| applied.0 == seq));
    }

    fn settle(&self, seq: Seq, committed: Instant) -> Result<(), StoreError> {
        let max_staleness = self.freshness.max_staleness;
        // A replica that has not applied the change has not renewed its lease since it was
        // committed (a renewal needs everything committed applied; see `RENEW`): it has let
        // that lease lapse, counted on its own clock from before it asked, once that lease's
        // length has passed since (and `CLOCK_MARGIN`, for clocks that run at slightly
        // different rates). Each lease's length is read with it.
        let lapsed_by = |longest: Duration| committed + max_staleness.max(longest) + CLOCK_MARGIN;
        let known = || {
            let longest = self.longest_lease_us.load(Ordering::Relaxed);
            Duration::from_micros(longest).min(MAX_LEASE)
        };
        // When the database committed it (see `unsettled`: this replica's commit, or the
        // batch it had applied when it answered a write that changed nothing). Settles come in
        // the order of `unsettled`: one before this is not waited for any more.
        let committed_us = self.settling(seq);
        let seq = to_sql(seq)?;
        // A lease is judged lapsed only `CLOCK_MARGIN` after the database's clock says so:
        // that clock stepped forward (an NTP step), or running faster than the replica's,
        // would otherwise end it here before the replica stops counting on it.
        let margin_us = i64::try_from(CLOCK_MARGIN.as_micros()).unwrap_or(i64::MAX);
        let mut settler = lock(&self.settler);
        // It listens for replicas' confirmations only while it waits for them: a session that
        // listens and reads nothing holds PostgreSQL's notification queue (shared by every
        // database of the server) from being truncated, every replica's renewal adds to it, and
        // once it is full every commit fails.
        let mut listening = false;
        let settled = loop {
            let waiting = settler.run(|conn| {
                // -1: the primary this connection reads does not hold the change (a standby
                // answers -3 first): a failover lost it, and nothing has taken its number
                // yet; its replicas' rows cannot say who has applied it. Waited on, in case
                // the answer came from a primary being replaced, then taken as lost. -2: the
                // database holds another commit of that number (a failover lost this one and
                // took another batch in its place): replicas past it never applied it.
                // -3: a standby, whose clock would judge the primary's leases.
                // With it, the longest lease another replica holds, as granted: a renewal sets
                // `seen` and `lease_until` in one statement, so their difference is its length
                // whatever the database's clock has done since.
                let waiting = conn.prepare(on_primary!(
                    "SELECT CASE WHEN pg_is_in_recovery() THEN -3 \
                     WHEN (SELECT value FROM directory_meta WHERE key = 'seq') < $2 \
                     THEN -1 \
                     WHEN $3::bigint IS NOT NULL AND (SELECT \
                     (extract(epoch FROM committed) * 1000000)::bigint FROM directory_feed \
                     WHERE seq = $2) IS DISTINCT FROM $3::bigint THEN -2 \
                     ELSE (SELECT count(*) FROM portcullis_replicas \
                     WHERE id <> $1 AND applied_seq < $2 \
                     AND lease_until + $4::bigint * interval '1 microsecond' > clock_timestamp()) \
                     END, (SELECT coalesce(max((extract(epoch FROM lease_until - seen) \
                     * 1000000)::bigint), 0) FROM portcullis_replicas WHERE id <> $1 \
                     AND lease_until + $4::bigint * interval '1 microsecond' > clock_timestamp())"
                ))?;
                let client = &mut conn.client;
                let row = client
                    .query_one(&waiting, &[&self.replica, &seq, &committed_us, &margin_us])
                    .map_err(backend)?;
                let waiting: i64 = row.try_get(0).map_err(backend)?;
                let longest = Duration::from_micros(
                    row.try_get::<_, i64>(1)
                        .map_err(backend)?
                        .try_into()
                        .unwrap_or(0),
                );
                if waiting == -3 {
                    // The connection goes with the error: the next may reach the primary.
                    return Err(StoreError::Backend(
                        "PostgreSQL answered from a standby: the replicas' progress is read \
                         from the primary only"
                            .to_owned(),
                    ));
                }
                if waiting < 0 {
                    std::thread::sleep(Duration::from_millis(20));
                } else if waiting > 0 {
                    // Woken by a replica confirming, or to look again (a confirmation sent
                    // before this listened is found by that look).
                    if !listening {
                        client
                            .batch_execute("LISTEN portcullis_applied")
                            .map_err(backend)?;
                        listening = true;
                    }
                    let mut notifications = client.notifications();
                    let _ = notifications
                        .timeout_iter(Duration::from_millis(20))
                        .next()
                        .map_err(backend)?;
                    while notifications.iter().next().map_err(backend)?.is_some() {}
                }
                let longest_us = u64::try_from(longest.as_micros()).unwrap_or(u64::MAX);
                self.longest_lease_us
                    .fetch_max(longest_us, Ordering::Relaxed);
                Ok((waiting, longest))
            });
            // The leases read now, or, where none could be, the longest known.
            let longest = waiting
                .as_ref()
                .map_or_else(|_| known(), |&(_, longest)| longest);
            let lapsed = Instant::now() > lapsed_by(longest);
            let given_up = Instant::now() > lapsed_by(longest) + max_staleness;
            let waiting = waiting.map(|(waiting, _)| waiting);
            if waiting.is_err() {
                // The connection went with the failure: a new one listens to nothing.
                listening = false;
            }
            match waiting {
                Ok(0) => break Ok(()),
                Ok(-2) => {
                    break Err(StoreError::Lost(
                        "the database no longer holds the change (lost in a failover?)".to_owned(),
                    ))
                }
                // A primary (a standby answers -3) that still lacks the change: a failover
                // lost it, and nothing was committed in its place yet.
                Ok(-1) if given_up => {
                    break Err(StoreError::Lost(
                        "the database does not hold the change (lost in a failover?)".to_owned(),
                    ))
                }
                // Replicas the database says hold a lease without the change, though every
                // such lease has lapsed where it is held: the database's clock stepped back
                // since they were granted (a replica that died before, say). Nobody counts on
                // them.
                Ok(n) if n > 0 && lapsed => {
                    tracing::warn!(
                        "{n} replicas' leases outlast their length by the database's clock \
                         (stepped back?); taken as lapsed"
                    );
                    break Ok(());
                }
                Ok(_) => {}
                // Cannot ask: ask again (on a new connection) until the same bound. Waiting
                // out this replica's own `max_staleness` and answering would not do: another
                // replica's lease may be longer (each replica's file sets its own).
                // Whether the database holds the change may be read all the same (their table
                // locked: an operator's `LOCK TABLE` or `VACUUM FULL` on it): then it is saved,
                // only not confirmed; not known, it may not be.
                Err(e) if given_up => {
                    break match self.holds(&mut settler, seq, committed_us) {
                        Ok(true) => Err(StoreError::Backend(format!(
                            "cannot read the replicas' progress: {e}"
                        ))),
                        Ok(false) => Err(StoreError::Lost(
                            "the database does not hold the change (lost in a failover?)"
                                .to_owned(),
                        )),
                        Err(held) => Err(StoreError::Unsettled(format!(
                            "cannot read the replicas' progress ({e}), nor whether the \
                             database holds the change ({held})"
                        ))),
                    };
                }
                Err(e) => {
                    tracing::warn!("cannot read the replicas' progress, asking again: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        if listening {
            // What arrived meanwhile is dropped with it; on failure the connection goes.
            let _ = settler.run(|conn| {
                let client = &mut conn.client;
                client
                    .batch_execute("UNLISTEN portcullis_applied")
                    .map_err(backend)?;
                let mut notifications = client.notifications();
                while notifications.iter().next().map_err(backend)?.is_some() {}
                Ok(())
            });
        }
        settled
    }
}

/// The fleet's audit log: `portcullis_audit`, records (JSON text, opaque here) numbered in
/// the order they were appended, and the directory's own changes. Used by one thread at a
/// time.
pub struct AuditLog {
    conn: Dedicated,
}

impl AuditLog {
    /// Appends `records` in one statement.
    pub fn append(&mut self, records: &[&str]) -> Result<(), StoreError> {
        self.conn.run(|conn| {
            let insert =
                conn.prepare("INSERT INTO portcullis_audit (record) SELECT unnest($1::text[])")?;
            conn.client.execute(&insert, &[&records]).map_err(backend)?;
            Ok(())
        })
    }

    /// Up to `limit` directory changes with a sequence above `after`, in order: the SCIM part
    /// of the audit, kept exactly once by the commit that made each.
    pub fn changes(&mut self, after: Seq, limit: i64) -> Result<Vec<Change>, StoreError> {
        self.conn
            .run(|conn| read_changes(&mut conn.client, after, limit))
    }

    /// Up to `limit` directory changes with a sequence below `before` (any, without), the
    /// newest first.
    pub fn changes_before(
        &mut self,
        before: Option<Seq>,
        limit: i64,
    ) -> Result<Vec<Change>, StoreError> {
        let before = before.map_or(Ok(i64::MAX), to_sql)?;
        self.conn.run(|conn| {
            let rows = conn
                .client
                .query(
                    on_primary!(
                        "SELECT seq, change FROM directory_changes WHERE seq < $1 \
                         ORDER BY seq DESC LIMIT $2"
                    ),
                    &[&before, &limit],
                )
                .map_err(backend)?;
            parse_changes(&rows)
        })
    }

    /// Up to `limit` records numbered below `before` (any, without), the newest first.
    pub fn read_before(
        &mut self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let before = before.unwrap_or(i64::MAX);
        self.conn.run(|conn| {
            let rows = conn
                .client
                .query(
                    on_primary!(
                        "SELECT id, extract(epoch FROM at)::bigint, record FROM portcullis_audit \
                         WHERE id < $1 ORDER BY id DESC LIMIT $2"
                    ),
                    &[&before, &limit],
                )
                .map_err(backend)?;
            audit_rows(&rows)
        })
    }

    /// Up to `limit` records numbered above `after`, in order.
    pub fn read(&mut self, after: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
        self.conn.run(|conn| {
            let rows = conn
                .client
                .query(
                    on_primary!(
                        "SELECT id, extract(epoch FROM at)::bigint, record FROM portcullis_audit \
                         WHERE id > $1 ORDER BY id LIMIT $2"
                    ),
                    &[&after, &limit],
                )
                .map_err(backend)?;
            audit_rows(&rows)
        })
    }
}

/// A record of `portcullis_audit`.
pub struct AuditRow {
    /// Its number, in the order records were appended.
    pub id: i64,
    /// When it was appended (Unix seconds, the database's clock): a replica's records can
    /// arrive late, after others' newer ones, and still carry the time they were made.
    pub written: i64,
    /// The record (JSON text).
    pub record: String,
}

fn audit_rows(rows: &[postgres::Row]) -> Result<Vec<AuditRow>, StoreError> {
    rows.iter()
        .map(|row| {
            Ok(AuditRow {
                id: row.try_get(0).map_err(backend)?,
                written: row.try_get(1).map_err(backend)?,
                record: row.try_get(2).map_err(backend)?,
            })
        })
        .collect()
}

/// A replica's lease renewal ([`Fleet::renew`]): `$1` the replica, `$2` the sequence it has
/// applied, `$3` the lease in milliseconds, `$4` the schema version this build reads; 1 if
/// renewed, 0 if something newer was committed, and minus the schema's version if a newer
/// build migrated the database (this one cannot read what it writes): then the lease is not
/// renewed ([`Fleet::follow`] ends it).
const RENEW: &str = "\
    WITH newest AS (SELECT coalesce(max(version), 0) AS version FROM portcullis_schema), \
    current AS (SELECT value FROM directory_meta WHERE key = 'seq' FOR SHARE), \
    lease AS (INSERT INTO portcullis_replicas (id, applied_seq, lease_until) \
        SELECT $1::text, $2::bigint, statement_timestamp() + $3::bigint * interval '1 millisecond' \
        FROM current, newest WHERE current.value = $2::bigint AND newest.version <= $4::integer \
        ON CONFLICT (id) DO UPDATE SET applied_seq = excluded.applied_seq, \
            lease_until = excluded.lease_until, seen = now() \
        RETURNING applied_seq), \
    notify AS (SELECT pg_notify('portcullis_applied', applied_seq::text) FROM lease) \
    SELECT CASE WHEN newest.version > $4::integer THEN -newest.version::bigint \
        ELSE (SELECT count(*) FROM notify) END FROM newest";

/// The first wait before the feed's connection is tried again (see [`Fleet::follow`]).
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// This replica's part in the fleet: follows the feed and holds the lease.
pub struct Fleet {
    replica: String,
    connector: Arc<Connector>,
    freshness: Arc<Freshness>,
}

impl Fleet {
    /// Runs on the calling thread until a newer build migrates the database (the error it
    /// returns; this replica can no longer read it), or the database, reached only now, cannot
    /// hold the directory (not in UTF8): waits for feed notifications (or a quarter of
    /// `max_staleness`), has `catch_up` apply what is new (it reports the sequence now applied,
    /// and the last one applied from the feed), then renews the lease if that is everything
    /// committed: when the quarter is up, or at once when other replicas' batches were
    /// applied, since their writers wait for it. Reconnects after failures; should the lease
    /// lapse meanwhile, this replica refuses callers until it has caught up.
    ///
    /// `visible` is the sequence already applied here: a notification of a batch this replica
    /// wrote itself needs no catching up. `foreign` is the last one applied from other
    /// replicas' batches, by this thread or by the writer catching up before it commits: a
    /// change of it is reported at once, whoever applied it.
    pub fn follow(
        &self,
        catch_up: &dyn Fn() -> Result<(Seq, Seq), StoreError>,
        visible: &dyn Fn() -> Seq,
        foreign: &dyn Fn() -> Seq,
    ) -> StoreError {
        // Reset by every renewal; at most a quarter of the lease, so that a connection that
        // keeps dropping is still tried again within it.
        let most = (self.freshness.max_staleness / 4).clamp(FIRST_RETRY, Duration::from_secs(2));
        let mut backoff = FIRST_RETRY;
        loop {
            match self.follow_connected(catch_up, visible, foreign, &mut backoff) {
                Ok(never) => match never {},
                // A newer build migrated the database: this one cannot read it safely (or the
                // database, reached only now, cannot hold the directory). Its lease lapses
                // here first, then goes from the table, so that no writer waits for it to
                // lapse there (as when leaving); the caller stops the process.
                Err(e @ (StoreError::Version { .. } | StoreError::Unsuitable(_))) => {
                    self.freshness.lapse(e.to_string());
                    // Whatever the session's settings: it only deletes a row.
                    let deleted = self.connector.connect_as_is().and_then(|mut client| {
                        client
                            .execute(
                                "DELETE FROM portcullis_replicas WHERE id = $1",
                                &[&self.replica],
                            )
                            .map_err(backend)
                    });
                    if let Err(left) = deleted {
                        tracing::warn!("PostgreSQL: cannot end this replica's lease: {left}");
                    }
                    return e;
                }
                Err(e) => {
                    self.freshness.lost(format!("lost the directory feed: {e}"));
                    tracing::warn!("lost the directory feed, retrying in {backoff:?}: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(most);
                }
            }
        }
    }

    /// Renews this replica's lease if it has applied everything committed; false if not, and
    /// [`StoreError::Version`] if a newer build migrated the database.
    ///
    /// The sequence is read `FOR SHARE`, so the renewal and a commit (which locks the same row
    /// `FOR UPDATE` until it ends) never overlap: either the renewal commits first, and the
    /// writer's settling then sees this lease and waits for the replica to apply the batch, or
    /// the renewal reads the batch's sequence and fails. One statement (`renewal`, [`RENEW`]),
    /// so one round trip, and no transaction left open between statements.
    fn renew(
        &self,
        client: &mut Client,
        renewal: &postgres::Statement,
        applied: i64,
        staleness_ms: i64,
    ) -> Result<bool, StoreError> {
        let renewed: i64 = client
            .query_one(
                renewal,
                &[&self.replica, &applied, &staleness_ms, &SCHEMA_VERSION],
            )
            .map_err(backend)?
            .try_get(0)
            .map_err(backend)?;
        if renewed < 0 {
            return Err(StoreError::Version {
                found: renewed.unsigned_abs(),
                expected: SCHEMA_VERSION as u64,
            });
        }
        Ok(renewed == 1)
    }

    fn follow_connected(
        &self,
        catch_up: &dyn Fn() -> Result<(Seq, Seq), StoreError>,
        visible: &dyn Fn() -> Seq,
        foreign: &dyn Fn() -> Seq,
        backoff: &mut Duration,
    ) -> Result<std::convert::Infallible, StoreError> {
        let mut client = self.connector.connect()?;
        migrate(&mut client)?;
        // Kept across the reconnection only as long as this database grants it.
        let sent = boot_nanos();
        let left: Option<i64> = client
            .query_opt(
                "SELECT (extract(epoch FROM lease_until - clock_timestamp()) * 1000000)::bigint \
                 FROM portcullis_replicas WHERE id = $1",
                &[&self.replica],
            )
            .map_err(backend)?
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(backend)?;
        let left = left
            .and_then(|us| u64::try_from(us).ok())
            .map(Duration::from_micros);
        if self.freshness.held_by_database(sent, left) {
            tracing::warn!(
                "PostgreSQL holds this replica's lease for less than it counted (a failover to a \
                 standby that lacked the last renewal, or runs on another clock): cut to what \
                 the database holds"
            );
        }
        client
            .batch_execute("LISTEN portcullis_feed")
            .map_err(backend)?;
        let staleness_ms =
            i64::try_from(self.freshness.max_staleness.as_millis()).unwrap_or(i64::MAX);
        // Replicas gone for a day are forgotten; lapsed ones are never waited for anyway.
        client
            .execute(
                "DELETE FROM portcullis_replicas WHERE seen < now() - interval '1 day'",
                &[],
            )
            .map_err(backend)?;
        let renewal = client.prepare(RENEW).map_err(backend)?;
        let mut last_prune = Instant::now();
        let interval = self.freshness.max_staleness / 4;
        // Renewed on schedule, and whenever other replicas' batches were applied (their
        // writers wait for that); this replica's own batches, applied by its writer, wait for
        // nobody here.
        let mut renew_by = Instant::now();
        let mut reported = None;
        loop {
            if self.freshness.leaving.load(Ordering::Acquire) {
                // Renewed no more: the lease lapses here first, then goes from the table.
                self.freshness
                    .lapse("left the fleet (shutting down)".to_owned());
                client
                    .execute(
                        "DELETE FROM portcullis_replicas WHERE id = $1",
                        &[&self.replica],
                    )
                    .map_err(backend)?;
                self.freshness.left.store(true, Ordering::Release);
                loop {
                    std::thread::park();
                }
            }
            let (seq, applied_foreign) = catch_up()?;
            if reported != Some(applied_foreign) || Instant::now() >= renew_by {
                // Counted from before the renewal is sent: never longer than the lease granted.
                let sent = boot_nanos();
                let sent_at = Instant::now();
                if !self.renew(&mut client, &renewal, to_sql(seq)?, staleness_ms)? {
                    // Something was committed meanwhile: apply it first.
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                self.freshness.renewed(sent);
                *backoff = FIRST_RETRY;
                renew_by = sent_at + interval;
                reported = Some(applied_foreign);
            }
            // Batches older than the retention go, but for the newest of them: replicas date
            // their index by the row of the last batch they applied (see `PgStorage::feed`),
            // and one that applied it before the directory went quiet still finds it.
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = Instant::now();
                client
                    .execute(
                        &format!(
                            "DELETE FROM directory_feed WHERE seq < (SELECT max(seq) FROM directory_feed \
                             WHERE committed < now() - interval '{FEED_RETENTION}')"
                        ),
                        &[],
                    )
                    .map_err(backend)?;
            }
            // Wait for news; batches already applied here are no news, unless the writer applied
            // other replicas' batches (their writers wait for this replica to report them).
            loop {
                let mut notified = None;
                let mut notifications = client.notifications();
                let timeout = renew_by.saturating_duration_since(Instant::now());
                let mut first = notifications
                    .timeout_iter(timeout)
                    .next()
                    .map_err(backend)?;
                while let Some(notification) = first.take() {
                    // An unreadable payload counts as news.
                    let seq = notification.payload().parse::<Seq>().unwrap_or(Seq::MAX);
                    notified = notified.max(Some(seq));
                    first = notifications.iter().next().map_err(backend)?;
                }
                if notified.is_none_or(|seq| seq > visible())
                    || reported != Some(foreign())
                    || Instant::now() >= renew_by
                    || self.freshness.leaving.load(Ordering::Acquire)
                {
                    break;
                }
            }
            if client.is_closed() {
                return Err(StoreError::Backend("the connection closed".to_owned()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every commit waiting keeps its time, however many wait: a settle is never done as if
    /// none were known. One number twice (a failover took it again) is settled in turn, each
    /// with its own time, and those after one keep theirs.
    #[test]
    fn every_settle_finds_its_own_commit_time() {
        let options = PgOptions {
            url: "host=/nonexistent sslmode=disable".to_owned(),
            pool_size: 1,
            max_staleness: Duration::from_secs(2),
        };
        let storage = PgStorage::open(&options).unwrap();
        let last = 10_000;
        for seq in 1..=last {
            storage.unsettled(seq, Some(seq as i64));
        }
        storage.unsettled(last, Some(-1));
        assert_eq!(storage.settling(1), Some(1));
        assert_eq!(storage.settling(3), Some(3));
        assert_eq!(storage.settling(2), None, "before 3: taken with it");
        assert_eq!(storage.settling(last), Some(last as i64));
        assert_eq!(storage.settling(last), Some(-1));
    }

    /// The lease is counted as the database grants it, in whole milliseconds, never longer.
    #[test]
    fn a_lease_is_counted_as_the_database_grants_it() {
        let lease = Freshness::new(Duration::from_micros(2_000_500));
        let sent = boot_nanos();
        lease.renewed(sent);
        let granted_ms = i64::try_from(lease.max_staleness.as_millis()).unwrap();
        let granted = u64::try_from(granted_ms).unwrap() * 1_000_000;
        assert_eq!(lease.until.load(Ordering::Acquire), sent + granted);
    }

    #[test]
    fn a_lease_holds_from_before_its_renewal_was_sent_until_it_lapses() {
        let lease = Freshness::new(Duration::from_secs(2));
        assert!(!lease.is_current(), "no lease before the first renewal");
        lease.renewed(boot_nanos());
        assert!(lease.is_current());
        // A renewal sent 3 s ago has already lapsed (a host that slept through it).
        lease.renewed(boot_nanos() - 3_000_000_000);
        assert!(!lease.is_current());
        lease.renewed(boot_nanos());
        lease.lost("lost the feed".to_owned());
        assert!(
            lease.is_current(),
            "a lost feed ends no lease before its time"
        );
        assert_eq!(lease.problem(), "lost the feed");
        // After a failover: the database holds 1 s of it, or none.
        let asked = boot_nanos();
        assert!(lease.held_by_database(asked, Some(Duration::from_secs(1))));
        assert_eq!(lease.until.load(Ordering::Acquire), asked + 1_000_000_000);
        assert!(!lease.held_by_database(asked, Some(Duration::from_secs(5))));
        assert_eq!(lease.until.load(Ordering::Acquire), asked + 1_000_000_000);
        assert!(lease.held_by_database(asked, None));
        assert!(!lease.is_current());
        lease.renewed(boot_nanos());
        lease.lapse("left the fleet".to_owned());
        assert!(!lease.is_current());
        assert_eq!(lease.problem(), "left the fleet");
    }
}

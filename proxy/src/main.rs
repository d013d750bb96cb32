//! `portcullis`: an identity-aware reverse proxy with a built-in SCIM 2.0 directory.
//!
//! This crate is the binary: the command line, the pingora data plane ([`proxy`]), the admin
//! listener, reload and shutdown. It owns no policy or directory logic of its own; those live in
//! `portcullis-policy` and `portcullis-scim`, and the configuration model in
//! `portcullis-config`. Read `proxy.rs` first: its module doc lists the request phases.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use portcullis_scim::store::postgres::{Freshness, PgOptions, PgStorage};
use portcullis_scim::store::redb::RedbStorage;
use portcullis_scim::store::{Directory, Sinks, StoreError};

use portcullis::state::{Runtime, Shared};
use portcullis::{admin, assertion, audit, auth, clock, explain, logging, proxy, reload, services};

// The proxy allocates small, short-lived buffers per request; mimalloc is measurably faster at
// that than the system allocator (bench/proxy.py).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "Identity-aware reverse proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and print every problem in it.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Start signing identity assertions with a new key; the old one stays published until
    /// the tokens it signed have expired. A running proxy picks it up within a minute; with
    /// `[postgres]`, every replica does as soon as the key reaches it.
    RotateAssertionKey {
        /// The configuration file (for `data_dir`, or `[postgres]`).
        #[arg(long, short)]
        config: PathBuf,
        /// How long the new key is published before it signs (`30s`, `3m`, `1h`; `0s` signs
        /// at once): upstreams that cached the key set must have fetched it again by then.
        #[arg(long, default_value = "3m", value_parser = clock::parse_duration)]
        publish_for: std::time::Duration,
    },
    /// Say whether a person may make a request, and which rule decides, judged against the
    /// live directory (by asking the running proxy over its admin listener, or, when none is
    /// running, from `data_dir`, or PostgreSQL with `[postgres]`). Exits 0 when allowed, 1 when
    /// denied, 2 on an error.
    Explain {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Who signs in: the claim `[identity]` maps to a directory user (their email by
        /// default).
        #[arg(long, required_unless_present_any = ["agent", "machine"], conflicts_with_all = ["agent", "machine"])]
        user: Option<String>,
        /// Or the agent that calls: the value of its token's `agent_claim` (its SCIM `name` by
        /// default).
        #[arg(long, conflicts_with = "machine")]
        agent: Option<String>,
        /// Or a machine calling with its own token: the value of its `machine_claim`, which
        /// finds its service account (`sub` by default), from a client that is no agent.
        #[arg(long)]
        machine: Option<String>,
        /// With --agent: the person the agent acts for (a delegated token), named as --user.
        #[arg(long, requires = "agent", conflicts_with_all = ["user", "machine"])]
        on_behalf_of: Option<String>,
        /// The full URL requested, e.g. `https://app.example/admin`.
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the audit log: SCIM changes, refusals, sign-ins and sign-outs, console actions
    /// and sampled allowed requests. Safe to run while the proxy is running.
    Audit {
        /// The configuration file (for `data_dir`, or PostgreSQL with `[postgres]`).
        #[arg(long, short)]
        config: PathBuf,
        /// Only records by this user or SCIM token, or naming them as the user or a console
        /// action's target (case-insensitive; not SCIM changes about them, which the console
        /// shows), and every record of records lost (which may have been theirs).
        #[arg(long)]
        user: Option<String>,
        /// Only records from this RFC 3339 time on, or from this long ago (`90s`, `15m`, `1h`,
        /// `2d`).
        #[arg(long)]
        since: Option<String>,
        /// Print the records as stored, one JSON object a line.
        #[arg(long)]
        json: bool,
        /// Print the newest records first: read from the log's end, so `| head` costs only
        /// what it prints.
        #[arg(long)]
        newest_first: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match portcullis_config::load(&file) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                print_problems(&file, &errors);
                ExitCode::FAILURE
            }
        },
        Command::RotateAssertionKey {
            config,
            publish_for,
        } => {
            let rotated = load_config(&config).and_then(|config| {
                let shared = config.postgres.is_some();
                rotate_assertion_key(&config, publish_for).map(|r| (r, shared))
            });
            match rotated {
                Ok(((kid, signs), shared)) => {
                    println!("new assertion signing key: {kid}");
                    let from = i64::try_from(signs)
                        .ok()
                        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                        .and_then(|t| {
                            t.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        })
                        .unwrap_or_else(|| signs.to_string());
                    // A server with its keys in `data_dir` reads them every minute, and
                    // upstreams cache the key set as long: a key that signs sooner than two
                    // minutes from now may reach an upstream before the key set naming it.
                    let published = if shared {
                        "published now"
                    } else {
                        "published by the running server within a minute"
                    };
                    println!(
                        "{published}; it signs from {from}, {}s from now (the old key until then)",
                        publish_for.as_secs()
                    );
                    let soonest = if shared { 60 } else { 120 };
                    if publish_for.as_secs() < soonest {
                        eprintln!(
                            "portcullis: warning: upstreams that cache the key set (60s) may \
                             see assertions signed with it before they have it: give \
                             --publish-for {soonest}s or more"
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portcullis: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Audit {
            config,
            user,
            since,
            json,
            newest_first,
        } => {
            let printed = load_config(&config).and_then(|loaded| {
                let since = since
                    .map(|s| audit::parse_since(&s, time::OffsetDateTime::now_utc()))
                    .transpose()
                    .map_err(|e| format!("--since {e}"))?;
                let filter = audit::Filter {
                    user,
                    since,
                    ..audit::Filter::default()
                };
                let postgres = open_postgres(&loaded)?;
                let kept_at =
                    audit::Destination::of(&loaded.data_dir, postgres.map(|pg| pg.audit_log()));
                let order = if newest_first {
                    audit::Order::NewestFirst
                } else {
                    audit::Order::OldestFirst
                };
                audit::run_cli(kept_at, &filter, order, json)
            });
            match printed {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("portcullis: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain {
            config,
            user,
            agent,
            machine,
            on_behalf_of,
            url,
            method,
            json,
        } => {
            let who = match (&user, &agent, &machine) {
                (_, Some(name), _) => explain::Who::Agent {
                    name,
                    on_behalf_of: on_behalf_of.as_deref(),
                },
                (_, None, Some(machine)) => explain::Who::Machine(machine),
                (user, None, None) => explain::Who::Person(user.as_deref().unwrap_or_default()),
            };
            let explained = load_config(&config)
                .and_then(|config| explain::run_cli(config, who, &url, &method))
                .and_then(|answer| {
                    let text = if json {
                        answer.to_json()?
                    } else {
                        answer.to_string()
                    };
                    println!("{text}");
                    Ok(answer.allowed)
                });
            match explained {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("portcullis: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve { config } => match serve(&config) {
            Ok(never) => match never {},
            Err(message) => {
                logging::flush();
                eprintln!("portcullis: {message}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The configuration, for a command that never connects to an upstream (`audit`, `explain`,
/// `rotate-assertion-key`): upstream names are not resolved, so one that does not resolve just
/// then (the running proxy keeps the address it had) keeps nobody from reading the audit log.
fn load_config(path: &Path) -> Result<portcullis_config::Config, String> {
    let unresolved = |_: &str, port: u16| Ok(std::net::SocketAddr::from(([0, 0, 0, 0], port)));
    portcullis_config::load_resolving(path, &unresolved).map_err(|errors| {
        print_problems(path, &errors);
        "the configuration has problems".to_owned()
    })
}

fn print_problems(file: &Path, errors: &portcullis_config::ConfigErrors) {
    for problem in &errors.problems {
        eprintln!("{}: {problem}", file.display());
    }
}

enum Never {}

/// Starts the proxy; returns only if it cannot start.
fn serve(config_path: &Path) -> Result<Never, String> {
    // First: loading the file can take a while (a secret file, DNS names), and a SIGHUP sent
    // meanwhile (a reload right after a start) would end the process.
    ignore_sighup_until_ready()?;
    // What is loaded, and what the file poll compares the file with: an edit made while
    // Portcullis starts is reloaded once it serves.
    let started_with = std::fs::read(config_path).ok();
    let loaded = match &started_with {
        Some(bytes) => {
            portcullis_config::load_read(config_path, bytes, &portcullis_config::resolve_now)
        }
        None => portcullis_config::load(config_path),
    };
    let config = loaded.map_err(|errors| {
        print_problems(config_path, &errors);
        format!(
            "{} has {} problem(s); not starting",
            config_path.display(),
            errors.problems.len()
        )
    })?;
    logging::init(&config.log);
    match portcullis::state::raise_open_files_limit() {
        Ok((from, to)) if from < to => {
            tracing::info!(from, to, "limit on open files raised to the hard limit");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}; connections past it will be refused"),
    }
    portcullis::state::make_data_dir(&config.data_dir)?;

    let listeners = config.listeners.clone();
    // Each address is tried before anything starts: pingora gives up on one it cannot bind
    // (no such address here yet, a port below 1024 without the capability) in a task of its
    // own, and the process would stay up serving nothing, for good.
    let addresses =
        (listeners.iter().map(|l| l.address)).chain(config.admin.as_ref().map(|a| a.address));
    for address in addresses.clone() {
        match std::net::TcpListener::bind(address) {
            // Held by another process (the one this replaces, stopping): pingora retries.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(format!("cannot listen on {address}: {e}")),
        }
    }
    let upgrade_sock = config.data_dir.join("pingora-upgrade.sock");
    let admin = config.admin.clone();
    let server_config = config.server.clone();
    let longest_drain = reload::Drainer::longest(&config);
    let postgres = open_postgres(&config)?;
    let audit_log = || {
        audit::Destination::of(
            &config.data_dir,
            postgres.as_ref().map(PgStorage::audit_log),
        )
    };
    let audit = Arc::new(audit::Audit::open(audit_log(), audit_log())?);
    let kept = Arc::new(auth::sessions::Kept::default());
    // With a shared store the assertion keys are too, once the directory has them.
    let signer = match &postgres {
        Some(_) => {
            assertion::Signer::shared(kept.clone(), clock::now_unix(), assertion::TOKEN_TTL)?
        }
        None => Arc::new(assertion::Signer::open(
            &config.data_dir,
            clock::now_unix(),
            assertion::TOKEN_TTL,
        )?),
    };
    let (directory, freshness) = open_directory(&config, postgres, &audit, &kept)?;
    // Committed changes the log lacks (a crash between the commit and the log's write).
    let recovered = audit.recover_changes(directory.seq(), |after, limit| {
        directory
            .changes(after, limit)
            .map_err(|e| format!("cannot read the directory's changes: {}", e.detail))
    })?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "audit log: changes it lacked appended from the directory"
        );
    }
    let auth = Arc::new(auth::Auth::new(directory.clone(), kept, audit.clone())?);
    warn_of_tokens_in_clear(&config);
    let runtime = Runtime::build(config, &directory);
    let shared = Arc::new(Shared::new(
        config_path.to_path_buf(),
        directory,
        freshness,
        auth,
        signer,
        audit,
        runtime,
    ));

    let conf = ServerConf {
        threads: server_config.threads,
        // One single-threaded runtime per worker thread: no cross-thread wake-ups per request.
        work_stealing: false,
        // Drainer exits as soon as it is done; this is only the upper bound.
        grace_period_seconds: Some(longest_drain.as_secs().saturating_add(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        // pingora's 16 by default: a request on a route of more upstreams, all but the last
        // refusing it, would end at the 16th (see `MAX_UPSTREAMS`).
        max_retries: 2 * portcullis_config::MAX_UPSTREAMS,
        // Never used (no signal asks pingora for an upgrade: see `StopSignals`), and never in
        // `/tmp`, where any user could listen for the sockets it would hand over.
        upgrade_sock: upgrade_sock.to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    let mut proxy = http_proxy_service_with_name(&conf, proxy::Proxy::new(shared.clone()), "proxy");
    // An HTTP/2 client that sits idle is closed as an idle HTTP/1 one is (at the value of start:
    // pingora takes it once). Without it, pingora holds an idle HTTP/2 connection for good.
    if let Some(app) = proxy.app_logic_mut() {
        let mut options = HttpServerOptions::default();
        options.h2_idle_timeout = Some(server_config.client_idle_timeout);
        app.server_options = Some(options);
        // An HTTP/2 request's head is bounded by `max_request_header_bytes`, as an HTTP/1 one
        // is, in Portcullis' own check (431). The HTTP/2 layer's bound (pingora's 64 KiB by
        // default) is set above it, counting as HTTP/2 counts; it too is taken once, at start.
        let list_size = reload::h2_header_list_size(server_config.max_request_header_bytes);
        let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
        h2.max_header_list_size(list_size);
        let streams = reload::h2_max_streams(list_size);
        h2.max_concurrent_streams(streams);
        portcullis::state::set_h2_streams(streams);
        app.h2_options = Some(h2);
    }
    for listener in &listeners {
        let address = listener.address.to_string();
        match shared.resolvers.get(&listener.address) {
            Some(resolver) => {
                let mut tls = TlsSettings::with_callbacks(Box::new(NoCallbacks))
                    .map_err(|e| format!("TLS listener {address}: {e}"))?;
                tls.set_cert_resolver(resolver.clone());
                tls.enable_h2();
                proxy.add_tls_with_settings(&address, None, tls);
            }
            None => proxy.add_tcp(&address),
        }
    }
    let proxy = server.add_service(proxy);

    if let Some(admin) = admin {
        let mut service = Service::new("admin".to_owned(), admin::Admin::new(shared.clone()));
        service.add_tcp(&admin.address.to_string());
        // The admin listener starts after the proxy service; /readyz itself checks that the
        // proxy's listeners accept connections (see `admin`).
        server.add_service(service).add_dependency(&proxy);
    }
    server.add_service(background_service(
        "reload",
        reload::Reloader::new(shared.clone(), started_with),
    ));
    server.add_service(background_service(
        "oidc discovery",
        services::Discovery::new(shared.clone()),
    ));
    server.add_service(background_service(
        "idp keys",
        services::IdpKeys::new(shared.clone()),
    ));
    server.add_service(background_service(
        "assertion keys",
        services::KeyRefresher::new(shared.signer.clone()),
    ));
    server.add_service(background_service(
        "sessions",
        services::SessionKeeper::new(shared.clone()),
    ));
    server.add_service(background_service(
        "upstream dns",
        services::UpstreamDns::new(shared.clone()),
    ));
    server.add_service(background_service(
        "stream watcher",
        services::Watcher::new(shared.clone()),
    ));
    server.add_service(background_service(
        "listeners",
        services::ListenerWatch::new(shared.clone(), addresses.collect()),
    ));
    server.add_service(background_service("drain", reload::Drainer::new(shared)));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "portcullis starting");
    // pingora's `run_forever` would exit without the log lines still waiting to be written.
    server.run(RunArgs {
        shutdown_signal: Box::new(reload::StopSignals),
    });
    logging::flush();
    std::process::exit(0)
}

/// A new assertion signing key: in `data_dir`, or with `[postgres]` kept for every replica.
/// Rotates the assertion keys; the new key signs `lead` from now. Returns its kid and when it
/// signs from (unix seconds).
fn rotate_assertion_key(
    config: &portcullis_config::Config,
    lead: std::time::Duration,
) -> Result<(String, u64), String> {
    let now = clock::now_unix();
    let Some(postgres) = open_postgres(config)? else {
        return assertion::rotate_keys(&config.data_dir, now, lead, assertion::TOKEN_TTL);
    };
    let fail = |e: StoreError| format!("PostgreSQL: {e}");
    // Only into a schema of this build's, and changing none: migrating would stop a fleet of
    // an older build at its replicas' next renewal.
    if !postgres.check_schema().map_err(fail)? {
        return Err(
            "no directory in PostgreSQL yet: a replica makes it at its first start; \
                    start a replica first, then rotate"
                .to_owned(),
        );
    }
    let existing = postgres.entries(assertion::ASSERTION_KEY).map_err(fail)?;
    let (kid, signs, entries) =
        assertion::rotate_shared(&existing, now, lead, assertion::TOKEN_TTL)?;
    postgres.put_entries(entries).map_err(fail)?;
    Ok((kid, signs))
}

/// Says at start which listeners refuse the bearer tokens the file's http routes take: sent
/// over plain HTTP off loopback, they cross the network in clear (see `Auth::authenticate`);
/// and which upstreams routes pass them on to so (as every reload does).
fn warn_of_tokens_in_clear(config: &portcullis_config::Config) {
    use portcullis_config::{Credential, Scheme};
    let takes_tokens = config
        .routes
        .iter()
        .any(|r| r.scheme == Scheme::Http && r.accept.contains(&Credential::Bearer));
    reload::warn_of_tokens_passed_in_clear(config);
    for listener in &config.listeners {
        if takes_tokens && !listener.carries_credentials() {
            tracing::warn!(
                address = %listener.address,
                "plain HTTP off loopback: bearer tokens sent here are refused (dropped unread on \
                 paths open to anyone), as they cross the network in clear; serve them over TLS, or set behind_tls_proxy (or \
                 allow_plain_http, on a network you trust) on this listener"
            );
        }
    }
}

/// The shared store of `[postgres]`, if configured (not yet connected).
fn open_postgres(config: &portcullis_config::Config) -> Result<Option<PgStorage>, String> {
    config
        .postgres
        .as_ref()
        .map(|postgres| {
            PgStorage::open(&PgOptions {
                url: postgres.url.expose().to_owned(),
                pool_size: postgres.pool_size,
                max_staleness: postgres.max_staleness,
            })
            .map_err(|e| e.to_string())
        })
        .transpose()
}

/// Opens the directory, rebuilding its in-memory index: from `data_dir`, or from `postgres`
/// (shared by several replicas), followed by a thread of its own (this replica's lease is the
/// second value). Every change committed here also goes to the audit log, and `kept` holds the
/// entries kept beside the directory.
fn open_directory(
    config: &portcullis_config::Config,
    postgres: Option<PgStorage>,
    audit: &Arc<audit::Audit>,
    kept: &Arc<auth::sessions::Kept>,
) -> Result<(Arc<Directory>, Option<Arc<Freshness>>), String> {
    let sinks = || Sinks {
        changes: Some(audit.change_sink()),
        entries: Some(kept.clone()),
    };
    if let Some(storage) = postgres {
        // A directory of its own, from a start without [postgres], is not PostgreSQL's: the
        // fleet would start without what the IdP pushed to it, and a start without
        // [postgres] later would bring back what the IdP has taken away since.
        let own = config.data_dir.join(portcullis_scim::store::redb::FILE);
        if own.exists() {
            return Err(format!(
                "{} holds a directory of its own, from a start without [postgres]; with \
                 [postgres] the directory is PostgreSQL's, and this one is neither read nor \
                 moved there: move the file out of data_dir (and have the IdP push its users \
                 and groups to the fleet again), or remove [postgres]",
                own.display()
            ));
        }
        match storage.migrate() {
            Ok(()) => {}
            Err(e @ (StoreError::Version { .. } | StoreError::Unsuitable(_))) => {
                return Err(format!("PostgreSQL: {e}"))
            }
            // Started anyway, not ready: the follower connects (and migrates) when it can.
            Err(e) => tracing::warn!("PostgreSQL: {e}; not ready until it answers"),
        }
        let freshness = storage.freshness();
        let fleet = storage.fleet();
        let directory = Arc::new(
            Directory::open_unloaded(
                Arc::new(storage),
                Box::new(time::OffsetDateTime::now_utc),
                sinks(),
            )
            .map_err(|e| e.to_string())?,
        );
        let following = directory.clone();
        let audit = audit.clone();
        std::thread::Builder::new()
            .name("directory-feed".to_owned())
            .spawn(move || {
                let e = fleet.follow(
                    &|| following.catch_up(),
                    &|| following.visible_seq(),
                    &|| following.foreign_seq(),
                );
                // Its lease is over already, here and in the table (see `Fleet::follow`);
                // what the audit log has queued is written first.
                tracing::error!("PostgreSQL: {e}; stopping");
                if !audit.flush(std::time::Duration::from_secs(5)) {
                    tracing::warn!(
                        "exiting before the audit log was written to the end (with PostgreSQL, \
                         those kept in data_dir's audit spool wait there for the next start)"
                    );
                }
                logging::flush();
                std::process::exit(1);
            })
            .map_err(|e| format!("cannot start the directory feed: {e}"))?;
        return Ok((directory, Some(freshness)));
    }
    let started = std::time::Instant::now();
    let storage = open_redb(&config.data_dir)?;
    let directory = Directory::open_with_sinks(
        Arc::new(storage),
        Box::new(time::OffsetDateTime::now_utc),
        sinks(),
    )
    .map_err(|e| e.to_string())?;
    let (users, groups) = directory.counts();
    tracing::info!(
        users,
        groups,
        seq = directory.seq(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "directory loaded"
    );
    Ok((Arc::new(directory), None))
}

/// Opens the directory in `data_dir`; while another process holds its file (`portcullis
/// explain` reading it, with no proxy answering on the admin listener), waits for it, up to
/// [`HELD_FOR`].
fn open_redb(data_dir: &std::path::Path) -> Result<RedbStorage, String> {
    let deadline = std::time::Instant::now() + HELD_FOR;
    let mut said = false;
    loop {
        match RedbStorage::open(data_dir) {
            Err(e @ StoreError::Held(_)) if std::time::Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    tracing::warn!(
                        "{e} (portcullis explain?): waiting for it, up to {}s",
                        HELD_FOR.as_secs()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            opened => return opened.map_err(|e| e.to_string()),
        }
    }
}

/// How long a start waits for another process to let go of the directory's file.
const HELD_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// SIGHUP's default action ends the process. Registering a handler now, before the listeners
/// start, makes a SIGHUP that arrives during start-up harmless. It may not be acted on: the
/// file poll reloads the edit it announced (see `reload::Reloader`).
fn ignore_sighup_until_ready() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    runtime
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) })
        .map(drop)
        .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))
}

struct NoCallbacks;

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for NoCallbacks {}

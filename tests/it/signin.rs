//! Sign-in end to end (issue 4): the real `portcullis` binary in front of a real upstream, a
//! real OpenID provider (`oidc-provider` under Node) and, for the browser flow, headless
//! Chromium. People sign in with the authorization-code flow; sessions live on the server and
//! end at sign-out and at the IdP's back-channel logout; return URLs are checked; the IdP may
//! be down. Bearer JWTs for machines are in `signin_machine.rs`, which shares [`Fixture`].
//!
//! Every host name (`app.test`, `corp.example.com`, …) is resolved to 127.0.0.1 by the
//! clients and the browser; the IdP's issuer is `http://127.0.0.1:<port>`, so Portcullis
//! reaches it without DNS.

use std::time::{Duration, Instant};

use portcullis_tests::client::plain_client_builder;
use portcullis_tests::idp::{jwt_claims, query_param, random_token};
use portcullis_tests::{
    Browser, ConfigBuilder, Echo, Idp, IdpClient, IdpOutage, IdpProfile, IdpResource, IdpSetup,
    IdpUser, JwtIssuer, Oidc, Pkce, Portcullis, Recorder, Route, Upstream,
};
use reqwest::header::{ACCEPT, COOKIE, LOCATION, ORIGIN, REFERER, WWW_AUTHENTICATE};
use reqwest::StatusCode;

pub(crate) const CLIENT_ID: &str = "portcullis";
pub(crate) const CLIENT_SECRET: &str = "portcullis-secret-0123456789abcdefghijklmnop";
pub(crate) const MACHINE_ID: &str = "build-agent";
pub(crate) const MACHINE_SECRET: &str = "build-agent-secret-0123456789abcdefghijklmn";
/// The resource whose access tokens Portcullis accepts (`aud` = [`API_AUD`]).
pub(crate) const API: &str = "https://api.corp.test/";
pub(crate) const API_AUD: &str = "portcullis-api";
/// A resource of the same IdP for someone else: its tokens have the wrong audience.
pub(crate) const OTHER_API: &str = "https://other.corp.test/";
pub(crate) const OTHER_AUD: &str = "someone-else";
/// Same audience as [`API`], tokens living [`SHORT_TTL`] seconds.
pub(crate) const SHORT_API: &str = "https://short.corp.test/";
/// How long [`SHORT_API`]'s tokens live, in seconds: 7 to 8 s, `iat` being whole seconds. Long
/// enough for a first fetch of the IdP's keys and a handshake on a loaded machine.
pub(crate) const SHORT_TTL: u64 = 8;
pub(crate) const ALICE: &str = "alice@corp.test";
pub(crate) const ALICE_PASSWORD: &str = "correct horse battery staple";
pub(crate) const BOB: &str = "bob@corp.test";
pub(crate) const BOB_PASSWORD: &str = "bob's password, long enough";
/// The session cookie over plain HTTP (no `__Host-` prefix without TLS).
pub(crate) const SESSION_COOKIE: &str = "portcullis_session";
/// The cookies carrying sign-ins in progress are named this, `_`, and 16 hex digits of the
/// SHA-256 of the sign-in's state.
pub(crate) const BINDING_COOKIE: &str = "portcullis_signin";

/// The name of the cookie that carries the sign-in with this `state`.
pub(crate) fn binding_cookie_name(state: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(state.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{BINDING_COOKIE}_{hex}")
}

/// The `Set-Cookie` line of a sign-in's cookie, if `resp` sets one.
pub(crate) fn binding_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|line| {
            line.trim_start_matches("__Host-")
                .starts_with(BINDING_COOKIE)
        })
        .map(str::to_owned)
}
/// An `Accept` header as a browser sends it when navigating.
pub(crate) const BROWSER_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
/// Every wait for the IdP or Portcullis to change state is bounded by this.
const WAIT: Duration = Duration::from_secs(40);
/// Set by browsers only: no page's script can (a forbidden header name).
const SEC_FETCH_SITE: reqwest::header::HeaderName =
    reqwest::header::HeaderName::from_static("sec-fetch-site");

/// Where the IdP sends back-channel logout tokens for the `portcullis` client.
pub(crate) enum Backchannel {
    /// `http://127.0.0.1:<portcullis>/.portcullis/backchannel_logout`.
    Portcullis,
    /// Somewhere else (a recorder, to capture the token).
    At(String),
}

/// How to set a [`Fixture`] up.
pub(crate) struct Options {
    pub backchannel: Backchannel,
    /// How the IdP misbehaves as Portcullis starts (`Unavailable`: never reached).
    pub idp_at_start: IdpOutage,
    /// Settings of the IdP's `[[jwt_issuers]]` entry, `(key, raw TOML value)`, e.g.
    /// `("leeway", "\"0s\"")` (default: none, the config's defaults).
    pub idp_issuer_settings: Vec<(&'static str, &'static str)>,
    /// Audiences the IdP's `[[jwt_issuers]]` entry accepts besides `API_AUD`.
    pub more_idp_audiences: Vec<&'static str>,
    /// More `[[jwt_issuers]]`.
    pub extra_issuers: Vec<JwtIssuer>,
    /// `[oidc] refresh = true`, with ID tokens living this many seconds at the IdP.
    pub refresh_every: Option<u64>,
    /// More routes, each to the `api` upstream.
    pub extra_routes: Vec<fn(&Upstream) -> Route>,
    /// Settings of `[oidc]`, `(key, raw TOML value)`.
    pub oidc_settings: Vec<(&'static str, &'static str)>,
    /// More people the IdP knows.
    pub more_idp_users: Vec<IdpUser>,
    /// The IdP puts the claims of the scopes asked for in the ID token too, as Okta and Auth0
    /// do (default: only at UserInfo, as oidc-provider ships).
    pub claims_in_id_token: bool,
    /// A SCIM directory (at `SCIM_HOST`, token `SCIM_TOKEN`): without one, nobody is in it.
    pub scim: bool,
    /// Claims the IdP never puts in an ID token, only in UserInfo answers.
    pub userinfo_only: Vec<&'static str>,
    /// How the IdP's tokens look. With `Entra`, the IdP puts groups in ID tokens
    /// (`groupMembershipClaims`) and Portcullis has `[identity] preset = "entra"`; people at
    /// the IdP need an `oid`.
    pub idp_profile: IdpProfile,
    /// Settings of `[server]`, `(key, raw TOML value)`.
    pub server_settings: Vec<(&'static str, &'static str)>,
    /// Portcullis' environment, besides what it inherits.
    pub env: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            backchannel: Backchannel::Portcullis,
            idp_at_start: IdpOutage::Off,
            idp_issuer_settings: Vec::new(),
            more_idp_audiences: Vec::new(),
            extra_issuers: Vec::new(),
            refresh_every: None,
            extra_routes: Vec::new(),
            oidc_settings: Vec::new(),
            more_idp_users: Vec::new(),
            claims_in_id_token: false,
            scim: false,
            userinfo_only: Vec::new(),
            idp_profile: IdpProfile::Conformant,
            server_settings: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running IdP, Portcullis and two upstreams:
///
/// - `http://app.test` and `http://corp.example.com` → `app`, sessions only (the default);
/// - `http://api.test` → `api`, `accept = ["bearer"]`;
/// - `http://both.test` → `api`, `accept = ["session", "bearer"]`.
///
/// The IdP knows the `portcullis` client (callbacks on app.test, corp.example.com and
/// both.test), the `build-agent` machine client, alice and bob, and three resources.
pub(crate) struct Fixture {
    pub cfg: ConfigBuilder,
    pub idp: Idp,
    pub px: Portcullis,
    pub app: Upstream,
    pub api: Upstream,
}

/// A finished sign-in of a plain HTTP client.
#[derive(Debug, Clone)]
pub(crate) struct SignedIn {
    /// The session cookie's value.
    pub cookie: String,
    /// The whole `Set-Cookie` line that set it.
    pub set_cookie: String,
    /// Where the callback sent the client.
    pub landed: String,
    /// The callback the IdP sent the client to (its code now spent).
    pub callback: String,
}

impl Fixture {
    pub async fn start() -> Fixture {
        Fixture::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Fixture {
        let app = Upstream::start("app").await;
        let api = Upstream::start("api").await;
        let cfg = ConfigBuilder::new().http_listener();
        let port = cfg.http_addr().port();
        let callback = |host: &str| format!("http://{host}:{port}/.portcullis/callback");
        let backchannel = match options.backchannel {
            Backchannel::Portcullis => {
                format!("http://127.0.0.1:{port}/.portcullis/backchannel_logout")
            }
            Backchannel::At(url) => url,
        };
        // oidc-provider's pairwise `sub` (the entra profile) wants a client's callbacks on one
        // host, or a sector_identifier_uri.
        let hosts: &[&str] = match options.idp_profile {
            IdpProfile::Entra => &["app.test"],
            _ => &["app.test", "corp.example.com", "both.test"],
        };
        let redirect_uris: Vec<String> = hosts.iter().map(|host| callback(host)).collect();
        let mut setup = idp_setup(&redirect_uris, &backchannel)
            .conform_id_token_claims(!options.claims_in_id_token)
            .profile(options.idp_profile)
            .group_membership_claims(options.idp_profile == IdpProfile::Entra);
        for user in options.more_idp_users {
            setup = setup.user(user);
        }
        for claim in options.userinfo_only {
            setup = setup.userinfo_only(claim);
        }
        if let Some(seconds) = options.refresh_every {
            setup = setup.ttl("IdToken", seconds);
        }
        let idp = setup.start().await;
        assert!(
            idp.issuer().starts_with("http://127.0.0.1:"),
            "{}",
            idp.issuer()
        );

        let audiences: Vec<&str> = std::iter::once(API_AUD)
            .chain(options.more_idp_audiences.iter().copied())
            .collect();
        let mut idp_issuer = JwtIssuer::new(idp.issuer(), &audiences);
        for (key, value) in &options.idp_issuer_settings {
            idp_issuer = idp_issuer.set(key, value);
        }
        let mut oidc = Oidc::new(
            idp.issuer(),
            CLIENT_ID,
            CLIENT_SECRET,
            &format!("app.test:{port}"),
        )
        .set("session_lifetime", "\"2h\"");
        if options.refresh_every.is_some() {
            // As an operator of Okta or Entra ID sets it: they issue a refresh token only to a
            // sign-in that asks for `offline_access` (the test IdP too).
            oidc = oidc.set("refresh", "true").set(
                "scopes",
                r#"["openid", "email", "profile", "offline_access"]"#,
            );
        }
        for (key, value) in &options.oidc_settings {
            oidc = oidc.set(key, value);
        }
        let mut cfg = cfg
            .route(Route::new("http://app.test", &[&app]).any_signed_in())
            .route(Route::new("http://corp.example.com", &[&app]).any_signed_in())
            .route(
                Route::new("http://api.test", &[&api])
                    .accept(&["bearer"])
                    .any_signed_in(),
            )
            .route(
                Route::new("http://both.test", &[&api])
                    .accept(&["session", "bearer"])
                    .any_signed_in(),
            )
            .oidc(oidc)
            .jwt_issuer(idp_issuer);
        for issuer in options.extra_issuers {
            cfg = cfg.jwt_issuer(issuer);
        }
        for route in options.extra_routes {
            cfg = cfg.route(route(&api));
        }
        if options.scim {
            cfg = cfg.scim(crate::SCIM_HOST, &[("okta", crate::SCIM_TOKEN)]);
        }
        if options.idp_profile == IdpProfile::Entra {
            cfg = cfg.identity("preset = \"entra\"");
        }
        for (key, value) in options.server_settings {
            cfg = cfg.server(key, value);
        }
        let idp_at_start = options.idp_at_start;
        if idp_at_start != IdpOutage::Off {
            idp.set_outage(idp_at_start).await;
        }
        let env: Vec<(&str, &str)> = (options.env.iter())
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let px = Portcullis::start_with_env(&cfg.toml(), &env).await;
        let fx = Fixture {
            cfg,
            idp,
            px,
            app,
            api,
        };
        // (An empty key set leaves the provider found.)
        if matches!(idp_at_start, IdpOutage::Off | IdpOutage::JwksEmpty) {
            fx.wait_sign_in_available(WAIT).await;
        }
        fx
    }

    /// `http://<host>:<port><path>` on Portcullis' listener.
    pub fn url(&self, host: &str, path: &str) -> String {
        self.cfg.http_url(host, path)
    }

    /// `http://app.test:<port><path>`.
    /// Rewrites the config with `line` added to `[oidc]` and reloads it (waiting until done).
    pub async fn reload_with_oidc_line(&self, line: &str) {
        let text = self
            .cfg
            .toml()
            .replacen("\n[oidc]\n", &format!("\n[oidc]\n{line}\n"), 1);
        assert_ne!(text, self.cfg.toml(), "the config has an [oidc] section");
        self.px.rewrite_config(&text);
        self.px.reload_and_wait().await;
    }

    pub fn app_url(&self, path: &str) -> String {
        self.url("app.test", path)
    }

    /// `http://app.test:<port>`, the origin of the app.
    pub fn app_origin(&self) -> String {
        self.app_url("")
    }

    /// Posts a same-origin sign-out on the app host with `cookies` (a `Cookie` header).
    pub async fn sign_out(&self, cookies: &str) -> reqwest::Response {
        bare_client()
            .post(self.app_url("/.portcullis/sign_out"))
            .header(ORIGIN, self.app_origin())
            .header(COOKIE, cookies)
            .send()
            .await
            .unwrap()
    }

    /// Polls `/.portcullis/sign_in` until it redirects to the IdP (Portcullis has discovered
    /// it), for at most `timeout`.
    pub async fn wait_sign_in_available(&self, timeout: Duration) {
        let url = self.app_url("/.portcullis/sign_in?rd=%2F");
        wait_sign_in_available_at(&client(), &url, timeout).await;
    }

    /// The first leg: a browser-like GET of `url` must be sent to the IdP's authorization
    /// endpoint with a browser-binding cookie. Returns the authorization URL.
    pub async fn start_sign_in(&self, client: &reqwest::Client, url: &str) -> String {
        let resp = navigate(client, url).await;
        let status = resp.status();
        let location = header(&resp, LOCATION.as_str());
        let binding = binding_cookie(&resp);
        assert_eq!(
            status,
            StatusCode::FOUND,
            "GET {url} must be sent to sign in; body: {}",
            resp.text().await.unwrap_or_default()
        );
        let location = location.expect("a Location");
        assert!(
            location.starts_with(&format!("{}/auth?", self.idp.issuer())),
            "{url} redirected to {location}, not to the IdP's authorization endpoint"
        );
        let binding = binding.expect("the sign-in sets the browser-binding cookie");
        assert!(binding.contains("HttpOnly"), "{binding}");
        // On TLS, `__Host-`: no other host (a sibling under the same domain) can plant one.
        let (binding, on_tls) = match binding.strip_prefix("__Host-") {
            Some(rest) => {
                assert!(
                    rest.contains("Path=/;") && rest.contains("Secure"),
                    "{rest}"
                );
                (rest, true)
            }
            None => (binding.as_str(), false),
        };
        assert!(
            on_tls || binding.contains("Path=/.portcullis/callback;"),
            "{binding}"
        );
        assert_eq!(on_tls, url.starts_with("https:"), "{binding}");
        let state = query_param(&location, "state").expect("a state");
        assert!(
            binding.starts_with(&format!("{}=", binding_cookie_name(&state))),
            "the cookie is named after the sign-in's state {state}: {binding}"
        );
        for (param, want) in [
            ("response_type", Some("code")),
            ("client_id", Some(CLIENT_ID)),
            ("code_challenge_method", Some("S256")),
        ] {
            assert_eq!(
                query_param(&location, param).as_deref(),
                want,
                "{param} in {location}"
            );
        }
        for param in ["state", "nonce", "code_challenge", "redirect_uri"] {
            assert!(
                query_param(&location, param).is_some_and(|v| !v.is_empty()),
                "no {param} in {location}"
            );
        }
        location
    }

    /// Signs in at the IdP's login form (with the harness' own HTTP client) and returns the
    /// callback URL the IdP sends the browser to (`/.portcullis/callback?code=…&state=…`).
    pub async fn idp_login(&self, authorize_url: &str, login: &str, password: &str) -> String {
        let back = self.idp.sign_in_http(authorize_url, login, password).await;
        let redirect_uri = query_param(authorize_url, "redirect_uri").expect("redirect_uri");
        assert!(
            back.starts_with(&format!("{redirect_uri}?")),
            "the IdP sent the browser to {back}, not to {redirect_uri}"
        );
        back
    }

    /// The IdP's token response to Portcullis' own client for `login`'s code flow, as a
    /// sign-in gets it (`id_token` with a nonce, `access_token`), fetched by the harness.
    pub async fn code_flow_tokens(&self, login: &str, password: &str) -> serde_json::Value {
        let redirect_uri = self.app_url("/.portcullis/callback");
        let pkce = Pkce::new();
        let authorize = self.idp.authorization_url(
            CLIENT_ID,
            &redirect_uri,
            "openid email",
            &random_token(16),
            &random_token(16),
            &pkce,
        );
        let back = self.idp_login(&authorize, login, password).await;
        self.idp
            .exchange_code(
                CLIENT_ID,
                CLIENT_SECRET,
                &query_param(&back, "code").unwrap(),
                &redirect_uri,
                &pkce.verifier,
            )
            .await
    }

    /// A whole sign-in with `client` (which must keep cookies): `url` → IdP → callback.
    /// Asserts the callback redirects and sets the session cookie.
    pub async fn sign_in(
        &self,
        client: &reqwest::Client,
        url: &str,
        login: &str,
        password: &str,
    ) -> SignedIn {
        let authorize = self.start_sign_in(client, url).await;
        self.finish_sign_in(client, &authorize, login, password)
            .await
    }

    /// The rest of a sign-in started at `authorize` (see [`Fixture::start_sign_in`]): the IdP's
    /// login, then the callback with `client`, which must redirect and set the session cookie.
    pub async fn finish_sign_in(
        &self,
        client: &reqwest::Client,
        authorize: &str,
        login: &str,
        password: &str,
    ) -> SignedIn {
        let callback = self.idp_login(authorize, login, password).await;
        let resp = client.get(&callback).send().await.expect("GET callback");
        let status = resp.status();
        let location = header(&resp, LOCATION.as_str());
        let session = set_cookie(&resp, SESSION_COOKIE);
        assert_eq!(
            status,
            StatusCode::FOUND,
            "the callback {callback} failed: {}",
            resp.text().await.unwrap_or_default()
        );
        let set_cookie = session.expect("the callback sets the session cookie");
        SignedIn {
            cookie: cookie_value(&set_cookie),
            set_cookie,
            landed: location.expect("the callback's Location"),
            callback,
        }
    }
}

/// The IdP every test uses: the `portcullis` client (callbacks at `redirect_uris`, back-channel
/// logout to `backchannel`), the `build-agent` machine client, alice and bob, and three
/// resources ([`API`], [`OTHER_API`], [`SHORT_API`]).
pub(crate) fn idp_setup(redirect_uris: &[String], backchannel: &str) -> IdpSetup {
    let mut portcullis = IdpClient::new(CLIENT_ID, CLIENT_SECRET)
        .backchannel_logout_uri(backchannel)
        .metadata(
            "grant_types",
            serde_json::json!(["authorization_code", "refresh_token"]),
        );
    for uri in redirect_uris {
        portcullis = portcullis.redirect_uri(uri);
    }
    IdpSetup::new()
        .client(portcullis)
        // A redirect URI only because the IdP requires one; nothing is ever sent there.
        .client(
            IdpClient::new(MACHINE_ID, MACHINE_SECRET).redirect_uri("http://127.0.0.1:9/unused"),
        )
        .user(IdpUser::new("alice", ALICE, ALICE_PASSWORD).name("Alice Liddell"))
        .user(IdpUser::new("bob", BOB, BOB_PASSWORD).name("Bob"))
        .resource(IdpResource::new(API, API_AUD).scope("api:read"))
        .resource(IdpResource::new(OTHER_API, OTHER_AUD).scope("api:read"))
        .resource(
            IdpResource::new(SHORT_API, API_AUD)
                .scope("api:read")
                .ttl(SHORT_TTL),
        )
}

/// The IdP of [`idp_setup`] for a Portcullis whose listener is `cfg`'s HTTP one, with
/// `app.test` as its auth host (callback and back-channel logout there), and the `[oidc]`
/// section that signs people in at it.
pub(crate) async fn idp_for_app_test(cfg: &ConfigBuilder) -> (Idp, Oidc) {
    let port = cfg.http_addr().port();
    let redirect_uris = vec![format!("http://app.test:{port}/.portcullis/callback")];
    let backchannel = format!("http://127.0.0.1:{port}/.portcullis/backchannel_logout");
    let idp = idp_setup(&redirect_uris, &backchannel).start().await;
    let oidc = Oidc::new(
        idp.issuer(),
        CLIENT_ID,
        CLIENT_SECRET,
        &format!("app.test:{port}"),
    );
    (idp, oidc)
}

/// Polls `url` (a `/.portcullis/sign_in` URL) with `client` until it redirects to the IdP
/// (Portcullis has discovered it), for at most `timeout`.
pub(crate) async fn wait_sign_in_available_at(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let resp = navigate(client, url).await;
        let status = resp.status();
        if status == StatusCode::FOUND {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "sign-in at {url} still unavailable after {timeout:?}: {status} {}",
                resp.text().await.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client with its own cookie jar that follows no redirects.
pub(crate) fn client() -> reqwest::Client {
    plain_client_builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build client")
}

/// A client without cookies that follows no redirects.
pub(crate) fn bare_client() -> reqwest::Client {
    plain_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build client")
}

/// A GET as a browser navigating to a page sends it.
pub(crate) async fn navigate(client: &reqwest::Client, url: &str) -> reqwest::Response {
    client
        .get(url)
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A GET presenting `cookie` as the session cookie, with `accept`.
pub(crate) async fn get_with_session(url: &str, cookie: &str, accept: &str) -> reqwest::Response {
    get_with_cookie(url, SESSION_COOKIE, cookie, accept).await
}

/// A GET presenting `value` as the cookie `name`, with `accept`.
pub(crate) async fn get_with_cookie(
    url: &str,
    name: &str,
    value: &str,
    accept: &str,
) -> reqwest::Response {
    bare_client()
        .get(url)
        .header(COOKIE, format!("{name}={value}"))
        .header(ACCEPT, accept)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Asserts that `cookie` is a live session on `url`: the upstream answers.
pub(crate) async fn assert_session_works(url: &str, cookie: &str) -> Echo {
    let resp = get_with_session(url, cookie, "application/json").await;
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    assert_eq!(
        status,
        StatusCode::OK,
        "the session no longer works on {url}: {}",
        String::from_utf8_lossy(&body)
    );
    Echo::parse(&body)
}

/// Asserts that `cookie` is not a session (any more) on `url`, from a fresh client: an API
/// call gets 401, a navigation is sent to sign in.
pub(crate) async fn assert_session_refused(fx: &Fixture, url: &str, cookie: &str) {
    let resp = get_with_session(url, cookie, "application/json").await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "an ended session still answers {url}: {}",
        resp.text().await.unwrap_or_default()
    );
    let resp = get_with_session(url, cookie, BROWSER_ACCEPT).await;
    assert_eq!(resp.status(), StatusCode::FOUND, "{url}");
    let location = header(&resp, LOCATION.as_str()).unwrap_or_default();
    assert!(
        location.starts_with(fx.idp.issuer()),
        "a navigation with an ended session goes to sign in, not to {location}"
    );
}

pub(crate) fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The `Set-Cookie` line that sets cookie `name`, if any.
pub(crate) fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|line| line.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

/// The value in a `Set-Cookie` line.
pub(crate) fn cookie_value(line: &str) -> String {
    let pair = line.split(';').next().unwrap_or_default();
    pair.split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}

/// Returns once the second `token` was issued in (its `iat`) has passed: a change made after
/// it (a re-activation, say) is then in a later second than the token, as `iat` and the
/// directory's times are in whole seconds.
pub(crate) async fn after_the_second_of(token: &str) {
    let iat = jwt_claims(token)["iat"]
        .as_u64()
        .expect("the token has an iat");
    let bound = Instant::now() + Duration::from_secs(5);
    while now_unix() <= iat {
        assert!(Instant::now() < bound, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The attributes of a `Set-Cookie` line, lower-cased, without the name=value pair.
fn cookie_attributes(line: &str) -> Vec<String> {
    line.split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect()
}

// ----- (a) a real browser ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn chromium_signs_in_through_the_idp_and_lands_on_the_original_page() {
    let fx = Fixture::start().await;
    let browser = Browser::start().await;
    let original = fx.app_url("/some/page?x=1");

    browser.goto(&original).await;
    let login_page = browser
        .wait_for_url(|u| u.contains("/interaction/"), WAIT)
        .await;
    assert!(
        login_page.starts_with(fx.idp.issuer()),
        "the browser is on {login_page}, not the IdP"
    );
    browser.fill("input[name=login]", ALICE).await;
    browser.fill("input[name=password]", ALICE_PASSWORD).await;
    browser.click("button[type=submit]").await;
    let landed = browser.wait_for_url(|u| u == original, WAIT).await;
    assert_eq!(landed, original);

    // The upstream's page, for the original path and query.
    let text = browser.wait_for_text("\"upstream\"", WAIT).await;
    assert!(text.contains("\"upstream\":\"app\""), "{text}");
    assert!(text.contains("\"uri\":\"/some/page?x=1\""), "{text}");
    let seen = fx.app.seen();
    assert!(
        seen.iter().any(|e| e.uri == "/some/page?x=1"),
        "the upstream never saw the page: {seen:?}"
    );

    // The session cookie: HttpOnly, SameSite=Lax, host-only, not Secure over http.
    let all = browser.all_cookies().await;
    let cookie = browser
        .cookie(SESSION_COOKIE)
        .await
        .unwrap_or_else(|| panic!("no session cookie: {all:?}"));
    assert!(cookie.http_only, "{cookie:?}");
    assert_eq!(cookie.same_site.as_deref(), Some("Lax"), "{cookie:?}");
    assert!(!cookie.secure, "{cookie:?}");
    assert_eq!(cookie.path, "/", "{cookie:?}");
    assert_eq!(cookie.domain, "app.test", "host-only cookie: {cookie:?}");
    assert_eq!(cookie.value.len(), 43, "{cookie:?}");
    // The binding cookie is gone once used.
    assert!(
        !all.iter()
            .any(|c| c.name.starts_with(BINDING_COOKIE) && !c.value.is_empty()),
        "{all:?}"
    );

    // The session is on the server: the same cookie works from another client, and /me
    // knows who it is.
    assert_session_works(&fx.app_url("/from/elsewhere"), &cookie.value).await;
    browser.goto(&fx.app_url("/.portcullis/me")).await;
    let me = browser.wait_for_text("Signed in as", WAIT).await;
    assert!(me.contains(ALICE), "{me}");
    assert!(me.contains("Alice Liddell"), "{me}");

    // Signing out from the page Portcullis shows (a real same-origin form post) ends the
    // session at Portcullis and at the IdP: the next visit shows the IdP's login form again.
    browser.click("button[type=submit]").await;
    browser
        .wait_for_url(|u| u.starts_with(fx.idp.issuer()), WAIT)
        .await;
    browser.wait_for_text("signed out", WAIT).await;
    assert_session_refused(&fx, &fx.app_url("/x"), &cookie.value).await;
    browser.goto(&fx.app_url("/again")).await;
    browser
        .wait_for_url(|u| u.contains("/interaction/"), WAIT)
        .await;
    assert!(browser.exists("input[name=password]").await);
    browser.quit().await;
}

// ----- (b) a plain HTTP client -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_client_signs_in_and_reaches_the_upstream() {
    let fx = Fixture::start().await;
    let http = client();
    let original = fx.app_url("/reports/q3?year=2024&sort=desc");

    let signed = fx.sign_in(&http, &original, ALICE, ALICE_PASSWORD).await;
    assert_eq!(
        signed.landed, original,
        "back on exactly the page asked for"
    );
    let attributes = cookie_attributes(&signed.set_cookie);
    for want in ["httponly", "samesite=lax", "path=/"] {
        assert!(
            attributes.iter().any(|a| a == want),
            "{want} missing: {}",
            signed.set_cookie
        );
    }
    assert!(
        !attributes
            .iter()
            .any(|a| a == "secure" || a.starts_with("domain=")),
        "{}",
        signed.set_cookie
    );
    let max_age: u64 = attributes
        .iter()
        .find_map(|a| a.strip_prefix("max-age="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Max-Age: {}", signed.set_cookie));
    assert_eq!(max_age, 2 * 3600, "the configured session_lifetime");

    // Following the redirect with the client's cookie jar reaches the upstream.
    let resp = navigate(&http, &signed.landed).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert_eq!(echo.upstream, "app");
    assert_eq!(echo.uri, "/reports/q3?year=2024&sort=desc");

    // /me as JSON shows who signed in and until when.
    let resp = http
        .get(fx.app_url("/.portcullis/me"))
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let me: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(me["kind"], "person", "{me}");
    assert_eq!(me["subject"], "alice", "{me}");
    assert_eq!(me["email"], ALICE, "{me}");
    assert_eq!(me["name"], "Alice Liddell", "{me}");
    let expires = me["session_expires"].as_u64().expect("session_expires");
    let now = now_unix();
    assert!(
        expires > now + 2 * 3600 - 120 && expires <= now + 2 * 3600 + 5,
        "session_expires {expires} is not ~2h from {now}"
    );
    // … and as HTML.
    let resp = navigate(&http, &fx.app_url("/.portcullis/me")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap();
    assert!(html.contains(ALICE), "{html}");

    // A sign-in started at /.portcullis/sign_in?rd= lands on rd, and a second person gets
    // a session of their own.
    let bob = client();
    let signed_bob = fx
        .sign_in(
            &bob,
            &fx.app_url("/.portcullis/sign_in?rd=%2Fafter%3Fy%3D2"),
            BOB,
            BOB_PASSWORD,
        )
        .await;
    assert_eq!(signed_bob.landed, fx.app_url("/after?y=2"));
    assert_ne!(signed_bob.cookie, signed.cookie);
    let resp = bob
        .get(fx.app_url("/.portcullis/me"))
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap();
    let me: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(me["email"], BOB, "{me}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_credentials_get_401_unless_they_are_browser_navigations() {
    let fx = Fixture::start().await;
    let c = bare_client();
    let url = fx.app_url("/api/things");
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("GET without Accept", c.get(&url)),
        (
            "GET for JSON",
            c.get(&url).header(ACCEPT, "application/json"),
        ),
        (
            "POST from a page's script",
            c.post(&url)
                .header(ACCEPT, BROWSER_ACCEPT)
                .header("sec-fetch-mode", "cors")
                .body("x=1"),
        ),
        (
            "POST for JSON",
            c.post(&url).header(ACCEPT, "application/json").body("x=1"),
        ),
        (
            "XHR",
            c.get(&url)
                .header(ACCEPT, BROWSER_ACCEPT)
                .header("x-requested-with", "XMLHttpRequest"),
        ),
        (
            "fetch() in cors mode",
            c.get(&url)
                .header(ACCEPT, BROWSER_ACCEPT)
                .header("sec-fetch-mode", "cors"),
        ),
        ("DELETE", c.delete(&url).header(ACCEPT, BROWSER_ACCEPT)),
        (
            "navigation to a bearer-only route",
            c.get(fx.url("api.test", "/page"))
                .header(ACCEPT, BROWSER_ACCEPT),
        ),
        (
            "/me for JSON",
            c.get(fx.app_url("/.portcullis/me"))
                .header(ACCEPT, "application/json"),
        ),
        (
            "a malformed session cookie",
            c.get(&url)
                .header(COOKIE, format!("{SESSION_COOKIE}=not-a-session")),
        ),
        (
            "a well-formed unknown session cookie",
            c.get(&url)
                .header(COOKIE, format!("{SESSION_COOKIE}={}", "A".repeat(43))),
        ),
        (
            "an oversized session cookie",
            c.get(&url)
                .header(COOKIE, format!("{SESSION_COOKIE}={}", "A".repeat(9000))),
        ),
    ];
    for (what, request) in cases {
        let resp = request.send().await.unwrap();
        let status = resp.status();
        let challenge = header(&resp, WWW_AUTHENTICATE.as_str());
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(
            challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Bearer")),
            "{what}: WWW-Authenticate {challenge:?}"
        );
    }
    assert_eq!(fx.app.count(), 0, "nothing reached the upstream");
    assert_eq!(fx.api.count(), 0, "nothing reached the upstream");

    // A browser's form sent without a session (it ended while the page was open) is a 401
    // too, as a page with a way to sign in and back to the form's page; an API's stays JSON.
    let form_page = fx.app_url("/orders/new?draft=1");
    let resp = c
        .post(fx.app_url("/orders"))
        .header(ACCEPT, BROWSER_ACCEPT)
        .header("sec-fetch-mode", "navigate")
        .header(REFERER, &form_page)
        .body("item=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&resp, WWW_AUTHENTICATE.as_str()).is_some_and(|c| c.starts_with("Bearer")));
    assert!(header(&resp, "content-type").is_some_and(|t| t.starts_with("text/html")));
    let page = resp.text().await.unwrap();
    let link = page
        .split("href=\"")
        .find_map(|rest| rest.split('"').next().filter(|l| l.contains("sign_in")))
        .unwrap_or_else(|| panic!("no sign-in link: {page}"))
        .replace("&amp;", "&");
    let browser = client();
    let authorize = fx.start_sign_in(&browser, &fx.app_url(&link)).await;
    let signed = fx
        .finish_sign_in(&browser, &authorize, ALICE, ALICE_PASSWORD)
        .await;
    assert_eq!(signed.landed, form_page);
    // From another site's page, or one sign-in would not return to (too long), back to this
    // host's root.
    let too_long = fx.app_url(&format!("/x?{}", "y".repeat(3000)));
    for referer in ["http://evil.test/", too_long.as_str()] {
        let resp = c
            .post(fx.app_url("/orders"))
            .header(ACCEPT, BROWSER_ACCEPT)
            .header(REFERER, referer)
            .send()
            .await
            .unwrap();
        let page = resp.text().await.unwrap();
        let root =
            url::form_urlencoded::byte_serialize(fx.app_url("/").as_bytes()).collect::<String>();
        assert!(page.contains(&format!("sign_in?rd={root}\"")), "{page}");
    }
    assert_eq!(fx.app.count(), 0, "nothing reached the upstream");

    // A browser navigation, by contrast, is sent to sign in, on every session route.
    for host in ["app.test", "corp.example.com", "both.test"] {
        let start = fx.url(host, "/page");
        let authorize = fx.start_sign_in(&client(), &start).await;
        assert_eq!(
            query_param(&authorize, "redirect_uri"),
            Some(fx.url(host, "/.portcullis/callback")),
            "without cookie_domain the callback is on the host itself"
        );
    }
}

// ----- (f) the callback --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_with_a_wrong_state_a_replayed_code_or_from_another_browser_are_refused() {
    let fx = Fixture::start().await;
    let original = fx.app_url("/private");
    async fn get(client: &reqwest::Client, url: &str) -> (StatusCode, Option<String>, String) {
        let resp = client.get(url).send().await.unwrap();
        let status = resp.status();
        let session = set_cookie(&resp, SESSION_COOKIE);
        (status, session, resp.text().await.unwrap_or_default())
    }
    fn refused(what: &str, (status, session, body): (StatusCode, Option<String>, String)) {
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert!(session.is_none(), "{what} set a session: {session:?}");
    }
    let with_param = |url: &str, name: &str, value: &str| {
        let mut u = url::Url::parse(url).unwrap();
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                if k == name {
                    (k.into_owned(), value.to_owned())
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
        u.to_string()
    };

    // The browser that started the sign-in.
    let browser = client();
    let authorize = fx.start_sign_in(&browser, &original).await;
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let state = query_param(&callback, "state").unwrap();
    assert_eq!(query_param(&authorize, "state").as_deref(), Some(&*state));

    // A wrong state, in the right browser with the right code: refused.
    refused(
        "a wrong state",
        get(&browser, &with_param(&callback, "state", "forged")).await,
    );
    refused(
        "a random state",
        get(&browser, &with_param(&callback, "state", &random_token(32))).await,
    );
    // No state or no code at all; an error from the IdP.
    let no_state = callback.replace(&format!("state={state}"), "x=1");
    refused("no state", get(&browser, &no_state).await);
    // An error from the IdP, back in the browser that started the sign-in: its words are
    // shown there. Elsewhere, where anyone's link could have put them, only its code.
    let error = fx.app_url(&format!(
        "/.portcullis/callback?error=access_denied&error_description=not%20assigned&state={state}"
    ));
    let answer = get(&browser, &error).await;
    assert!(
        answer.2.contains("access_denied not assigned"),
        "{}",
        answer.2
    );
    refused("an error from the IdP", answer);
    let elsewhere = get(&client(), &error).await;
    assert!(
        elsewhere.2.contains("access_denied") && !elsewhere.2.contains("not assigned"),
        "{}",
        elsewhere.2
    );
    // Nor is it said to be the IdP's refusal: anyone's link could have said it.
    assert!(
        elsewhere.2.contains("for no sign-in begun in this browser")
            && !elsewhere.2.contains("identity provider refused"),
        "{}",
        elsewhere.2
    );
    refused("an error from the IdP, in another browser", elsewhere);
    // The IdP in trouble (RFC 6749's two words for it): that browser is asked to sign in again
    // in a moment, not refused.
    for said in ["temporarily_unavailable", "server_error"] {
        let busy = fx.app_url(&format!("/.portcullis/callback?error={said}&state={state}"));
        let answer = get(&browser, &busy).await;
        assert_eq!(
            answer.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "{said}: {}",
            answer.2
        );
        assert!(answer.2.contains("in a moment"), "{said}: {}", answer.2);
        refused(
            &format!("{said}, in another browser"),
            get(&client(), &busy).await,
        );
    }
    // Refused for what the operator mends (a scope the IdP does not define, a client not let
    // use the code flow): said in the log, once a minute at most; not for a link anyone could
    // have sent, which would take that minute from the operator's warning.
    let sent_back = |error: &str| {
        fx.app_url(&format!(
            "/.portcullis/callback?error={error}&state={state}"
        ))
    };
    refused(
        "invalid_scope elsewhere",
        get(&client(), &sent_back("invalid_scope")).await,
    );
    for error in ["unauthorized_client", "invalid_scope", "invalid_scope"] {
        refused(error, get(&browser, &sent_back(error)).await);
    }
    let warned = "refused at the identity provider (";
    let log = fx.px.log_until(|log| log.contains(warned)).await;
    assert_eq!(log.matches(warned).count(), 1, "{log}");
    assert!(log.contains("provider (unauthorized_client)"), "{log}");
    // And recorded so: the words are the IdP's only where that browser brought them.
    let audited = fx
        .px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.matches("access_denied").count() >= 2
        })
        .await;
    assert_eq!(audited.matches("not assigned").count(), 1, "{audited}");
    assert_eq!(
        audited
            .matches("refusal (access_denied) came back for no sign-in begun in this browser")
            .count(),
        1,
        "{audited}"
    );
    // The genuine callback in another browser: refused, on a page the page that opened it (a
    // host's own, which started the sign-in in a window of its own) cannot read the
    // address of, where the code is.
    let resp = client().get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        header(&resp, "cross-origin-opener-policy").as_deref(),
        Some("same-origin")
    );

    // The genuine callback still completes (the forgeries consumed nothing)…
    let resp = browser.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND, "the genuine callback");
    assert_eq!(header(&resp, "location").as_deref(), Some(&*original));
    let cookie = cookie_value(&set_cookie(&resp, SESSION_COOKIE).expect("session"));
    assert_session_works(&original, &cookie).await;

    // … once: the same state and code again make no session. The browser, signed in now, is
    // sent on to the site (the back button brings it there so); elsewhere it is refused.
    let (status, session, body) = get(&browser, &callback).await;
    assert_eq!(status, StatusCode::FOUND, "a replayed callback: {body}");
    assert!(
        session.is_none(),
        "a replayed callback set a session: {session:?}"
    );
    refused(
        "a replayed callback from elsewhere",
        get(&client(), &callback).await,
    );
    // Even a replay that carries the sign-in's own cookie gets no session: the IdP redeems
    // a code once.
    let resp = navigate(&bare_client(), &original).await;
    let line = binding_cookie(&resp).expect("a sign-in cookie");
    let pair = line.split(';').next().unwrap_or_default().to_owned();
    let authorize = header(&resp, "location").expect("to the IdP");
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let with_cookie = || bare_client().get(&callback).header(COOKIE, &pair).send();
    let resp = with_cookie().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND, "the cookie's first use");
    assert!(set_cookie(&resp, SESSION_COOKIE).is_some());
    // Refused by Portcullis itself, which sends a sign-in's code to the IdP once however
    // often its callback comes with its cookie (each exchange would be one more request to
    // the IdP's token endpoint, under its rate limits).
    for _ in 0..3 {
        let resp = with_cookie().await.unwrap();
        let status = resp.status();
        let session = set_cookie(&resp, SESSION_COOKIE);
        let body = resp.text().await.unwrap_or_default();
        assert!(
            body.contains("already used"),
            "a replay went to the IdP: {body}"
        );
        refused(
            "a replay with the sign-in's cookie",
            (status, session, body),
        );
    }

    // A callback from another browser (no sign-in cookie) is refused; it cannot spoil the
    // sign-in of the browser that started it, which finishes it.
    let victim = client();
    let authorize = fx.start_sign_in(&victim, &original).await;
    let callback = fx.idp_login(&authorize, BOB, BOB_PASSWORD).await;
    refused(
        "a callback from another browser",
        get(&client(), &callback).await,
    );
    let (status, session, body) = get(&victim, &callback).await;
    assert_eq!(status, StatusCode::FOUND, "the starting browser: {body}");
    assert!(session.is_some(), "the starting browser is signed in");

    // A wrong sign-in cookie is the same as none: one under the state's name with another
    // value, and another browser's genuine one, sealed for its own state.
    let victim = client();
    let authorize = fx.start_sign_in(&victim, &original).await;
    let callback = fx.idp_login(&authorize, BOB, BOB_PASSWORD).await;
    let state = query_param(&callback, "state").unwrap();
    let other = navigate(&bare_client(), &fx.app_url("/.portcullis/sign_in?rd=%2F")).await;
    let other = cookie_value(&binding_cookie(&other).expect("a sign-in cookie"));
    for value in [random_token(32), other] {
        let resp = bare_client()
            .get(&callback)
            .header(COOKIE, format!("{}={value}", binding_cookie_name(&state)))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let session = set_cookie(&resp, SESSION_COOKIE);
        refused(
            "a wrong sign-in cookie",
            (status, session, resp.text().await.unwrap_or_default()),
        );
    }
    let resp = bare_client()
        .get(&callback)
        .header(COOKIE, format!("{BINDING_COOKIE}={}", random_token(32)))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let session = set_cookie(&resp, SESSION_COOKIE);
    refused(
        "a wrong binding cookie",
        (status, session, resp.text().await.unwrap_or_default()),
    );

    // Code injection: an attacker's own sign-in (their state and binding cookie) completed
    // with a code issued to someone else's sign-in is refused (PKCE binds the code).
    let victim = client();
    let authorize = fx.start_sign_in(&victim, &original).await;
    let victims_callback = fx.idp_login(&authorize, BOB, BOB_PASSWORD).await;
    let attacker = client();
    let authorize = fx.start_sign_in(&attacker, &original).await;
    let attackers_callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let injected = with_param(
        &attackers_callback,
        "code",
        &query_param(&victims_callback, "code").unwrap(),
    );
    // Refused by the IdP, for the verifier: a code it redeemed (the verifier not bound to its
    // sign-in) would have been stopped by the nonce only, with a 502.
    let answer = get(&attacker, &injected).await;
    let body = answer.2.clone();
    refused("an injected code", answer);
    assert!(
        body.contains("the identity provider refused the sign-in"),
        "an injected code: {body}"
    );

    // Each refusal is recorded (within the budget anyone's requests have), and none warns on
    // top: anyone can send as many, a code of their own under a sign-in they started too
    // (`invalid_grant`). A request sent after them has its access line written after any
    // warning of theirs.
    let marker = "/after-the-refused-callbacks";
    let _ = get(&client(), &fx.app_url(marker)).await;
    let log = fx
        .px
        .log_until(|log| {
            log.lines()
                .any(|line| line.contains(" access: ") && line.contains(marker))
        })
        .await;
    let warned: Vec<&str> = (log.lines())
        .filter(|line| line.contains("sign-in refused") && line.contains("WARN"))
        .collect();
    assert!(warned.is_empty(), "{warned:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_holds_at_most_max_sessions_per_person_and_the_oldest_ends() {
    let fx = Fixture::start_with(Options {
        oidc_settings: vec![("max_sessions_per_person", "2")],
        ..Options::default()
    })
    .await;
    let url = fx.app_url("/private");
    // Three browsers (or a script) sign alice in, one after the other, each in a later
    // second (which one is oldest is known to the second); bob once.
    let mut alice = Vec::new();
    for _ in 0..3 {
        let second = now_unix();
        while now_unix() == second {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        alice.push(
            fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD)
                .await
                .cookie,
        );
    }
    let bob = fx.sign_in(&client(), &url, BOB, BOB_PASSWORD).await.cookie;
    // Her first session has ended; her two newest, and bob's, go on.
    assert_session_refused(&fx, &url, &alice[0]).await;
    for cookie in [&alice[1], &alice[2], &bob] {
        assert_session_works(&url, cookie).await;
    }
    let audited = fx
        .px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.contains("oldest_ended")
        })
        .await;
    assert_eq!(audited.matches("oldest_ended").count(), 1, "{audited}");
}

/// 10,001 anonymous sign-in starts (one more than the server-side table of pending sign-ins
/// once held) leave nothing behind for a real sign-in to wait on; and two sign-ins started
/// in two tabs of one browser both finish.
#[tokio::test(flavor = "multi_thread")]
async fn anonymous_sign_in_starts_cannot_exhaust_sign_in_and_tabs_do_not_collide() {
    let fx = Fixture::start().await;
    let start = fx.app_url("/.portcullis/sign_in?rd=%2F");
    let flood: Vec<_> = (0..4)
        .map(|task| {
            let start = start.clone();
            tokio::spawn(async move {
                let http = bare_client();
                let count = if task == 0 { 2_501 } else { 2_500 };
                for _ in 0..count {
                    let resp = http
                        .get(&start)
                        .header(ACCEPT, "text/html")
                        .send()
                        .await
                        .expect("GET sign_in");
                    assert_eq!(resp.status(), StatusCode::FOUND, "an anonymous start");
                }
            })
        })
        .collect();
    for task in flood {
        task.await.expect("the flood task");
    }

    // Two tabs: both sign-ins are started before either returns.
    let browser = client();
    let first = fx.start_sign_in(&browser, &fx.app_url("/first")).await;
    let second = fx.start_sign_in(&browser, &fx.app_url("/second")).await;
    for (authorize, path) in [(second, "/second"), (first, "/first")] {
        let signed = fx
            .finish_sign_in(&browser, &authorize, ALICE, ALICE_PASSWORD)
            .await;
        assert_eq!(signed.landed, fx.app_url(path));
        assert_session_works(&fx.app_url(path), &signed.cookie).await;
    }
}

// ----- (g) the return URL ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_return_urls_are_checked_against_the_served_hosts() {
    let fx = Fixture::start().await;
    let port = fx.cfg.http_addr().port();
    // rd values as the endpoint decodes them; each is sent fully percent-encoded.
    let refused: Vec<String> = [
        "//evil.com",
        "//evil.com/path",
        "///evil.com",
        "/\\evil.com",
        "/\\/evil.com",
        "\\\\evil.com",
        "\\/evil.com",
        "/\t/evil.com",
        "/\n/evil.com",
        "/\r/evil.com",
        " //evil.com",
        "https:evil.com",
        "https:/evil.com",
        "https:\\\\evil.com",
        "http:\\\\evil.com",
        "https:/\\evil.com",
        "https://evil.com",
        "HTTPS://EVIL.COM/",
        "%2f%2fevil.com",
        "%2F%2Fevil.com",
        "/%2f%2fevil.com",
        "/%2F/evil.com",
        "/%2fevil.com",
        "%5c%5cevil.com",
        "/%5cevil.com",
        "/%5C/evil.com",
        "%252f%252fevil.com",
        "https://corp.example.com.evil.com/",
        "https://evilcorp.example.com/",
        "https://corp.example.com@evil.com/",
        "https://corp.example.com:443@evil.com/",
        "https://user:pass@corp.example.com/",
        "https://evil.com#@corp.example.com/",
        "https://evil.com?@corp.example.com/",
        "https://evil.com\\@corp.example.com/",
        "https://corp.exаmple.com/",
        "http://app.test.evil.com/",
        "http://evil.com/http://app.test/",
        "javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "ftp://corp.example.com/",
        "evil.com",
        "",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        format!("http://app.test:{port}@evil.com/"),
        format!("//app.test:{port}@evil.com/"),
        format!("http://evil.com:{port}/"),
    ])
    .collect();
    let http = client();
    for rd in &refused {
        let encoded: String = url::form_urlencoded::byte_serialize(rd.as_bytes()).collect();
        let url = fx.app_url(&format!("/.portcullis/sign_in?rd={encoded}"));
        let resp = navigate(&http, &url).await;
        let status = resp.status();
        let location = header(&resp, "location");
        let binding = binding_cookie(&resp);
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::BAD_REQUEST, "rd={rd:?} ({url}): {body}");
        assert!(location.is_none(), "rd={rd:?} redirected to {location:?}");
        assert!(binding.is_none(), "rd={rd:?} started a sign-in");
    }
    // Each is recorded: a link made to send people elsewhere after signing in.
    fx.px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.matches("return address (rd) is not one Portcullis serves")
                .count()
                >= refused.len()
        })
        .await;

    // The same few as a careless link would write them: unencoded or singly encoded in the
    // query, sent byte for byte.
    for raw in [
        "//evil.com",
        "/\\evil.com",
        "/%09/evil.com",
        "%2F%2Fevil.com",
        "%2f%2fevil.com",
        "/%2F%2Fevil.com",
        "%5C%5Cevil.com",
        "https:evil.com",
        "https:%2F%2Fevil.com",
        "https://corp.example.com%2Eevil.com/",
        "https://evil.com%23@corp.example.com/",
        "//evil.com%00.corp.example.com",
    ] {
        let request = format!(
            "GET /.portcullis/sign_in?rd={raw} HTTP/1.1\r\nHost: app.test:{port}\r\n\
             Accept: text/html\r\nConnection: close\r\n\r\n"
        );
        let resp = portcullis_tests::raw_request(fx.cfg.http_addr(), request.as_bytes())
            .await
            .unwrap();
        assert!(
            resp.status == 400,
            "raw rd={raw}: {} {:?} {}",
            resp.status,
            resp.header("location"),
            resp.body_text()
        );
    }

    // Good return URLs start a sign-in that comes back to them.
    let allowed = [
        ("/path".to_owned(), fx.app_url("/path")),
        ("/path?a=1&b=two".to_owned(), fx.app_url("/path?a=1&b=two")),
        (fx.app_url("/ok"), fx.app_url("/ok")),
        (
            "http://corp.example.com/dash".to_owned(),
            "http://corp.example.com/dash".to_owned(),
        ),
        (
            fx.url("corp.example.com", "/dash?x=1"),
            fx.url("corp.example.com", "/dash?x=1"),
        ),
    ];
    for (rd, want) in &allowed {
        let encoded: String = url::form_urlencoded::byte_serialize(rd.as_bytes()).collect();
        let url = fx.app_url(&format!("/.portcullis/sign_in?rd={encoded}"));
        let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
        assert_eq!(&signed.landed, want, "rd={rd}");
    }
}

// ----- (h) sign-out ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_with_more_cookies_than_are_read_is_told_so_not_sent_round_the_sign_in() {
    let fx = Fixture::start().await;
    let page = fx.app_url("/stuffed");
    let alice = fx
        .sign_in(&client(), &page, ALICE, ALICE_PASSWORD)
        .await
        .cookie;
    // A sibling host can fill the jar (cookie bombing): past 8 KiB none is read, not even the
    // session, and a sign-in would make one that could not be read back either.
    let padding = format!("pad={}", "x".repeat(9 * 1024));
    for cookies in [
        padding.clone(),
        format!("{SESSION_COOKIE}={alice}; {padding}"),
    ] {
        let resp = bare_client()
            .get(&page)
            .header(ACCEPT, BROWSER_ACCEPT)
            .header(COOKIE, cookies)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert!(resp.text().await.unwrap().contains("Too many cookies"));
    }
    let resp = bare_client()
        .get(fx.app_url("/.portcullis/sign_in?rd=%2F"))
        .header(COOKIE, padding)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Without them, the same session still works.
    assert_session_works(&page, &alice).await;
    // Each refusal is recorded, as nobody's, as the request it refused: the page's on its
    // route, the sign-in's as the sign-in.
    let stuffed = |r: &serde_json::Value| {
        r["reason"]
            .as_str()
            .is_some_and(|why| why.contains("more cookies than Portcullis reads"))
    };
    let records = crate::audit::audit_json_until(&fx.px, &[], |r| {
        crate::audit::of_event(r, "refusal")
            .into_iter()
            .filter(|r| stuffed(r))
            .count()
            >= 3
    })
    .await;
    let refused: Vec<_> = crate::audit::of_event(&records, "refusal")
        .into_iter()
        .filter(|r| stuffed(r))
        .map(|r| {
            assert_eq!(r["user"], "anonymous", "{r}");
            (
                r["route"].as_str().unwrap_or_default(),
                r["method"].as_str().unwrap_or_default(),
                r["path"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let app = "http://app.test";
    assert_eq!(
        refused,
        [
            (app, "GET", "/stuffed"),
            (app, "GET", "/stuffed"),
            ("oidc", "GET", "/.portcullis/sign_in")
        ]
    );
}

/// Signs in at `url` as a browser does, with `browser`'s cookies for the IdP too: the IdP's
/// login form when it has no session of `login`, else single sign-on. The session's id.
async fn browser_sign_in(
    fx: &Fixture,
    browser: &reqwest::Client,
    url: &str,
    login: &str,
    password: &str,
) -> String {
    let mut at = header(&navigate(browser, url).await, LOCATION.as_str()).expect("to the IdP");
    for _ in 0..10 {
        if !at.starts_with(fx.idp.issuer()) {
            break;
        }
        let resp = browser.get(&at).send().await.unwrap();
        at = match header(&resp, LOCATION.as_str()) {
            Some(to) => url::Url::parse(&at).unwrap().join(&to).unwrap().to_string(),
            None => {
                let page = resp.text().await.unwrap();
                let action = page
                    .split("action=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or_else(|| panic!("no login form: {page}"));
                let target = url::Url::parse(&at).unwrap().join(action).unwrap();
                let resp = browser
                    .post(target)
                    .form(&[("login", login), ("password", password)])
                    .send()
                    .await
                    .unwrap();
                let to = header(&resp, LOCATION.as_str()).expect("the login redirects");
                url::Url::parse(&at).unwrap().join(&to).unwrap().to_string()
            }
        };
    }
    let resp = browser.get(&at).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND, "the callback {at}");
    cookie_value(&set_cookie(&resp, SESSION_COOKIE).expect("a session"))
}

/// Without a cookie domain each host has its own session: one sign-in at the IdP (single
/// sign-on) makes one on each host visited. Signing out on one ends those of the same sign-in
/// at the IdP everywhere, though the IdP tells Portcullis nothing (Entra ID sends no
/// back-channel logout); another sign-in of the same person stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_out_ends_the_sessions_of_the_same_idp_sign_in_on_every_host() {
    let fx = Fixture::start().await;
    let browser = client();
    let app = fx.app_url("/a");
    let corp = fx.url("corp.example.com", "/c");
    let on_app = browser_sign_in(&fx, &browser, &app, ALICE, ALICE_PASSWORD).await;
    let on_corp = browser_sign_in(&fx, &browser, &corp, ALICE, ALICE_PASSWORD).await;
    assert_ne!(on_app, on_corp);
    let elsewhere = fx
        .sign_in(&client(), &corp, ALICE, ALICE_PASSWORD)
        .await
        .cookie;
    for (url, cookie) in [(&app, &on_app), (&corp, &on_corp), (&corp, &elsewhere)] {
        assert_session_works(url, cookie).await;
    }
    // Signed out on app.test; the browser is not (yet) taken to the IdP's end-session page.
    let resp = fx.sign_out(&format!("{SESSION_COOKIE}={on_app}")).await;
    assert!(resp.status().is_redirection(), "{}", resp.status());
    assert_session_refused(&fx, &app, &on_app).await;
    assert_session_refused(&fx, &corp, &on_corp).await;
    assert_session_works(&corp, &elsewhere).await;
}

/// A reload that moves `[oidc] issuer` to another IdP signs people out here until that one is
/// discovered: not at the old IdP's end-session endpoint (with the new settings' client), and
/// the old IdP's ID token is sent nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_out_after_a_reload_moved_the_issuer_is_not_sent_to_the_old_idp() {
    let fx = Fixture::start().await;
    let page = fx.app_url("/page");
    let signed = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let sign_out = || async {
        let cookie = fx
            .sign_in(&client(), &page, ALICE, ALICE_PASSWORD)
            .await
            .cookie;
        fx.sign_out(&format!("{SESSION_COOKIE}={cookie}")).await
    };
    // To the IdP's end-session endpoint while it is the configured one.
    let before = sign_out().await;
    let to_idp = header(&before, LOCATION.as_str()).unwrap_or_default();
    assert!(
        to_idp.starts_with(fx.idp.issuer()),
        "{}: {to_idp}",
        before.status()
    );

    // Nothing listens at the new issuer: it is never discovered. (A port out of the range
    // other tests' servers are given one from: see `free_port`.)
    let moved = format!("http://127.0.0.1:{}", portcullis_tests::free_port());
    let issuer = format!("issuer = \"{}\"", fx.idp.issuer());
    let moved = format!("issuer = \"{moved}\"");
    fx.px.reload_with("[oidc]", &issuer, &moved).await;

    let resp = fx
        .sign_out(&format!("{SESSION_COOKIE}={}", signed.cookie))
        .await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{:?}",
        header(&resp, LOCATION.as_str())
    );
    let body = resp.text().await.unwrap();
    assert!(body.contains("You are signed out"), "{body}");
}

/// An authorization response that names another issuer (RFC 9207's `iss`: a mix-up) is
/// refused, its code never sent to the token endpoint; the response as the IdP sent it then
/// signs in.
#[tokio::test(flavor = "multi_thread")]
async fn a_callback_naming_another_issuer_is_refused() {
    let fx = Fixture::start().await;
    let bare = bare_client();
    let page = fx.app_url("/page");
    let start = navigate(&bare, &page).await;
    let binding = binding_cookie(&start).expect("a sign-in cookie");
    let pair = binding.split(';').next().unwrap_or_default().to_owned();
    let authorize = header(&start, LOCATION.as_str()).unwrap();
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let mut mixed_up = url::Url::parse(&callback).expect("a callback URL");
    let kept: Vec<(String, String)> = mixed_up
        .query_pairs()
        .filter(|(name, _)| name != "iss")
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    mixed_up
        .query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("iss", "https://mix-up.example");
    let refused = bare
        .get(mixed_up.as_str())
        .header(COOKIE, &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body = refused.text().await.unwrap();
    assert!(body.contains("another identity provider"), "{body}");

    // oidc-provider says it names itself in every answer (RFC 9207): one without `iss` is
    // not its own.
    let discovery = bare_client()
        .get(format!(
            "{}/.well-known/openid-configuration",
            fx.idp.issuer()
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let discovery: serde_json::Value = serde_json::from_slice(&discovery).unwrap();
    assert_eq!(
        discovery["authorization_response_iss_parameter_supported"], true,
        "{discovery}"
    );
    let mut unnamed = mixed_up.clone();
    let kept: Vec<(String, String)> = mixed_up
        .query_pairs()
        .filter(|(name, _)| name != "iss")
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    unnamed.query_pairs_mut().clear().extend_pairs(kept);
    let refused = bare
        .get(unnamed.as_str())
        .header(COOKIE, &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

    let own = bare
        .get(&callback)
        .header(COOKIE, &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::FOUND, "{}", fx.px.log());
}

/// A sign-in begun before a reload that changed `[oidc] client_id` (or the issuer) is not
/// finished under the new one: its code is not sent with another client's credentials.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_begun_before_a_reload_changed_the_client_is_begun_again() {
    let fx = Fixture::start().await;
    let bare = bare_client();
    let start = navigate(&bare, &fx.app_url("/page")).await;
    let binding = binding_cookie(&start).expect("a sign-in cookie");
    let pair = binding.split(';').next().unwrap_or_default().to_owned();
    let authorize = header(&start, LOCATION.as_str()).unwrap();
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;

    let client = format!("client_id = \"{CLIENT_ID}\"");
    let another = "client_id = \"another-client\"";
    fx.px.reload_with("[oidc]", &client, another).await;

    let resp = bare
        .get(&callback)
        .header(COOKIE, &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = resp.text().await.unwrap();
    assert!(body.contains("another identity provider"), "{body}");
}

/// A sign-out after a reload that changed `[oidc] client_id` sends the IdP no `id_token_hint`
/// of the old client's: the IdP would refuse the pairing, and the sign-out there with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_out_after_the_client_changed_sends_no_hint_of_the_old_client() {
    let fx = Fixture::start().await;
    let signed = fx
        .sign_in(&client(), &fx.app_url("/page"), ALICE, ALICE_PASSWORD)
        .await;
    let client = format!("client_id = \"{CLIENT_ID}\"");
    let another = "client_id = \"another-client\"";
    fx.px.reload_with("[oidc]", &client, another).await;
    let resp = fx
        .sign_out(&format!("{SESSION_COOKIE}={}", signed.cookie))
        .await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let location = header(&resp, LOCATION.as_str()).unwrap_or_default();
    assert_eq!(
        query_param(&location, "client_id").as_deref(),
        Some("another-client"),
        "{location}"
    );
    assert_eq!(query_param(&location, "id_token_hint"), None, "{location}");
}

/// Without `cookie_domain`, a session is its host's alone: its id presented on another host
/// (a sign-in code a hostile page of one host caught, finished in another browser; a cookie
/// copied) is no session there.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_in_a_cookie_per_host_is_no_session_on_another_host() {
    let fx = Fixture::start().await;
    let signed = fx
        .sign_in(&client(), &fx.app_url("/home"), ALICE, ALICE_PASSWORD)
        .await;
    assert_session_works(&fx.app_url("/home"), &signed.cookie).await;
    let elsewhere = fx.url("corp.example.com", "/home");
    let resp = get_with_session(&elsewhere, &signed.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Signed in there too, the person has a session of that host.
    let there = fx
        .sign_in(&client(), &elsewhere, ALICE, ALICE_PASSWORD)
        .await;
    assert_session_works(&elsewhere, &there.cookie).await;
    let resp = get_with_session(&fx.app_url("/home"), &there.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        fx.app.seen().len(),
        2,
        "only each host's own session went upstream"
    );
}

/// Without `cookie_domain`, a sign-in is finished on the host it began on: its code caught
/// there (a hostile page's service worker sees that host's callbacks) and sent, with the
/// sign-in's cookie, to another host's callback makes no session of that host, and is not
/// spent by it.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_begun_on_one_host_is_not_finished_on_another() {
    let fx = Fixture::start().await;
    let resp = navigate(&client(), &fx.app_url("/home")).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let authorize = header(&resp, LOCATION.as_str()).expect("sent to the IdP");
    let binding = binding_cookie(&resp).expect("the sign-in's cookie");
    let sent = binding.split(';').next().unwrap_or_default().to_owned();
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let (_, rest) = callback
        .split_once("/.portcullis/callback")
        .expect("a callback address");
    let finish = |url: String| {
        let sent = sent.clone();
        async move {
            bare_client()
                .get(url)
                .header(COOKIE, sent)
                .header(ACCEPT, BROWSER_ACCEPT)
                .send()
                .await
                .expect("GET callback")
        }
    };
    let elsewhere =
        finish(fx.url("corp.example.com", &format!("/.portcullis/callback{rest}"))).await;
    let status = elsewhere.status();
    let session = set_cookie(&elsewhere, SESSION_COOKIE).filter(|c| !cookie_value(c).is_empty());
    assert_eq!(session, None, "a session of corp.example.com");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Its code was not spent: the sign-in finishes where it began.
    let here = finish(callback).await;
    assert_eq!(here.status(), StatusCode::FOUND);
    let session = set_cookie(&here, SESSION_COOKIE).expect("a session");
    assert_session_works(&fx.app_url("/home"), &cookie_value(&session)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_out_ends_the_session_on_the_server_and_refuses_cross_site_posts() {
    let fx = Fixture::start().await;
    let alice = client();
    let signed = fx
        .sign_in(&alice, &fx.app_url("/home"), ALICE, ALICE_PASSWORD)
        .await;
    let page = fx.app_url("/home");
    assert_session_works(&page, &signed.cookie).await;
    let sign_out = fx.app_url("/.portcullis/sign_out");

    // GET shows a confirmation form and changes nothing.
    let resp = alice.get(&sign_out).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap();
    assert!(
        html.contains("method=\"post\"") && html.contains("/.portcullis/sign_out"),
        "{html}"
    );
    assert_session_works(&page, &signed.cookie).await;

    // Cross-site or unattributed POSTs are refused and leave the session alive.
    let origin = fx.app_origin();
    let forged: Vec<(&str, Vec<(reqwest::header::HeaderName, String)>)> = vec![
        (
            "Origin of another site",
            vec![(ORIGIN, "http://evil.test".to_owned())],
        ),
        (
            "Origin of another site, Referer of ours",
            vec![
                (ORIGIN, "http://evil.test".to_owned()),
                (REFERER, format!("{origin}/home")),
            ],
        ),
        ("Origin: null", vec![(ORIGIN, "null".to_owned())]),
        ("neither Origin nor Referer", vec![]),
        // A sandboxed frame's or another site's form (Origin: null), as the browser says.
        (
            "Origin: null from another site",
            vec![
                (ORIGIN, "null".to_owned()),
                (SEC_FETCH_SITE, "cross-site".to_owned()),
            ],
        ),
        (
            "Origin: null from a sibling host",
            vec![
                (ORIGIN, "null".to_owned()),
                (SEC_FETCH_SITE, "same-site".to_owned()),
            ],
        ),
        (
            "another site's Origin, said to be same-origin",
            vec![
                (ORIGIN, "http://evil.test".to_owned()),
                (SEC_FETCH_SITE, "same-origin".to_owned()),
            ],
        ),
        (
            "our host on another port",
            vec![(ORIGIN, "http://app.test:1".to_owned())],
        ),
        (
            "https instead of http",
            vec![(ORIGIN, origin.replace("http://", "https://"))],
        ),
        (
            "an Origin extending ours",
            vec![(ORIGIN, format!("{origin}.evil.test"))],
        ),
        (
            "a port extending ours",
            vec![(ORIGIN, format!("{origin}0"))],
        ),
        (
            "a Referer on a look-alike host",
            vec![(REFERER, format!("{origin}.evil.test/home"))],
        ),
        (
            "a Referer of another site",
            vec![(REFERER, "http://evil.test/app.test".to_owned())],
        ),
    ];
    for (what, headers) in forged {
        let mut request = alice.post(&sign_out).header(ACCEPT, BROWSER_ACCEPT);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let resp = request.send().await.unwrap();
        let status = resp.status();
        let cleared = set_cookie(&resp, SESSION_COOKIE);
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        assert!(cleared.is_none(), "{what}: {cleared:?}");
        assert_session_works(&page, &signed.cookie).await;
    }
    // Each forgery is recorded (a forged sign-out is an attack on someone's session).
    fx.px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.matches("a sign-out was posted from another site")
                .count()
                >= 8
        })
        .await;

    // A same-origin POST ends the session, clears the cookie, and continues to the IdP's
    // end_session_endpoint.
    let resp = alice
        .post(&sign_out)
        .header(ORIGIN, &origin)
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let location = header(&resp, "location").unwrap_or_default();
    let end_session = fx.idp.discovery().await["end_session_endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(location.starts_with(&end_session), "{location}");
    assert_eq!(
        query_param(&location, "client_id").as_deref(),
        Some(CLIENT_ID)
    );
    let hint = query_param(&location, "id_token_hint").expect("id_token_hint");
    assert_eq!(jwt_claims(&hint)["sub"], "alice");
    let cleared = set_cookie(&resp, SESSION_COOKIE).expect("the cookie is cleared");
    assert_eq!(cookie_value(&cleared), "", "{cleared}");
    assert!(
        cookie_attributes(&cleared).contains(&"max-age=0".to_owned()),
        "{cleared}"
    );

    // The old cookie no longer works, replayed by anyone.
    assert_session_refused(&fx, &page, &signed.cookie).await;
    let resp = alice
        .get(&page)
        .header(COOKIE, format!("{SESSION_COOKIE}={}", signed.cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Sign-out with a Referer only (no Origin) from our own page works too, for bob.
    let bob = client();
    let signed_bob = fx.sign_in(&bob, &page, BOB, BOB_PASSWORD).await;
    let resp = bob
        .post(&sign_out)
        .header(REFERER, format!("{origin}/.portcullis/sign_out"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_session_refused(&fx, &page, &signed_bob.cookie).await;

    // And from our own page whose referrer policy is no-referrer: the browser sends
    // `Origin: null`, no Referer, and says the post is the origin's own.
    let signed_bob = fx.sign_in(&bob, &page, BOB, BOB_PASSWORD).await;
    let resp = bob
        .post(&sign_out)
        .header(ORIGIN, "null")
        .header(SEC_FETCH_SITE, "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_session_refused(&fx, &page, &signed_bob.cookie).await;

    // Signing out without a session is harmless.
    let resp = bare_client()
        .post(&sign_out)
        .header(ORIGIN, &origin)
        .send()
        .await
        .unwrap();
    assert!(resp.status() == StatusCode::FOUND || resp.status() == StatusCode::OK);

    // Each sign-in and sign-out is in the audit log, by the person's name; nothing else is
    // about a session (the refused posts ended none).
    assert_eq!(
        session_events(&fx, 6).await,
        [
            (ALICE, "sign_in"),
            (ALICE, "sign_out"),
            (BOB, "sign_in"),
            (BOB, "sign_out"),
            (BOB, "sign_in"),
            (BOB, "sign_out")
        ]
        .map(|(who, what)| (who.to_owned(), what.to_owned()))
    );
    // With the address each came from.
    let records = crate::audit::audit_json_until(&fx.px, &[], |_| true).await;
    for record in crate::audit::of_event(&records, "session") {
        assert_eq!(record["client"], "127.0.0.1", "{record}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_bearer_token_is_told_invalid_token_and_audited_whatever_its_client_accepts() {
    let fx = Fixture::start().await;
    // Java's `HttpURLConnection` sends this `Accept` unless told otherwise: it names HTML as
    // a browser's page load does, on a route that takes sessions and tokens, and at "who am
    // I". No browser sends a token on a page load: the client is told its token is invalid
    // (so that it gets a new one), not sent round the IdP's sign-in page.
    let java = "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2";
    for (url, token) in [
        (fx.url("both.test", "/page"), "not-a-jwt"),
        (fx.app_url("/.portcullis/me"), "not-a-jwt-either"),
    ] {
        let resp = bare_client()
            .get(&url)
            .header(ACCEPT, java)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{url}");
        assert!(resp.headers().get(LOCATION).is_none(), "{url}");
        let challenge = resp.headers().get(WWW_AUTHENTICATE).cloned();
        let challenge = challenge.map(|v| v.to_str().unwrap_or_default().to_owned());
        assert!(
            challenge.is_some_and(|c| c.contains("error=\"invalid_token\"")),
            "a refused token is answered invalid_token at {url}"
        );
    }

    let records = crate::audit::audit_json_until(&fx.px, &[], |r| {
        crate::audit::of_event(r, "refusal").len() >= 2
    })
    .await;
    let refused: Vec<(&str, &str, &str)> = crate::audit::of_event(&records, "refusal")
        .iter()
        .map(|r| {
            assert_eq!(r["user"], "anonymous", "{r}");
            (
                r["route"].as_str().unwrap(),
                r["path"].as_str().unwrap(),
                r["reason"].as_str().unwrap(),
            )
        })
        .collect();
    let reason = "a bearer token was refused: the token is not a compact JWS";
    assert_eq!(
        refused,
        [
            ("http://both.test", "/page", reason),
            ("oidc", "/.portcullis/me", reason)
        ]
    );
    let log = std::fs::read_to_string(fx.px.dir().join("data/audit.jsonl")).unwrap();
    assert!(!log.contains("not-a-jwt"), "{log}");
}

/// The first `n` `session` records of the audit log, as (user, what), once there are `n`.
async fn session_events(fx: &Fixture, n: usize) -> Vec<(String, String)> {
    let records = crate::audit::audit_json_until(&fx.px, &[], |r| {
        crate::audit::of_event(r, "session").len() >= n
    })
    .await;
    crate::audit::of_event(&records, "session")
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_owned(),
                r["what"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ----- (i) back-channel logout -------------------------------------------------------------

/// A logout token signed with a key Portcullis cannot get yet (the IdP has just rotated, or its
/// key set is down) is not called invalid, which an IdP takes as final: it is told to try
/// again (503), the session stands meanwhile, and a try once the key can be had ends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_backchannel_logout_whose_key_cannot_be_had_yet_is_asked_again_not_refused() {
    let fx = Fixture::start().await;
    let page = fx.app_url("/dashboard");
    // Signed with a key the IdP has just begun using: the set is fetched for the sign-in.
    fx.idp.rotate_keys(true).await;
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let fetched = Instant::now();
    let logout = || {
        fx.idp
            .try_backchannel_logout_keeping_sessions("alice", CLIENT_ID)
    };
    let asked_again = |told: Result<Vec<String>, String>| {
        let told = told.expect_err("Portcullis took a token it could not verify");
        assert!(told.contains("503"), "{told}");
    };
    // Rotated a moment after: the set is fetched again for what anyone posts 10 s on. (A
    // machine too loaded to get here within them had it fetched, and the key in it.)
    fx.idp.rotate_keys(false).await;
    let told = logout().await;
    if told.is_ok() {
        eprintln!("the set was fetched again {:?} after", fetched.elapsed());
    } else {
        asked_again(told);
        assert_session_works(&page, &alice.cookie).await;
        // 10 s on, the key set cannot be fetched.
        tokio::time::sleep(Duration::from_secs(11)).await;
        fx.idp.set_outage(IdpOutage::Jwks).await;
        let told = logout().await;
        fx.idp.outage(false).await;
        asked_again(told);
        assert_session_works(&page, &alice.cookie).await;
        // 10 s after that fetch failed, it is fetched, and the logout taken.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(logout().await.map(|sids| sids.len()), Ok(1));
    }
    assert_session_refused(&fx, &page, &alice.cookie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backchannel_logout_from_the_idp_ends_the_session() {
    let fx = Fixture::start().await;
    let page = fx.app_url("/dashboard");
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let alice_again = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let bob = fx.sign_in(&client(), &page, BOB, BOB_PASSWORD).await;
    for s in [&alice, &alice_again, &bob] {
        assert_session_works(&page, &s.cookie).await;
    }

    // The IdP posts a real logout token for each of alice's IdP sessions to Portcullis
    // (it panics unless Portcullis answers 200/204).
    let sids = fx.idp.backchannel_logout("alice", CLIENT_ID).await;
    assert_eq!(sids.len(), 2, "alice signed in twice: {sids:?}");
    assert_session_refused(&fx, &page, &alice.cookie).await;
    assert_session_refused(&fx, &page, &alice_again.cookie).await;
    assert_session_works(&page, &bob.cookie).await;

    // Junk at the endpoint is refused.
    let endpoint = fx.url("127.0.0.1", "/.portcullis/backchannel_logout");
    for (what, body) in [
        ("a garbage token", "logout_token=garbage".to_owned()),
        (
            "a token of three junk parts",
            "logout_token=a.b.c".to_owned(),
        ),
        ("no token", "something_else=1".to_owned()),
        ("an empty body", String::new()),
        (
            "a body larger than any logout token",
            format!("logout_token={}", "a".repeat(128 * 1024)),
        ),
    ] {
        let expected = match body.len() > 64 * 1024 {
            true => StatusCode::PAYLOAD_TOO_LARGE,
            false => StatusCode::BAD_REQUEST,
        };
        let resp = bare_client()
            .post(&endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), expected, "{what}");
    }
    assert_session_works(&page, &bob.cookie).await;

    // The audit log has the sign-ins, one logout by the IdP per session of alice's, the two
    // tokens refused, none quoted, the two posts with no token and the one too large.
    let mut events = session_events(&fx, 5).await;
    events.sort();
    let ended = "idp_logout".to_owned();
    assert_eq!(
        events,
        [
            (ALICE.to_owned(), ended.clone()),
            (ALICE.to_owned(), ended),
            (ALICE.to_owned(), "sign_in".to_owned()),
            (ALICE.to_owned(), "sign_in".to_owned()),
            (BOB.to_owned(), "sign_in".to_owned()),
        ]
    );
    let records = crate::audit::audit_json_until(&fx.px, &[], |r| {
        crate::audit::of_event(r, "refusal").len() >= 5
    })
    .await;
    let refusals = crate::audit::of_event(&records, "refusal");
    assert_eq!(refusals.len(), 5, "{refusals:#?}");
    let (mut without, mut too_large) = (0, 0);
    for refusal in refusals {
        assert_eq!(refusal["route"], "oidc", "{refusal}");
        assert_eq!(refusal["user"], "anonymous", "{refusal}");
        assert_eq!(
            refusal["path"], "/.portcullis/backchannel_logout",
            "{refusal}"
        );
        let reason = refusal["reason"].as_str().unwrap();
        if reason == "a back-channel logout without a logout_token" {
            without += 1;
            continue;
        }
        if reason == "a back-channel logout's body is larger than any logout token" {
            too_large += 1;
            continue;
        }
        assert!(
            reason.starts_with("a back-channel logout token was refused: ")
                && !reason.contains("garbage")
                && !reason.contains("a.b.c"),
            "{refusal}"
        );
    }
    assert_eq!((without, too_large), (2, 1), "{records:#?}");
}

/// A fixture whose IdP sends its back-channel logouts to a recorder, not to Portcullis: the
/// test holds a real logout token ([`recorded_logout`]) and posts it itself ([`post_logout`]).
async fn recording_logouts() -> (Recorder, Fixture) {
    let rp = Recorder::start().await;
    let fx = Fixture::start_with(Options {
        backchannel: Backchannel::At(rp.url("/bcl")),
        ..Options::default()
    })
    .await;
    (rp, fx)
}

/// The logout token the IdP sent to the recorder of [`recording_logouts`].
async fn recorded_logout(rp: &Recorder) -> String {
    rp.wait_for("/bcl", WAIT)
        .await
        .form("logout_token")
        .expect("logout_token")
}

/// Posts `token` to Portcullis' back-channel logout endpoint; the answer's status.
async fn post_logout(fx: &Fixture, token: String) -> StatusCode {
    bare_client()
        .post(fx.url("127.0.0.1", "/.portcullis/backchannel_logout"))
        .form(&[("logout_token", token)])
        .send()
        .await
        .unwrap()
        .status()
}

/// A back-channel logout is answered from the sessions held when it comes: one whose sign-in
/// is still being finished (its code issued, its session not yet stored) was not among them.
/// The IdP session it is of is kept signed out meanwhile: the sign-in gets no session.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_whose_idp_session_is_logged_out_while_it_finishes_gets_no_session() {
    let (rp, fx) = recording_logouts().await;
    let page = fx.app_url("/dashboard");
    let browser = client();
    let authorize = fx.start_sign_in(&browser, &page).await;
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    // The IdP signs that session out; its logout reaches Portcullis before the callback does.
    let sids = fx
        .idp
        .backchannel_logout_keeping_sessions("alice", CLIENT_ID)
        .await;
    assert_eq!(sids.len(), 1);
    let token = recorded_logout(&rp).await;
    assert_eq!(post_logout(&fx, token).await, StatusCode::OK);

    // The code is still good at the IdP; the session it would begin is not. A page says so,
    // with the way back to sign in again (not sent there: a sign-in under the same IdP
    // session would be refused again, and again).
    let resp = browser.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        set_cookie(&resp, SESSION_COOKIE).is_none(),
        "a session was given"
    );
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("signed you out") && body.contains(&*page),
        "{body}"
    );
    let audited = fx
        .px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.contains("its IdP session was signed out while it began")
        })
        .await;
    assert!(!audited.contains(r#""what":"sign_in""#), "{audited}");
    // Signed in again, at the IdP too, the person has a session.
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&page, &alice.cookie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_or_misused_logout_token_is_refused() {
    let (rp, fx) = recording_logouts().await;
    let page = fx.app_url("/dashboard");
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let sids = fx.idp.backchannel_logout("alice", CLIENT_ID).await;
    assert_eq!(sids.len(), 1);
    let token = recorded_logout(&rp).await;
    assert_session_works(&page, &alice.cookie).await;

    // An ID token of the same IdP and client is not a logout token (it has a nonce and no
    // logout event).
    let tokens = fx.code_flow_tokens(ALICE, ALICE_PASSWORD).await;
    let id_token = tokens["id_token"].as_str().unwrap().to_owned();
    assert_eq!(
        post_logout(&fx, id_token).await,
        StatusCode::BAD_REQUEST,
        "an ID token"
    );
    // An access token for a resource neither.
    let access = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, None)
        .await;
    assert_eq!(
        post_logout(&fx, access).await,
        StatusCode::BAD_REQUEST,
        "an access token"
    );
    // The logout token with its signature broken.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let sig = parts[2].clone();
    parts[2] = format!("{}{}", &sig[..sig.len() - 4], "AAAA");
    assert_eq!(
        post_logout(&fx, parts.join(".")).await,
        StatusCode::BAD_REQUEST,
        "a bad signature"
    );
    assert_session_works(&page, &alice.cookie).await;

    // The real token, once: 200 and alice's session is over.
    assert_eq!(post_logout(&fx, token.clone()).await, StatusCode::OK);
    assert_session_refused(&fx, &page, &alice.cookie).await;

    // Replayed: refused.
    let alice2 = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    assert_eq!(
        post_logout(&fx, token.clone()).await,
        StatusCode::BAD_REQUEST,
        "a replayed token"
    );
    assert_session_works(&page, &alice2.cookie).await;
    // Refused as used: alice2's session is of another IdP session (`sid`), which a replay
    // taken would not end, so only the audit tells a replay refused from one taken.
    const USED: &str = "this logout token was already used";
    fx.px
        .audit_log_until(WAIT, |text| text.matches(USED).count() == 1)
        .await;

    // Still after a restart: the tokens used are kept with the sessions, not in memory only.
    let mut fx = fx;
    fx.px.kill_hard();
    fx.px.restart().await;
    // Verifiable (the IdP's keys fetched again), so that a 400 is the replay's.
    fx.wait_sign_in_available(WAIT).await;
    assert_eq!(
        post_logout(&fx, token).await,
        StatusCode::BAD_REQUEST,
        "a token replayed after a restart"
    );
    fx.px
        .audit_log_until(WAIT, |text| text.matches(USED).count() == 2)
        .await;
    assert_session_works(&page, &alice2.cookie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backchannel_logout_works_with_the_default_algorithm_list() {
    // No `id_token_algorithms` in [oidc]: the README's default applies.
    let fx = Fixture::start().await;
    let page = fx.app_url("/dashboard");
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    // Panics unless Portcullis answers the IdP's logout token with 200/204.
    let sids = fx.idp.backchannel_logout("alice", CLIENT_ID).await;
    assert_eq!(sids.len(), 1, "{sids:?}");
    assert_session_refused(&fx, &page, &alice.cookie).await;
}

// ----- the IdP down ------------------------------------------------------------------------

/// Discovery retries an unreachable IdP with a growing pause (up to a minute); a reload (an
/// operator who fixed the issuer, or the network, and sent `SIGHUP`) tries again at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_retries_discovery_at_once() {
    let fx = Fixture::start_with(Options {
        idp_at_start: IdpOutage::Unavailable,
        ..Options::default()
    })
    .await;
    // Past a few failures: the pause is 8 s now.
    fx.px.log_until(|log| log.contains("retrying in 8s")).await;
    fx.idp.outage(false).await;
    let back = Instant::now();
    fx.px.reload_and_wait().await;
    fx.wait_sign_in_available(Duration::from_secs(5)).await;
    eprintln!("sign-in available {:?} after the reload", back.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_is_unavailable_until_the_idp_is_first_reached_then_works() {
    let fx = Fixture::start_with(Options {
        idp_at_start: IdpOutage::Unavailable,
        ..Options::default()
    })
    .await;
    let page = fx.app_url("/wanted?z=9");

    // Never reached: a navigation gets a clear 503 page, not a redirect.
    for url in [page.clone(), fx.app_url("/.portcullis/sign_in?rd=%2F")] {
        let resp = navigate(&client(), &url).await;
        let status = resp.status();
        assert!(header(&resp, "location").is_none(), "{url}");
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{url}: {body}");
        assert!(
            body.to_ascii_lowercase().contains("sign-in is unavailable"),
            "{url}: {body}"
        );
    }
    // API calls still get a plain 401.
    let resp = bare_client().get(&page).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(fx.app.count(), 0);
    // Both refused sign-ins are recorded, saying why.
    let unavailable = "a sign-in was refused: sign-in is unavailable";
    let audited = fx
        .px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.matches(unavailable).count() >= 2
        })
        .await;
    assert_eq!(audited.matches(unavailable).count(), 2, "{audited}");

    // The IdP comes back: sign-in works within the discovery backoff.
    let back = Instant::now();
    fx.idp.outage(false).await;
    fx.wait_sign_in_available(Duration::from_secs(30)).await;
    eprintln!(
        "sign-in available {:?} after the IdP came back",
        back.elapsed()
    );
    let client = client();
    let signed = fx.sign_in(&client, &page, ALICE, ALICE_PASSWORD).await;
    assert_eq!(signed.landed, page);
    assert_session_works(&page, &signed.cookie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn existing_sessions_keep_working_while_the_idp_is_down() {
    let fx = Fixture::start().await;
    let page = fx.app_url("/work");
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    // A sign-in started before the outage, to be completed during it.
    let late = client();
    let authorize = fx.start_sign_in(&late, &page).await;
    let callback = fx.idp_login(&authorize, BOB, BOB_PASSWORD).await;

    for outage in [IdpOutage::Unavailable, IdpOutage::Reset] {
        fx.idp.set_outage(outage).await;
        assert_session_works(&page, &alice.cookie).await;
        let resp = get_with_session(
            &fx.app_url("/.portcullis/me"),
            &alice.cookie,
            "application/json",
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "{outage:?}");
        fx.idp.outage(false).await;
    }

    // The code exchange cannot happen while the IdP is down (its connections reset, or a
    // gateway's error page, text or JSON, in its place, or its own 500 in OAuth's JSON): a
    // clear 503, saying what the IdP answered, no session.
    for (outage, answered) in [
        (IdpOutage::Unavailable, "the IdP answered 503"),
        (IdpOutage::Gateway, "the IdP answered 502"),
        (IdpOutage::ServerError, "the IdP answered 500"),
        (IdpOutage::SpringNotFound, "the IdP answered 404"),
        (IdpOutage::Reset, "error sending request"),
    ] {
        fx.idp.set_outage(outage).await;
        let resp = late.get(&callback).send().await.unwrap();
        let status = resp.status();
        let session = set_cookie(&resp, SESSION_COOKIE);
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{outage:?}: {body}"
        );
        assert!(body.contains("Reload this page"), "{outage:?}: {body}");
        assert!(body.contains(answered), "{outage:?}: {body}");
        assert!(!body.contains("for url ("), "{outage:?}: {body}");
        assert!(session.is_none());
        assert_session_works(&page, &alice.cookie).await;
        fx.idp.outage(false).await;
    }
    // The IdP never had the code: reloading the callback once it is back finishes the
    // sign-in (the browser still has the sign-in's cookie).
    let resp = late.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let bob_late = cookie_value(&set_cookie(&resp, SESSION_COOKIE).expect("a session"));
    assert_eq!(header(&resp, "location").as_deref(), Some(&*page));
    assert_session_works(&page, &bob_late).await;

    // After the outage, everything as before.
    assert_session_works(&page, &alice.cookie).await;
    let bob = fx.sign_in(&client(), &page, BOB, BOB_PASSWORD).await;
    assert_session_works(&page, &bob.cookie).await;
}

// ----- (c) key rotation --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_new_sign_in_works_after_the_idp_rotates_its_keys() {
    let fx = Fixture::start().await;
    let discovered = Instant::now();
    let page = fx.app_url("/before");
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&page, &alice.cookie).await;

    // Portcullis may rate-limit key refetches (10 s between two); a rotation is rare, so give
    // it that much since it last fetched the keys (at discovery).
    let quiet = Duration::from_secs(11);
    if let Some(rest) = quiet.checked_sub(discovered.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let kids = fx.idp.rotate_keys(false).await;
    assert_eq!(kids.len(), 2, "only the new keys are published: {kids:?}");

    // No restart: a new sign-in, with an ID token signed by a key Portcullis has never seen.
    let page = fx.app_url("/after?k=1");
    let bob = fx.sign_in(&client(), &page, BOB, BOB_PASSWORD).await;
    assert_eq!(bob.landed, page);
    assert_session_works(&page, &bob.cookie).await;
    // Sessions from before the rotation are untouched.
    assert_session_works(&page, &alice.cookie).await;
}

/// An IdP that rotates its keys again soon after (Keycloak signs with a new key at once): the
/// first sign-in after each rotation is verified with the new keys, however short the time
/// since they were last fetched. Its ID token is the IdP's own, not a client's to make up.
#[tokio::test(flavor = "multi_thread")]
async fn each_sign_in_after_a_quick_key_rotation_is_verified_with_the_new_keys() {
    let fx = Fixture::start().await;
    for (round, (login, password)) in [(ALICE, ALICE_PASSWORD), (BOB, BOB_PASSWORD)]
        .into_iter()
        .enumerate()
    {
        let kids = fx.idp.rotate_keys(false).await;
        assert_eq!(kids.len(), 2, "round {round}: {kids:?}");
        let page = fx.app_url(&format!("/rotated?round={round}"));
        let signed = fx.sign_in(&client(), &page, login, password).await;
        assert_eq!(signed.landed, page, "round {round}");
        assert_session_works(&page, &signed.cookie).await;
    }
}

/// The sign-in's `callback` taken by `browser` while the IdP has `outage`: 503, asked to sign
/// in again in a moment, no session made. The outage ends after.
async fn callback_asks_to_come_back(
    idp: &Idp,
    browser: &reqwest::Client,
    callback: &str,
    outage: IdpOutage,
) {
    idp.set_outage(outage).await;
    let resp = browser.get(callback).send().await.expect("GET callback");
    idp.outage(false).await;
    let status = resp.status();
    let session = set_cookie(&resp, SESSION_COOKIE);
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("sign in again"), "{body}");
    assert!(session.is_none(), "a session was made: {session:?}");
}

/// An ID token signed with a key the IdP's key set cannot give (it is down) is neither taken
/// nor called forged: the person is asked to come back in a moment, and then signs in.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_whose_new_key_cannot_be_fetched_is_asked_to_come_back() {
    let fx = Fixture::start().await;
    comes_back_then_signs_in(&fx, "/rotated", true, IdpOutage::Jwks).await;
}

/// Alice's sign-in to `path`, its keys rotated before its callback if `rotate`, asked to come
/// back while the IdP has `outage`; once it ends, her next sign-in lands there.
async fn comes_back_then_signs_in(fx: &Fixture, path: &str, rotate: bool, outage: IdpOutage) {
    let page = fx.app_url(path);
    let browser = client();
    let authorize = fx.start_sign_in(&browser, &page).await;
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    if rotate {
        fx.idp.rotate_keys(false).await;
    }
    callback_asks_to_come_back(&fx.idp, &browser, &callback, outage).await;

    let signed = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    assert_eq!(signed.landed, page);
    assert_session_works(&page, &signed.cookie).await;
}

/// A provider first found with a key set Portcullis can use none of (an IdP node whose keys
/// failed to load serves one empty) says nothing of a sign-in's ID token: the person is asked
/// to come back in a moment, not refused as holding a forged token, and signs in once the
/// keys are served.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_while_the_provider_has_served_no_usable_key_is_asked_to_come_back() {
    let fx = Fixture::start_with(Options {
        idp_at_start: IdpOutage::JwksEmpty,
        ..Options::default()
    })
    .await;
    comes_back_then_signs_in(&fx, "/first", false, IdpOutage::JwksEmpty).await;
}

/// An ID token whose kid is known but whose key the IdP replaced under it is not called forged
/// while the key set cannot be fetched: the person is asked to come back in a moment. (The set
/// is fetched again for it as for a client's token, at most once in 10 s.)
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_with_a_key_replaced_under_its_kid_is_asked_to_come_back_while_keys_are_down() {
    let fx = Fixture::start().await;
    // The keys were fetched at start: 10 s on, a signature no key verifies fetches them again.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let page = fx.app_url("/replaced");
    let browser = client();
    let authorize = fx.start_sign_in(&browser, &page).await;
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let before = fx.idp.jwks().await;
    let kids = fx.idp.replace_keys_under_their_kids().await;
    let before: Vec<_> = (before.keys.iter())
        .filter_map(|k| k.common.key_id.clone())
        .collect();
    assert!(kids.iter().all(|kid| before.contains(kid)), "{kids:?}");
    callback_asks_to_come_back(&fx.idp, &browser, &callback, IdpOutage::Jwks).await;

    // 10 s after the fetch that failed, the set is fetched again, and the new key verifies.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let signed = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    assert_eq!(signed.landed, page);
    assert_session_works(&page, &signed.cookie).await;
}

// ----- one cookie for many hosts, TLS, restarts --------------------------------------------

/// Portcullis with `routes` and one session for every host under `.corp.test`, signed in on
/// `auth.corp.test`, and the IdP: the configuration, the IdP, Portcullis and the auth host
/// (with its port).
async fn under_corp_test(routes: Vec<Route>) -> (ConfigBuilder, Idp, Portcullis, String) {
    under_corp_test_taking(routes, false).await
}

/// [`under_corp_test`], with the IdP's bearer tokens taken (`[[jwt_issuers]]`) when `bearer`.
async fn under_corp_test_taking(
    routes: Vec<Route>,
    bearer: bool,
) -> (ConfigBuilder, Idp, Portcullis, String) {
    let cfg = ConfigBuilder::new().http_listener();
    let port = cfg.http_addr().port();
    let auth = format!("auth.corp.test:{port}");
    let idp = idp_setup(
        &[format!("http://{auth}/.portcullis/callback")],
        &format!("http://127.0.0.1:{port}/.portcullis/backchannel_logout"),
    )
    .start()
    .await;
    let mut cfg = routes.into_iter().fold(cfg, ConfigBuilder::route).oidc(
        Oidc::new(idp.issuer(), CLIENT_ID, CLIENT_SECRET, &auth)
            .set("cookie_domain", "\".corp.test\""),
    );
    if bearer {
        cfg = cfg.jwt_issuer(JwtIssuer::new(idp.issuer(), &[API_AUD]));
    }
    let px = cfg.start().await;
    (cfg, idp, px, auth)
}

/// A deep link whose query holds a raw `\` (browsers send one as typed, `?q=C:\tmp`) signs in
/// through the auth host too: the address Portcullis sends there is one it takes.
#[tokio::test(flavor = "multi_thread")]
async fn a_deep_link_with_a_backslash_in_its_query_signs_in_under_the_cookie_domain() {
    let app = Upstream::start("app").await;
    let (cfg, _idp, _px, auth) = under_corp_test(vec![
        Route::new("http://app.corp.test", &[&app]).any_signed_in()
    ])
    .await;
    wait_sign_in_available_at(
        &client(),
        &format!("http://{auth}/.portcullis/sign_in?rd=%2F"),
        WAIT,
    )
    .await;
    let page = cfg.http_url("app.corp.test", "/search?q=C:\\tmp");
    let c = client();
    let resp = navigate(&c, &page).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let to_auth = header(&resp, "location").unwrap();
    let resp = navigate(&c, &to_auth).await;
    let status = resp.status();
    let location = header(&resp, "location");
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::FOUND, "{to_auth}: {body}");
    assert!(location.is_some_and(|l| l.contains("/auth?")), "{body}");
}

/// On a host outside the cookie domain (a route that takes bearer tokens only), a browser
/// asking `/.portcullis/me` is not sent to sign in: the cookie the sign-in sets would never
/// come back there, and every round would make a session and go round again.
#[tokio::test(flavor = "multi_thread")]
async fn me_outside_the_cookie_domain_is_no_sign_in_loop() {
    let app = Upstream::start("app").await;
    let routes = vec![
        Route::new("http://app.corp.test", &[&app]).any_signed_in(),
        Route::new("http://api.other.test", &[&app])
            .accept(&["bearer"])
            .any_signed_in(),
    ];
    let (cfg, _idp, _px, auth) = under_corp_test_taking(routes, true).await;
    wait_sign_in_available_at(
        &client(),
        &format!("http://{auth}/.portcullis/sign_in?rd=%2F"),
        WAIT,
    )
    .await;
    let resp = navigate(
        &client(),
        &cfg.http_url("api.other.test", "/.portcullis/me"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key("www-authenticate"));
    // Under the domain, a browser is sent to sign in, as ever.
    let resp = navigate(&client(), &cfg.http_url("app.corp.test", "/.portcullis/me")).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_sign_in_covers_every_host_under_the_cookie_domain() {
    let app = Upstream::start("app").await;
    let wiki = Upstream::start("wiki").await;
    let (cfg, idp, _px, auth) = under_corp_test(vec![
        Route::new("http://app.corp.test", &[&app]).any_signed_in(),
        Route::new("http://wiki.corp.test", &[&wiki]).any_signed_in(),
    ])
    .await;
    wait_sign_in_available_at(
        &client(),
        &format!("http://{auth}/.portcullis/sign_in?rd=%2F"),
        WAIT,
    )
    .await;
    let page = cfg.http_url("app.corp.test", "/x?y=1");

    // The hops: the app's host sends the browser to sign in on the auth host, which sends it
    // to the IdP with the auth host's callback.
    let c = client();
    let resp = navigate(&c, &page).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let to_auth = header(&resp, "location").unwrap();
    assert_eq!(
        url::Url::parse(&to_auth).unwrap().host_str(),
        Some("auth.corp.test"),
        "{to_auth}"
    );
    assert_eq!(query_param(&to_auth, "rd").as_deref(), Some(&*page));
    let resp = navigate(&c, &to_auth).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let authorize = header(&resp, "location").unwrap();
    assert!(authorize.starts_with(idp.issuer()), "{authorize}");
    assert_eq!(
        query_param(&authorize, "redirect_uri"),
        Some(format!("http://{auth}/.portcullis/callback"))
    );

    // A deep link longer than a return address may be (a dashboard's, with its state in the
    // query) loses its query on the way to the auth host, not the sign-in.
    let long = cfg.http_url(
        "app.corp.test",
        &format!("/board?state={}", "s".repeat(3000)),
    );
    let resp = navigate(&c, &long).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let to_auth = header(&resp, "location").unwrap();
    let board = cfg.http_url("app.corp.test", "/board");
    assert_eq!(query_param(&to_auth, "rd").as_deref(), Some(&*board));
    let resp = navigate(&c, &to_auth).await;
    assert_eq!(resp.status(), StatusCode::FOUND, "{to_auth}");
    let authorize = header(&resp, "location").unwrap();
    assert!(authorize.starts_with(idp.issuer()), "{authorize}");

    // A real browser signs in once and is signed in on every host under .corp.test.
    let browser = Browser::start().await;
    browser.goto(&page).await;
    browser
        .wait_for_url(|u| u.contains("/interaction/"), WAIT)
        .await;
    browser.fill("input[name=login]", ALICE).await;
    browser.fill("input[name=password]", ALICE_PASSWORD).await;
    browser.click("button[type=submit]").await;
    browser.wait_for_url(|u| u == page, WAIT).await;
    let text = browser.wait_for_text("\"upstream\"", WAIT).await;
    assert!(text.contains("\"upstream\":\"app\""), "{text}");
    let cookie = browser
        .cookie(SESSION_COOKIE)
        .await
        .expect("session cookie");
    assert_eq!(
        cookie.domain.trim_start_matches('.'),
        "corp.test",
        "{cookie:?}"
    );
    assert!(cookie.http_only && cookie.same_site.as_deref() == Some("Lax"));

    let other = cfg.http_url("wiki.corp.test", "/page");
    browser.goto(&other).await;
    assert_eq!(browser.current_url().await, other, "no new sign-in");
    let text = browser.wait_for_text("\"upstream\"", WAIT).await;
    assert!(text.contains("\"upstream\":\"wiki\""), "{text}");
    browser.quit().await;
}

/// A page on one host calling an API on another with the session (`credentials: "include"`,
/// under `cookie_domain`) makes the browser send a CORS preflight first, without the cookie.
/// Where the route lets preflights through, the upstream answers them, as itself; anything
/// else that is not a preflight still needs a caller.
#[tokio::test(flavor = "multi_thread")]
async fn cors_preflights_reach_the_upstream_only_where_the_route_lets_them() {
    let app = Upstream::start("app").await;
    let api = Upstream::start("api").await;
    let (cfg, _idp, _px, _) = under_corp_test(vec![
        Route::new("http://app.corp.test", &[&app]).any_signed_in(),
        Route::new("http://api.corp.test", &[&api])
            .any_signed_in()
            .set("cors_preflight = true"),
    ])
    .await;
    let origin = cfg.http_url("app.corp.test", "");
    let preflight = |host: &str| {
        bare_client()
            .request(reqwest::Method::OPTIONS, cfg.http_url(host, "/data"))
            .header(ORIGIN, &origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
    };
    // nginx's websocket recipe in front sets `Connection: upgrade` on every request.
    let resp = preflight("api.corp.test")
        .header("connection", "upgrade")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "behind nginx");
    // Answered by the upstream a second later: a preflight is nobody's, and is not judged
    // again as an anonymous request when the marks move (every second, at least).
    let slow = bare_client()
        .request(
            reqwest::Method::OPTIONS,
            cfg.http_url("api.corp.test", "/slow?ms=1100"),
        )
        .header(ORIGIN, &origin)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), StatusCode::OK, "answered a second later");
    let resp = preflight("api.corp.test").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The answer is what a browser reads of a preflight's, and no more: the upstream's
    // handler answered it too (with the page it gives any method), and that is nobody's to
    // see. A browser sees it as the upstream's CORS rules say.
    let headers = resp.headers().clone();
    assert_eq!(headers["access-control-allow-origin"], origin.as_str());
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(headers["vary"], "Origin");
    for name in ["content-type", "x-upstream"] {
        assert!(!headers.contains_key(name), "{name} in {headers:?}");
    }
    assert_eq!(resp.bytes().await.unwrap().len(), 0, "the handler's page");
    let seen = api.seen();
    let echo = seen.last().unwrap();
    assert_eq!(
        (echo.upstream.as_str(), echo.method.as_str()),
        ("api", "OPTIONS")
    );
    assert_eq!(echo.header("access-control-request-method"), Some("POST"));
    assert!(
        echo.headers
            .iter()
            .all(|(name, _)| !name.starts_with("x-portcullis-")),
        "a preflight is nobody's: {:?}",
        echo.headers
    );
    // Not where the route does not say so; not an OPTIONS that is no preflight, nor one
    // with a body; not any other method.
    let cases = [
        ("another route", preflight("app.corp.test")),
        (
            "no Access-Control-Request-Method",
            bare_client()
                .request(
                    reqwest::Method::OPTIONS,
                    cfg.http_url("api.corp.test", "/data"),
                )
                .header(ORIGIN, &origin),
        ),
        ("a body", preflight("api.corp.test").body("x=1")),
        // Its headers named in `Connection` would be removed before the upstream: there it
        // is an OPTIONS to the path's handler, with the caller's query.
        (
            "Connection naming its headers",
            preflight("api.corp.test")
                .header("connection", "Origin, Access-Control-Request-Method"),
        ),
        (
            "a GET",
            bare_client()
                .get(cfg.http_url("api.corp.test", "/data"))
                .header(ORIGIN, &origin),
        ),
    ];
    for (what, request) in cases {
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
    assert_eq!((app.count(), api.count()), (0, 3));
}

/// A jar stuffed past what is read for a session (by a sibling host, say), or holding two
/// cookies of the session's name (one set for a longer path), does not leave a session alive
/// behind a sign-out that said it ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_out_from_a_stuffed_cookie_jar_ends_the_session() {
    let fx = Fixture::start().await;
    let page = fx.app_url("/home");
    let signed = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let other = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let stuffing: Vec<String> = (0..12)
        .map(|i| format!("sibling{i}={}", "x".repeat(1000)))
        .collect();
    let jar = format!(
        "{SESSION_COOKIE}={}; {}; {SESSION_COOKIE}={}",
        other.cookie,
        stuffing.join("; "),
        signed.cookie
    );
    let resp = fx.sign_out(&jar).await;
    assert!(
        resp.status() == StatusCode::FOUND || resp.status() == StatusCode::OK,
        "{}",
        resp.status()
    );
    assert_session_refused(&fx, &page, &signed.cookie).await;
    assert_session_refused(&fx, &page, &other.cookie).await;
}

/// A browser sends every cookie of the session's name it holds, those for longer paths first.
/// One planted by a sibling host under the cookie domain, or a session that ended, sent in
/// front of the live session, does not hide it (it sent the browser round the sign-in for
/// ever).
#[tokio::test(flavor = "multi_thread")]
async fn a_cookie_of_the_session_s_name_sent_first_does_not_hide_the_session() {
    let fx = Fixture::start().await;
    let page = fx.app_url("/home");
    let ended = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let signed = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let resp = fx
        .sign_out(&format!("{SESSION_COOKIE}={}", ended.cookie))
        .await;
    assert!(resp.status().is_redirection() || resp.status().is_success());
    assert_session_refused(&fx, &page, &ended.cookie).await;
    let planted = "p".repeat(43);
    for first in [&*planted, &ended.cookie] {
        let jar = format!("{first}; {SESSION_COOKIE}={}", signed.cookie);
        assert_session_works(&page, &jar).await;
    }
    // Without a live one among them, none is a session.
    assert_session_refused(
        &fx,
        &page,
        &format!("{planted}; {SESSION_COOKIE}={}", ended.cookie),
    )
    .await;
}

/// An upstream cannot set Portcullis' cookies in a visitor's browser: not its operator's own
/// session (the visitor would act as them), not a sign-in's, and it cannot clear them; its own
/// cookies pass.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_cannot_set_or_clear_portcullis_cookies() {
    let fx = Fixture::start().await;
    let cookie = fx
        .sign_in(&client(), &fx.app_url("/"), ALICE, ALICE_PASSWORD)
        .await
        .cookie;
    let resp = get_with_session(&fx.app_url("/set-cookies"), &cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let set: Vec<&str> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(set, ["theme=dark; Path=/"]);
    assert_eq!(header(&resp, "clear-site-data"), None);
    // Its own caching rule stands; an answer for alice that has none is marked hers alone,
    // so that no shared cache in front serves it to others.
    assert_eq!(
        header(&resp, "cache-control").as_deref(),
        Some("public, max-age=60")
    );
    let resp = get_with_session(&fx.app_url("/page"), &cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "cache-control").as_deref(), Some("private"));
    // One that does not say whether a shared cache may store it is made private too.
    // And so is one keyed on who is calling by headers only Portcullis sends the upstream: a
    // cache in front never sees them.
    for (said, sent) in [
        ("cc=must-revalidate", vec!["must-revalidate", "private"]),
        ("cc=max-age=60", vec!["max-age=60", "private"]),
        ("cc=no-cache", vec!["no-cache", "private"]),
        ("cc=s-maxage=30", vec!["s-maxage=30"]),
        ("cc=no-store", vec!["no-store"]),
        ("cc=Private,%20max-age=5", vec!["Private, max-age=5"]),
        (
            "cc=private=%22Set-Cookie%22",
            vec!["private=\"Set-Cookie\"", "private"],
        ),
        ("cc=public&vary=Accept-Encoding", vec!["public"]),
        (
            "cc=public,%20max-age=60&vary=Accept,%20X-Portcullis-User",
            vec!["private, max-age=60"],
        ),
        (
            "cc=max-age=5&vary=x-forwarded-for",
            vec!["private, max-age=5"],
        ),
    ] {
        let url = fx.app_url(&format!("/cache-control?{said}"));
        let resp = get_with_session(&url, &cookie, "application/json").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let got: Vec<&str> = resp
            .headers()
            .get_all("cache-control")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(got, sent, "{said}");
    }
    // A CDN reads its own fields in place of `Cache-Control`: an answer keyed on who is
    // calling keeps none, one that is not keeps what its upstream said.
    let cdn = "cdn-cache-control=max-age=600&cloudflare-cdn-cache-control=max-age=600\
               &surrogate-control=max-age=600&cc=max-age=5";
    for (vary, kept) in [("X-Portcullis-User", false), ("Accept", true)] {
        let url = fx.app_url(&format!("/cache-control?{cdn}&vary={vary}"));
        let resp = get_with_session(&url, &cookie, "application/json").await;
        assert_eq!(resp.status(), StatusCode::OK);
        for field in [
            "cdn-cache-control",
            "cloudflare-cdn-cache-control",
            "surrogate-control",
        ] {
            assert_eq!(resp.headers().contains_key(field), kept, "{vary}: {field}");
        }
    }
    assert_session_works(&fx.app_url("/"), &cookie).await;
}

/// With `cookie_domain` on TLS the session cookie is `__Secure-` prefixed: no plain-HTTP answer
/// (a sibling host's, or one forged on the network) can set a cookie of that name, so none can
/// plant a session of its own for the browser to send first. Sibling hosts on TLS still can:
/// that is what a shared cookie domain shares.
#[tokio::test(flavor = "multi_thread")]
async fn on_tls_with_a_cookie_domain_the_session_cookie_is_secure_prefixed() {
    let ca = portcullis_tests::TestCa::new();
    let hosts = ["auth.corp.test", "app.corp.test"];
    let cfg = ConfigBuilder::new().https_listener(vec![ca.leaf("corp", &hosts)]);
    let port = cfg.https_addr().port();
    let app = Upstream::start("app").await;
    let auth = format!("auth.corp.test:{port}");
    let idp = idp_setup(
        &[format!("https://{auth}/.portcullis/callback")],
        "http://127.0.0.1:9/unused",
    )
    .start()
    .await;
    let cfg = cfg
        .route(Route::new("https://app.corp.test", &[&app]).any_signed_in())
        .oidc(
            Oidc::new(idp.issuer(), CLIENT_ID, CLIENT_SECRET, &auth)
                .set("auth_scheme", "\"https\"")
                .set("cookie_domain", "\".corp.test\""),
        );
    let _px = cfg.start().await;
    let c = signing_in_client(&ca);
    wait_sign_in_available_at(
        &c,
        &format!("https://{auth}/.portcullis/sign_in?rd=%2F"),
        WAIT,
    )
    .await;
    let page = cfg.https_url("app.corp.test", "/page");
    let to_auth = header(&navigate(&c, &page).await, LOCATION.as_str()).expect("to the auth host");
    let authorize = header(&navigate(&c, &to_auth).await, LOCATION.as_str()).expect("to the IdP");
    let callback = idp.sign_in_http(&authorize, ALICE, ALICE_PASSWORD).await;
    let resp = c.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let line = set_cookie(&resp, &format!("__Secure-{SESSION_COOKIE}"))
        .unwrap_or_else(|| panic!("no __Secure- session cookie: {:?}", resp.headers()));
    let attributes = cookie_attributes(&line);
    for want in ["secure", "httponly", "domain=corp.test"] {
        assert!(attributes.iter().any(|a| a == want), "{want}: {line}");
    }
    let session = line
        .split(';')
        .next()
        .and_then(|pair| pair.split_once('='))
        .map(|(_, value)| value.to_owned())
        .expect("a session id");
    let with = |name: &str| {
        c.get(&page)
            .header(COOKIE, format!("{name}={session}"))
            .header(ACCEPT, "application/json")
            .send()
    };
    assert_eq!(
        with(&format!("__Secure-{SESSION_COOKIE}"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        with(SESSION_COOKIE).await.unwrap().status(),
        StatusCode::UNAUTHORIZED,
        "the unprefixed name, which a plain-HTTP answer can set, is no session on TLS"
    );
}

/// A client that signs in on https: it trusts `ca`, keeps cookies and follows no redirect.
fn signing_in_client(ca: &portcullis_tests::TestCa) -> reqwest::Client {
    portcullis_tests::client::tls_client_builder(ca)
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Portcullis on `cfg` (its listeners set), where browsers reach `https://app.test:{port}`
/// (signed by `ca`): the route `https://app.test` for anyone signed in, sign-in on that host,
/// ready to sign in.
async fn https_fixture(cfg: ConfigBuilder, port: u16, ca: &portcullis_tests::TestCa) -> Fixture {
    let app = Upstream::start("app").await;
    let url = |path: &str| format!("https://app.test:{port}{path}");
    let idp = idp_setup(&[url("/.portcullis/callback")], "http://127.0.0.1:9/unused")
        .start()
        .await;
    let cfg = cfg
        .route(Route::new("https://app.test", &[&app]).any_signed_in())
        .oidc(
            Oidc::new(
                idp.issuer(),
                CLIENT_ID,
                CLIENT_SECRET,
                &format!("app.test:{port}"),
            )
            .set("auth_scheme", "\"https\""),
        );
    let px = cfg.start().await;
    wait_sign_in_available_at(
        &signing_in_client(ca),
        &url("/.portcullis/sign_in?rd=%2F"),
        WAIT,
    )
    .await;
    Fixture {
        cfg,
        idp,
        px,
        app,
        api: Upstream::start("unused").await,
    }
}

/// [`https_fixture`] on Portcullis' own TLS listener, with a certificate for `app.test`.
async fn tls_listener_fixture(ca: &portcullis_tests::TestCa) -> Fixture {
    let cfg = ConfigBuilder::new().https_listener(vec![ca.leaf("app", &["app.test"])]);
    let port = cfg.https_addr().port();
    https_fixture(cfg, port, ca).await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_tls_the_session_cookie_is_secure_and_host_prefixed() {
    let ca = portcullis_tests::TestCa::new();
    let fx = tls_listener_fixture(&ca).await;
    let cfg = fx.cfg.clone();
    let tls = || signing_in_client(&ca);
    let c = tls();
    let page = cfg.https_url("app.test", "/secure?q=1");
    let authorize = fx.start_sign_in(&c, &page).await;
    assert_eq!(
        query_param(&authorize, "redirect_uri"),
        Some(cfg.https_url("app.test", "/.portcullis/callback"))
    );
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let resp = c.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(header(&resp, "location").as_deref(), Some(&*page));
    let line = set_cookie(&resp, &format!("__Host-{SESSION_COOKIE}"))
        .unwrap_or_else(|| panic!("no __Host- session cookie: {:?}", resp.headers()));
    let attributes = cookie_attributes(&line);
    for want in ["secure", "httponly", "samesite=lax", "path=/"] {
        assert!(attributes.iter().any(|a| a == want), "{want}: {line}");
    }
    assert!(
        !attributes.iter().any(|a| a.starts_with("domain=")),
        "{line}"
    );
    let resp = c.get(&page).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(Echo::parse(&resp.bytes().await.unwrap()).uri, "/secure?q=1");
}

/// Tabs restored at once, each sent to sign in with a long address (a dashboard's), leave a
/// sign-in cookie each, sent with every request to the host while it lasts: together past
/// `max_request_header_bytes`, they must not make the callback, or any page, 431. A browser
/// keeps the newest 16; a request made too large by more (sign-ins started all at once, none
/// seeing the others') is answered 431 with all but those expired.
#[tokio::test(flavor = "multi_thread")]
async fn many_sign_ins_in_progress_do_not_make_the_host_s_requests_too_large() {
    let ca = portcullis_tests::TestCa::new();
    let fx = tls_listener_fixture(&ca).await;
    let c = portcullis_tests::client::tls_client_builder(&ca)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // A browser's jar: cookies of one path sent oldest first (RFC 6265 §5.4), as browsers do
    // (reqwest's own jar keeps no order).
    let mut jar: Vec<(String, String)> = Vec::new();
    let get = |url: String, jar: &[(String, String)]| {
        let cookies: Vec<String> = jar.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let request = c.get(url).header(ACCEPT, BROWSER_ACCEPT);
        let request = match cookies.is_empty() {
            true => request,
            false => request.header(COOKIE, cookies.join("; ")),
        };
        async move { request.send().await.unwrap() }
    };
    let keep = |resp: &reqwest::Response, jar: &mut Vec<(String, String)>| {
        for set in resp.headers().get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let (name, value) = set.split(';').next().unwrap().split_once('=').unwrap();
            jar.retain(|(n, _)| n != name);
            if !set.contains("Max-Age=0") {
                jar.push((name.to_owned(), value.to_owned()));
            }
        }
    };
    let long = "q".repeat(1_400);
    let page = |tab: usize| fx.cfg.https_url("app.test", &format!("/dash/{tab}?{long}"));
    let mut authorize = Vec::new();
    for tab in 0..40 {
        let resp = get(page(tab), &jar).await;
        assert_eq!(resp.status(), StatusCode::FOUND, "tab {tab}");
        authorize.push(header(&resp, "location").unwrap());
        keep(&resp, &mut jar);
    }
    let signing_in = |jar: &[(String, String)]| {
        (jar.iter())
            .filter(|(n, _)| n.starts_with("__Host-portcullis_signin"))
            .count()
    };
    assert_eq!(signing_in(&jar), 16, "the newest 16 kept");
    // The oldest were expired: tab 23's sign-in cannot finish, tab 24's does.
    let callback = fx.idp_login(&authorize[23], ALICE, ALICE_PASSWORD).await;
    let resp = get(callback, &jar).await;
    assert_ne!(
        resp.status(),
        StatusCode::FOUND,
        "an expired sign-in finished"
    );
    let callback = fx.idp_login(&authorize[24], ALICE, ALICE_PASSWORD).await;
    let resp = get(callback, &jar).await;
    assert_eq!(resp.status(), StatusCode::FOUND, "the callback");
    assert_eq!(header(&resp, "location").as_deref(), Some(&*page(24)));
    keep(&resp, &mut jar);
    assert_eq!(signing_in(&jar), 15, "its own cleared");
    let resp = get(page(24), &jar).await;
    assert_eq!(resp.status(), StatusCode::OK, "the page signed in to");
    // The sign-in cookies went no further.
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    let cookies = echo.header("cookie").unwrap_or_default();
    assert!(!cookies.contains("signin"), "{cookies}");

    // Sixty begun at once: the request they make too large is answered 431, with all but the
    // newest 16 expired; the next, without them, is not too large.
    let value = "v".repeat(2_400);
    let name = |i: usize| format!("__Host-portcullis_signin_{i:016x}");
    let jar_of = |tabs: std::ops::Range<usize>| {
        let cookies: Vec<String> = tabs.map(|i| format!("{}={value}", name(i))).collect();
        cookies.join("; ")
    };
    let http1 = portcullis_tests::client::tls_client_http1(&ca);
    // Among them, names that are no sign-in's, and one said twice: neither expired.
    let others = format!(
        "__Host-portcullis_signin=x; __Host-portcullis_signin_zz=x; {}=x",
        name(0)
    );
    let resp = http1
        .get(page(0))
        .header(COOKIE, format!("{}; {others}", jar_of(0..60)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let set_cookies = |resp: &reqwest::Response| -> Vec<String> {
        let set = resp.headers().get_all("set-cookie").iter();
        set.map(|v| v.to_str().unwrap().to_owned()).collect()
    };
    let expired = set_cookies(&resp);
    assert_eq!(expired.len(), 44, "{expired:?}");
    for (i, cookie) in expired.iter().enumerate() {
        assert!(cookie.starts_with(&format!("{}=;", name(i))), "{cookie}");
        assert!(cookie.contains("Max-Age=0"), "{cookie}");
    }
    let resp = http1
        .get(page(0))
        .header(COOKIE, jar_of(44..60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "not too large");
    // However many there are, one answer expires at most 64.
    let many: Vec<String> = (0..4_000).map(|i| format!("{}=", name(i))).collect();
    let resp = http1
        .get(page(0))
        .header(COOKIE, many.join("; "))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(set_cookies(&resp).len(), 64);
}

/// Behind a load balancer that terminates TLS, the browser is on https and Portcullis hears
/// plain HTTP: with `behind_tls_proxy`, that listener's requests are the https requests they
/// were. The sign-in comes back to an https callback, the cookie is `__Host-` and `Secure`,
/// the upstream is told `https`, and a sign-out posted from the https page (its `Origin`) is
/// taken, where it was refused with 403 as cross-site.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_proxy_that_terminates_tls_requests_are_the_https_ones_they_were() {
    let ca = portcullis_tests::TestCa::new();
    // Not on loopback: only the listener's setting lets sign-in through in plain HTTP.
    let cfg = ConfigBuilder::new()
        .http_listener_on_all_interfaces()
        .behind_tls_proxy();
    let cert = ca.leaf("app", &["app.test"]);
    let balancer = portcullis_tests::TlsTerminator::start(&cert, cfg.http_addr()).await;
    let port = balancer.addr().port();
    let url = |path: &str| format!("https://app.test:{port}{path}");
    let fx = https_fixture(cfg, port, &ca).await;
    let tls = || signing_in_client(&ca);
    let c = tls();
    let page = url("/secure");
    let authorize = fx.start_sign_in(&c, &page).await;
    assert_eq!(
        query_param(&authorize, "redirect_uri"),
        Some(url("/.portcullis/callback"))
    );
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let resp = c.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(header(&resp, "location").as_deref(), Some(&*page));
    let line = set_cookie(&resp, &format!("__Host-{SESSION_COOKIE}"))
        .unwrap_or_else(|| panic!("no __Host- session cookie: {:?}", resp.headers()));
    assert!(
        cookie_attributes(&line).iter().any(|a| a == "secure"),
        "{line}"
    );

    let resp = c.get(&page).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));

    let resp = c
        .post(url("/.portcullis/sign_out"))
        .header(ORIGIN, url(""))
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND, "the sign-out was taken");
    let resp = c.get(&page).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "the session ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_tls_only_the_host_prefixed_cookie_is_a_session() {
    let ca = portcullis_tests::TestCa::new();
    let fx = tls_listener_fixture(&ca).await;
    let cfg = fx.cfg.clone();
    let tls = || signing_in_client(&ca);
    let c = tls();
    let page = cfg.https_url("app.test", "/secure");
    let authorize = fx.start_sign_in(&c, &page).await;
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let resp = c.get(&callback).send().await.unwrap();
    let id = cookie_value(&set_cookie(&resp, &format!("__Host-{SESSION_COOKIE}")).unwrap());

    let bare = portcullis_tests::client::tls_client_builder(&ca)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let status = |name: String| {
        let bare = bare.clone();
        let page = page.clone();
        let id = id.clone();
        async move {
            bare.get(&page)
                .header(COOKIE, format!("{name}={id}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        status(format!("__Host-{SESSION_COOKIE}")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(SESSION_COOKIE.to_owned()).await,
        StatusCode::UNAUTHORIZED,
        "the unprefixed name (which any sibling host or a plain-http response can set) must \
         not be a session on TLS"
    );

    // Nor a sign-in: one planted under the unprefixed name (by a sibling host, for a sign-in
    // the planter began) is not finished, and signs nobody in.
    let start = navigate(&bare, &page).await;
    let binding = binding_cookie(&start).expect("a sign-in cookie");
    let (name, value) = binding
        .split(';')
        .next()
        .and_then(|pair| pair.split_once('='))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .unwrap();
    let unprefixed = name.strip_prefix("__Host-").expect("__Host- on TLS");
    let authorize = header(&start, LOCATION.as_str()).unwrap();
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let planted = bare
        .get(&callback)
        .header(COOKIE, format!("{unprefixed}={value}"))
        .send()
        .await
        .unwrap();
    assert_ne!(
        planted.status(),
        StatusCode::FOUND,
        "a planted sign-in was finished"
    );
    assert_eq!(
        set_cookie(&planted, &format!("__Host-{SESSION_COOKIE}")),
        None
    );
    let own = bare
        .get(&callback)
        .header(COOKIE, format!("{name}={value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::FOUND, "the host's own sign-in");
    assert!(set_cookie(&own, &format!("__Host-{SESSION_COOKIE}")).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_and_their_ends_survive_a_restart() {
    let mut fx = Fixture::start().await;
    let page = fx.app_url("/kept");
    let alice = fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let bob_client = client();
    let bob = fx.sign_in(&bob_client, &page, BOB, BOB_PASSWORD).await;
    let resp = bob_client
        .post(fx.app_url("/.portcullis/sign_out"))
        .header(ORIGIN, fx.app_origin())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);

    fx.px.kill_hard();
    fx.px.restart().await;

    assert_session_works(&page, &alice.cookie).await;
    let resp = get_with_session(
        &fx.app_url("/.portcullis/me"),
        &alice.cookie,
        "application/json",
    )
    .await;
    let me: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(me["email"], ALICE, "{me}");
    assert_session_refused(&fx, &page, &bob.cookie).await;
    fx.wait_sign_in_available(WAIT).await;
    let again = fx.sign_in(&client(), &page, BOB, BOB_PASSWORD).await;
    assert_session_works(&page, &again.cookie).await;
}

/// oidc-provider as it ships serves claims asked for by scope (`email`, `profile`, `groups`)
/// only at UserInfo when it issues an access token (OpenID Connect Core §5.4). With the default
/// configuration Portcullis asks UserInfo at sign-in, and alice is who her email says, with her
/// token's groups; with `userinfo = "never"` her sign-in carries no email and names nobody.
#[tokio::test(flavor = "multi_thread")]
async fn claims_the_id_token_lacks_are_fetched_from_userinfo_at_sign_in() {
    let fx = Fixture::start().await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    let echo = assert_session_works(&url, &signed.cookie).await;
    assert_eq!(echo.header("x-portcullis-user"), Some(ALICE));
    assert_eq!(echo.header("x-portcullis-email"), Some(ALICE));
    let me = get_with_session(
        &fx.app_url("/.portcullis/me"),
        &signed.cookie,
        "application/json",
    )
    .await
    .text()
    .await
    .unwrap_or_default();
    assert!(
        me.contains("Alice Liddell"),
        "the name, from UserInfo: {me}"
    );

    fx.reload_with_oidc_line("userinfo = \"never\"").await;
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("no email claim"), "{body}");
}

/// The back button after signing in brings back the IdP's page, which (the person being
/// signed in there) sends the browser to the callback again, under the spent state: a browser
/// whose session holds lands on the site, one without gets the refusal.
#[tokio::test(flavor = "multi_thread")]
async fn a_callback_sent_again_by_a_signed_in_browser_lands_it_on_the_site() {
    let fx = Fixture::start().await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    let again = bare_client()
        .get(&signed.callback)
        .header(COOKIE, format!("{SESSION_COOKIE}={}", signed.cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::FOUND);
    assert_eq!(header(&again, LOCATION.as_str()).as_deref(), Some("/"));
    let anonymous = bare_client().get(&signed.callback).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::BAD_REQUEST);
    // A cookie that names no session: the same refusal.
    let ended = bare_client()
        .get(&signed.callback)
        .header(COOKIE, format!("{SESSION_COOKIE}=not-a-session"))
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), StatusCode::BAD_REQUEST);
}

/// Claims worded as IdPs word them, not as the OpenID Connect spec does, sign a person in all
/// the same, whether they come in the ID token or from UserInfo: Auth0's `updated_at` as an
/// RFC 3339 time (in every ID token it issues with `profile`), and `email_verified` as the
/// string "true" (Apple's ID tokens, Amazon Cognito's UserInfo).
#[tokio::test(flavor = "multi_thread")]
async fn claims_worded_as_idps_word_them_sign_a_person_in() {
    const CARLA: &str = "carla@example.com";
    const CARLA_PASSWORD: &str = "carla's password, long enough";
    for claims_in_id_token in [true, false] {
        let carla = IdpUser::new("auth0|carla", CARLA, CARLA_PASSWORD)
            .claim("updated_at", serde_json::json!("2025-12-23T10:59:07.841Z"))
            .claim("email_verified", serde_json::json!("true"));
        let fx = Fixture::start_with(Options {
            more_idp_users: vec![carla],
            claims_in_id_token,
            ..Options::default()
        })
        .await;
        let url = fx.url("app.test", "/page");
        let signed = fx.sign_in(&client(), &url, CARLA, CARLA_PASSWORD).await;
        let echo = assert_session_works(&url, &signed.cookie).await;
        assert_eq!(
            echo.header("x-portcullis-email"),
            Some(CARLA),
            "claims in the ID token: {claims_in_id_token}"
        );
    }
}

/// After a reload that moves sign-in to another provider (off a compromised one, say), the old
/// one's sessions let nobody in, and end: moved back, they still let nobody in.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_reload_to_another_identity_provider_the_old_one_s_sessions_vouch_for_nobody() {
    let fx = Fixture::start().await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;

    let issuer = fx.idp.issuer();
    let moved = fx.cfg.toml().replacen(
        &format!("issuer = \"{issuer}\""),
        &format!("issuer = \"{issuer}/elsewhere\""),
        1,
    );
    assert_ne!(moved, fx.cfg.toml(), "the config names the issuer");
    fx.px.rewrite_config(&moved);
    fx.px.reload_and_wait().await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Ended, not only set aside: moved back, the provider's sessions from before stay ended
    // (those begun while it was compromised, those it logged out meanwhile).
    fx.px
        .log_until(|log| log.contains("sessions the sign-in configuration no longer holds ended"))
        .await;
    // Whose sessions the reload ended, and why, is in the audit log.
    crate::audit::audit_json_until(&fx.px, &["--user", ALICE], |records| {
        records.iter().any(|r| {
            r["event"] == "session"
                && r["what"] == "config_ended"
                && r["detail"] == "sign-in moved to another provider"
        })
    })
    .await;
    fx.px.rewrite_config(&fx.cfg.toml());
    fx.px.reload_and_wait().await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let again = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &again.cookie).await;
}

/// A session no request uses for `session_idle_timeout` ends, and an open websocket is no use
/// of it, however busy: closed once its session idles out. One in use lives on past it.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_unused_for_its_idle_timeout_ends_and_one_in_use_lives_on() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let fx = Fixture::start_with(Options {
        // The shortest there is.
        oidc_settings: vec![("session_idle_timeout", "\"1m\"")],
        // Not ended by the upstream's silence (60 s by default) either.
        extra_routes: vec![|api| {
            Route::new("http://app.test/ws", &[api])
                .any_signed_in()
                .websockets(true)
                .set("read_timeout = \"10m\"")
        }],
        ..Options::default()
    })
    .await;
    let url = fx.url("app.test", "/page");
    let sign_in = || async {
        fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD)
            .await
            .cookie
    };
    let (used, unused, watching) = (sign_in().await, sign_in().await, sign_in().await);
    let signed_in = Instant::now();
    let cookie = format!("{SESSION_COOKIE}={watching}");
    let addr = fx.cfg.http_addr();
    let ws = portcullis_tests::client::websocket(addr, "app.test", "/ws", ("cookie", &cookie));
    let mut ws = ws.await;
    // Used every 10 s, to past the idle timeout; the websocket talks as often.
    let idled_out = Duration::from_secs(66);
    let mut open = true;
    while signed_in.elapsed() < idled_out {
        assert_session_works(&url, &used).await;
        if open {
            open = ws.send(Message::text("still here")).await.is_ok();
        }
        tokio::time::sleep(
            Duration::from_secs(10).min(idled_out.saturating_sub(signed_in.elapsed())),
        )
        .await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    });
    assert!(
        closed.await.is_ok(),
        "the idle session's websocket is still open"
    );
    assert_session_works(&url, &used).await;
    assert_session_refused(&fx, &url, &unused).await;
    // Its websocket's frames were no use of it: ended as idle, not merely cut.
    assert_session_refused(&fx, &url, &watching).await;
}

/// A reload that shortens `session_lifetime` (after a stolen cookie, say) ends the sessions
/// past it: a reload back to the old lifetime does not let them in again.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_a_shortened_lifetime_ended_stays_ended_when_it_is_lengthened_again() {
    let fx = Fixture::start().await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;
    // The shortest lifetime there is, a minute, and the session a little older.
    tokio::time::sleep(Duration::from_secs(62)).await;
    let lifetime = "session_lifetime = \"2h\"";
    let shortened = fx
        .cfg
        .toml()
        .replacen(lifetime, "session_lifetime = \"1m\"", 1);
    assert_ne!(shortened, fx.cfg.toml(), "the config sets the lifetime");
    fx.px.rewrite_config(&shortened);
    fx.px.reload_and_wait().await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    fx.px
        .log_until(|log| log.contains("sessions the sign-in configuration no longer holds ended"))
        .await;
    fx.px.rewrite_config(&fx.cfg.toml());
    fx.px.reload_and_wait().await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "ended, not set aside"
    );
}

/// After a reload shortens `session_lifetime`, `/.portcullis/me` says when the session ends
/// under it, not under the lifetime it was signed in with.
#[tokio::test(flavor = "multi_thread")]
async fn me_tells_the_end_a_shortened_lifetime_gives_a_session() {
    let fx = Fixture::start().await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    let lifetime = "session_lifetime = \"2h\"";
    let shortened = (fx.cfg.toml()).replacen(lifetime, "session_lifetime = \"1h\"", 1);
    assert_ne!(shortened, fx.cfg.toml(), "the config sets the lifetime");
    fx.px.rewrite_config(&shortened);
    fx.px.reload_and_wait().await;
    let me = fx.url("app.test", "/.portcullis/me");
    let resp = get_with_session(&me, &signed.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let expires = body["session_expires"].as_u64().expect("session_expires");
    assert!(expires <= now_unix() + 3_600, "{body}");
}

/// Renaming the session cookie ends the sessions issued in the old one: browsers keep
/// sending it, and Portcullis takes out of what upstreams are sent only cookies of the name
/// it has now, so the old cookie's id must be worth nothing, under either name.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_reload_that_renames_the_session_cookie_the_old_sessions_vouch_for_nobody() {
    let fx = Fixture::start().await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;
    let bob = fx.sign_in(&client(), &url, BOB, BOB_PASSWORD).await;

    fx.reload_with_oidc_line("cookie_name = \"renamed_session\"")
        .await;
    for name in ["renamed_session", SESSION_COOKIE] {
        let resp = get_with_cookie(&url, name, &signed.cookie, "application/json").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{name}");
    }
    // A sign-in now is a session in the new cookie.
    let c = client();
    let authorize = fx.start_sign_in(&c, &url).await;
    let callback = fx.idp_login(&authorize, ALICE, ALICE_PASSWORD).await;
    let resp = c.get(&callback).send().await.unwrap();
    let again = cookie_value(&set_cookie(&resp, "renamed_session").expect("the new cookie"));
    let resp = get_with_cookie(&url, "renamed_session", &again, "application/json").await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Browsers still send the old cookie. Its id is never handed to an upstream: renamed
    // back (or on a replica not renamed yet), it vouches again.
    let both = format!(
        "{SESSION_COOKIE}={}; renamed_session={again}; theme=dark",
        signed.cookie
    );
    let resp = bare_client()
        .get(&url)
        .header(COOKIE, both)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert_eq!(echo.header("cookie"), Some("theme=dark"));

    // So a sign-out ends the old cookie's sessions as well: renamed back, they would let in
    // again someone who had signed out. Who the IdP is told to sign out is read from the
    // cookie of the name there is now alone: a sibling host can set one of an earlier name
    // (here bob's), and that must not take the hint away.
    let resp = fx
        .sign_out(&format!(
            "{SESSION_COOKIE}={}; {SESSION_COOKIE}={}; renamed_session={again}",
            bob.cookie, signed.cookie
        ))
        .await;
    assert!(resp.status().is_redirection(), "{}", resp.status());
    let location = header(&resp, "location").unwrap_or_default();
    let hint = query_param(&location, "id_token_hint").expect("id_token_hint");
    assert_eq!(jwt_claims(&hint)["sub"], "alice");
    fx.px.rewrite_config(&fx.cfg.toml());
    fx.px.reload_and_wait().await;
    for cookie in [&signed.cookie, &bob.cookie] {
        let resp = get_with_cookie(&url, SESSION_COOKIE, cookie, "application/json").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "renamed back");
    }
}

/// A refresh whose new ID token fails verification ends the session: here Portcullis has
/// since been told to accept only ES256 ID tokens, and the IdP signs them with RS256.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_whose_id_token_fails_verification_ends_the_session() {
    // Time for the sign-in, a reload and a request before the refresh falls due (the
    // token's `iat` is whole seconds), on a loaded machine.
    let fx = Fixture::start_with(Options {
        refresh_every: Some(10),
        ..Options::default()
    })
    .await;
    let url = fx.url("app.test", "/page");
    // The ID token is issued after this, in a second no earlier than its (whole) `iat`.
    let before = Instant::now();
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;

    fx.reload_with_oidc_line("id_token_algorithms = [\"ES256\"]")
        .await;
    // Until the ID token expires nothing is asked of the IdP: the session works. (A machine
    // so loaded that the refresh may have been due when it was answered cannot show that.)
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    if before.elapsed() < Duration::from_secs(9) {
        assert_eq!(resp.status(), StatusCode::OK, "before the refresh is due");
    } else {
        eprintln!("too slow to see the session work before its refresh is due");
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_session_refused(&fx, &url, &signed.cookie).await;
    fx.px
        .log_until(|log| log.contains("the refreshed ID token failed verification"))
        .await;
}

/// A refresh whose ID token is signed with a key the IdP began using moments after Portcullis
/// last fetched its keys has them fetched again (at once, as a sign-in's does: the IdP itself
/// handed the token over), and does not end the session, nor blame the IdP for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_signed_with_a_key_too_new_to_fetch_keeps_the_session() {
    let fx = Fixture::start_with(Options {
        refresh_every: Some(3),
        ..Options::default()
    })
    .await;
    let url = fx.url("app.test", "/page");
    // The keys were fetched at start; 10 s on, a sign-in with a new key fetches them again.
    tokio::time::sleep(Duration::from_secs(11)).await;
    fx.idp.rotate_keys(true).await;
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    // At once the IdP moves to a key newer still, which signs the refreshed ID token.
    fx.idp.rotate_keys(false).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_session_works(&url, &signed.cookie).await;
    assert_session_works(&url, &signed.cookie).await;
    assert!(!fx
        .px
        .log()
        .contains("the refreshed ID token failed verification"));
}

/// While the IdP takes connections but never answers, a session whose refresh is due keeps
/// working, and only the first request waits on the IdP (up to Portcullis' 10 s timeout for
/// IdP calls): refreshes then pause (5 s, doubling up to a minute), so the next ones go ahead
/// without asking it. Once a pause is over, one request finds out whether the IdP is back,
/// whoever's sessions are due.
#[tokio::test(flavor = "multi_thread")]
async fn requests_do_not_each_wait_on_an_idp_that_hangs() {
    let fx = Fixture::start_with(Options {
        refresh_every: Some(3),
        ..Options::default()
    })
    .await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    let bob = fx.sign_in(&client(), &url, BOB, BOB_PASSWORD).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    fx.idp.set_outage(IdpOutage::Hang).await;
    // The first request waits for the refresh to time out, and is served on what the
    // session has.
    assert_session_works(&url, &signed.cookie).await;
    // Each of the next ones would wait 10 s more if it asked the IdP again.
    let started = Instant::now();
    for _ in 0..5 {
        assert_session_works(&url, &signed.cookie).await;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "5 requests took {took:?} with the IdP hanging: they waited on it"
    );
    // The pause is over: of two sessions due at once, one asks the IdP, the other goes ahead.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let timed = |cookie: String| {
        let url = url.clone();
        async move {
            let started = Instant::now();
            assert_session_works(&url, &cookie).await;
            started.elapsed()
        }
    };
    let (a, b) = tokio::join!(timed(signed.cookie.clone()), timed(bob.cookie.clone()));
    assert!(
        a.min(b) < Duration::from_secs(3),
        "both waited on the IdP once the pause was over ({a:?}, {b:?})"
    );
    fx.idp.set_outage(IdpOutage::Off).await;
}

/// An IdP failing inside answers a refresh with a 500 whose JSON reads as an OAuth error
/// (Keycloak's `unknown_error`): an outage, which pauses refreshes, not a refusal, which would
/// end every session whose refresh comes due while it lasts.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_answered_with_the_idp_s_own_error_page_keeps_the_session() {
    let fx = Fixture::start_with(Options {
        refresh_every: Some(3),
        ..Options::default()
    })
    .await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    fx.idp.set_outage(IdpOutage::ServerError).await;
    assert_session_works(&url, &signed.cookie).await;
    assert_session_works(&url, &signed.cookie).await;
    fx.idp.set_outage(IdpOutage::Off).await;
    assert_eq!(
        session_events(&fx, 1).await,
        [(ALICE.to_owned(), "sign_in".to_owned())]
    );
}

/// `refresh = false` by a reload holds for the sessions already open: they stop asking the
/// IdP, and one whose refresh the IdP would refuse goes on (to its idle or absolute end).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_turns_refresh_off_stops_it_for_open_sessions() {
    let recorder = portcullis_tests::recorder::Recorder::start().await;
    let fx = Fixture::start_with(Options {
        backchannel: Backchannel::At(recorder.url("/logout")),
        refresh_every: Some(3),
        ..Options::default()
    })
    .await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;
    fx.px
        .reload_with("[oidc]", "refresh = true", "refresh = false")
        .await;
    // Her refresh token dies: a refresh would be refused, and end the session.
    fx.idp.backchannel_logout("alice", CLIENT_ID).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_session_works(&url, &signed.cookie).await;
}

/// A fixture whose sessions refresh with the IdP every 3 s, scoped for `groups`, with
/// `http://app.test/eng/` judging the IdP's groups (`eng` allowed), and `person` at the IdP.
fn refreshing_on_token_groups(person: IdpUser) -> Options {
    Options {
        refresh_every: Some(3),
        more_idp_users: vec![person],
        extra_routes: vec![|api| {
            Route::new("http://app.test/eng/", &[api])
                .set("token_groups = true")
                .set("allow = { groups = [\"eng\"] }")
        }],
        oidc_settings: vec![(
            "scopes",
            r#"["openid", "email", "profile", "offline_access", "groups"]"#,
        )],
        ..Options::default()
    }
}

const DAVE: &str = "dave@example.com";
const DAVE_PASSWORD: &str = "dave's password, long enough";

/// Dave, in `eng` at the IdP only, and a route on `/eng/` that judges the IdP's groups of
/// sessions refreshed every few seconds; its URL.
async fn dave_in_eng_refreshing_on_token_groups() -> (Fixture, String) {
    let dave = IdpUser::new("dave", DAVE, DAVE_PASSWORD).groups(&["eng"]);
    let fx = Fixture::start_with(refreshing_on_token_groups(dave)).await;
    let url = fx.url("app.test", "/eng/page");
    (fx, url)
}

/// The IdP's admin takes dave out of `eng`: his session `cookie` is refused at its next
/// refresh, and recorded as ended by the IdP.
async fn taken_out_of_eng_the_session_ends_at_its_refresh(fx: &Fixture, url: &str, cookie: &str) {
    fx.idp.set_groups("dave", &[]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_session_refused(fx, url, cookie).await;
    assert_eq!(
        session_events(fx, 2).await,
        [(DAVE, "sign_in"), (DAVE, "idp_ended")]
            .map(|(who, what)| (who.to_owned(), what.to_owned()))
    );
}

/// On a route that judges the groups the IdP gives (`token_groups`), a refreshed session holds
/// only while the IdP still gives the person the groups they signed in with: one its admin
/// takes out of a group signs in again, and is judged by the groups they have then.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_that_finds_other_groups_at_the_idp_has_the_person_sign_in_again() {
    let (fx, url) = dave_in_eng_refreshing_on_token_groups().await;
    let signed = fx.sign_in(&client(), &url, DAVE, DAVE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;
    // Past the ID token's lifetime, a refresh that finds the same groups keeps the session.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_session_works(&url, &signed.cookie).await;

    taken_out_of_eng_the_session_ends_at_its_refresh(&fx, &url, &signed.cookie).await;
    // Signed in again, with the groups the IdP gives now: not let in.
    let again = fx.sign_in(&client(), &url, DAVE, DAVE_PASSWORD).await;
    let resp = get_with_session(&url, &again.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

/// A refreshed ID token signed with a key the IdP began using since Portcullis fetched its
/// keys is verified with that key, fetched then: what it says counts at once, not a minute on.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_signed_with_a_new_key_is_judged_at_once() {
    let (fx, url) = dave_in_eng_refreshing_on_token_groups().await;
    // Signed with a key the IdP has just begun using: the keys are fetched for the sign-in, so
    // a refresh seconds later is within the 10 s in which a client's token fetches none.
    fx.idp.rotate_keys(true).await;
    let signed = fx.sign_in(&client(), &url, DAVE, DAVE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;

    fx.idp.rotate_keys(false).await;
    taken_out_of_eng_the_session_ends_at_its_refresh(&fx, &url, &signed.cookie).await;
}

/// Entra ID lists a person's groups in the ID token by object id, which routes name as
/// `group_ids`; it leaves `groups` out of the ID token of a person in no group, and puts no
/// `email` in it for one without a mailbox: a refresh that finds the person taken out of their
/// last group still sees it (their `preferred_username` shows the ID token holds their claims).
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_sees_a_person_taken_out_of_their_last_group_at_entra_id() {
    const UPN: &str = "gil@corp.onmicrosoft.test";
    const PASSWORD: &str = "gil's password, long enough";
    const OID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    let gil = IdpUser::new("gil", UPN, PASSWORD).oid(OID).groups(&["eng"]);
    let fx = Fixture::start_with(Options {
        idp_profile: IdpProfile::Entra,
        extra_routes: vec![|api| {
            let eng = portcullis_tests::idp::entra_group_id("eng");
            Route::new("http://app.test/eng/", &[api])
                .set("token_groups = true")
                .set(&format!("allow = {{ group_ids = [\"{eng}\"] }}"))
        }],
        ..refreshing_on_token_groups(gil)
    })
    .await;
    let url = fx.url("app.test", "/eng/page");
    let signed = fx.sign_in(&client(), &url, UPN, PASSWORD).await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap_or_default());
    let eng = portcullis_tests::idp::entra_group_id("eng");
    assert_eq!(echo.header("x-portcullis-groups"), Some(eng.as_str()));

    fx.idp.set_groups("gil", &[]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_session_refused(&fx, &url, &signed.cookie).await;
    let events = session_events(&fx, 2).await;
    let what: Vec<&str> = events.iter().map(|(_, what)| what.as_str()).collect();
    assert_eq!(what, ["sign_in", "idp_ended"]);
}

/// Past 200 groups Entra ID lists none in the ID token, only where Graph gives them
/// (`_claim_names`, its overage): someone the directory does not know is then refused on a
/// `token_groups` route, not judged as in no group, where a deny would miss them. One whose
/// groups it lists is judged on them.
#[tokio::test(flavor = "multi_thread")]
async fn a_person_past_entra_s_group_overage_is_refused_on_a_token_groups_route() {
    const PASSWORD: &str = "a password, long enough";
    let teams: Vec<String> = (0..201).map(|i| format!("team-{i:03}")).collect();
    let teams: Vec<&str> = teams.iter().map(String::as_str).collect();
    let ivy = IdpUser::new("ivy", "ivy@corp.onmicrosoft.test", PASSWORD)
        .oid("1b4e28ba-2fa1-41d2-883f-0016d3cca427")
        .groups(&teams);
    let jo = IdpUser::new("jo", "jo@corp.onmicrosoft.test", PASSWORD)
        .oid("6fa459ea-ee8a-4ca4-894e-db77e160355e")
        .groups(&teams[..2]);
    let fx = Fixture::start_with(Options {
        idp_profile: IdpProfile::Entra,
        more_idp_users: vec![ivy, jo],
        ..Options::default()
    })
    .await;
    // The fixture's route lets anyone signed in in, judged on their token's groups.
    let url = fx.url("app.test", "/teams");
    let jo = fx
        .sign_in(&client(), &url, "jo@corp.onmicrosoft.test", PASSWORD)
        .await;
    let resp = get_with_session(&url, &jo.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap_or_default());
    let mut listed = [teams[0], teams[1]].map(portcullis_tests::idp::entra_group_id);
    listed.sort();
    let mut told: Vec<&str> = echo
        .header("x-portcullis-groups")
        .unwrap_or_default()
        .split(", ")
        .collect();
    told.sort_unstable();
    assert_eq!(told, listed);

    let ivy = fx
        .sign_in(&client(), &url, "ivy@corp.onmicrosoft.test", PASSWORD)
        .await;
    let resp = get_with_session(&url, &ivy.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let overage = "the token names more groups than it lists";
    crate::audit::audit_json_until(&fx.px, &[], |records| {
        records.iter().any(|r| {
            r["event"] == "refusal" && r["reason"].as_str().is_some_and(|r| r.contains(overage))
        })
    })
    .await;
}

/// A websocket makes no requests, so nothing on the request path refreshes its session: the
/// watcher does, when the refresh is due. One the IdP's answer ends (other groups, here) is
/// closed.
#[tokio::test(flavor = "multi_thread")]
async fn an_open_websocket_ends_when_a_refresh_finds_other_groups_at_the_idp() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const HAL: &str = "hal@example.com";
    const HAL_PASSWORD: &str = "hal's password, long enough";
    let hal = IdpUser::new("hal", HAL, HAL_PASSWORD).groups(&["eng"]);
    let fx = Fixture::start_with(Options {
        extra_routes: vec![|api| {
            Route::new("http://app.test/ws", &[api])
                .websockets(true)
                .set("token_groups = true")
                .set("allow = { groups = [\"eng\"] }")
        }],
        ..refreshing_on_token_groups(hal)
    })
    .await;
    let url = fx.url("app.test", "/ws");
    let signed = fx.sign_in(&client(), &url, HAL, HAL_PASSWORD).await;
    let cookie = format!("{SESSION_COOKIE}={}", signed.cookie);
    let addr = fx.cfg.http_addr();
    let mut ws =
        portcullis_tests::client::websocket(addr, "app.test", "/ws", ("cookie", &cookie)).await;
    ws.send(Message::text("open")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(back)))) => assert_eq!(back.as_str(), "open"),
        other => panic!("no echo: {other:?}"),
    }

    // Refreshed up to 30 s after it is due (see `Watcher::refresh_late_by`), every 3 s here.
    fx.idp.set_groups("hal", &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(50);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => break,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the websocket is still open 50 s after the IdP took hal out of eng"),
        }
    }
    let events = session_events(&fx, 2).await;
    let what: Vec<&str> = events.iter().map(|(_, what)| what.as_str()).collect();
    assert_eq!(what, ["sign_in", "idp_ended"]);
}

/// The ways UserInfo is in trouble, none an answer: a 503, a redirect to a maintenance page,
/// one served with 200, a gateway's 404 (a page, Kong's JSON, Spring's `"error": "Not Found"`).
const USERINFO_IN_TROUBLE: [IdpOutage; 6] = [
    IdpOutage::UserInfo,
    IdpOutage::UserInfoRedirect,
    IdpOutage::UserInfoPage,
    IdpOutage::UserInfoNotFound,
    IdpOutage::UserInfoGatewayNotFound,
    IdpOutage::UserInfoSpringNotFound,
];

/// A refresh that cannot read the person's groups because UserInfo is in trouble (a 503, a
/// redirect to a maintenance page, one served with 200, a gateway's 404 in HTML or JSON; with
/// the groups there alone) leaves the session as it is, as an outage does: it is not taken for
/// a person in no group.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_while_userinfo_is_down_keeps_the_session_s_groups() {
    const FAY: &str = "fay@example.com";
    const FAY_PASSWORD: &str = "fay's password, long enough";
    // A fixture each: the first outage would pause the next one's refreshes.
    for outage in USERINFO_IN_TROUBLE {
        let fay = IdpUser::new("fay", FAY, FAY_PASSWORD).groups(&["eng"]);
        let fx = Fixture::start_with(Options {
            // The email in the ID token, the groups at UserInfo alone.
            claims_in_id_token: true,
            userinfo_only: vec!["groups"],
            ..refreshing_on_token_groups(fay)
        })
        .await;
        let url = fx.url("app.test", "/eng/page");
        let signed = fx.sign_in(&client(), &url, FAY, FAY_PASSWORD).await;
        assert_session_works(&url, &signed.cookie).await;
        fx.idp.set_outage(outage).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_session_works(&url, &signed.cookie).await;
        fx.idp.outage(false).await;
    }
}

const CAL: &str = "cal@example.com";
const CAL_PASSWORD: &str = "cal's password, long enough";

/// cal, a contractor at the IdP, whose email is in the ID token and whose groups are at
/// UserInfo alone (as the provider ships); and a route on `/eng/` that reads the IdP's groups
/// and denies contractors.
async fn with_cal_s_groups_at_userinfo() -> Fixture {
    with_cal_in_contractors(Options {
        claims_in_id_token: true,
        userinfo_only: vec!["groups"],
        ..Options::default()
    })
    .await
}

/// Cal, a stranger to the directory in the IdP's `contractors`, and a route that reads the
/// IdP's groups and denies them; the IdP set up as `options` says.
async fn with_cal_in_contractors(options: Options) -> Fixture {
    let cal = IdpUser::new("cal", CAL, CAL_PASSWORD).groups(&["contractors"]);
    Fixture::start_with(Options {
        more_idp_users: vec![cal],
        extra_routes: vec![|api| {
            Route::new("http://app.test/eng/", &[api])
                .set("token_groups = true")
                .set("allow = { any_signed_in = true }")
                .set("deny = { groups = [\"contractors\"] }")
        }],
        oidc_settings: vec![("scopes", r#"["openid", "email", "profile", "groups"]"#)],
        ..options
    })
    .await
}

/// A sign-in while UserInfo, the only place the provider gives groups, is in trouble (503, a
/// redirect to a maintenance page, one served with 200, a gateway's 404 in HTML or JSON) is an
/// outage, not a person in no group: taken as the ID token has it, a deny rule on a group would
/// miss them for the session's lifetime.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_while_userinfo_is_down_is_not_taken_for_a_person_in_no_group() {
    let fx = with_cal_s_groups_at_userinfo().await;
    let url = fx.url("app.test", "/eng/page");

    for outage in USERINFO_IN_TROUBLE {
        let browser = client();
        let authorize = fx.start_sign_in(&browser, &url).await;
        let callback = fx.idp_login(&authorize, CAL, CAL_PASSWORD).await;
        callback_asks_to_come_back(&fx.idp, &browser, &callback, outage).await;
    }

    // With UserInfo back, cal signs in in the contractors group, and the deny rule holds.
    let signed = fx.sign_in(&client(), &url, CAL, CAL_PASSWORD).await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

/// A UserInfo that refuses the access token (one meant for another API), where the groups a
/// route reads are only there, leaves the person's groups unknown, not none: a deny rule on a
/// group they are in is not missed, and they are not let in on the groups the IdP did not say.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_whose_userinfo_refuses_the_token_is_not_taken_for_a_person_in_no_group() {
    let fx = with_cal_s_groups_at_userinfo().await;
    let url = fx.url("app.test", "/eng/page");

    let browser = client();
    let authorize = fx.start_sign_in(&browser, &url).await;
    let callback = fx.idp_login(&authorize, CAL, CAL_PASSWORD).await;
    fx.idp.set_outage(IdpOutage::UserInfoRefuses).await;
    let resp = browser.get(&callback).send().await.expect("GET callback");
    fx.idp.outage(false).await;
    let session = set_cookie(&resp, SESSION_COOKIE).expect("the sign-in makes a session");
    let resp = get_with_session(&url, &cookie_value(&session), "application/json").await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("cannot be judged"), "{body}");
}

/// A UserInfo answer about someone else (OpenID Connect Core §5.3.2: its `sub` must be the ID
/// token's) fails the sign-in: another person's email and groups are never taken for this
/// one's, however the route reads them.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_whose_userinfo_answers_about_someone_else_fails() {
    let fx = with_cal_s_groups_at_userinfo().await;
    let url = fx.url("app.test", "/eng/page");

    let browser = client();
    let authorize = fx.start_sign_in(&browser, &url).await;
    let callback = fx.idp_login(&authorize, CAL, CAL_PASSWORD).await;
    fx.idp.set_outage(IdpOutage::UserInfoOtherSubject).await;
    let resp = browser.get(&callback).send().await.expect("GET callback");
    fx.idp.outage(false).await;
    let status = resp.status();
    let session = set_cookie(&resp, SESSION_COOKIE);
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(session, None, "{body}");
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
}

/// A person who signed in while no route read the IdP's groups, with none in the ID token and
/// UserInfo not asked, has groups unknown, not none: a reload that adds a route reading them
/// does not let them past its deny rule as a person in no group.
#[tokio::test(flavor = "multi_thread")]
async fn groups_not_sought_at_sign_in_are_not_taken_for_none_after_a_reload() {
    let fx = with_cal_s_groups_at_userinfo().await;
    // No route reads the IdP's groups while cal signs in.
    let text = fx.cfg.toml();
    let reads_none = text.replace("token_groups = true", "token_groups = false");
    assert_ne!(reads_none, text);
    fx.px.rewrite_config(&reads_none);
    fx.px.reload_and_wait().await;
    let url = fx.url("app.test", "/eng/page");
    let browser = client();
    let authorize = fx.start_sign_in(&browser, &url).await;
    let callback = fx.idp_login(&authorize, CAL, CAL_PASSWORD).await;
    let resp = browser.get(&callback).send().await.expect("GET callback");
    let session = set_cookie(&resp, SESSION_COOKIE).expect("the sign-in makes a session");

    // Routes read them again.
    fx.px.rewrite_config(&text);
    fx.px.reload_and_wait().await;
    let resp = get_with_session(&url, &cookie_value(&session), "application/json").await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("cannot be judged"), "{body}");
}

/// Likewise where UserInfo was asked at sign-in, for the person's email (a provider that puts
/// claims only there), without the groups scope: its answer without `groups` does not say
/// they are in none.
#[tokio::test(flavor = "multi_thread")]
async fn groups_userinfo_was_not_asked_for_are_not_taken_for_none_after_a_reload() {
    // The test IdP as it is: the person's claims only at UserInfo.
    let fx = with_cal_in_contractors(Options::default()).await;
    // No route reads the IdP's groups, nor asks for them, while cal signs in.
    let text = fx.cfg.toml();
    let reads_none = (text.replace("token_groups = true", "token_groups = false")).replace(
        r#"["openid", "email", "profile", "groups"]"#,
        r#"["openid", "email", "profile"]"#,
    );
    assert!(!reads_none.contains("\"groups\"]\n") && reads_none != text);
    fx.px.rewrite_config(&reads_none);
    fx.px.reload_and_wait().await;
    let url = fx.url("app.test", "/eng/page");
    let signed = fx.sign_in(&client(), &url, CAL, CAL_PASSWORD).await;

    // Routes read them, and ask for them, again.
    fx.px.rewrite_config(&text);
    fx.px.reload_and_wait().await;
    let resp = get_with_session(&url, &signed.cookie, "application/json").await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("cannot be judged"), "{body}");
}

/// The IdP's groups judge only people the directory does not know: a person it knows is judged
/// by the directory's groups, and the IdP's changing ends no session of theirs.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_judges_no_groups_of_a_person_the_directory_knows() {
    const ERIN: &str = "erin@example.com";
    const ERIN_PASSWORD: &str = "erin's password, long enough";
    let erin_at_the_idp = IdpUser::new("erin", ERIN, ERIN_PASSWORD).groups(&["eng"]);
    let fx = Fixture::start_with(Options {
        scim: true,
        ..refreshing_on_token_groups(erin_at_the_idp)
    })
    .await;
    let scim = portcullis_tests::ScimClient::new(&fx.cfg.scim_base_url(), crate::SCIM_TOKEN);
    let erin = scim.create_user(ERIN).await.id();
    scim.create_group("eng", &[&erin]).await;
    let url = fx.url("app.test", "/eng/page");
    let signed = fx.sign_in(&client(), &url, ERIN, ERIN_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;
    fx.idp.set_groups("erin", &[]).await;
    // Past the ID token's lifetime: refreshed, and still in by the directory's eng.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_session_works(&url, &signed.cookie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_refresh_with_the_idp_and_end_when_it_refuses() {
    // The IdP's logout tokens go elsewhere, so only a refused refresh can end the session.
    let recorder = portcullis_tests::recorder::Recorder::start().await;
    let fx = Fixture::start_with(Options {
        backchannel: Backchannel::At(recorder.url("/logout")),
        refresh_every: Some(3),
        ..Options::default()
    })
    .await;
    let url = fx.url("app.test", "/page");
    let signed = fx.sign_in(&client(), &url, ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &signed.cookie).await;

    // Twice past the ID token's lifetime: each next request refreshes it with the IdP (the
    // second time with the refresh token the first refresh returned), and is served.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_session_works(&url, &signed.cookie).await;
    }

    // The IdP ends alice's session: her refresh token dies with it, so at the next expiry the
    // refresh is refused and Portcullis ends the session.
    fx.idp.backchannel_logout("alice", CLIENT_ID).await;
    assert_session_works(&url, &signed.cookie).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_session_refused(&fx, &url, &signed.cookie).await;
    // The audit log says the IdP ended it, and why.
    assert_eq!(
        session_events(&fx, 2).await,
        [(ALICE, "sign_in"), (ALICE, "idp_ended")]
            .map(|(who, what)| (who.to_owned(), what.to_owned()))
    );
}

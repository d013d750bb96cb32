//! Self-tests of the sign-in harness against the real components: the `oidc-provider` IdP
//! under Node, headless Chromium under chromedriver, and the recorder as a relying party.
//! No `portcullis` here; these prove the pieces the sign-in tests stand on.

use std::time::Duration;

use portcullis_tests::idp::{jwt_claims, jwt_header, query_param, random_token};
use portcullis_tests::{
    Browser, Idp, IdpClient, IdpOutage, IdpResource, IdpSetup, IdpUser, Pkce, Recorder,
};
use reqwest::StatusCode;

const CLIENT_ID: &str = "portcullis";
const CLIENT_SECRET: &str = "portcullis-secret-0123456789abcdefghijklmnop";
const MACHINE_ID: &str = "build-agent";
const MACHINE_SECRET: &str = "build-agent-secret-0123456789abcdefghijklmn";
const API: &str = "https://api.corp.test/";
const API_AUD: &str = "portcullis-api";
const ES_API: &str = "https://es.corp.test/";
const ES_AUD: &str = "portcullis-es";
const ALICE_PASSWORD: &str = "correct horse battery staple";

/// A setup with one browser client (redirects and logout to `rp`), one machine client, alice,
/// and two resource servers (RS256 and ES256 tokens).
fn setup(rp: &Recorder) -> IdpSetup {
    IdpSetup::new()
        .client(
            IdpClient::new(CLIENT_ID, CLIENT_SECRET)
                .redirect_uri(&rp.url_as("rp.test", "/cb"))
                .post_logout_redirect_uri(&rp.url_as("rp.test", "/signed-out"))
                .backchannel_logout_uri(&rp.url("/bcl")),
        )
        .client(IdpClient::new(MACHINE_ID, MACHINE_SECRET).redirect_uri(&rp.url("/unused")))
        .user(
            IdpUser::new("alice", "alice@corp.test", ALICE_PASSWORD)
                .name("Alice Liddell")
                .groups(&["engineering", "admins"]),
        )
        .user(IdpUser::new("bob", "bob@corp.test", "bob's password"))
        .resource(IdpResource::new(API, API_AUD).scope("api:read api:write"))
        .resource(IdpResource::new(ES_API, ES_AUD).alg("ES256"))
}

#[tokio::test]
async fn discovery_and_jwks_are_served_with_the_issuer() {
    let rp = Recorder::start().await;
    let idp = Idp::start(setup(&rp)).await;
    assert!(idp.issuer().starts_with("http://127.0.0.1:"));

    let doc = idp.discovery().await;
    assert_eq!(doc["issuer"], idp.issuer(), "{doc}");
    for endpoint in [
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "end_session_endpoint",
        "revocation_endpoint",
    ] {
        let url = doc[endpoint].as_str().unwrap_or_default();
        assert!(url.starts_with(idp.issuer()), "{endpoint}: {doc}");
    }
    assert_eq!(doc["backchannel_logout_supported"], true, "{doc}");
    assert_eq!(doc["backchannel_logout_session_supported"], true, "{doc}");
    let grants = doc["grant_types_supported"].to_string();
    assert!(grants.contains("client_credentials") && grants.contains("refresh_token"));

    let jwks = idp.jwks().await;
    let algs: Vec<String> = jwks
        .keys
        .iter()
        .map(|k| format!("{:?}", k.common.key_algorithm))
        .collect();
    assert_eq!(jwks.keys.len(), 2, "{algs:?}");
    assert!(algs.iter().any(|a| a.contains("RS256")), "{algs:?}");
    assert!(algs.iter().any(|a| a.contains("ES256")), "{algs:?}");
    // Only public halves are published.
    let raw = reqwest::get(idp.jwks_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !raw.contains("\"d\""),
        "private key material in the JWKS: {raw}"
    );

    // A simulated outage, and back.
    idp.outage(true).await;
    let resp = reqwest::get(idp.discovery_url()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    idp.set_outage(IdpOutage::Reset).await;
    assert!(reqwest::get(idp.discovery_url()).await.is_err());
    idp.outage(false).await;
    let resp = reqwest::get(idp.discovery_url()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn client_credentials_tokens_are_jwts_for_the_audience_and_follow_key_rotation() {
    let rp = Recorder::start().await;
    let idp = Idp::start(setup(&rp)).await;

    let token = idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, None)
        .await;
    let header = jwt_header(&token);
    assert_eq!(header["alg"], "RS256", "{header}");
    let first_kid = header["kid"].as_str().unwrap().to_owned();
    let claims = idp.verify_jwt(&token, API_AUD).await.unwrap();
    assert_eq!(claims["aud"], API_AUD, "{claims}");
    assert_eq!(claims["client_id"], MACHINE_ID, "{claims}");
    assert_eq!(claims["scope"], "api:read api:write", "{claims}");
    assert!(idp.verify_jwt(&token, "someone-else").await.is_err());

    let es = idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(ES_API))
        .await;
    assert_eq!(jwt_header(&es)["alg"], "ES256");
    assert_eq!(idp.verify_jwt(&es, ES_AUD).await.unwrap()["aud"], ES_AUD);

    // Rotation keeping the old keys: new tokens use a new kid, old tokens still verify.
    let kids = idp.rotate_keys(true).await;
    assert_eq!(kids.len(), 4, "{kids:?}");
    let second = idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, None)
        .await;
    let second_kid = jwt_header(&second)["kid"].as_str().unwrap().to_owned();
    assert_ne!(second_kid, first_kid);
    assert_eq!(
        kids[0], second_kid,
        "the new RS256 key is the first published"
    );
    idp.verify_jwt(&second, API_AUD).await.unwrap();
    idp.verify_jwt(&token, API_AUD).await.unwrap();

    // Rotation dropping them: the first token's key is gone.
    let kids = idp.rotate_keys(false).await;
    assert_eq!(kids.len(), 2, "{kids:?}");
    let third = idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, None)
        .await;
    let third_kid = jwt_header(&third)["kid"].as_str().unwrap().to_owned();
    assert!(third_kid != first_kid && third_kid != second_kid);
    idp.verify_jwt(&third, API_AUD).await.unwrap();
    let err = idp.verify_jwt(&token, API_AUD).await.unwrap_err();
    assert!(err.contains("not in the JWKS"), "{err}");

    // A wrong secret is refused by the token endpoint.
    let (status, body) = idp
        .try_token_request(
            MACHINE_ID,
            "wrong-secret",
            &[("grant_type", "client_credentials".to_owned())],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn sign_in_with_a_plain_http_client_at_a_named_issuer() {
    let rp = Recorder::start().await;
    let idp = Idp::start(setup(&rp).issuer("http://idp.test:{port}")).await;
    assert_eq!(idp.issuer(), format!("http://idp.test:{}", idp.port()));
    assert_eq!(idp.discovery().await["issuer"], idp.issuer());
    let redirect_uri = rp.url_as("rp.test", "/cb");
    let (state, nonce, pkce) = (random_token(16), random_token(16), Pkce::new());
    let auth = idp.authorization_url(
        CLIENT_ID,
        &redirect_uri,
        // A refresh token only to a sign-in that asks for it, as Okta and Entra ID issue them.
        "openid email profile offline_access",
        &state,
        &nonce,
        &pkce,
    );

    let back = idp
        .sign_in_http(&auth, "bob@corp.test", "bob's password")
        .await;
    assert!(back.starts_with(&redirect_uri), "{back}");
    assert_eq!(query_param(&back, "state").as_deref(), Some(state.as_str()));
    let code = query_param(&back, "code").expect("code");
    let tokens = idp
        .exchange_code(
            CLIENT_ID,
            CLIENT_SECRET,
            &code,
            &redirect_uri,
            &pkce.verifier,
        )
        .await;
    let id = idp
        .verify_jwt(tokens["id_token"].as_str().unwrap(), CLIENT_ID)
        .await
        .unwrap();
    assert_eq!(id["sub"], "bob");
    assert_eq!(id["nonce"], nonce.as_str());
    assert_eq!(id["iss"], idp.issuer());

    // The refresh token works once, and rotates.
    let refresh = tokens["refresh_token"].as_str().expect("refresh_token");
    let renewed = idp
        .token_request(
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("grant_type", "refresh_token".to_owned()),
                ("refresh_token", refresh.to_owned()),
            ],
        )
        .await;
    let id = idp
        .verify_jwt(renewed["id_token"].as_str().unwrap(), CLIENT_ID)
        .await
        .unwrap();
    assert_eq!(id["sub"], "bob");
    let next = renewed["refresh_token"]
        .as_str()
        .expect("a new refresh token");
    assert_ne!(next, refresh, "rotated");
    // The spent one used again is refused, and takes the new one down with it.
    let refresh_with = |token: &str| {
        [
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", token.to_owned()),
        ]
    };
    let (status, body) = idp
        .try_token_request(CLIENT_ID, CLIENT_SECRET, &refresh_with(refresh))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant", "{body}");
    let (status, body) = idp
        .try_token_request(CLIENT_ID, CLIENT_SECRET, &refresh_with(next))
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the grant is revoked: {body}"
    );

    // The code is single-use.
    let (status, body) = idp
        .try_token_request(
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("grant_type", "authorization_code".to_owned()),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", pkce.verifier),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant", "{body}");
}

#[tokio::test]
async fn chromium_signs_in_at_the_idp_and_backchannel_logout_reaches_the_client() {
    let rp = Recorder::start().await;
    let idp = Idp::start(setup(&rp)).await;
    let browser = Browser::start().await;
    let redirect_uri = rp.url_as("rp.test", "/cb");
    let (state, nonce, pkce) = (random_token(16), random_token(16), Pkce::new());
    let auth = idp.authorization_url(
        CLIENT_ID,
        &redirect_uri,
        // A refresh token only to a sign-in that asks for it, as Okta and Entra ID issue them;
        // groups only to one that asks for them (Okta's `groups` scope).
        "openid email profile groups offline_access",
        &state,
        &nonce,
        &pkce,
    );

    // A host name mapped to loopback works in the browser.
    browser.goto(&rp.url_as("rp.test", "/hello")).await;
    assert_eq!(browser.page_text().await.trim(), "ok");

    browser.goto(&auth).await;
    browser
        .wait_for_url(|u| u.contains("/interaction/"), Duration::from_secs(10))
        .await;
    browser.fill("input[name=login]", "alice@corp.test").await;
    browser
        .fill("input[name=password]", "not her password")
        .await;
    browser.click("button[type=submit]").await;
    browser
        .wait_for_text("Wrong email or password", Duration::from_secs(10))
        .await;
    browser.fill("input[name=password]", ALICE_PASSWORD).await;
    browser.click("button[type=submit]").await;
    let landed = browser
        .wait_for_url(|u| u.starts_with(&redirect_uri), Duration::from_secs(15))
        .await;

    let cb = rp.wait_for("/cb", Duration::from_secs(5)).await;
    assert_eq!(
        cb.query("state").as_deref(),
        Some(state.as_str()),
        "{landed}"
    );
    assert_eq!(cb.query("iss").as_deref(), Some(idp.issuer()));
    let code = cb.query("code").expect("code in the callback");
    let tokens = idp
        .exchange_code(
            CLIENT_ID,
            CLIENT_SECRET,
            &code,
            &redirect_uri,
            &pkce.verifier,
        )
        .await;
    assert!(tokens["refresh_token"].is_string(), "{tokens}");
    let id_token = tokens["id_token"].as_str().expect("id_token");
    let id = idp.verify_jwt(id_token, CLIENT_ID).await.unwrap();
    assert_eq!(id["sub"], "alice", "{id}");
    assert_eq!(id["nonce"], nonce.as_str(), "{id}");
    // As the provider ships (OpenID Connect Core §5.4): claims asked for by scope are at
    // UserInfo, not in an ID token issued with an access token.
    assert!(id.get("email").is_none(), "{id}");
    let userinfo = idp.discovery().await["userinfo_endpoint"]
        .as_str()
        .expect("a userinfo_endpoint")
        .to_owned();
    let access_token = tokens["access_token"].as_str().expect("access_token");
    let info = reqwest::Client::new()
        .get(&userinfo)
        .bearer_auth(access_token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["sub"], "alice", "{info}");
    assert_eq!(info["email"], "alice@corp.test", "{info}");
    assert_eq!(info["email_verified"], true, "{info}");
    assert_eq!(info["name"], "Alice Liddell", "{info}");
    assert_eq!(
        info["groups"],
        serde_json::json!(["engineering", "admins"]),
        "{info}"
    );
    let sid = id["sid"].as_str().expect("sid in the ID token").to_owned();

    // The IdP's session cookie lives in the browser; a second authorization skips the form.
    let idp_cookies = browser.all_cookies().await;
    assert!(
        idp_cookies.iter().any(|c| c.name == "_session"),
        "{idp_cookies:?}"
    );
    let again = idp.authorization_url(
        CLIENT_ID,
        &redirect_uri,
        "openid email",
        "second",
        "n2",
        &Pkce::new(),
    );
    browser.goto(&again).await;
    browser
        .wait_for_url(|u| u.starts_with(&redirect_uri), Duration::from_secs(10))
        .await;

    // Back-channel logout: a real logout token for that session reaches the client.
    let sids = idp.backchannel_logout("alice", CLIENT_ID).await;
    assert_eq!(sids, vec![sid.clone()]);
    let bcl = rp.wait_for("/bcl", Duration::from_secs(5)).await;
    assert_eq!(bcl.method, "POST");
    let logout_token = bcl.form("logout_token").expect("logout_token field");
    let claims = idp.verify_jwt(&logout_token, CLIENT_ID).await.unwrap();
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["sid"], sid.as_str(), "{claims}");
    assert!(claims["jti"].is_string(), "{claims}");
    assert!(claims.get("nonce").is_none(), "{claims}");
    assert!(
        claims["events"]
            .get("http://schemas.openid.net/event/backchannel-logout")
            .is_some(),
        "{claims}"
    );
    assert_eq!(jwt_claims(&logout_token)["iss"], idp.issuer());

    // The IdP session is over: nothing more to log out, and the login form is back.
    assert!(idp.backchannel_logout("alice", CLIENT_ID).await.is_empty());
    browser.goto(&auth).await;
    browser
        .wait_for_url(|u| u.contains("/interaction/"), Duration::from_secs(10))
        .await;
    assert!(browser.exists("input[name=password]").await);

    // RP-initiated logout: sign in again, then the end-session page submits itself, sends
    // another back-channel logout, and returns to the post-logout URI with the state.
    browser.fill("input[name=login]", "alice").await;
    browser.fill("input[name=password]", ALICE_PASSWORD).await;
    browser.click("button[type=submit]").await;
    browser
        .wait_for_url(|u| u.starts_with(&redirect_uri), Duration::from_secs(15))
        .await;
    let mut end = url::Url::parse(&format!("{}/session/end", idp.issuer())).unwrap();
    end.query_pairs_mut()
        .append_pair("id_token_hint", id_token)
        .append_pair(
            "post_logout_redirect_uri",
            &rp.url_as("rp.test", "/signed-out"),
        )
        .append_pair("state", "bye");
    browser.goto(end.as_str()).await;
    let out = browser
        .wait_for_url(|u| u.contains("/signed-out"), Duration::from_secs(10))
        .await;
    assert_eq!(query_param(&out, "state").as_deref(), Some("bye"));
    let posts = rp.wait_for_count("/bcl", 2, Duration::from_secs(5)).await;
    let second = jwt_claims(&posts[1].form("logout_token").unwrap());
    assert_eq!(second["sub"], "alice");
    assert_ne!(second["sid"], sid.as_str(), "a new sign-in has a new sid");
    browser.quit().await;
}

//! Sign-in against the test IdP in the shapes real IdPs give tokens (issue #13): the provider
//! as it ships (scope claims only at UserInfo), Microsoft Entra ID (a pairwise `sub`, `oid`,
//! `preferred_username`, no `email`) and Okta (`sub` is the Okta user id, the scopes' claims in the
//! ID token, so no UserInfo is needed).
//! For each, the same person is provisioned with that IdP's own SCIM requests, signs in through
//! headless Chromium, reaches the upstream as the provisioned user, and is refused on the next
//! request once the IdP deactivates them over SCIM.

use portcullis_tests::scim::{patch_ops, ScimClient, GROUP_SCHEMA};
use portcullis_tests::{
    Browser, ConfigBuilder, IdpClient, IdpProfile, IdpSetup, IdpUser, Oidc, Portcullis, Route,
    Upstream,
};
use reqwest::StatusCode;
use serde_json::json;

use crate::scim_entra::entra_user;
use crate::scim_okta::okta_user;
use crate::signin::{get_with_session, CLIENT_ID, CLIENT_SECRET, SESSION_COOKIE};
use crate::{SCIM_HOST, SCIM_TOKEN};

/// How long the browser may take for each step.
const WAIT: std::time::Duration = std::time::Duration::from_secs(40);

const PASSWORD: &str = "pat's password, long enough";
/// Pat's Okta user id: the `sub` of Okta's ID tokens and the `externalId` Okta provisions.
const OKTA_ID: &str = "00u1a2b3c4D5e6F7g8h9";
/// Pat's Entra object id: the `oid` of Entra's tokens and the `externalId` Entra provisions.
const ENTRA_OID: &str = "2d0b5e1c-94f6-4c0e-8a57-0f6a3c1d9e42";

/// Runs the whole story for `profile`; `identity` is the `[identity]` table, if any.
async fn pat_signs_in_and_is_refused_once_deactivated(profile: IdpProfile, identity: &str) {
    // What the IdP knows of pat, and how it provisions pat: (sub, login at the IdP, the
    // provisioned userName).
    let (sub, login, user_name) = match profile {
        IdpProfile::Conformant => ("pat", "pat@corp.test", "pat@corp.test"),
        // Entra provisions the UPN as userName; pat signs in with it.
        IdpProfile::Entra => (
            "pat",
            "pat@corp.onmicrosoft.test",
            "pat@corp.onmicrosoft.test",
        ),
        IdpProfile::Okta => (OKTA_ID, "pat@corp.test", "pat@corp.test"),
    };
    let app = Upstream::start("app").await;
    let cfg = ConfigBuilder::new().http_listener();
    let port = cfg.http_addr().port();
    let mut user = IdpUser::new(sub, login, PASSWORD).name("Pat Doe");
    if profile == IdpProfile::Entra {
        user = user.oid(ENTRA_OID);
    }
    // An Okta login need not be the person's email: given another one, only the preset's
    // `sub` as `externalId` finds pat (not the email as `userName`, the default mapping).
    if profile == IdpProfile::Okta {
        user = user.claim("email", json!("pat.doe@mail.corp.test"));
    }
    let idp = IdpSetup::new()
        .profile(profile)
        .client(
            IdpClient::new(CLIENT_ID, CLIENT_SECRET)
                .redirect_uri(&format!("http://app.test:{port}/.portcullis/callback")),
        )
        .user(user)
        .start()
        .await;
    let cfg = cfg
        .route(Route::new("http://app.test", &[&app]).set("allow = { groups = [\"eng\"] }"))
        .oidc(Oidc::new(
            idp.issuer(),
            CLIENT_ID,
            CLIENT_SECRET,
            &format!("app.test:{port}"),
        ))
        .scim(SCIM_HOST, &[("idp", SCIM_TOKEN)]);
    let _px = Portcullis::start(&format!("{}\n{identity}", cfg.toml())).await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);

    // Provisioned as the IdP provisions.
    let (id, deactivate) = match profile {
        IdpProfile::Conformant => {
            let id = scim.create_user(user_name).await.id();
            scim.create_group("eng", &[&id]).await;
            (id, json!([{"op": "replace", "value": {"active": false}}]))
        }
        IdpProfile::Okta => {
            let mut body = okta_user(user_name, "Pat", "Doe");
            body["externalId"] = json!(OKTA_ID);
            let id = scim.post("/Users", &body).await.expect(201).id();
            let group = json!({
                "schemas": [GROUP_SCHEMA],
                "displayName": "eng",
                "members": [{"value": id, "display": user_name}],
            });
            scim.post("/Groups", &group).await.expect(201);
            (id, json!([{"op": "replace", "value": {"active": false}}]))
        }
        IdpProfile::Entra => {
            let id = scim
                .post("/Users", &entra_user(user_name, ENTRA_OID))
                .await
                .expect(201)
                .id();
            let group = json!({
                "schemas": [GROUP_SCHEMA],
                "externalId": "b1f6a4d2-0c9e-4e47-9b0a-5d3c2e1f0a99",
                "displayName": "eng",
                "meta": {"resourceType": "Group"},
            });
            let gid = scim.post("/Groups", &group).await.expect(201).id();
            let add =
                patch_ops(json!([{"op": "Add", "path": "members", "value": [{"value": id}]}]));
            scim.patch(&format!("/Groups/{gid}"), &add)
                .await
                .expect(204);
            (
                id,
                json!([{"op": "Replace", "path": "active", "value": "False"}]),
            )
        }
    };

    // Pat signs in in a real browser and lands on the upstream as the provisioned user.
    let browser = Browser::start().await;
    let page = format!("http://app.test:{port}/reports");
    browser.goto(&page).await;
    browser
        .wait_for_url(|u| u.contains("/interaction/"), WAIT)
        .await;
    browser.fill("input[name=login]", login).await;
    browser.fill("input[name=password]", PASSWORD).await;
    browser.click("button[type=submit]").await;
    browser.wait_for_url(|u| u == page, WAIT).await;
    let text = browser.wait_for_text("\"upstream\"", WAIT).await;
    assert!(text.contains("\"upstream\":\"app\""), "{profile:?}: {text}");
    let cookie = browser
        .cookie(SESSION_COOKIE)
        .await
        .expect("a session cookie")
        .value;
    let resp = get_with_session(&page, &cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::OK, "{profile:?}");
    let echo = portcullis_tests::Echo::parse(&resp.bytes().await.unwrap_or_default());
    assert_eq!(
        echo.header("x-portcullis-user"),
        Some(user_name),
        "{profile:?}: the upstream is told the provisioned user"
    );

    // The IdP deactivates pat: the very next request is refused.
    scim.patch(&format!("/Users/{id}"), &patch_ops(deactivate))
        .await
        .expect(200);
    let resp = get_with_session(&page, &cookie, "application/json").await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "{profile:?}: a deactivated user's session still works"
    );
}

/// The provider as it ships, with no `[identity]` at all: the defaults work.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_configuration_works_against_the_spec_conformant_provider() {
    pat_signs_in_and_is_refused_once_deactivated(IdpProfile::Conformant, "").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_id_shaped_tokens_and_provisioning_work_with_the_entra_preset() {
    pat_signs_in_and_is_refused_once_deactivated(
        IdpProfile::Entra,
        "[identity]\npreset = \"entra\"\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn okta_shaped_tokens_and_provisioning_work_with_the_okta_preset() {
    pat_signs_in_and_is_refused_once_deactivated(
        IdpProfile::Okta,
        "[identity]\npreset = \"okta\"\n",
    )
    .await;
}

/// A provider that signs its UserInfo answers (a client registered with
/// `userinfo_signed_response_alg`, as Keycloak offers), here with ES256, and with the scopes'
/// claims only there: the answer verifies with the provider's keys as they are now, also
/// after it rotates them, and its email identifies the person.
#[tokio::test(flavor = "multi_thread")]
async fn a_signed_userinfo_answer_verifies_with_the_provider_s_current_keys() {
    use crate::signin::{client, cookie_value, header, navigate, set_cookie};
    let app = Upstream::start("app").await;
    let cfg = ConfigBuilder::new().http_listener();
    let port = cfg.http_addr().port();
    let many: [String; 600] = std::array::from_fn(|i| format!("0f8fad5b-d9cb-469f-a165-{i:012}"));
    let idp = IdpSetup::new()
        .client(
            IdpClient::new(CLIENT_ID, CLIENT_SECRET)
                .redirect_uri(&format!("http://app.test:{port}/.portcullis/callback"))
                .metadata("userinfo_signed_response_alg", json!("ES256")),
        )
        // In 600 groups: a signed answer longer than a token sent in a request may be.
        .user(
            IdpUser::new("pat", "pat@corp.test", PASSWORD)
                .groups(&many.each_ref().map(String::as_str)),
        )
        .start()
        .await;
    let cfg = cfg
        .route(Route::new("http://app.test", &[&app]).set("allow = { groups = [\"eng\"] }"))
        .oidc(
            Oidc::new(
                idp.issuer(),
                CLIENT_ID,
                CLIENT_SECRET,
                &format!("app.test:{port}"),
            )
            .set("scopes", r#"["openid", "email", "profile", "groups"]"#),
        )
        .scim(SCIM_HOST, &[("idp", SCIM_TOKEN)]);
    let _px = Portcullis::start(&cfg.toml()).await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
    let id = scim.create_user("pat@corp.test").await.id();
    scim.create_group("eng", &[&id]).await;
    let page = format!("http://app.test:{port}/reports");
    let sign_in = || async {
        let browser = client();
        let deadline = std::time::Instant::now() + WAIT;
        let authorize = loop {
            let resp = navigate(&browser, &page).await;
            match header(&resp, "location") {
                Some(to) if to.starts_with(idp.issuer()) => break to,
                other => assert!(
                    std::time::Instant::now() < deadline,
                    "sign-in never available: {} {other:?}",
                    resp.status()
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let callback = idp
            .sign_in_http(&authorize, "pat@corp.test", PASSWORD)
            .await;
        let resp = browser.get(&callback).send().await.unwrap();
        let status = resp.status();
        let session = set_cookie(&resp, SESSION_COOKIE);
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::FOUND, "{body}");
        cookie_value(&session.expect("a session"))
    };
    // Known once sign-in is first available: the keys were fetched by then.
    let mut discovered = None;
    for round in ["keys as discovered", "keys rotated since"] {
        let cookie = sign_in().await;
        let discovered = *discovered.get_or_insert_with(std::time::Instant::now);
        let resp = get_with_session(&page, &cookie, "application/json").await;
        assert_eq!(resp.status(), StatusCode::OK, "{round}");
        let echo = portcullis_tests::Echo::parse(&resp.bytes().await.unwrap_or_default());
        assert_eq!(
            echo.header("x-portcullis-user"),
            Some("pat@corp.test"),
            "{round}"
        );
        // Portcullis fetches keys again at most every 10 s: a rotation is rare, so give it
        // that much since it fetched them (at discovery), as `signin::` does.
        let quiet = std::time::Duration::from_secs(11);
        if let Some(rest) = quiet.checked_sub(discovered.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        idp.rotate_keys(false).await;
    }
}

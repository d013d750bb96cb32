//! SCIM 2.0 protocol behaviour that every client relies on: discovery documents, Bulk, ETags,
//! RFC 7644 error bodies, bearer-token authentication (expiry, rotation, reload), the body
//! limit, passwords, deletes and nested groups.

use std::time::{Duration, Instant};

use portcullis_tests::client::{chunked, raw_request, read_response_head};
use portcullis_tests::scim::{
    patch_ops, user, ScimClient, BULK_REQUEST_SCHEMA, BULK_RESPONSE_SCHEMA, ENTERPRISE_USER_SCHEMA,
    GROUP_SCHEMA, LIST_RESPONSE_SCHEMA, USER_SCHEMA,
};
use portcullis_tests::{Portcullis, ScimToken};
use reqwest::Method;
use serde_json::{json, Value};

use crate::{scim_config, scim_server, SCIM_HOST, SCIM_TOKEN};

/// The attribute named `name` in a `/Schemas` resource.
pub(crate) fn attribute<'a>(schema: &'a Value, name: &str) -> &'a Value {
    schema["attributes"]
        .as_array()
        .and_then(|attrs| attrs.iter().find(|a| a["name"] == name))
        .unwrap_or_else(|| panic!("schema {} has no attribute {name}", schema["id"]))
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_describes_users_groups_and_the_enterprise_extension() {
    let cfg = scim_config()
        .scim_setting("max_bulk_operations", "7")
        .scim_setting("max_results", "50")
        .scim_setting("max_request_body_bytes", "65536");
    let _px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);

    let spc = scim.get("/ServiceProviderConfig").await.expect(200);
    let body = &spc.body;
    assert_eq!(
        body["schemas"],
        json!(["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"]),
        "{}",
        spc.text
    );
    assert_eq!(body["patch"]["supported"], true);
    assert_eq!(body["bulk"]["supported"], true);
    assert_eq!(body["bulk"]["maxOperations"], 7, "{}", spc.text);
    assert_eq!(body["bulk"]["maxPayloadSize"], 65536, "{}", spc.text);
    assert_eq!(body["filter"]["supported"], true);
    assert_eq!(body["filter"]["maxResults"], 50, "{}", spc.text);
    assert_eq!(body["etag"]["supported"], true);
    assert!(body["sort"]["supported"].is_boolean());
    assert!(body["changePassword"]["supported"].is_boolean());
    let schemes = body["authenticationSchemes"]
        .as_array()
        .expect("authenticationSchemes");
    assert!(
        schemes.iter().any(|s| s["type"] == "oauthbearertoken"),
        "{}",
        spc.text
    );

    let types = scim.get("/ResourceTypes").await.expect(200);
    assert_eq!(types.body["schemas"], json!([LIST_RESPONSE_SCHEMA]));
    assert_eq!(types.body["totalResults"], 4, "{}", types.text);
    let resources = types.resources();
    let user_type = resources
        .iter()
        .find(|r| r["name"] == "User")
        .expect("a User resource type");
    assert_eq!(user_type["endpoint"], "/Users");
    assert_eq!(user_type["schema"], USER_SCHEMA);
    assert_eq!(
        user_type["schemaExtensions"],
        json!([{"schema": ENTERPRISE_USER_SCHEMA, "required": false}]),
        "{}",
        types.text
    );
    let group_type = resources
        .iter()
        .find(|r| r["name"] == "Group")
        .expect("a Group resource type");
    assert_eq!(group_type["endpoint"], "/Groups");
    assert_eq!(group_type["schema"], GROUP_SCHEMA);
    let one = scim.get("/ResourceTypes/User").await.expect(200);
    assert_eq!(&one.body, user_type);

    let schemas = scim.get("/Schemas").await.expect(200);
    let list = schemas.resources();
    let ids: Vec<&str> = list.iter().filter_map(|s| s["id"].as_str()).collect();
    for urn in [USER_SCHEMA, GROUP_SCHEMA, ENTERPRISE_USER_SCHEMA] {
        assert!(ids.contains(&urn), "/Schemas lacks {urn}: {ids:?}");
    }
    let user_schema = list.iter().find(|s| s["id"] == USER_SCHEMA).unwrap();
    let user_name = attribute(user_schema, "userName");
    assert_eq!(user_name["uniqueness"], "server");
    assert_eq!(user_name["caseExact"], false);
    assert_eq!(user_name["required"], true);
    assert_eq!(attribute(user_schema, "password")["returned"], "never");
    let emails = attribute(user_schema, "emails");
    assert_eq!(emails["multiValued"], true);
    assert_eq!(emails["type"], "complex");
    assert!(emails["subAttributes"].is_array());
    let group_schema = list.iter().find(|s| s["id"] == GROUP_SCHEMA).unwrap();
    assert_eq!(attribute(group_schema, "members")["multiValued"], true);
    assert!(attribute(group_schema, "displayName").is_object());
    let enterprise = scim
        .get(&format!("/Schemas/{ENTERPRISE_USER_SCHEMA}"))
        .await
        .expect(200);
    for name in ["employeeNumber", "department", "manager"] {
        attribute(&enterprise.body, name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_resolves_bulk_ids_and_honours_its_limits() {
    let cfg = scim_config().scim_setting("max_bulk_operations", "5");
    let _px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);

    let request = json!({
        "schemas": [BULK_REQUEST_SCHEMA],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "u1", "data": user("bulk-ann@example.com")},
            {"method": "POST", "path": "/Groups", "bulkId": "g1",
             "data": {"schemas": [GROUP_SCHEMA], "displayName": "bulk-group",
                      "members": [{"type": "User", "value": "bulkId:u1"}]}},
            {"method": "PATCH", "path": "/Users/bulkId:u1",
             "data": patch_ops(json!([{"op": "replace", "path": "title", "value": "Bulk"}]))}
        ]
    });
    let resp = scim.post("/Bulk", &request).await.expect(200);
    assert_eq!(
        resp.body["schemas"],
        json!([BULK_RESPONSE_SCHEMA]),
        "{}",
        resp.text
    );
    let ops = resp.body["Operations"].as_array().expect("Operations");
    assert_eq!(ops.len(), 3, "{}", resp.text);
    assert_eq!(ops[0]["status"], "201", "{}", resp.text);
    assert_eq!(ops[0]["bulkId"], "u1");
    assert_eq!(ops[1]["status"], "201", "{}", resp.text);
    assert_eq!(ops[2]["status"], "200", "{}", resp.text);
    let user_location = ops[0]["location"].as_str().expect("location of the user");
    let user_id = user_location.rsplit('/').next().unwrap().to_owned();
    let group_location = ops[1]["location"].as_str().expect("location of the group");
    let group_id = group_location.rsplit('/').next().unwrap().to_owned();
    assert_eq!(user_location, format!("{}/Users/{user_id}", scim.base()));

    let got = scim.get(&format!("/Users/{user_id}")).await.expect(200);
    assert_eq!(got.body["userName"], "bulk-ann@example.com");
    assert_eq!(got.body["title"], "Bulk", "{}", got.text);
    assert_eq!(scim.member_ids(&group_id).await, vec![user_id.clone()]);

    // Names in any case (RFC 7643 §2.1): a `Version` is a precondition as `version` is, and
    // `FailOnErrors` a limit. Every result but a failed POST's names its resource (§3.7).
    let mut overwrite = user("bulk-ann@example.com");
    overwrite["title"] = json!("Overwritten");
    let request = json!({
        "Schemas": [BULK_REQUEST_SCHEMA.to_uppercase()],
        "FailOnErrors": 1,
        "operations": [
            {"Method": "PUT", "Path": format!("/Users/{user_id}"), "Version": "W/\"stale\"",
             "Data": overwrite},
            {"method": "DELETE", "path": format!("/Users/{user_id}")}
        ]
    });
    let resp = scim.post("/Bulk", &request).await.expect(200);
    let ops = resp.body["Operations"].as_array().expect("Operations");
    assert_eq!(ops.len(), 1, "{}", resp.text);
    assert_eq!(ops[0]["status"], "412", "{}", resp.text);
    assert_eq!(ops[0]["location"], user_location, "{}", resp.text);
    let got = scim.get(&format!("/Users/{user_id}")).await.expect(200);
    assert_eq!(got.body["title"], "Bulk", "{}", got.text);
    let request = json!({
        "schemas": [BULK_REQUEST_SCHEMA],
        "Operations": [{"method": "DELETE", "path": "/Users/no-such-user"}]
    });
    let resp = scim.post("/Bulk", &request).await.expect(200);
    let ops = resp.body["Operations"].as_array().expect("Operations");
    assert_eq!(ops[0]["status"], "404", "{}", resp.text);
    let missing = format!("{}/Users/no-such-user", scim.base());
    assert_eq!(ops[0]["location"], missing.as_str(), "{}", resp.text);

    // failOnErrors = 2: the second error ends the request; what follows is not done.
    let request = json!({
        "schemas": [BULK_REQUEST_SCHEMA],
        "failOnErrors": 2,
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "a", "data": user("bulk-a@example.com")},
            {"method": "POST", "path": "/Users", "bulkId": "dup", "data": user("BULK-ANN@example.com")},
            {"method": "POST", "path": "/Users", "bulkId": "bad", "data": {"schemas": [USER_SCHEMA]}},
            {"method": "POST", "path": "/Users", "bulkId": "b", "data": user("bulk-b@example.com")},
            {"method": "POST", "path": "/Users", "bulkId": "c", "data": user("bulk-c@example.com")}
        ]
    });
    let resp = scim.post("/Bulk", &request).await.expect(200);
    let ops = resp.body["Operations"].as_array().expect("Operations");
    let statuses: Vec<&str> = ops.iter().filter_map(|o| o["status"].as_str()).collect();
    assert_eq!(statuses, ["201", "409", "400"], "{}", resp.text);
    assert_eq!(
        ops[1]["response"]["scimType"], "uniqueness",
        "{}",
        resp.text
    );
    assert_eq!(ops[1]["response"]["status"], "409", "{}", resp.text);
    assert_eq!(ops[2]["response"]["status"], "400", "{}", resp.text);
    for (name, present) in [
        ("bulk-a@example.com", 1),
        ("bulk-b@example.com", 0),
        ("bulk-c@example.com", 0),
    ] {
        let found = scim
            .filter("/Users", &format!("userName eq \"{name}\""))
            .await
            .expect(200);
        assert_eq!(
            found.body["totalResults"], present,
            "{name}: {}",
            found.text
        );
    }

    // More operations than advertised: 413, and none of them is done.
    let too_many: Vec<Value> = (0..6)
        .map(|i| {
            json!({"method": "POST", "path": "/Users", "bulkId": format!("x{i}"),
                   "data": user(&format!("bulk-x{i}@example.com"))})
        })
        .collect();
    let request = json!({"schemas": [BULK_REQUEST_SCHEMA], "Operations": too_many});
    scim.post("/Bulk", &request).await.expect_error(413, None);
    let found = scim
        .filter("/Users", "userName sw \"bulk-x\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 0, "{}", found.text);
}

/// What an IdP's Bulk request says is done as it says, or refused: a member filter naming a
/// user created earlier in the request removes that user (Okta's form of a removal), a
/// `version` that is not an ETag is no precondition to drop, and a bulkId names one
/// resource.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_does_what_its_references_and_preconditions_say_or_refuses() {
    let (_px, scim) = scim_server().await;
    let request = json!({
        "schemas": [BULK_REQUEST_SCHEMA],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "u1", "data": user("ref-ann@example.com")},
            {"method": "POST", "path": "/Users", "bulkId": "u2", "data": user("ref-bob@example.com")},
            {"method": "POST", "path": "/Groups", "bulkId": "g",
             "data": {"schemas": [GROUP_SCHEMA], "displayName": "ref-group",
                      "members": [{"value": "bulkId:u1"}, {"value": "bulkId:u2"}]}},
            {"method": "PATCH", "path": "/Groups/bulkId:g",
             "data": patch_ops(json!([{"op": "remove", "path": "members[value eq \"bulkId:u1\"]"}]))}
        ]
    });
    let resp = scim.post("/Bulk", &request).await.expect(200);
    let ops = resp.body["Operations"].as_array().expect("Operations");
    let statuses: Vec<&str> = ops.iter().filter_map(|o| o["status"].as_str()).collect();
    assert_eq!(statuses, ["201", "201", "201", "200"], "{}", resp.text);
    let id = |i: usize| {
        ops[i]["location"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
    };
    let (bob, group) = (id(1).to_owned(), id(2).to_owned());
    assert_eq!(scim.member_ids(&group).await, vec![bob], "{}", resp.text);

    // A `version` of another type: that operation is refused, and the user stays.
    let user_path = format!("/Users/{}", id(0));
    for version in [json!(3), json!({"etag": "W/\"1\""})] {
        let request = json!({
            "schemas": [BULK_REQUEST_SCHEMA],
            "Operations": [{"method": "DELETE", "path": user_path, "version": version}]
        });
        let resp = scim.post("/Bulk", &request).await.expect(200);
        assert_eq!(resp.body["Operations"][0]["status"], "400", "{}", resp.text);
        scim.get(&user_path).await.expect(200);
    }

    // One bulkId on two POSTs: refused before anything is done.
    let request = json!({
        "schemas": [BULK_REQUEST_SCHEMA],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "x", "data": user("twice-1@example.com")},
            {"method": "POST", "path": "/Users", "bulkId": "x", "data": user("twice-2@example.com")}
        ]
    });
    scim.post("/Bulk", &request)
        .await
        .expect_error(400, Some("invalidValue"));
    let found = scim
        .filter("/Users", "userName sw \"twice-\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 0, "{}", found.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn etags_make_reads_conditional_and_writes_safe() {
    let (_px, scim) = scim_server().await;
    let created = scim.create_user("etag@example.com").await;
    let id = created.id();
    let path = format!("/Users/{id}");
    let etag = created.etag().expect("ETag on create").to_owned();

    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.etag(), Some(etag.as_str()));
    assert_eq!(got.body["meta"]["version"], etag.as_str());

    let not_modified = scim
        .request(Method::GET, &path, &[], None, &[("if-none-match", &etag)])
        .await
        .expect(304);
    assert_eq!(not_modified.text, "", "a 304 has no body");
    assert_eq!(
        not_modified.header("content-length"),
        None,
        "nor says it has one"
    );
    // Compared weakly: the same version without `W/` is the same.
    let strong = etag.strip_prefix("W/").expect("a weak ETag");
    scim.request(Method::GET, &path, &[], None, &[("if-none-match", strong)])
        .await
        .expect(304);
    scim.request(
        Method::GET,
        &path,
        &[],
        None,
        &[("if-none-match", "W/\"not-the-version\"")],
    )
    .await
    .expect(200);

    // Someone else changes the user: the first ETag is now stale.
    let mut body = got.body.clone();
    body["title"] = json!("First");
    let first = scim.put(&path, &body).await.expect(200);
    let current = first.etag().expect("ETag on PUT").to_owned();
    assert_ne!(current, etag);

    body["title"] = json!("Stale");
    scim.request(Method::PUT, &path, &[], Some(&body), &[("if-match", &etag)])
        .await
        .expect_error(412, None);
    let patch = patch_ops(json!([{"op": "replace", "path": "title", "value": "Stale"}]));
    scim.request(
        Method::PATCH,
        &path,
        &[],
        Some(&patch),
        &[("if-match", &etag)],
    )
    .await
    .expect_error(412, None);
    scim.request(Method::DELETE, &path, &[], None, &[("if-match", &etag)])
        .await
        .expect_error(412, None);
    // A tag that is not ASCII is still a tag, which matches no version: not a write without
    // a condition.
    scim.request(
        Method::PATCH,
        &path,
        &[],
        Some(&patch),
        &[("if-match", "\"v\u{e9}\"")],
    )
    .await
    .expect_error(412, None);
    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.body["title"], "First", "a 412 changed the user");
    assert_eq!(got.etag(), Some(current.as_str()));
    // Tags in several fields are one list (RFC 9110 §5.3): the current one, in the second,
    // matches. (A GET's `If-None-Match` is read so too: none of these changes the user.)
    let fields = [
        ("if-none-match", etag.as_str()),
        ("if-none-match", &current),
    ];
    scim.request(Method::GET, &path, &[], None, &fields)
        .await
        .expect(304);
    // The old ETag no longer yields a 304.
    scim.request(Method::GET, &path, &[], None, &[("if-none-match", &etag)])
        .await
        .expect(200);

    body["title"] = json!("Second");
    let second = scim
        .request(
            Method::PUT,
            &path,
            &[],
            Some(&body),
            &[("if-match", &current)],
        )
        .await
        .expect(200);
    let newest = second.etag().expect("ETag on PUT").to_owned();
    assert_ne!(newest, current);
    assert_eq!(second.body["meta"]["version"], newest.as_str());
    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.body["title"], "Second");
    assert_eq!(got.etag(), Some(newest.as_str()));
    scim.request(Method::GET, &path, &[], None, &[("if-none-match", &newest)])
        .await
        .expect(304);

    // If-Match too is compared weakly: a client (or a proxy between) that drops the `W/` is
    // not refused for ever.
    let newest_strong = newest.strip_prefix("W/").expect("a weak ETag");
    let deleted = scim
        .request(
            Method::DELETE,
            &path,
            &[],
            None,
            &[("if-match", newest_strong)],
        )
        .await
        .expect(204);
    assert_eq!(
        deleted.header("content-length"),
        None,
        "a 204 has no length"
    );
    scim.get(&path).await.expect_error(404, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_an_rfc_7644_error_body_and_changes_nothing() {
    let (_px, scim) = scim_server().await;
    let created = scim.create_user("errors@example.com").await;
    let id = created.id();
    let path = format!("/Users/{id}");
    let etag = created.etag().unwrap().to_owned();

    // A filter that does not parse, and one on an unknown attribute.
    scim.get_query("/Users", &[("filter", "userName xx \"a\"")])
        .await
        .expect_error(400, Some("invalidFilter"));
    scim.get_query("/Users", &[("filter", "userName eq \"a\" and (")])
        .await
        .expect_error(400, Some("invalidFilter"));
    scim.get_query("/Users", &[("filter", "noSuchAttribute eq \"a\"")])
        .await
        .expect_error(400, Some("invalidFilter"));

    // A body that is not JSON.
    let bad = scim
        .try_raw(
            Method::POST,
            "/Users",
            &[],
            Some(b"{\"schemas\": [".to_vec()),
            &[],
        )
        .await
        .unwrap();
    bad.expect_error(400, Some("invalidSyntax"));

    // An attribute the schema does not have: refused, not dropped.
    let mut unknown = user("unknown-attr@example.com");
    unknown["favouriteColour"] = json!("green");
    let resp = scim.post("/Users", &unknown).await.expect_error(400, None);
    let scim_type = resp.body["scimType"].as_str().unwrap_or_default();
    assert!(
        ["invalidSyntax", "invalidValue"].contains(&scim_type),
        "unknown attribute on POST: {}",
        resp.text
    );
    let found = scim
        .filter("/Users", "userName eq \"unknown-attr@example.com\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 0, "{}", found.text);
    let unknown_patch =
        patch_ops(json!([{"op": "replace", "path": "favouriteColour", "value": "x"}]));
    let resp = scim
        .patch(&path, &unknown_patch)
        .await
        .expect_error(400, None);
    let scim_type = resp.body["scimType"].as_str().unwrap_or_default();
    assert!(
        ["invalidPath", "invalidSyntax", "invalidValue"].contains(&scim_type),
        "unknown attribute in PATCH: {}",
        resp.text
    );
    // A value of the wrong type.
    let mut wrong = user("wrong-type@example.com");
    wrong["active"] = json!("maybe");
    let resp = scim.post("/Users", &wrong).await.expect_error(400, None);
    let scim_type = resp.body["scimType"].as_str().unwrap_or_default();
    assert!(
        ["invalidSyntax", "invalidValue"].contains(&scim_type),
        "{}",
        resp.text
    );
    // A PATCH body without the PatchOp schema, and one with an unknown op.
    scim.patch(
        &path,
        &json!({"Operations": [{"op": "replace", "path": "title", "value": "x"}]}),
    )
    .await
    .expect_error(400, Some("invalidSyntax"));
    scim.patch(
        &path,
        &patch_ops(json!([{"op": "frobnicate", "path": "title", "value": "x"}])),
    )
    .await
    .expect_error(400, Some("invalidSyntax"));

    // Changing the id by PATCH (PUT: see `changing_the_id_by_put_is_a_mutability_error`).
    scim.patch(
        &path,
        &patch_ops(json!([{"op": "replace", "path": "id", "value": "another-id"}])),
    )
    .await
    .expect_error(400, Some("mutability"));
    scim.patch(
        &path,
        &patch_ops(json!([{"op": "replace", "value": {"id": "another-id"}}])),
    )
    .await
    .expect_error(400, Some("mutability"));

    // Removing a required attribute.
    let resp = scim
        .patch(
            &path,
            &patch_ops(json!([{"op": "remove", "path": "userName"}])),
        )
        .await
        .expect_error(400, None);
    assert!(resp.body["scimType"].is_string(), "{}", resp.text);

    // Uniqueness, not found, wrong method, unknown endpoint.
    scim.post("/Users", &user("ERRORS@example.com"))
        .await
        .expect_error(409, Some("uniqueness"));
    scim.get("/Users/no-such-id").await.expect_error(404, None);
    scim.put("/Users/no-such-id", &user("nobody@example.com"))
        .await
        .expect_error(404, None);
    scim.delete("/Groups/no-such-id")
        .await
        .expect_error(404, None);
    scim.get("/NoSuchEndpoint").await.expect_error(404, None);
    // A wrong method is told which ones the endpoint takes (RFC 9110 §15.5.6); a path below
    // an endpoint is none.
    for (method, path, allow) in [
        (Method::DELETE, "/Users", "GET, HEAD, POST"),
        (Method::POST, path.as_str(), "GET, HEAD, PUT, PATCH, DELETE"),
        (Method::GET, "/Bulk", "POST"),
        (Method::GET, "/.search", "POST"),
        (Method::GET, "/Users/.search", "POST"),
        (Method::PUT, "/ServiceProviderConfig", "GET, HEAD"),
        (Method::DELETE, "/Schemas/x", "GET, HEAD"),
    ] {
        let resp = scim
            .request(method.clone(), path, &[], None, &[])
            .await
            .expect_error(405, None);
        let allowed = resp.headers.get("allow").and_then(|v| v.to_str().ok());
        assert_eq!(allowed, Some(allow), "{method} {path}");
    }
    for path in [
        format!("{path}/groups"),
        "/ServiceProviderConfig/x".to_owned(),
        "/Schemas/a/b".to_owned(),
    ] {
        scim.get(&path).await.expect_error(404, None);
    }
    // A HEAD is its GET's head: the same status and ETag, no body.
    for path in [path.as_str(), "/Users", "/ServiceProviderConfig"] {
        let head = scim.request(Method::HEAD, path, &[], None, &[]).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.text.is_empty(), "HEAD {path}: {}", head.text);
        let get = scim.get(path).await.expect(200);
        assert_eq!(head.etag(), get.etag(), "HEAD {path}");
    }

    // None of it changed the user.
    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.etag(), Some(etag.as_str()), "{}", got.text);
    assert_eq!(got.body["id"], id.as_str());
    assert_eq!(got.body.get("favouriteColour"), None);
    let all = scim.get("/Users").await.expect(200);
    assert_eq!(all.body["totalResults"], 1, "{}", all.text);
}

/// `POST /.search` at the root pages over every type as one list, Users first, and a filter
/// on an attribute only some types have matches nothing of the others.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_search_pages_across_types_as_one_list() {
    let (_px, scim) = scim_server().await;
    let mut users = Vec::new();
    for name in [
        "root-a@example.com",
        "root-b@example.com",
        "root-c@example.com",
    ] {
        users.push(scim.create_user(name).await.id());
    }
    let groups = [
        scim.create_group("root-g1", &[&users[0]]).await.id(),
        scim.create_group("root-g2", &[]).await.id(),
    ];
    let search = |start: usize, count: usize, filter: Option<&str>| {
        let mut body = json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
            "startIndex": start,
            "count": count,
        });
        if let Some(filter) = filter {
            body["filter"] = json!(filter);
        }
        body
    };
    let ids = |resp: &portcullis_tests::ScimResponse| -> Vec<String> {
        resp.resources()
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };

    let page = scim
        .post("/.search", &search(1, 100, None))
        .await
        .expect(200);
    assert_eq!(page.body["totalResults"], 5, "{}", page.text);
    assert_eq!(ids(&page), [&users[..], &groups[..]].concat());
    let page = scim.post("/.search", &search(2, 2, None)).await.expect(200);
    assert_eq!(page.body["totalResults"], 5, "{}", page.text);
    assert_eq!(page.body["startIndex"], 2, "{}", page.text);
    assert_eq!(ids(&page), [users[1].clone(), users[2].clone()]);
    let page = scim.post("/.search", &search(3, 2, None)).await.expect(200);
    assert_eq!(ids(&page), [users[2].clone(), groups[0].clone()]);
    let page = scim
        .post("/.search", &search(5, 10, None))
        .await
        .expect(200);
    assert_eq!(ids(&page), [groups[1].clone()]);
    let page = scim
        .post("/.search", &search(6, 10, None))
        .await
        .expect(200);
    assert_eq!(page.body["totalResults"], 5, "{}", page.text);
    assert_eq!(ids(&page), Vec::<String>::new());
    let page = scim.post("/.search", &search(1, 0, None)).await.expect(200);
    assert_eq!(page.body["totalResults"], 5, "{}", page.text);
    assert_eq!(ids(&page), Vec::<String>::new());

    let filter = "userName sw \"root-b\"";
    let page = scim
        .post("/.search", &search(1, 10, Some(filter)))
        .await
        .expect(200);
    assert_eq!(page.body["totalResults"], 1, "{}", page.text);
    assert_eq!(ids(&page), [users[1].clone()]);
    let filter = "userName sw \"root-\"";
    let page = scim
        .post("/.search", &search(2, 1, Some(filter)))
        .await
        .expect(200);
    assert_eq!(page.body["totalResults"], 3, "{}", page.text);
    assert_eq!(ids(&page), [users[1].clone()]);
    let page = scim
        .get_query(
            "/Users",
            &[("filter", filter), ("startIndex", "3"), ("count", "5")],
        )
        .await
        .expect(200);
    assert_eq!(page.body["totalResults"], 3, "{}", page.text);
    assert_eq!(ids(&page), [users[2].clone()]);
    // Parameters named in another case are read alike: ignored, `Filter` would list everyone.
    let filter = "userName eq \"root-b@example.com\"";
    let body = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
        "Filter": filter,
        "COUNT": 5,
    });
    for path in ["/.search", "/Users/.search"] {
        let page = scim.post(path, &body).await.expect(200);
        assert_eq!(page.body["totalResults"], 1, "{path}: {}", page.text);
        assert_eq!(page.body["itemsPerPage"], 1, "{path}: {}", page.text);
        assert_eq!(ids(&page), [users[1].clone()], "{path}");
    }
    let page = scim
        .get_query("/Users", &[("Filter", filter), ("StartIndex", "1")])
        .await
        .expect(200);
    assert_eq!(ids(&page), [users[1].clone()]);
    // A blank filter (a client's empty variable) is no filter the grammar has: refused, where
    // it listed everyone.
    let refused = scim
        .get_query("/Users", &[("filter", "")])
        .await
        .expect(400);
    assert_eq!(
        refused.body["scimType"], "invalidFilter",
        "{}",
        refused.text
    );
    let blank = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
        "filter": " ",
    });
    let refused = scim.post("/Users/.search", &blank).await.expect(400);
    assert_eq!(
        refused.body["scimType"], "invalidFilter",
        "{}",
        refused.text
    );
    let filter = "displayName eq \"root-g2\"";
    let page = scim
        .post("/.search", &search(1, 10, Some(filter)))
        .await
        .expect(200);
    assert_eq!(ids(&page), [groups[1].clone()]);
    scim.post("/.search", &search(1, 10, Some("noSuchAttribute eq \"x\"")))
        .await
        .expect_error(400, Some("invalidFilter"));
}

/// A member the client names without its id is refused, not dropped: dropped, a PUT of
/// `[{"display": ...}]` would empty the group. A Group has no `password` to PATCH either.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_write_naming_a_member_without_its_id_or_a_password_changes_nothing() {
    let (_px, scim) = scim_server().await;
    let member = scim.create_user("kept-member@example.com").await.id();
    let created = scim.create_group("kept", &[&member]).await;
    let path = format!("/Groups/{}", created.id());
    let etag = created.etag().unwrap().to_owned();

    let without_ids = [
        json!([{"display": "kept-member@example.com"}]),
        json!([{"$ref": format!("https://scim.test/scim/v2/Users/{member}")}]),
        json!([{"value": member}, {"value": ""}]),
        json!([{"value": 7}]),
    ];
    for members in without_ids {
        let body = json!({"schemas": [GROUP_SCHEMA], "displayName": "kept", "members": members});
        scim.put(&path, &body)
            .await
            .expect_error(400, Some("invalidValue"));
        let body = json!({"schemas": [GROUP_SCHEMA], "displayName": "new", "members": members});
        scim.post("/Groups", &body)
            .await
            .expect_error(400, Some("invalidValue"));
    }
    scim.patch(
        &path,
        &patch_ops(json!([{"op": "replace", "path": "password", "value": "x"}])),
    )
    .await
    .expect_error(400, Some("invalidPath"));
    let resp = scim
        .patch(
            &path,
            &patch_ops(json!([{"op": "replace", "value": {"password": "x"}}])),
        )
        .await
        .expect_error(400, None);
    assert!(resp.body["scimType"].is_string(), "{}", resp.text);

    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.etag(), Some(etag.as_str()), "{}", got.text);
    assert_eq!(scim.member_ids(&created.id()).await, vec![member]);
    let groups = scim.get("/Groups").await.expect(200);
    assert_eq!(groups.body["totalResults"], 1, "{}", groups.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_the_id_by_put_is_a_mutability_error() {
    let (_px, scim) = scim_server().await;
    let created = scim.create_user("put-id@example.com").await;
    let id = created.id();
    let path = format!("/Users/{id}");
    let etag = created.etag().unwrap().to_owned();

    // Sending the resource's own id is fine (and changes nothing).
    let mut body = scim.get(&path).await.expect(200).body;
    body["title"] = json!("Same id");
    let same = scim.put(&path, &body).await.expect(200);
    assert_eq!(same.body["id"], id.as_str());
    let etag_after_same = same.etag().unwrap().to_owned();
    assert_ne!(etag_after_same, etag);

    body["id"] = json!("another-id");
    body["title"] = json!("Another id");
    scim.put(&path, &body)
        .await
        .expect_error(400, Some("mutability"));
    let got = scim.get(&path).await.expect(200);
    assert_eq!(
        got.body["title"], "Same id",
        "the refused PUT changed the user"
    );
    assert_eq!(got.etag(), Some(etag_after_same.as_str()));
}

/// Asserts a 401 with a SCIM error body and a Bearer challenge.
#[track_caller]
fn assert_refused(resp: portcullis_tests::ScimResponse) {
    let resp = resp.expect_error(401, None);
    let challenge = resp.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.to_ascii_lowercase().starts_with("bearer"),
        "401 without a Bearer challenge: {:?}",
        resp.headers
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_missing_wrong_expired_rotated_and_hashed() {
    let tokens = vec![
        ScimToken::new("okta", SCIM_TOKEN),
        ScimToken::new("okta-next", "okta-next-token-0123456789abcdef"),
        ScimToken::new("entra", "entra-token-0123456789abcdefghij").as_sha256(),
        ScimToken::new("old", "old-token-0123456789abcdefghijkl").expires("2020-01-01T00:00:00Z"),
        ScimToken::new("later", "later-token-0123456789abcdefghij").expires("2999-01-01T00:00:00Z"),
    ];
    let cfg = scim_config().scim_tokens(SCIM_HOST, tokens);
    let _px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);

    assert_refused(scim.with_token(None).get("/Users").await);
    assert_refused(
        scim.with_token(Some("okta-token-0123456789abcdefghiX"))
            .get("/Users")
            .await,
    );
    assert_refused(scim.with_token(Some("")).get("/Users").await);
    // An expired token, on reads and writes.
    let old = scim.with_token(Some("old-token-0123456789abcdefghijkl"));
    assert_refused(old.get("/Users").await);
    assert_refused(old.post("/Users", &user("by-old@example.com")).await);
    // Not Bearer.
    let basic = scim
        .with_token(None)
        .request(
            Method::GET,
            "/Users",
            &[],
            None,
            &[("authorization", &format!("Basic {SCIM_TOKEN}"))],
        )
        .await;
    assert_refused(basic);
    // Even discovery needs a token.
    assert_refused(scim.with_token(None).get("/ServiceProviderConfig").await);

    // Every valid token works at once: the current, the next (rotation), the hashed one and
    // the one that expires later.
    for (i, token) in [
        SCIM_TOKEN,
        "okta-next-token-0123456789abcdef",
        "entra-token-0123456789abcdefghij",
        "later-token-0123456789abcdefghij",
    ]
    .into_iter()
    .enumerate()
    {
        let client = scim.with_token(Some(token));
        client.get("/Users").await.expect(200);
        client
            .create_user(&format!("by-token-{i}@example.com"))
            .await;
    }
    let all = scim.get("/Users").await.expect(200);
    assert_eq!(all.body["totalResults"], 4, "{}", all.text);
    // Nothing was written by a refused request.
    let found = scim
        .filter("/Users", "userName eq \"by-old@example.com\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 0);
}

/// Polls `GET /Users` with `client` (bounded) until it is answered `status`.
async fn wait_for_status(px: &Portcullis, client: &ScimClient, status: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = client.get("/Users").await;
        if resp.status == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} 10 s after the reload ({}); output:\n{}",
            resp.status,
            resp.text,
            px.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_rotation_by_config_reload() {
    const NEW: &str = "rotated-token-0123456789abcdef";
    let cfg = scim_config();
    let px = cfg.start().await;
    let old = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
    let new = old.with_token(Some(NEW));
    old.create_user("before-rotation@example.com").await;
    assert_refused(new.get("/Users").await);

    // Rotation, step 1: the operator adds the new token next to the old one and sends SIGHUP.
    let both = cfg
        .clone()
        .scim(SCIM_HOST, &[("okta", SCIM_TOKEN), ("okta-2", NEW)]);
    px.rewrite_config(&both.toml());
    px.reload();
    wait_for_status(&px, &new, 200, "the added token").await;
    old.get("/Users").await.expect(200);
    new.create_user("during-rotation@example.com").await;

    // Step 2: the IdP uses the new token; the old one is removed.
    let only_new = cfg.clone().scim(SCIM_HOST, &[("okta-2", NEW)]);
    px.rewrite_config(&only_new.toml());
    px.reload();
    wait_for_status(&px, &old, 401, "the removed token").await;
    assert_refused(old.get("/Users").await);
    assert_refused(old.post("/Users", &user("by-old-token@example.com")).await);

    // The new one works, and the directory survived both reloads.
    let found = new
        .filter("/Users", "userName eq \"before-rotation@example.com\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 1, "{}", found.text);
    new.create_user("after-rotation@example.com").await;
    let all = new.get("/Users").await.expect(200);
    assert_eq!(all.body["totalResults"], 3, "{}", all.text);
}

/// A token a reload removes while a request of it sends its body has what it sends undone:
/// the body's content (chosen after the removal, chunked) is not written.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_removed_while_its_request_s_body_comes_writes_nothing() {
    use tokio::io::AsyncWriteExt;
    const NEW: &str = "rotated-token-0123456789abcdef";
    let cfg = scim_config().scim(SCIM_HOST, &[("okta", SCIM_TOKEN), ("okta-2", NEW)]);
    let px = cfg.start().await;
    let old = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
    let new = old.with_token(Some(NEW));
    old.get("/Users").await.expect(200);

    let body = serde_json::to_vec(&user("late@example.com")).unwrap();
    let (head, rest) = body.split_at(10);
    let mut stream = tokio::net::TcpStream::connect(cfg.http_addr())
        .await
        .unwrap();
    // Asking to be told to go on: told so once its token is taken, before the reload (on a
    // loaded machine the head may otherwise be read only after it).
    let start = format!(
        "POST /scim/v2/Users HTTP/1.1\r\nHost: {SCIM_HOST}\r\nAuthorization: Bearer {SCIM_TOKEN}\r\n\
         Content-Type: application/scim+json\r\nTransfer-Encoding: chunked\r\n\
         Expect: 100-continue\r\n\r\n"
    );
    stream.write_all(start.as_bytes()).await.unwrap();
    let go_on = read_response_head(&mut stream, Duration::from_secs(30)).await;
    assert!(go_on.starts_with("HTTP/1.1 100"), "{go_on}");
    let first = chunked(head, head.len());
    let unended = first.strip_suffix(b"0\r\n\r\n").unwrap();
    stream.write_all(unended).await.unwrap();

    let only_new = cfg.clone().scim(SCIM_HOST, &[("okta-2", NEW)]);
    px.rewrite_config(&only_new.toml());
    px.reload();
    wait_for_status(&px, &old, 401, "the removed token").await;

    stream.write_all(&chunked(rest, rest.len())).await.unwrap();
    let answer = read_response_head(&mut stream, Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let found = new
        .filter("/Users", "userName eq \"late@example.com\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 0, "{}", found.text);
    // Recorded as the token's, which was good when the request began: not as anyone's guess.
    refusal_recorded_as_okta_s(&px, "refused once its body was in").await;
}

/// Waits (bounded) until a SCIM refusal whose reason holds `why` is recorded as the token
/// `okta`'s.
async fn refusal_recorded_as_okta_s(px: &Portcullis, why: &str) {
    crate::audit::audit_json_until(px, &[], |records| {
        crate::audit::of_event(records, "refusal").iter().any(|r| {
            r["route"] == "scim"
                && r["user"] == "okta"
                && r["reason"].as_str().is_some_and(|r| r.contains(why))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_are_refused_with_413() {
    const LIMIT: usize = 4096;
    let cfg = scim_config().scim_setting("max_request_body_bytes", &LIMIT.to_string());
    let px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);

    // Just under the limit: accepted.
    let mut small = user("small@example.com");
    small["displayName"] = json!("s".repeat(LIMIT - 200));
    assert!(serde_json::to_vec(&small).unwrap().len() < LIMIT);
    scim.post("/Users", &small).await.expect(201);

    // Over it, with a Content-Length.
    let mut big = user("big@example.com");
    big["displayName"] = json!("b".repeat(LIMIT + 10));
    scim.post("/Users", &big).await.expect_error(413, None);

    // Over it, chunked (no Content-Length to refuse up front).
    let body = serde_json::to_vec(&big).unwrap();
    let mut request = format!(
        "POST /scim/v2/Users HTTP/1.1\r\nHost: {SCIM_HOST}\r\nAuthorization: Bearer {SCIM_TOKEN}\r\n\
         Content-Type: application/scim+json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(&chunked(&body, 1000));
    let resp = raw_request(cfg.http_addr(), &request)
        .await
        .unwrap_or_else(|e| panic!("chunked oversized POST: {e}; output:\n{}", px.log()));
    assert_eq!(resp.status, 413, "{}", resp.body_text());
    let error: Value = serde_json::from_slice(&resp.body).expect("a JSON error body");
    assert_eq!(error["status"], "413", "{error}");
    assert_eq!(
        error["schemas"],
        json!(["urn:ietf:params:scim:api:messages:2.0:Error"])
    );

    // Neither oversized user exists, and the server still answers.
    let found = scim
        .filter("/Users", "userName eq \"big@example.com\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 0, "{}", found.text);
    let all = scim.get("/Users").await.expect(200);
    assert_eq!(all.body["totalResults"], 1);
}

/// A body that cannot be read (a chunk whose size is no number) is the client's failure: 400,
/// not a 500 counted as Portcullis'. Nothing is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_cannot_be_read_is_refused_as_the_client_s() {
    let cfg = scim_config();
    let px = cfg.start().await;
    let request = format!(
        "POST /scim/v2/Users HTTP/1.1\r\nHost: {SCIM_HOST}\r\nAuthorization: Bearer {SCIM_TOKEN}\r\n\
         Content-Type: application/scim+json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let resp = raw_request(cfg.http_addr(), request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("malformed chunked POST: {e}; output:\n{}", px.log()));
    assert_eq!(resp.status, 400, "{}", resp.body_text());
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
    let all = scim.get("/Users").await.expect(200);
    assert_eq!(all.body["totalResults"], 0);
}

/// A client that waits for `100 Continue` before its body (.NET Framework's, Apache
/// HttpClient's, curl's for a large upload) is told to send it, and its write is done; one
/// refused is answered at once, never told to send its body first.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_that_expects_100_continue_is_told_to_go_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = scim_config().scim_setting("max_request_body_bytes", "4096");
    let px = cfg.start().await;
    let addr = cfg.http_addr();
    let body = serde_json::to_vec(&user("expecting@example.com")).unwrap();
    let body_old = serde_json::to_vec(&user("old-client@example.com")).unwrap();
    // The head of a POST of `length` bytes with `token`, and the first answer to it.
    let first_answer = |token: &'static str, length: usize| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /scim/v2/Users HTTP/1.1\r\nHost: {SCIM_HOST}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/scim+json\r\nExpect: 100-continue\r\n\
             Content-Length: {length}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let answer = read_response_head(&mut stream, Duration::from_secs(10)).await;
        (stream, answer)
    };
    let (_, refused) = first_answer("not-the-token-0123456789abcdef", body.len()).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let (_, too_large) = first_answer(SCIM_TOKEN, 5000).await;
    assert!(too_large.starts_with("HTTP/1.1 413"), "{too_large}");
    // HTTP/1.0 has no interim answers (RFC 9110 §10.1.1): the body is simply sent.
    let mut old = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /scim/v2/Users HTTP/1.0\r\nHost: {SCIM_HOST}\r\nAuthorization: Bearer {SCIM_TOKEN}\r\n\
         Content-Type: application/scim+json\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n",
        body_old.len()
    );
    old.write_all(head.as_bytes()).await.unwrap();
    old.write_all(&body_old).await.unwrap();
    let answer = read_response_head(&mut old, Duration::from_secs(30)).await;
    assert!(answer.contains(" 201 "), "HTTP/1.0: {answer}");
    let (mut stream, interim) = first_answer(SCIM_TOKEN, body.len()).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(&body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    // The 413 is audited as the token's.
    refusal_recorded_as_okta_s(&px, "larger than SCIM takes (4096 bytes)").await;
}

/// An attribute's values are bounded (1,000), however many the body has room for: the IdP is
/// told which, and the user is as it was.
#[tokio::test(flavor = "multi_thread")]
async fn an_attribute_with_more_values_than_the_bound_is_refused_and_changes_nothing() {
    let (_px, scim) = scim_server().await;
    let emails = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"value": format!("u{i}@example.com"), "type": "other"}))
            .collect()
    };
    let mut many = user("many@example.com");
    many["emails"] = json!(emails(1001));
    let e = scim
        .post("/Users", &many)
        .await
        .expect_error(400, Some("invalidValue"));
    assert!(e.text.contains("emails"), "{}", e.text);
    many["emails"] = json!(emails(1000));
    let id = scim.post("/Users", &many).await.expect(201).id();
    let path = format!("/Users/{id}");
    let add = patch_ops(
        json!([{"op": "add", "path": "emails", "value": [{"value": "one-more@example.com"}]}]),
    );
    scim.patch(&path, &add)
        .await
        .expect_error(400, Some("invalidValue"));
    let kept = scim.get(&path).await.expect(200);
    assert_eq!(kept.body["emails"].as_array().map(Vec::len), Some(1000));
    // What the IdP does next still works: a deactivation.
    let off = patch_ops(json!([{"op": "replace", "value": {"active": false}}]));
    let off = scim.patch(&path, &off).await.expect(200);
    assert_eq!(off.body["active"], false, "{}", off.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_are_accepted_and_never_returned() {
    let (px, scim) = scim_server().await;
    let secret = "Pa55word-that-must-not-leak";
    let mut body = user("pw@example.com");
    body["password"] = json!(secret);
    let created = scim.post("/Users", &body).await.expect(201);
    let id = created.id();
    let path = format!("/Users/{id}");

    let no_leak = |what: &str, text: &str| {
        assert!(
            !text.contains(secret),
            "{what} returned the password: {text}"
        );
        assert!(
            !text.to_ascii_lowercase().contains("\"password\""),
            "{what} returned a password attribute: {text}"
        );
    };
    no_leak("POST", &created.text);
    no_leak("GET", &scim.get(&path).await.expect(200).text);
    no_leak("list", &scim.get("/Users").await.expect(200).text);
    no_leak(
        "GET ?attributes=password",
        &scim
            .get_query(&path, &[("attributes", "password")])
            .await
            .expect(200)
            .text,
    );
    no_leak(
        "list ?attributes=password,userName",
        &scim
            .get_query("/Users", &[("attributes", "password,userName")])
            .await
            .expect(200)
            .text,
    );
    let search = scim
        .post(
            "/Users/.search",
            &json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                "attributes": ["password", "userName"],
                "filter": "userName eq \"pw@example.com\""
            }),
        )
        .await
        .expect(200);
    assert_eq!(search.body["totalResults"], 1, "{}", search.text);
    no_leak("POST /.search", &search.text);

    // Changed by PATCH and by PUT: accepted, still never returned.
    let patch =
        patch_ops(json!([{"op": "replace", "path": "password", "value": "N3w-secret-value"}]));
    let patched = scim.patch(&path, &patch).await.expect_success();
    no_leak("PATCH", &patched.text);
    let mut put = scim.get(&path).await.expect(200).body;
    put["password"] = json!(secret);
    no_leak("PUT", &scim.put(&path, &put).await.expect(200).text);
    no_leak("GET after PUT", &scim.get(&path).await.expect(200).text);

    // A password that is not a string is refused, however it is sent, and changes nothing:
    // never answered as done with the password left as it was.
    let version = scim.get(&path).await.expect(200).etag().map(str::to_owned);
    let unchanged = |what: &str| {
        let (scim, path, version, what) = (&scim, &path, &version, what.to_owned());
        async move {
            let now = scim.get(path).await.expect(200);
            let now = now.etag().map(str::to_owned);
            assert_eq!(&now, version, "{what} changed the user");
        }
    };
    for (what, ops) in [
        (
            "path-less, a number",
            json!([{"op": "replace", "value": {"password": 123}}]),
        ),
        (
            "path-less, null",
            json!([{"op": "replace", "value": {"password": null, "title": "x"}}]),
        ),
        (
            "with a path, null",
            json!([{"op": "replace", "path": "password", "value": null}]),
        ),
    ] {
        scim.patch(&path, &patch_ops(ops))
            .await
            .expect_error(400, Some("invalidValue"));
        unchanged(what).await;
    }
    for (what, password) in [
        ("an array", json!(["not", "a", "string"])),
        ("null", json!(null)),
    ] {
        let mut bad_put = scim.get(&path).await.expect(200).body;
        bad_put["password"] = password;
        bad_put["title"] = json!("x");
        scim.put(&path, &bad_put)
            .await
            .expect_error(400, Some("invalidValue"));
        unchanged(&format!("a PUT with {what}")).await;
    }

    // Under its full name (`urn:…:core:2.0:User:password`), as a client that qualifies every
    // attribute sends it: the same password, hashed, never kept or returned as sent.
    let qualified = format!("{USER_SCHEMA}:password");
    let mut body = user("pw2@example.com");
    body[&qualified] = json!("Qualified-POST-secret");
    let created = scim.post("/Users", &body).await.expect(201);
    let other = format!("/Users/{}", created.id());
    let mut put = created.body.clone();
    put[&qualified] = json!("Qualified-PUT-secret");
    scim.put(&other, &put).await.expect(200);
    for (op, secret) in [
        (
            json!({"op": "replace", "value": {&qualified: "Qualified-PATCH-value-secret"}}),
            "Qualified-PATCH-value-secret",
        ),
        (
            json!({"op": "replace", "path": &qualified, "value": "Qualified-PATCH-path-secret"}),
            "Qualified-PATCH-path-secret",
        ),
    ] {
        let patched = scim
            .patch(&other, &patch_ops(json!([op])))
            .await
            .expect(200);
        assert!(!patched.text.contains(secret), "{}", patched.text);
    }
    let read = scim.get(&other).await.expect(200);
    assert!(!read.text.contains("secret"), "{}", read.text);
    // Nothing Portcullis keeps holds a password as it was sent.
    let secrets = [
        secret,
        "N3w-secret-value",
        "Qualified-POST-secret",
        "Qualified-PUT-secret",
        "Qualified-PATCH-value-secret",
        "Qualified-PATCH-path-secret",
    ];
    let mut files = vec![px.dir().to_path_buf()];
    while let Some(at) = files.pop() {
        if at.is_dir() {
            files.extend(std::fs::read_dir(&at).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let bytes = std::fs::read(&at).unwrap_or_default();
        for secret in secrets {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(
                !found,
                "{} holds the password {secret:?} as sent",
                at.display()
            );
        }
    }
}

/// The current ETag of a group.
async fn etag_of(scim: &ScimClient, group: &str) -> String {
    let got = scim.get(&format!("/Groups/{group}")).await.expect(200);
    got.etag().expect("a group's ETag").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_user_removes_it_from_every_group() {
    let (_px, scim) = scim_server().await;
    let gone = scim.create_user("leaver@example.com").await.id();
    let stays = scim.create_user("stayer@example.com").await.id();
    let inner = scim.create_group("inner", &[&gone, &stays]).await.id();
    let outer = scim.create_group("outer", &[&gone, &inner]).await.id();
    let solo = scim.create_group("solo", &[&gone]).await.id();
    assert_eq!(scim.member_ids(&solo).await, vec![gone.clone()]);
    let solo_etag = etag_of(&scim, &solo).await;

    scim.delete(&format!("/Users/{gone}")).await.expect(204);
    // The groups it left have a new version: the old ETag is no longer current.
    let solo_path = format!("/Groups/{solo}");
    scim.request(
        Method::GET,
        &solo_path,
        &[],
        None,
        &[("if-none-match", &solo_etag)],
    )
    .await
    .expect(200);
    assert_ne!(etag_of(&scim, &solo).await, solo_etag);
    let rename = patch_ops(json!([{"op": "replace", "path": "displayName", "value": "x"}]));
    scim.request(
        Method::PATCH,
        &solo_path,
        &[],
        Some(&rename),
        &[("if-match", &solo_etag)],
    )
    .await
    .expect_error(412, None);
    let outer_etag = etag_of(&scim, &outer).await;
    scim.get(&format!("/Users/{gone}"))
        .await
        .expect_error(404, None);
    assert_eq!(scim.member_ids(&inner).await, vec![stays.clone()]);
    assert_eq!(scim.member_ids(&outer).await, vec![inner.clone()]);
    assert_eq!(scim.member_ids(&solo).await, Vec::<String>::new());
    // Deleting again: 404, and the userName is free for a new user.
    scim.delete(&format!("/Users/{gone}"))
        .await
        .expect_error(404, None);
    let again = scim.create_user("leaver@example.com").await.id();
    assert_ne!(again, gone);
    assert_eq!(scim.member_ids(&solo).await, Vec::<String>::new());

    // Deleting a group removes it from the groups it was in, which change version too.
    scim.delete(&format!("/Groups/{inner}")).await.expect(204);
    assert_eq!(scim.member_ids(&outer).await, Vec::<String>::new());
    assert_ne!(etag_of(&scim, &outer).await, outer_etag);
    let user = scim.get(&format!("/Users/{stays}")).await.expect(200);
    assert_eq!(user.body.get("groups"), None, "{}", user.text);
}

/// A group shows its group and agent members by name: one renamed, if only in letter case,
/// gives the groups it is in a new version, or a client holding the old ETag would be told its
/// copy, with the old name, still stands.
#[tokio::test(flavor = "multi_thread")]
async fn renaming_a_group_or_agent_member_gives_its_groups_a_new_version() {
    let (_px, scim) = scim_server().await;
    let owner = scim.create_user("renamer@example.com").await.id();
    let bot = scim.create_agent("deploy-bot", &[&owner], &[]).await.id();
    let inner = scim.create_group("inner-team", &[]).await.id();
    let outer = scim.create_group("outer-team", &[&inner, &bot]).await.id();
    for (path, name_attr, name) in [
        (format!("/Groups/{inner}"), "displayName", "Inner-Team"),
        (format!("/Agents/{bot}"), "name", "deploy-bot-2"),
    ] {
        let held = etag_of(&scim, &outer).await;
        let rename = patch_ops(json!([{"op": "replace", "path": name_attr, "value": name}]));
        scim.patch(&path, &rename).await.expect_success();
        let got = scim
            .request(
                Method::GET,
                &format!("/Groups/{outer}"),
                &[],
                None,
                &[("if-none-match", &held)],
            )
            .await
            .expect(200);
        let shown: Vec<&str> = got.body["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["display"].as_str())
            .collect();
        assert!(shown.contains(&name), "{}", got.text);
        assert_ne!(got.etag(), Some(held.as_str()), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_groups_show_direct_and_indirect_membership() {
    let (_px, scim) = scim_server().await;
    let ann = scim.create_user("nested-ann@example.com").await.id();
    let bob = scim.create_user("nested-bob@example.com").await.id();
    let team = scim.create_group("team", &[&ann]).await.id();
    let dept = scim.create_group("dept", &[&team, &bob]).await.id();
    let org = scim.create_group("org", &[&dept]).await.id();

    let dept_group = scim.get(&format!("/Groups/{dept}")).await.expect(200);
    let members = dept_group.body["members"].as_array().expect("members");
    let team_member = members
        .iter()
        .find(|m| m["value"] == team.as_str())
        .unwrap_or_else(|| panic!("team is not a member of dept: {}", dept_group.text));
    assert_eq!(team_member["type"], "Group", "{}", dept_group.text);
    let bob_member = members.iter().find(|m| m["value"] == bob.as_str()).unwrap();
    assert_eq!(bob_member["type"], "User", "{}", dept_group.text);

    let memberships = |body: &Value| -> Vec<(String, String)> {
        let mut list: Vec<(String, String)> = body
            .get("groups")
            .and_then(Value::as_array)
            .map(|groups| {
                groups
                    .iter()
                    .map(|g| {
                        (
                            g["value"].as_str().unwrap_or_default().to_owned(),
                            g["type"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        list.sort();
        list
    };
    let expected = |pairs: &[(&String, &str)]| -> Vec<(String, String)> {
        let mut list: Vec<(String, String)> = pairs
            .iter()
            .map(|(id, kind)| ((*id).clone(), (*kind).to_owned()))
            .collect();
        list.sort();
        list
    };
    let ann_user = scim.get(&format!("/Users/{ann}")).await.expect(200);
    assert_eq!(
        memberships(&ann_user.body),
        expected(&[(&team, "direct"), (&dept, "indirect"), (&org, "indirect")]),
        "{}",
        ann_user.text
    );
    let bob_user = scim.get(&format!("/Users/{bob}")).await.expect(200);
    assert_eq!(
        memberships(&bob_user.body),
        expected(&[(&dept, "direct"), (&org, "indirect")]),
        "{}",
        bob_user.text
    );

    // A cycle is refused and changes nothing.
    let cycle = patch_ops(json!([{"op": "add", "path": "members", "value": [{"value": org}]}]));
    scim.patch(&format!("/Groups/{team}"), &cycle)
        .await
        .expect_error(400, None);
    assert_eq!(scim.member_ids(&team).await, vec![ann.clone()]);

    // Taking team out of dept ends the indirect memberships through it.
    let remove =
        patch_ops(json!([{"op": "remove", "path": format!("members[value eq \"{team}\"]")}]));
    scim.patch(&format!("/Groups/{dept}"), &remove)
        .await
        .expect_success();
    let ann_user = scim.get(&format!("/Users/{ann}")).await.expect(200);
    assert_eq!(
        memberships(&ann_user.body),
        expected(&[(&team, "direct")]),
        "{}",
        ann_user.text
    );
    let bob_user = scim.get(&format!("/Users/{bob}")).await.expect(200);
    assert_eq!(
        memberships(&bob_user.body),
        expected(&[(&dept, "direct"), (&org, "indirect")]),
        "{}",
        bob_user.text
    );
}

/// A PATCH of a Group answers 204, with no body, unless it asks for attributes: an empty
/// `attributes` is none given, and renders no member list either.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_patch_renders_members_only_when_asked() {
    let (_px, scim) = scim_server().await;
    let alice = scim.create_user("alice@example.com").await.id();
    let bob = scim.create_user("bob@example.com").await.id();
    let group = scim.create_group("eng", &[&alice]).await.id();
    let add =
        |id: &str| patch_ops(json!([{"op": "add", "path": "members", "value": [{"value": id}]}]));
    for query in ["", "?attributes=", "?attributes=%20"] {
        let answer = scim
            .patch(&format!("/Groups/{group}{query}"), &add(&bob))
            .await
            .expect(204);
        assert!(answer.body.is_null(), "{query}: {}", answer.body);
    }
    let answer = scim
        .patch(&format!("/Groups/{group}?attributes=members"), &add(&bob))
        .await
        .expect(200);
    assert_eq!(answer.body["members"].as_array().map(Vec::len), Some(2));
}

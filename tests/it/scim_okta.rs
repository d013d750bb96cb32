//! Okta's SCIM 2.0 provisioning, replayed request by request as Okta really sends it (see
//! PRODUCT.md, "SCIM clients Portcullis must accept"), with the directory read back after
//! every step: by `GET /{id}` and by the `filter` lookups Okta itself makes.

use std::collections::HashSet;

use portcullis_tests::scim::{
    filter_str, patch_ops, ScimClient, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, LIST_RESPONSE_SCHEMA,
    USER_SCHEMA,
};
use reqwest::Method;
use serde_json::{json, Value};

use crate::scim_server;

/// The media type of Okta's SCIM requests with a body.
const OKTA_TYPE: &str = "application/scim+json; charset=utf-8";

/// Okta's lookup before a create: `filter=userName eq "…"&startIndex=1&count=100`, encoded as
/// Okta encodes it (`%20` for a space, not `+`).
async fn okta_lookup(scim: &ScimClient, user_name: &str) -> Value {
    let filter = format!("userName eq {}", filter_str(user_name));
    // (`+` in the name is `%2B` here: every `+` left is a space.)
    let filter: String = url::form_urlencoded::byte_serialize(filter.as_bytes()).collect();
    let query = format!(
        "filter={}&startIndex=1&count=100",
        filter.replace('+', "%20")
    );
    let resp = scim
        .request(Method::GET, &format!("/Users?{query}"), &[], None, &[])
        .await
        .expect(200);
    assert_eq!(
        resp.body["schemas"],
        json!([LIST_RESPONSE_SCHEMA]),
        "{}",
        resp.text
    );
    for key in ["totalResults", "startIndex", "itemsPerPage"] {
        assert!(
            resp.body[key].is_u64(),
            "{key} must be an integer: {}",
            resp.text
        );
    }
    assert_eq!(resp.body["startIndex"], 1, "{}", resp.text);
    assert!(resp.body["Resources"].is_array(), "{}", resp.text);
    resp.body
}

/// The one user a lookup finds (panics unless exactly one).
async fn lookup_one(scim: &ScimClient, user_name: &str) -> Value {
    let found = okta_lookup(scim, user_name).await;
    assert_eq!(found["totalResults"], 1, "lookup of {user_name}: {found}");
    assert_eq!(found["itemsPerPage"], 1, "lookup of {user_name}: {found}");
    found["Resources"][0].clone()
}

pub(crate) fn okta_user(user_name: &str, given: &str, family: &str) -> Value {
    json!({
        "schemas": [USER_SCHEMA],
        "userName": user_name,
        "name": {"givenName": given, "familyName": family},
        "emails": [{"primary": true, "value": user_name, "type": "work"}],
        "displayName": format!("{given} {family}"),
        "locale": "en-US",
        "externalId": format!("00u{}", user_name.len()),
        "groups": [],
        "password": "1mz050nq-okta-initial",
        "active": true
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn okta_user_lifecycle() {
    let (_px, scim) = scim_server().await;
    let name = "isabella@example.com";

    // 1. Lookup before create: an empty ListResponse with integers and `Resources: []`.
    let empty = okta_lookup(&scim, name).await;
    assert_eq!(empty["totalResults"], 0, "{empty}");
    assert_eq!(empty["itemsPerPage"], 0, "{empty}");
    assert_eq!(empty["Resources"], json!([]), "{empty}");

    // 2. Create: 201 with Location and ETag matching `meta`.
    let create = okta_user(name, "Isabella", "Moore");
    let typed = [("content-type", OKTA_TYPE)];
    let created = scim
        .request(Method::POST, "/Users", &[], Some(&create), &typed)
        .await
        .expect(201);
    let id = created.id();
    let body = &created.body;
    let location = created.header("location").expect("Location on 201");
    assert_eq!(location, format!("{}/Users/{id}", scim.base()));
    assert_eq!(body["meta"]["location"], location, "{}", created.text);
    assert_eq!(body["meta"]["resourceType"], "User", "{}", created.text);
    assert!(body["meta"]["created"].is_string(), "{}", created.text);
    assert!(body["meta"]["lastModified"].is_string(), "{}", created.text);
    let etag = created.etag().expect("ETag on 201").to_owned();
    assert_eq!(body["meta"]["version"], etag.as_str(), "{}", created.text);
    assert_eq!(body["userName"], name);
    assert_eq!(body["active"], true);
    assert_eq!(
        body.get("password"),
        None,
        "password returned: {}",
        created.text
    );

    // 3. The lookup now finds exactly that user, and by any case of its userName.
    let found = lookup_one(&scim, name).await;
    assert_eq!(found["id"], id.as_str());
    assert_eq!(found["name"]["familyName"], "Moore");
    let found = lookup_one(&scim, "ISABELLA@Example.COM").await;
    assert_eq!(
        found["id"],
        id.as_str(),
        "userName matching is case-insensitive"
    );

    // 4. Okta re-POSTs a user it thinks is new, in another case: 409 uniqueness, no change.
    let again = scim
        .post(
            "/Users",
            &okta_user("Isabella@EXAMPLE.com", "Other", "Person"),
        )
        .await;
    again.expect_error(409, Some("uniqueness"));
    let found = lookup_one(&scim, name).await;
    assert_eq!(found["id"], id.as_str());
    assert_eq!(
        found["name"]["givenName"], "Isabella",
        "the 409 changed the user"
    );
    let all = scim.get("/Users").await.expect(200);
    assert_eq!(all.body["totalResults"], 1, "{}", all.text);

    // 5. GET by id.
    let got = scim.get(&format!("/Users/{id}")).await.expect(200);
    assert_eq!(got.body["userName"], name);
    assert_eq!(got.etag(), Some(etag.as_str()));

    // 6. Profile update: GET + full PUT of the changed profile.
    let mut profile = got.body.clone();
    profile["name"] = json!({"givenName": "Isabella", "familyName": "Moore-Smith"});
    profile["displayName"] = json!("Isabella Moore-Smith");
    profile["title"] = json!("Staff Engineer");
    profile["emails"] = json!([
        {"primary": true, "value": name, "type": "work"},
        {"value": "bella@home.example", "type": "home"}
    ]);
    profile[ENTERPRISE_USER_SCHEMA] = json!({"department": "Platform"});
    profile["schemas"] = json!([USER_SCHEMA, ENTERPRISE_USER_SCHEMA]);
    let put = scim
        .put(&format!("/Users/{id}"), &profile)
        .await
        .expect(200);
    let new_etag = put.etag().expect("ETag on PUT").to_owned();
    assert_ne!(new_etag, etag, "a PUT that changed the user kept its ETag");
    let got = scim.get(&format!("/Users/{id}")).await.expect(200);
    assert_eq!(got.body["id"], id.as_str());
    assert_eq!(
        got.body["name"]["familyName"], "Moore-Smith",
        "{}",
        got.text
    );
    assert_eq!(got.body["displayName"], "Isabella Moore-Smith");
    assert_eq!(got.body["title"], "Staff Engineer");
    assert_eq!(
        got.body["emails"].as_array().map(Vec::len),
        Some(2),
        "{}",
        got.text
    );
    assert_eq!(
        got.body[ENTERPRISE_USER_SCHEMA]["department"], "Platform",
        "{}",
        got.text
    );
    assert_eq!(got.body["meta"]["created"], created.body["meta"]["created"]);
    assert_eq!(got.etag(), Some(new_etag.as_str()));
    assert_eq!(got.body["active"], true);
    let found = lookup_one(&scim, name).await;
    assert_eq!(found["name"]["familyName"], "Moore-Smith");

    // 7. Deactivation: a path-less replace of `active` (Okta never deletes users).
    let deactivate = patch_ops(json!([{"op": "replace", "value": {"active": false}}]));
    let patched = scim
        .patch(&format!("/Users/{id}"), &deactivate)
        .await
        .expect(200);
    assert_eq!(patched.body["active"], false, "{}", patched.text);
    let got = scim.get(&format!("/Users/{id}")).await.expect(200);
    assert_eq!(got.body["active"], false, "{}", got.text);
    assert_eq!(
        got.body["name"]["familyName"], "Moore-Smith",
        "the PATCH lost data"
    );
    assert_eq!(got.body["title"], "Staff Engineer", "the PATCH lost data");
    let inactive = scim.filter("/Users", "active eq false").await.expect(200);
    assert_eq!(inactive.body["totalResults"], 1, "{}", inactive.text);
    assert_eq!(inactive.body["Resources"][0]["id"], id.as_str());
    let active = scim.filter("/Users", "active eq true").await.expect(200);
    assert_eq!(active.body["totalResults"], 0, "{}", active.text);
    assert_eq!(lookup_one(&scim, name).await["active"], false);

    // Reactivation, the same way.
    let reactivate = patch_ops(json!([{"op": "replace", "value": {"active": true}}]));
    scim.patch(&format!("/Users/{id}"), &reactivate)
        .await
        .expect(200);
    let got = scim.get(&format!("/Users/{id}")).await.expect(200);
    assert_eq!(got.body["active"], true, "{}", got.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn okta_group_push() {
    let (_px, scim) = scim_server().await;
    let mut users = Vec::new();
    for name in ["ann@example.com", "bob@example.com", "cid@example.com"] {
        users.push(scim.create_user(name).await.id());
    }
    let (ann, bob, cid) = (&users[0], &users[1], &users[2]);

    // Okta creates the group empty, then pushes members by PATCH.
    let created = scim
        .post(
            "/Groups",
            &json!({"schemas": [GROUP_SCHEMA], "displayName": "Engineering", "members": []}),
        )
        .await
        .expect(201);
    let gid = created.id();
    let group_path = format!("/Groups/{gid}");
    assert!(created.header("location").is_some(), "Location on 201");
    assert!(created.etag().is_some(), "ETag on 201");
    assert_eq!(scim.member_ids(&gid).await, Vec::<String>::new());
    let found = scim
        .filter("/Groups", "displayName eq \"Engineering\"")
        .await
        .expect(200);
    assert_eq!(found.body["totalResults"], 1, "{}", found.text);

    // Rename: a path-less replace whose value carries the group's own (read-only) id.
    let rename = patch_ops(json!([{
        "op": "replace",
        "value": {"id": gid, "displayName": "Engineering Team"}
    }]));
    scim.patch(&group_path, &rename).await.expect_success();
    let got = scim.get(&group_path).await.expect(200);
    assert_eq!(got.body["displayName"], "Engineering Team", "{}", got.text);
    assert_eq!(got.body["id"], gid.as_str());
    let old = scim
        .filter("/Groups", "displayName eq \"Engineering\"")
        .await
        .expect(200);
    assert_eq!(
        old.body["totalResults"], 0,
        "old name still found: {}",
        old.text
    );
    let new = scim
        .filter("/Groups", "displayName eq \"Engineering Team\"")
        .await
        .expect(200);
    assert_eq!(new.body["totalResults"], 1, "{}", new.text);
    assert_eq!(new.body["Resources"][0]["id"], gid.as_str());

    // Push members: add with `path: members`.
    let add = patch_ops(json!([{
        "op": "add",
        "path": "members",
        "value": [
            {"value": ann, "display": "ann@example.com"},
            {"value": bob, "display": "bob@example.com"}
        ]
    }]));
    scim.patch(&group_path, &add).await.expect_success();
    assert_eq!(scim.member_ids(&gid).await, sorted(&[ann, bob]));

    // A member's profile pushed as Okta sends it: its PUT carries `groups: []`, a password and
    // `active`, and leaves his groups as they are.
    let mut profile = okta_user("bob@example.com", "Bob", "Builder");
    profile["id"] = json!(bob);
    let typed = [("content-type", OKTA_TYPE)];
    scim.request(
        Method::PUT,
        &format!("/Users/{bob}"),
        &[],
        Some(&profile),
        &typed,
    )
    .await
    .expect(200);
    assert_eq!(scim.member_ids(&gid).await, sorted(&[ann, bob]));
    assert_eq!(group_ids_of(&scim, bob).await, vec![gid.clone()]);

    // Okta's membership change: remove by `members[value eq "…"]`, add by `members`.
    let change = patch_ops(json!([
        {"op": "remove", "path": format!("members[value eq \"{ann}\"]")},
        {"op": "add", "path": "members", "value": [{"value": cid, "display": "cid@example.com"}]}
    ]));
    scim.patch(&group_path, &change).await.expect_success();
    assert_eq!(scim.member_ids(&gid).await, sorted(&[bob, cid]));
    // The users see it from their side too.
    assert_eq!(group_ids_of(&scim, ann).await, Vec::<String>::new());
    assert_eq!(group_ids_of(&scim, bob).await, vec![gid.clone()]);
    assert_eq!(group_ids_of(&scim, cid).await, vec![gid.clone()]);

    // A retried remove of someone no longer there succeeds and changes nothing.
    let retry = patch_ops(json!([
        {"op": "remove", "path": format!("members[value eq \"{ann}\"]")}
    ]));
    scim.patch(&group_path, &retry).await.expect_success();
    assert_eq!(scim.member_ids(&gid).await, sorted(&[bob, cid]));

    // Sometimes Okta replaces the whole list.
    let replace = patch_ops(json!([{
        "op": "replace",
        "path": "members",
        "value": [{"value": ann}, {"value": cid}]
    }]));
    scim.patch(&group_path, &replace).await.expect_success();
    assert_eq!(scim.member_ids(&gid).await, sorted(&[ann, cid]));
    assert_eq!(group_ids_of(&scim, bob).await, Vec::<String>::new());

    let empty = patch_ops(json!([{"op": "replace", "path": "members", "value": []}]));
    scim.patch(&group_path, &empty).await.expect_success();
    assert_eq!(scim.member_ids(&gid).await, Vec::<String>::new());
    assert_eq!(
        scim.get(&group_path).await.body["displayName"],
        "Engineering Team"
    );

    // Or pushes the group whole, its members listed, by PUT.
    let whole = json!({
        "schemas": [GROUP_SCHEMA],
        "id": gid,
        "displayName": "Engineering Team",
        "members": [{"value": bob, "display": "bob@example.com"}]
    });
    scim.request(Method::PUT, &group_path, &[], Some(&whole), &typed)
        .await
        .expect(200);
    assert_eq!(scim.member_ids(&gid).await, vec![bob.clone()]);
    assert_eq!(group_ids_of(&scim, bob).await, vec![gid.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn okta_import_pages_are_integers_disjoint_complete_and_stable() {
    const USERS: usize = 250;
    let (_px, scim) = scim_server().await;
    // Something the import filter must leave out.
    scim.create_user("not-imported@example.com").await;

    let mut tasks = Vec::new();
    for worker in 0..8 {
        let scim = scim.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (worker..USERS).step_by(8) {
                let name = format!("import-{i:03}@example.com");
                ids.push(scim.create_user(&name).await.id());
            }
            ids
        }));
    }
    let mut created = HashSet::new();
    for task in tasks {
        created.extend(task.await.unwrap());
    }
    assert_eq!(created.len(), USERS);

    let filter = "userName sw \"import-\"";
    let first = import_pass(&scim, filter, USERS).await;
    let first_set: HashSet<String> = first.iter().cloned().collect();
    assert_eq!(
        first.len(),
        USERS,
        "pages overlap: {} ids, {} distinct",
        first.len(),
        first_set.len()
    );
    assert_eq!(
        first_set, created,
        "the pages do not cover exactly the created users"
    );

    // A change in the middle of the directory (Okta imports while users change) must not move
    // anything between pages.
    let middle = &first[USERS / 2];
    scim.patch(
        &format!("/Users/{middle}"),
        &patch_ops(json!([{"op": "replace", "value": {"displayName": "Changed Meanwhile"}}])),
    )
    .await
    .expect(200);
    let second = import_pass(&scim, filter, USERS).await;
    assert_eq!(first, second, "page order changed between two passes");

    // Unfiltered, the extra user is there too, and a page past the end is empty.
    let all = scim
        .get_query("/Users", &[("startIndex", "1"), ("count", "100")])
        .await
        .expect(200);
    assert_eq!(all.body["totalResults"], USERS + 1, "{}", all.text);
    let past = scim
        .get_query("/Users", &[("startIndex", "1000"), ("count", "100")])
        .await
        .expect(200);
    assert_eq!(past.body["totalResults"], USERS + 1);
    assert_eq!(past.body["itemsPerPage"], 0);
    assert_eq!(past.body["startIndex"], 1000);
    assert_eq!(past.body["Resources"], json!([]));
}

/// Pages through `/Users?filter=…` with `count=100` as Okta imports, checking each page's
/// numbers; returns the ids in page order.
async fn import_pass(scim: &ScimClient, filter: &str, expected_total: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut start = 1usize;
    for _ in 0..=(expected_total / 100 + 1) {
        let start_text = start.to_string();
        let page = scim
            .get_query(
                "/Users",
                &[
                    ("filter", filter),
                    ("startIndex", &start_text),
                    ("count", "100"),
                ],
            )
            .await
            .expect(200);
        let body = &page.body;
        assert_eq!(body["totalResults"], json!(expected_total), "{}", page.text);
        assert_eq!(body["startIndex"], json!(start), "{}", page.text);
        let resources = page.resources();
        let expected_items = expected_total.saturating_sub(start - 1).min(100);
        assert_eq!(body["itemsPerPage"], json!(expected_items), "{}", page.text);
        assert_eq!(resources.len(), expected_items);
        ids.extend(
            resources
                .iter()
                .map(|r| r["id"].as_str().expect("id").to_owned()),
        );
        start += 100;
        if start > expected_total {
            break;
        }
    }
    ids
}

/// The ids of the groups a User's `groups` attribute lists, sorted.
async fn group_ids_of(scim: &ScimClient, user_id: &str) -> Vec<String> {
    let user = scim.get(&format!("/Users/{user_id}")).await.expect(200);
    let mut ids: Vec<String> = user
        .body
        .get("groups")
        .and_then(Value::as_array)
        .map(|groups| {
            groups
                .iter()
                .map(|g| g["value"].as_str().expect("group value").to_owned())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn sorted(ids: &[&String]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|s| (*s).clone()).collect();
    ids.sort();
    ids
}

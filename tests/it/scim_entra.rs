//! Microsoft Entra ID's SCIM 2.0 provisioning, replayed as Entra really sends it (see
//! PRODUCT.md): capitalised operation names, booleans as strings, path-less replaces with
//! dotted and extension-URN keys, its member-removal form, `"$ref": null`, groups read
//! without members, and its lookups. The directory is read back after every step.

use portcullis_tests::scim::{
    filter_str, patch_ops, ScimClient, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, USER_SCHEMA,
};
use serde_json::{json, Value};

use crate::scim_server;

const EXTERNAL_ID: &str = "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159";

pub(crate) fn entra_user(user_name: &str, external_id: &str) -> Value {
    json!({
        "schemas": [USER_SCHEMA, ENTERPRISE_USER_SCHEMA],
        "externalId": external_id,
        "userName": user_name,
        "active": "True",
        "displayName": "Ryan Leenay",
        "meta": {"resourceType": "User"},
        "name": {"formatted": "Ryan Leenay", "familyName": "Leenay", "givenName": "Ryan"},
        ENTERPRISE_USER_SCHEMA: {"employeeNumber": "1001"}
    })
}

/// The ids `filter` finds among Users, in order.
async fn found_ids(scim: &ScimClient, filter: &str) -> Vec<String> {
    let resp = scim.filter("/Users", filter).await.expect(200);
    resp.resources()
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_user_provisioning() {
    let (_px, scim) = scim_server().await;
    let name = "Test_User_00aa00aa@contoso.com";

    // Entra's lookup by externalId before create.
    let by_external = format!("externalId eq {}", filter_str(EXTERNAL_ID));
    assert_eq!(found_ids(&scim, &by_external).await, Vec::<String>::new());

    let created = scim
        .post("/Users", &entra_user(name, EXTERNAL_ID))
        .await
        .expect(201);
    let id = created.id();
    let path = format!("/Users/{id}");
    assert_eq!(
        created.body["active"], true,
        "string boolean: {}",
        created.text
    );
    assert_eq!(found_ids(&scim, &by_external).await, vec![id.clone()]);
    // externalId is case-exact.
    let other_case = format!("externalId eq {}", filter_str(&EXTERNAL_ID.to_uppercase()));
    assert_eq!(found_ids(&scim, &other_case).await, Vec::<String>::new());

    // Deactivate: capitalised op, string boolean.
    let deactivate = patch_ops(json!([{"op": "Replace", "path": "active", "value": "False"}]));
    scim.patch(&path, &deactivate).await.expect_success();
    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.body["active"], false, "{}", got.text);

    // A path-less Replace with dotted keys, an extension-URN key and a string boolean.
    let update = patch_ops(json!([{
        "op": "Replace",
        "value": {
            "name.givenName": "Bryan",
            "name.familyName": "Leenay-Smith",
            "displayName": "Bryan Leenay-Smith",
            "active": "true",
            (format!("{ENTERPRISE_USER_SCHEMA}:department")): "Research",
            (format!("{ENTERPRISE_USER_SCHEMA}:costCenter")): "4130"
        }
    }]));
    scim.patch(&path, &update).await.expect_success();
    let got = scim.get(&path).await.expect(200);
    let user = &got.body;
    assert_eq!(user["name"]["givenName"], "Bryan", "{}", got.text);
    assert_eq!(user["name"]["familyName"], "Leenay-Smith", "{}", got.text);
    assert_eq!(
        user["name"]["formatted"], "Ryan Leenay",
        "dotted keys replaced all of name"
    );
    assert_eq!(user["displayName"], "Bryan Leenay-Smith");
    assert_eq!(user["active"], true, "string boolean: {}", got.text);
    let enterprise = &user[ENTERPRISE_USER_SCHEMA];
    assert_eq!(enterprise["department"], "Research", "{}", got.text);
    assert_eq!(enterprise["costCenter"], "4130", "{}", got.text);
    assert_eq!(
        enterprise["employeeNumber"], "1001",
        "the replace lost a sibling"
    );
    assert!(
        user["schemas"]
            .as_array()
            .is_some_and(|s| s.contains(&json!(ENTERPRISE_USER_SCHEMA))),
        "{}",
        got.text
    );
    assert_eq!(
        user.get("department"),
        None,
        "the URN key landed in the core schema"
    );
    // The extension attribute is filterable.
    let by_dept = format!("{ENTERPRISE_USER_SCHEMA}:department eq \"Research\"");
    assert_eq!(found_ids(&scim, &by_dept).await, vec![id.clone()]);

    // A filtered replace on an email the user does not have yet is an add.
    assert_eq!(user.get("emails"), None, "{}", got.text);
    let email = patch_ops(json!([{
        "op": "Replace",
        "path": "emails[type eq \"work\"].value",
        "value": "ryan@contoso.com"
    }]));
    scim.patch(&path, &email).await.expect_success();
    let got = scim.get(&path).await.expect(200);
    assert_eq!(
        got.body["emails"],
        json!([{"type": "work", "value": "ryan@contoso.com"}]),
        "{}",
        got.text
    );
    // A second one replaces it in place rather than adding another.
    let email = patch_ops(json!([{
        "op": "Replace",
        "path": "emails[type eq \"work\"].value",
        "value": "bryan@contoso.com"
    }]));
    scim.patch(&path, &email).await.expect_success();
    let got = scim.get(&path).await.expect(200);
    assert_eq!(
        got.body["emails"],
        json!([{"type": "work", "value": "bryan@contoso.com"}]),
        "{}",
        got.text
    );

    // Entra's lookups: by work email, and combined with externalId by `and`.
    let by_email = "emails[type eq \"work\"].value eq \"bryan@contoso.com\"";
    assert_eq!(found_ids(&scim, by_email).await, vec![id.clone()]);
    let old_email = "emails[type eq \"work\"].value eq \"ryan@contoso.com\"";
    assert_eq!(found_ids(&scim, old_email).await, Vec::<String>::new());
    let home = "emails[type eq \"home\"].value eq \"bryan@contoso.com\"";
    assert_eq!(found_ids(&scim, home).await, Vec::<String>::new());
    let both = format!("{by_external} and {by_email}");
    assert_eq!(found_ids(&scim, &both).await, vec![id.clone()]);
    let mismatch = format!("externalId eq \"someone-else\" and {by_email}");
    assert_eq!(found_ids(&scim, &mismatch).await, Vec::<String>::new());

    // Another user, so a filter that matched everything would show.
    let other = scim
        .post(
            "/Users",
            &entra_user("other@contoso.com", "other-external-id"),
        )
        .await
        .expect(201)
        .id();
    assert_eq!(found_ids(&scim, &both).await, vec![id.clone()]);
    assert_eq!(
        found_ids(&scim, "externalId eq \"other-external-id\"").await,
        vec![other]
    );

    // Capitalised Add and Remove on single attributes.
    let ops = patch_ops(json!([
        {"op": "Add", "path": "title", "value": "Researcher"},
        {"op": "Remove", "path": "nickName"},
        {"op": "Add", "path": "nickName", "value": "Bry"}
    ]));
    scim.patch(&path, &ops).await.expect_success();
    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.body["title"], "Researcher", "{}", got.text);
    assert_eq!(got.body["nickName"], "Bry", "{}", got.text);
    let ops = patch_ops(json!([{"op": "Remove", "path": "nickName"}]));
    scim.patch(&path, &ops).await.expect_success();
    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.body.get("nickName"), None, "{}", got.text);
    assert_eq!(got.body["title"], "Researcher");
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_group_provisioning() {
    let (_px, scim) = scim_server().await;
    let mut users = Vec::new();
    for i in 0..4 {
        let name = format!("user{i}@contoso.com");
        users.push(
            scim.post("/Users", &entra_user(&name, &format!("ext-{i}")))
                .await
                .expect(201)
                .id(),
        );
    }

    // Entra's create, as Microsoft's SCIM endpoint guide shows it: with its own group schema
    // URN beside the core one, a marker that carries no attribute.
    let created = scim
        .post(
            "/Groups",
            &json!({
                "schemas": [
                    GROUP_SCHEMA,
                    "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"
                ],
                "externalId": "8aa1a0c0-group",
                "displayName": "Group1DisplayName",
                "meta": {"resourceType": "Group"},
                "members": []
            }),
        )
        .await
        .expect(201);
    assert_eq!(
        created.body["schemas"],
        json!([GROUP_SCHEMA]),
        "{}",
        created.text
    );
    let gid = created.id();
    let path = format!("/Groups/{gid}");

    // Entra's lookup: by displayName, without members.
    let lookup = scim
        .get_query(
            "/Groups",
            &[
                ("filter", "displayName eq \"Group1DisplayName\""),
                ("excludedAttributes", "members"),
            ],
        )
        .await
        .expect(200);
    assert_eq!(lookup.body["totalResults"], 1, "{}", lookup.text);
    assert_eq!(lookup.body["Resources"][0]["id"], gid.as_str());
    assert_eq!(
        lookup.body["Resources"][0].get("members"),
        None,
        "{}",
        lookup.text
    );

    // Add members with `"$ref": null`, capitalised op.
    let add = patch_ops(json!([{
        "op": "Add",
        "path": "members",
        "value": users.iter().map(|u| json!({"$ref": null, "value": u})).collect::<Vec<_>>()
    }]));
    scim.patch(&path, &add).await.expect_success();
    assert_eq!(scim.member_ids(&gid).await, sorted(&users));

    // Entra's removal: path `members` and a value list; only those go.
    let remove = patch_ops(json!([{
        "op": "Remove",
        "path": "members",
        "value": [{"value": users[1]}, {"value": users[3]}]
    }]));
    scim.patch(&path, &remove).await.expect_success();
    assert_eq!(
        scim.member_ids(&gid).await,
        sorted(&[users[0].clone(), users[2].clone()])
    );

    // The same removal again (Entra retries) changes nothing and succeeds.
    scim.patch(&path, &remove).await.expect_success();
    assert_eq!(
        scim.member_ids(&gid).await,
        sorted(&[users[0].clone(), users[2].clone()])
    );

    // Members and a rename in one request, `$ref: null` again.
    let both = patch_ops(json!([
        {"op": "Replace", "path": "displayName", "value": "Group1Renamed"},
        {"op": "Add", "path": "members", "value": [{"$ref": null, "value": users[3]}]}
    ]));
    scim.patch(&path, &both).await.expect_success();
    assert_eq!(
        scim.member_ids(&gid).await,
        sorted(&[users[0].clone(), users[2].clone(), users[3].clone()])
    );

    // GET with excludedAttributes=members: everything but the members.
    let got = scim
        .get_query(&path, &[("excludedAttributes", "members")])
        .await
        .expect(200);
    assert_eq!(got.body.get("members"), None, "{}", got.text);
    assert_eq!(got.body["displayName"], "Group1Renamed", "{}", got.text);
    assert_eq!(got.body["externalId"], "8aa1a0c0-group", "{}", got.text);
    assert_eq!(got.body["id"], gid.as_str());
    assert!(got.body["meta"].is_object(), "{}", got.text);
    let full = scim.get(&path).await.expect(200);
    assert_eq!(full.body["members"].as_array().map(Vec::len), Some(3));

    // displayName is unique: a second group by the same name is 409 uniqueness, and so is
    // renaming another group to it.
    let dup = scim
        .post(
            "/Groups",
            &json!({"schemas": [GROUP_SCHEMA], "displayName": "Group1Renamed"}),
        )
        .await;
    dup.expect_error(409, Some("uniqueness"));
    let second = scim.create_group("Group2", &[]).await.id();
    let rename = patch_ops(json!([
        {"op": "Replace", "path": "displayName", "value": "Group1Renamed"}
    ]));
    scim.patch(&format!("/Groups/{second}"), &rename)
        .await
        .expect_error(409, Some("uniqueness"));
    let groups = scim.get("/Groups").await.expect(200);
    assert_eq!(groups.body["totalResults"], 2, "{}", groups.text);
    let second_now = scim.get(&format!("/Groups/{second}")).await.expect(200);
    assert_eq!(second_now.body["displayName"], "Group2");
    // The old name is free again after the rename.
    scim.create_group("Group1DisplayName", &[]).await;
}

fn sorted(ids: &[String]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

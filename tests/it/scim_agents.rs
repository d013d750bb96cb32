//! Agents and AgenticApplications (draft-abbey-scim-agent-extension-00) over SCIM, provisioned
//! the way an IdP provisions Users: discovery, CRUD, filters, sorting and paging, projections,
//! ETags, PATCH in Okta's and Entra's forms, Bulk, and agents as members of Groups.

use portcullis_tests::scim::{
    agent, agentic_application, filter_str, patch_ops, AGENTIC_APPLICATION_SCHEMA, AGENT_SCHEMA,
    BULK_REQUEST_SCHEMA, GROUP_SCHEMA, PORTCULLIS_AGENT_SCHEMA,
};
use portcullis_tests::ScimClient;
use serde_json::{json, Value};

use crate::scim_protocol::attribute;
use crate::scim_server;

/// The ids a filtered listing of `path` finds.
async fn found(scim: &ScimClient, path: &str, filter: &str) -> Vec<String> {
    let resp = scim.filter(path, filter).await.expect(200);
    resp.resources()
        .iter()
        .map(|r| r["id"].as_str().expect("an id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_and_their_applications_are_provisioned_like_users() {
    let (_px, scim) = scim_server().await;

    // Discovery: both resource types, the drafts' read-only links, and the extension an IdP
    // writes them through.
    let agent_type = scim.get("/ResourceTypes/Agent").await.expect(200);
    assert_eq!(agent_type.body["endpoint"], "/Agents");
    assert_eq!(agent_type.body["schema"], AGENT_SCHEMA);
    assert_eq!(
        agent_type.body["schemaExtensions"],
        json!([{"schema": PORTCULLIS_AGENT_SCHEMA, "required": false}]),
    );
    let application_type = scim.get("/ResourceTypes/AgenticApplication").await;
    let application_type = application_type.expect(200);
    assert_eq!(application_type.body["endpoint"], "/AgenticApplications");
    let schema = scim.get(&format!("/Schemas/{AGENT_SCHEMA}")).await;
    let schema = schema.expect(200).body;
    assert_eq!(attribute(&schema, "name")["uniqueness"], "server");
    assert_eq!(attribute(&schema, "owners")["mutability"], "readOnly");
    let extension = scim
        .get(&format!("/Schemas/{PORTCULLIS_AGENT_SCHEMA}"))
        .await;
    let extension = extension.expect(200).body;
    assert_eq!(attribute(&extension, "owners")["mutability"], "readWrite");
    assert_eq!(attribute(&extension, "expires")["type"], "dateTime");

    let alice = scim.create_user("alice@example.com").await.id();
    let application = scim
        .post("/AgenticApplications", &agentic_application("Helpdesk"))
        .await
        .expect(201);
    let app = application.id();
    assert_eq!(
        application.body["schemas"],
        json!([AGENTIC_APPLICATION_SCHEMA])
    );
    let created = scim.create_agent("helpdesk-bot", &[&alice], &[&app]).await;
    let id = created.id();
    let base = scim.base().to_owned();
    assert_eq!(
        created.header("location"),
        Some(format!("{base}/Agents/{id}").as_str())
    );
    assert!(created.etag().is_some(), "{}", created.text);
    assert_eq!(created.body["meta"]["resourceType"], "Agent");
    // The draft's read-only `owners` and `applications` show what the extension set.
    assert_eq!(
        created.body["owners"],
        json!([{"value": alice, "$ref": format!("{base}/Users/{alice}")}]),
        "{}",
        created.text
    );
    assert_eq!(
        created.body["applications"][0]["$ref"],
        format!("{base}/AgenticApplications/{app}")
    );
    assert_eq!(
        created.body[PORTCULLIS_AGENT_SCHEMA]["owners"][0]["value"],
        alice.as_str()
    );

    // `name` is unique among agents, case-insensitively.
    scim.post("/Agents", &agent("HELPDESK-BOT", &[&alice], &[]))
        .await
        .expect_error(409, Some("uniqueness"));

    // The lookups an IdP makes before a create.
    let by_name = format!("name eq {}", filter_str("Helpdesk-Bot"));
    assert_eq!(found(&scim, "/Agents", &by_name).await, [id.as_str()]);
    let by_external_id = "externalId eq \"client-helpdesk-bot\"";
    assert_eq!(found(&scim, "/Agents", by_external_id).await, [id.as_str()]);
    let by_app_name = "name eq \"helpdesk\"";
    assert_eq!(
        found(&scim, "/AgenticApplications", by_app_name).await,
        [app.as_str()]
    );
    // The agents a person owns, by the attribute GET shows them in, or its extension's.
    for owned_by in [
        format!("owners.value eq \"{alice}\""),
        format!("owners[value eq \"{alice}\"]"),
        format!("{PORTCULLIS_AGENT_SCHEMA}:owners.value eq \"{alice}\""),
        format!("applications.value eq \"{app}\""),
    ] {
        assert_eq!(
            found(&scim, "/Agents", &owned_by).await,
            [id.as_str()],
            "{owned_by}"
        );
    }

    // Sorting, paging and projections.
    for name in ["b-agent", "c-agent", "a-agent"] {
        scim.create_agent(name, &[&alice], &[]).await;
    }
    let page = scim
        .get_query(
            "/Agents",
            &[
                ("sortBy", "name"),
                ("sortOrder", "descending"),
                ("startIndex", "2"),
                ("count", "2"),
                ("attributes", "name"),
            ],
        )
        .await
        .expect(200);
    assert_eq!(page.body["totalResults"], 4, "{}", page.text);
    let names: Vec<Value> = page.resources().iter().map(|r| r["name"].clone()).collect();
    assert_eq!(names, [json!("c-agent"), json!("b-agent")], "{}", page.text);
    assert!(page.resources()[0].get("active").is_none(), "{}", page.text);

    // PATCH as Okta sends it (no path, the value an object) and as Entra does (capitalized
    // ops, string booleans, the extension attribute by its URN).
    let path = format!("/Agents/{id}");
    let okta = patch_ops(json!([{"op": "replace", "value": {"active": false}}]));
    let patched = scim.patch(&path, &okta).await.expect(200);
    assert_eq!(patched.body["active"], false, "{}", patched.text);
    let entra = patch_ops(json!([
        {"op": "Replace", "path": "active", "value": "True"},
        {"op": "Add", "path": format!("{PORTCULLIS_AGENT_SCHEMA}:expires"),
         "value": "2030-01-01T00:00:00Z"},
    ]));
    let patched = scim.patch(&path, &entra).await.expect(200);
    assert_eq!(patched.body["active"], true, "{}", patched.text);
    assert_eq!(
        patched.body[PORTCULLIS_AGENT_SCHEMA]["expires"],
        "2030-01-01T00:00:00Z"
    );
    let not_a_time = patch_ops(json!([
        {"op": "replace", "path": format!("{PORTCULLIS_AGENT_SCHEMA}:expires"), "value": "soon"},
    ]));
    scim.patch(&path, &not_a_time)
        .await
        .expect_error(400, Some("invalidValue"));

    // ETags guard writes; PUT replaces the whole agent and keeps its id.
    let stale = created.etag().expect("an etag").to_owned();
    let resp = scim
        .request(
            reqwest::Method::PUT,
            &path,
            &[],
            Some(&agent("helpdesk-bot", &[&alice], &[])),
            &[("If-Match", &stale)],
        )
        .await;
    resp.expect_error(412, None);
    let mut replacement = agent("helpdesk-bot", &[&alice], &[]);
    replacement["description"] = json!("answers tickets");
    let replaced = scim.put(&path, &replacement).await.expect(200);
    assert_eq!(replaced.id(), id);
    assert_eq!(replaced.body["description"], "answers tickets");
    assert!(
        replaced.body.get("applications").is_none(),
        "{}",
        replaced.text
    );

    // Agents are members of Groups (member type "Agent"); applications are not.
    let group = json!({
        "schemas": [GROUP_SCHEMA],
        "displayName": "bots",
        "members": [{"value": id, "type": "Agent"}],
    });
    let bots = scim.post("/Groups", &group).await.expect(201).id();
    let members = scim.get(&format!("/Groups/{bots}")).await.expect(200).body["members"].clone();
    assert_eq!(
        members,
        json!([{"value": id, "type": "Agent", "display": "helpdesk-bot",
                "$ref": format!("{base}/Agents/{id}")}])
    );
    let groups = scim.get(&path).await.expect(200).body["groups"].clone();
    assert_eq!(groups[0]["display"], "bots", "{groups}");
    let with_app = patch_ops(json!([{"op": "add", "path": "members", "value": [{"value": app}]}]));
    scim.patch(&format!("/Groups/{bots}"), &with_app)
        .await
        .expect_error(400, Some("invalidValue"));

    // Deleting an agent takes it out of its groups.
    scim.delete(&path).await.expect(204);
    scim.get(&path).await.expect_error(404, None);
    assert!(scim.member_ids(&bots).await.is_empty());
    let app_path = format!("/AgenticApplications/{app}");
    let off = patch_ops(json!([{"op": "replace", "path": "active", "value": false}]));
    let patched = scim.patch(&app_path, &off).await.expect(200);
    assert_eq!(patched.body["active"], false);
    scim.delete(&app_path).await.expect(204);
    scim.get(&app_path).await.expect_error(404, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_provisions_an_owner_an_application_an_agent_and_its_group_at_once() {
    let (_px, scim) = scim_server().await;
    let links = |id: &str| json!([{"value": id}]);
    let request = json!({
        "schemas": [BULK_REQUEST_SCHEMA],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "owner",
             "data": portcullis_tests::scim::user("owner@example.com")},
            {"method": "POST", "path": "/AgenticApplications", "bulkId": "app",
             "data": agentic_application("Portal")},
            {"method": "POST", "path": "/Agents", "bulkId": "bot",
             "data": {"schemas": [AGENT_SCHEMA, PORTCULLIS_AGENT_SCHEMA], "name": "portal-bot",
                      PORTCULLIS_AGENT_SCHEMA: {"owners": links("bulkId:owner"),
                                                "applications": links("bulkId:app")}}},
            {"method": "POST", "path": "/Groups", "bulkId": "bots",
             "data": {"schemas": [GROUP_SCHEMA], "displayName": "portal-bots",
                      "members": [{"type": "Agent", "value": "bulkId:bot"}]}},
            {"method": "PATCH", "path": "/Agents/bulkId:bot",
             "data": patch_ops(json!([{"op": "replace", "path": "agentType", "value": "Assistant"}]))},
            {"method": "DELETE", "path": "/AgenticApplications/bulkId:app"},
        ]
    });
    let resp = scim.post("/Bulk", &request).await.expect(200);
    let ops = resp.body["Operations"].as_array().expect("Operations");
    let statuses: Vec<&str> = ops.iter().filter_map(|op| op["status"].as_str()).collect();
    assert_eq!(
        statuses,
        ["201", "201", "201", "201", "200", "204"],
        "{}",
        resp.text
    );
    let id_of = |i: usize| {
        ops[i]["location"]
            .as_str()
            .and_then(|l| l.rsplit('/').next())
            .unwrap_or_else(|| panic!("no location: {}", resp.text))
            .to_owned()
    };
    let (owner, app, bot, bots) = (id_of(0), id_of(1), id_of(2), id_of(3));
    let got = scim.get(&format!("/Agents/{bot}")).await.expect(200);
    assert_eq!(got.body["agentType"], "Assistant");
    assert_eq!(got.body[PORTCULLIS_AGENT_SCHEMA]["owners"], links(&owner));
    assert_eq!(
        got.body[PORTCULLIS_AGENT_SCHEMA]["applications"],
        links(&app)
    );
    assert_eq!(scim.member_ids(&bots).await, [bot]);
    scim.get(&format!("/AgenticApplications/{app}"))
        .await
        .expect_error(404, None);
}

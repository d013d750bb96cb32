//! A PATCH request body, as an IdP would send it: parsed, then applied to a User and to a
//! Group. Neither may panic, and a failed PATCH must leave the resource untouched.
//!
//! The input is tried as the whole body, and as its `Operations` inside the PatchOp envelope:
//! a fuzzer with no seeds seldom writes the 45-byte schema URN, and without it nothing past
//! the parser would be reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_scim::patch::{apply_patch, parse_patch_request};
use portcullis_scim::schema::ResourceType;
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(fuzzed) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let enveloped = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": fuzzed.clone(),
    });
    for body in [fuzzed, enveloped] {
        patch(&body);
    }
});

fn patch(body: &Value) {
    let Ok(ops) = parse_patch_request(body) else {
        return;
    };
    let user = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "id": "u1",
        "userName": "a@example.com",
        "name": {"givenName": "A"},
        "emails": [{"value": "a@example.com", "type": "work", "primary": true}],
        "active": true,
    });
    let group = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "id": "g1",
        "displayName": "Eng",
    });
    for (rt, original) in [(ResourceType::User, user), (ResourceType::Group, group)] {
        let mut resource = original.clone();
        if apply_patch(&mut resource, rt, &ops, &|id| id == "m1").is_err() {
            assert_eq!(resource, original, "a failed PATCH changed the resource");
        }
    }
}

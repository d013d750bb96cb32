//! A POST/PUT body for a User or a Group: validation may refuse it but never panic, and what
//! it accepts validates again to the same value.
//!
//! An object is also tried with the resource type's core schema URN in its `schemas`: a
//! fuzzer with no seeds seldom writes it, and without it nothing past that check is reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_scim::schema::ResourceType;
use portcullis_scim::validate::{validate_resource, Mode};
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for (rt, urn) in [
        (ResourceType::User, "urn:ietf:params:scim:schemas:core:2.0:User"),
        (ResourceType::Group, "urn:ietf:params:scim:schemas:core:2.0:Group"),
    ] {
        let mut with_schema = body.clone();
        if let Some(object) = with_schema.as_object_mut() {
            object.insert("schemas".to_owned(), json!([urn]));
        }
        for body in [&body, &with_schema] {
            if let Ok(valid) = validate_resource(rt, body, Mode::Create) {
                let again = validate_resource(rt, &valid, Mode::Create);
                assert_eq!(again.as_ref(), Ok(&valid), "validation is not idempotent");
            }
        }
    }
});

//! A POST/PUT body for a User or a Group: validation may refuse it but never panic, and what
//! it accepts validates again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_scim::schema::ResourceType;
use portcullis_scim::validate::{validate_resource, Mode};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for rt in [ResourceType::User, ResourceType::Group] {
        if let Ok(valid) = validate_resource(rt, &body, Mode::Create) {
            let again = validate_resource(rt, &valid, Mode::Create);
            assert_eq!(again.as_ref(), Ok(&valid), "validation is not idempotent");
        }
    }
});

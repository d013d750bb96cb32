//! Any UTF-8 text: parsing must not panic, and what parses must print and parse back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_scim::filter::MAX_FILTER_LEN;
use portcullis_scim::Filter;

fuzz_target!(|input: &str| {
    let Ok(filter) = Filter::parse(input) else {
        return;
    };
    let printed = filter.to_string();
    // The canonical form can be a little longer than the input (`a eq"x"`, `1e1` → `10.0`).
    if printed.len() <= MAX_FILTER_LEN {
        assert_eq!(Filter::parse(&printed), Ok(filter), "printed as {printed:?}");
    }
});

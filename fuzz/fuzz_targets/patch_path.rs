//! Any UTF-8 text: parsing must not panic, and what parses must print and parse back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_scim::filter::MAX_FILTER_LEN;
use portcullis_scim::PatchPath;

fuzz_target!(|input: &str| {
    let Ok(path) = PatchPath::parse(input) else {
        return;
    };
    let printed = path.to_string();
    // The canonical form can be a little longer than the input (`a[b eq"x"]`).
    if printed.len() <= MAX_FILTER_LEN {
        assert_eq!(PatchPath::parse(&printed), Ok(path), "printed as {printed:?}");
    }
});

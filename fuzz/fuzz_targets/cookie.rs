//! Any bytes as `Cookie` headers: reading must not panic; what is removed can no longer be
//! found; nothing else is lost.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../proxy/src/cookies.rs"]
mod cookies;

fuzz_target!(|header: &[u8]| {
    let names: Vec<&[u8]> = cookies::pairs(header).map(|(name, _)| name).collect();
    for (name, value) in cookies::pairs(header) {
        assert!(!name.contains(&b';') && !value.contains(&b';'), "{header:?}");
        assert!(cookies::find([header], name).is_some(), "{name:?} in {header:?}");
    }
    // Remove the first cookie's name: it is gone, every other cookie stays, in order.
    let Some(&dropped) = names.first() else {
        return;
    };
    let kept = cookies::without(header, |name| name == dropped).unwrap_or_default();
    assert_eq!(cookies::find([kept.as_slice()], dropped), None, "{header:?} -> {kept:?}");
    let others: Vec<&[u8]> = names.iter().copied().filter(|n| *n != dropped).collect();
    let left: Vec<&[u8]> = cookies::pairs(&kept).map(|(name, _)| name).collect();
    assert_eq!(left, others, "{header:?} -> {kept:?}");
});

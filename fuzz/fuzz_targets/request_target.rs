//! Any bytes as a request target: reading and normalizing must not panic, and a normalized path
//! is absolute, printable ASCII, has no empty or dot segments, and normalizes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../policy/src/path.rs"]
mod path;

fuzz_target!(|raw: &[u8]| {
    let Ok(target) = path::target(raw) else {
        return;
    };
    assert!(!target.path.is_empty(), "{target:?}");
    if let Some(query) = target.query {
        assert!(raw.ends_with(query.as_bytes()), "{target:?}");
    }
    let Ok(normal) = path::normalize(target.path) else {
        return;
    };
    assert!(normal.starts_with('/'), "{normal:?}");
    assert!(normal.bytes().all(|b| b.is_ascii_graphic()), "{normal:?}");
    let inner = normal.strip_suffix('/').unwrap_or(&normal);
    assert!(
        inner
            .split('/')
            .skip(1)
            .all(|segment| !matches!(segment, "" | "." | "..")),
        "{normal:?}"
    );
    assert_eq!(path::normalize(&normal).as_deref(), Ok(&*normal));
});

//! Annotation parsing: each input line is `key=value` (a key without `/` is taken under
//! `wg-injector.io/`, so the fuzzer spends its time on our contract).
//!
//! Oracle beyond "no panic": a `wg-injector.io/` value that looks like key material is always
//! denied as `key_material`, and no denial message ever echoes such a value.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use wg_injector::annotations::{self, PREFIX};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        let key = if key.contains('/') {
            key.to_owned()
        } else {
            format!("{PREFIX}{key}")
        };
        map.insert(key, value.to_owned());
    }
    let secret = map
        .iter()
        .find(|(k, v)| k.starts_with(PREFIX) && annotations::looks_like_key_material(v).is_some())
        .map(|(_, v)| v.clone());
    let screened = annotations::screen(&map);
    if let Some(secret) = &secret {
        // screen runs first on every Pod, so its message is the only one a user would see.
        let denial = screened.as_ref().expect_err("key material must be denied");
        assert_eq!(denial.reason, "key_material");
        for shown in [secret.clone(), format!("{secret:?}")] {
            assert!(
                !denial.message.contains(shown.as_str()),
                "the denial echoed key material: {}",
                denial.message
            );
        }
    }
    let requested = annotations::inject_requested(&map);
    let parsed = annotations::parse(&map);
    for denial in [screened.err(), requested.err(), parsed.err()]
        .into_iter()
        .flatten()
    {
        assert!(!denial.message.is_empty(), "a denial without a message");
    }
});

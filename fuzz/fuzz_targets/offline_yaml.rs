//! The offline CLI's reader: arbitrary text → `offline::transform` (inject and uninject).
//!
//! Oracle beyond "no panic": what inject writes is read back by inject as unchanged output
//! (injecting twice equals once), and uninject of it reads back.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wg_injector::config::Config;
use wg_injector::offline::{transform, Direction};

const CONFIG: &str = include_str!("../../injector/tests/testdata/golden-config.yaml");

fn config() -> &'static Config {
    static CONFIG_CELL: OnceLock<Config> = OnceLock::new();
    CONFIG_CELL.get_or_init(|| {
        let mut config = Config::from_yaml_str(CONFIG).expect("the golden config parses");
        config.inject_by_default = true; // what the CLI does
        config
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = transform(text, "fuzz", config(), Direction::Uninject);
    let Ok(once) = transform(text, "fuzz", config(), Direction::Inject) else {
        return;
    };
    let twice = match transform(&once, "fuzz", config(), Direction::Inject) {
        Ok(twice) => twice,
        Err(_) => panic!("inject could not read its own output:\n{once}"),
    };
    assert_eq!(once, twice, "injecting twice must equal injecting once");
    if transform(&once, "fuzz", config(), Direction::Uninject).is_err() {
        panic!("uninject could not read inject's output:\n{once}");
    }
});

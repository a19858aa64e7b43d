//! The config file: `Config::parse` (TOML, then every section read and checked) must
//! answer `Ok` or every problem it found, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpcgate::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The check reads the key and certificate files a config names; a device that
    // never ends a read (`/dev/stdin`) would stall the fuzzer, not find a bug.
    if ["/dev", "/proc", "/sys"].iter().any(|dir| text.contains(dir)) {
        return;
    }
    match Config::parse(text) {
        Ok(config) => {
            assert!(config.check().is_empty(), "accepted with problems");
            // What `check-config` prints of an accepted config.
            let _ = format!("{config:?}");
        }
        Err(problems) => {
            assert!(!problems.0.is_empty(), "refused without a problem");
            assert!(problems.0.iter().all(|p| !p.is_empty()), "an empty problem");
        }
    }
});

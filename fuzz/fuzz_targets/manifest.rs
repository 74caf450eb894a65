//! Arbitrary bytes through relume's own untrusted-input parsers: the manifest (sealed
//! JSON with limits and path checks) and the safetensors header of a tensor file.
//! Each must return a value or a typed error, never panic or allocate unboundedly.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use relume_ckpt::manifest::Manifest;
use relume_ckpt::tensor_file::parse_header;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz/manifest.json");
    if let Ok(m) = Manifest::parse(path, data) {
        // A manifest that parses must re-serialise and parse back to the same value.
        let again = Manifest::parse(path, &m.to_bytes());
        assert!(again.is_ok(), "a parsed manifest must round-trip");
    }
    let tensors = Path::new("fuzz/model.safetensors");
    if let Ok(entries) = parse_header(tensors, data, data.len() as u64) {
        for e in entries {
            let _ = e;
        }
    }
});

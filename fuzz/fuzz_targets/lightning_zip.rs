//! Arbitrary bytes as a `.ckpt` zip: the archive reader, the pickle interpreter over its
//! storages, and the checkpoint accessors must never panic or allocate past the limits.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use relume_lightning::{LightningCheckpoint, Limits, TorchArchive};

fuzz_target!(|data: &[u8]| {
    let Ok(mut archive) = TorchArchive::from_bytes(data.to_vec(), Path::new("fuzz.ckpt"), Limits::small())
    else {
        return;
    };
    let version = archive.format_version().ok().flatten();
    if let Ok(root) = archive.load() {
        if let Ok(ckpt) = LightningCheckpoint::from_value("fuzz.ckpt", version, root) {
            let _ = ckpt.diagnose();
            let _ = ckpt.state_dict();
            let _ = ckpt.callbacks();
            let _ = ckpt.optimizers();
        }
    }
});

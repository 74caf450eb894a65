//! Arbitrary bytes through the restricted pickle interpreter: it must return a value or
//! a typed error, never panic, hang or allocate past `Limits::small()`.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use relume_lightning::{parse_pickle, LightningCheckpoint, Limits, MemoryStorages};

fuzz_target!(|data: &[u8]| {
    let mut storages = MemoryStorages::default();
    for (key, len) in [("0", 16usize), ("1", 64), ("2", 4), ("3", 2)] {
        let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
        storages.storages.insert(key.to_string(), Arc::from(bytes));
    }
    if let Ok(value) = parse_pickle(data, "fuzz.pkl", &mut storages, &Limits::small()) {
        let _json = value.to_json();
        if let Ok(ckpt) = LightningCheckpoint::from_value("fuzz.ckpt", None, value) {
            let _ = ckpt.diagnose();
            let _ = ckpt.state_dict();
            let _ = ckpt.optimizers().iter().map(|o| o.state_tensors().len()).sum::<usize>();
            let _ = ckpt.lr_schedulers();
            let _ = ckpt.loop_progress();
        }
    }
});

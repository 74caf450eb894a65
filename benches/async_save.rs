//! Async-save stall on the training thread vs a plain memcpy of the same bytes.
//!
//! ```text
//! cargo bench -p relume-ckpt --bench async_save              # 256 MiB of tensors
//! RELUME_BENCH_MIB=1024 cargo bench -p relume-ckpt --bench async_save
//! RELUME_BENCH_ROUNDS=9 RELUME_BENCH_DIR=/mnt/nvme ...       # rounds (default 11), where to write
//! ```
//!
//! The "live" state is a set of byte buffers (like parameters and optimizer moments in
//! host memory). Each round measures, in alternating order:
//!
//! - **memcpy**: `copy_from_slice` of every tensor into destination buffers allocated
//!   and touched once before the rounds (the floor: pure memory bandwidth);
//! - **alloc+memcpy**: `to_vec()` of every tensor (a copy into fresh memory, which is
//!   what any snapshot must do unless it recycles buffers);
//! - **stall**: what the training thread pays for an async save: from "take snapshot"
//!   (one [`snapshot_copy`] per tensor: one exact allocation and one memcpy,
//!   wrapped with `TensorBytes::owned` without another copy, inserted into a
//!   `StateDict`) through
//!   [`AsyncCheckpointer::submit`] returning. The slot is free (the previous save was
//!   flushed, untimed), so this is the stall of a save every N steps where N steps take
//!   longer than one write.
//!
//! Reports medians and the median per-round ratios stall/memcpy (target <= 1.2) and
//! stall/(alloc+memcpy). The writer commits each snapshot durably to a temporary
//! directory between rounds (not timed here; see the `ckpt_save` bench).

use std::sync::Arc;
use std::time::Instant;

use relume_ckpt::{
    snapshot_copy, AsyncCheckpointer, Checkpoint, CheckpointDir, DType, StateDict, TensorBytes,
    TensorData,
};

const ROUNDS: usize = 11;

struct Live {
    component: &'static str,
    key: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// 512 small tensors (biases, norms: 256 B..2 KiB), then 64 KiB .. 16 MiB ones, over two
/// components; random-looking contents.
fn live_state(total: usize) -> Vec<Live> {
    let sizes = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];
    let (mut out, mut used, mut i, mut seed) = (Vec::new(), 0, 0usize, 0x2545_F491_4F6C_DD1Du64);
    while used < total {
        let want = if i < 512 {
            256 << (i % 4)
        } else {
            sizes[i % sizes.len()]
        };
        let n = want.min(total - used).max(4) / 4 * 4;
        let mut bytes = vec![0u8; n];
        for c in bytes.chunks_exact_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            c.copy_from_slice(&seed.to_le_bytes());
        }
        let (component, key) = if i % 3 == 2 {
            ("optimizer", format!("0/layer{i:04}.weight/exp_avg"))
        } else {
            ("model", format!("layer{i:04}.weight"))
        };
        out.push(Live {
            component,
            key,
            shape: vec![n / 4],
            bytes,
        });
        used += n;
        i += 1;
    }
    out
}

/// The snapshot: one copy per tensor, straight into the `Vec` that `TensorBytes` owns.
fn snapshot(live: &[Live], step: u64) -> Checkpoint {
    let mut ckpt = Checkpoint::default();
    for t in live {
        let copy = snapshot_copy(&t.bytes);
        let data = TensorData::new(DType::F32, t.shape.clone(), TensorBytes::owned(copy))
            .expect("tensor length matches its shape");
        ckpt.components
            .entry(t.component.to_string())
            .or_insert_with(StateDict::new)
            .insert_tensor(t.key.clone(), data);
    }
    ckpt.progress = serde_json::json!({ "step": step });
    ckpt
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let mib: usize = env_or("RELUME_BENCH_MIB", 256);
    let rounds: usize = env_or("RELUME_BENCH_ROUNDS", ROUNDS);
    let base = std::env::var_os("RELUME_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).expect("temp dir");
    let live = live_state(mib << 20);
    let total: usize = live.iter().map(|t| t.bytes.len()).sum();
    println!(
        "async_save: {mib} MiB in {} tensors, writer commits under {}",
        live.len(),
        work.path().display()
    );
    let mut dst: Vec<Vec<u8>> = live.iter().map(|t| vec![1u8; t.bytes.len()]).collect();
    let dir = Arc::new(CheckpointDir::open(work.path().join("run")).expect("open run dir"));
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).expect("start writer");

    let (mut copies, mut allocs, mut stalls, mut r_copy, mut r_alloc) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut run_copy = || {
            let t = Instant::now();
            for (d, s) in dst.iter_mut().zip(&live) {
                d.copy_from_slice(&s.bytes);
            }
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        };
        let run_alloc = || {
            let t = Instant::now();
            let v: Vec<Vec<u8>> = live.iter().map(|s| s.bytes.to_vec()).collect();
            let d = t.elapsed().as_secs_f64();
            drop(std::hint::black_box(v));
            d
        };
        let mut run_stall = || {
            let t = Instant::now();
            let ckpt = snapshot(&live, round as u64);
            let _ticket = saver
                .submit(&format!("step={round:06}"), ckpt)
                .expect("submit");
            let d = t.elapsed().as_secs_f64();
            // Untimed: wait for the commit, keep only the newest checkpoint.
            for done in saver.flush().expect("async save") {
                for old in dir.list().expect("list") {
                    if old.name != done.name {
                        dir.delete(&old.name).expect("delete");
                    }
                }
            }
            d
        };
        let (copy, alloc, stall) = if round % 2 == 0 {
            let c = run_copy();
            let a = run_alloc();
            (c, a, run_stall())
        } else {
            let s = run_stall();
            let a = run_alloc();
            (run_copy(), a, s)
        };
        println!(
            "  round {round}: memcpy {:.2} GB/s, alloc+memcpy {:.2} GB/s, stall {:.2} GB/s ({:.1} ms); stall/memcpy {:.3}, stall/alloc+memcpy {:.3}",
            gbps(total, copy),
            gbps(total, alloc),
            gbps(total, stall),
            stall * 1e3,
            stall / copy,
            stall / alloc
        );
        copies.push(copy);
        allocs.push(alloc);
        stalls.push(stall);
        r_copy.push(stall / copy);
        r_alloc.push(stall / alloc);
    }
    let (copy, alloc, stall) = (
        median(&mut copies),
        median(&mut allocs),
        median(&mut stalls),
    );
    println!(
        "median: memcpy {:.1} ms ({:.2} GB/s), alloc+memcpy {:.1} ms ({:.2} GB/s), async-save stall {:.1} ms ({:.2} GB/s)",
        copy * 1e3,
        gbps(total, copy),
        alloc * 1e3,
        gbps(total, alloc),
        stall * 1e3,
        gbps(total, stall)
    );
    println!(
        "ratio (median per round): stall/memcpy = {:.3} (target <= 1.2), stall/alloc+memcpy = {:.3}",
        median(&mut r_copy),
        median(&mut r_alloc)
    );
}

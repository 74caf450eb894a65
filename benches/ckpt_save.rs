//! Durable checkpoint save vs raw write+fsync of the same bytes, then load+verify.
//!
//! ```text
//! cargo bench -p relume-ckpt --bench ckpt_save             # 1 GiB
//! RELUME_BENCH_GIB=0.5 cargo bench -p relume-ckpt --bench ckpt_save
//! cargo bench -p relume-ckpt --bench ckpt_save -- 2        # 2 GiB
//! RELUME_BENCH_DIR=/mnt/nvme ...                           # where to write (default: temp dir)
//! ```
//!
//! Each round writes the state dict once as raw files (`write_all` per tensor +
//! `fsync` per file + `fsync` of the directory, no hashing, no manifest) and once with
//! [`CheckpointDir::save`] (full commit protocol, BLAKE3 of every byte, manifest,
//! renames, `latest`). Rounds alternate the order (`RELUME_BENCH_ROUNDS`, default 5); medians and
//! the median per-round ratio save/raw are reported (target >= 0.9). Load+verify is measured after evicting the files from the
//! page cache with `posix_fadvise(DONTNEED)` (cold) and again warm.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use relume_ckpt::{load, Checkpoint, CheckpointDir, DType, StateDict, TensorBytes, TensorData};

const ROUNDS: usize = 5;

fn gib_from_args() -> f64 {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<f64>().ok())
        .or_else(|| {
            std::env::var("RELUME_BENCH_GIB")
                .ok()
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or(1.0)
}

/// Many tensors of mixed sizes (2000 of 512 B..4 KiB like biases and norms, then
/// 16 KiB .. 64 MiB), split over two components.
fn build_state(total: u64) -> Checkpoint {
    let sizes: [u64; 7] = [
        16 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
        4 << 20,
        16 << 20,
        64 << 20,
    ];
    let mut model = StateDict::new();
    let mut opt = StateDict::new();
    let (mut used, mut i, mut seed) = (0u64, 0usize, 0x9E37_79B9_7F4A_7C15u64);
    while used < total {
        let want = if i < 2000 {
            512 << (i % 4)
        } else {
            sizes[i % sizes.len()]
        };
        let bytes = want.min(total - used).max(4) / 4 * 4;
        let mut v = vec![0u8; bytes as usize];
        for c in v.chunks_exact_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            c.copy_from_slice(&seed.to_le_bytes());
        }
        let t = TensorData::new(DType::F32, vec![bytes as usize / 4], TensorBytes::owned(v))
            .expect("tensor");
        if i % 3 == 2 {
            opt.insert_tensor(format!("0/layer{i:04}.weight/exp_avg"), t);
        } else {
            model.insert_tensor(format!("layer{i:04}.weight"), t);
        }
        used += bytes;
        i += 1;
    }
    let mut c = Checkpoint::default();
    c.components.insert("model".into(), model);
    c.components.insert("optimizer".into(), opt);
    c.progress = serde_json::json!({"step": 1});
    c
}

fn raw_write(dir: &Path, ckpt: &Checkpoint) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let mut total = 0;
    for (name, sd) in &ckpt.components {
        let tensors: Vec<(&str, &TensorData)> = sd.tensors().collect();
        let header = relume_ckpt::tensor_file::encode_header(&tensors);
        let mut f = File::create(dir.join(format!("{name}.safetensors")))?;
        f.write_all(&header)?;
        total += header.len() as u64;
        for (_, t) in &tensors {
            f.write_all(t.bytes())?;
            total += t.bytes().len() as u64;
        }
        f.sync_all()?;
    }
    File::open(dir)?.sync_all()?;
    Ok(total)
}

fn evict(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("read dir") {
        let f = File::open(e.expect("entry").path()).expect("open");
        // SAFETY: plain syscall on a valid fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let gib = gib_from_args();
    let total = (gib * (1u64 << 30) as f64) as u64;
    let base = std::env::var_os("RELUME_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).expect("temp dir");
    let ckpt = build_state(total);
    let n_tensors: usize = ckpt.components.values().map(|c| c.tensors().count()).sum();
    println!(
        "ckpt_save: {gib} GiB in {n_tensors} tensors, writing under {}",
        work.path().display()
    );
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    for c in ckpt.components.values() {
        for (_, t) in c.tensors() {
            h.update(t.bytes());
        }
    }
    std::hint::black_box(h.finalize());
    println!(
        "  (diagnostic) in-memory blake3, one thread: {:.3} GB/s",
        gbps(total, t.elapsed().as_secs_f64())
    );
    let dir = CheckpointDir::open(work.path().join("run")).expect("open run dir");
    let rounds: usize = std::env::var("RELUME_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS);
    let (mut raws, mut saves, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    let mut raw_bytes = 0;
    let mut last: Option<std::path::PathBuf> = None;
    let mut older: Option<std::path::PathBuf> = None;
    for round in 0..rounds {
        let raw_dir = work.path().join(format!("raw{round}"));
        let mut run_raw = || {
            let t = Instant::now();
            raw_bytes = raw_write(&raw_dir, &ckpt).expect("raw write");
            let d = t.elapsed().as_secs_f64();
            std::fs::remove_dir_all(&raw_dir).expect("cleanup");
            d
        };
        let mut run_save = || {
            // Keep at most two checkpoints; the older one is deleted outside the timing
            // (the newest cannot be deleted: `latest` names it).
            if let Some(prev) = older.take() {
                let name = prev
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .expect("name");
                dir.delete(&name).expect("delete");
            }
            let t = Instant::now();
            let p = dir.save(&format!("step={round:06}"), &ckpt).expect("save");
            let d = t.elapsed().as_secs_f64();
            older = last.replace(p);
            d
        };
        // Alternate the order so neither side always runs on a warmer system.
        let (raw, save) = if round % 2 == 0 {
            let r = run_raw();
            (r, run_save())
        } else {
            let s = run_save();
            (run_raw(), s)
        };
        println!(
            "  round {round}: raw write+fsync {:.3} GB/s, durable save {:.3} GB/s, ratio {:.3}",
            gbps(raw_bytes, raw),
            gbps(raw_bytes, save),
            raw / save
        );
        raws.push(raw);
        saves.push(save);
        pairs.push(raw / save);
    }
    let path = last.expect("a checkpoint");
    let saved: u64 = load(&path).expect("load").manifest.total_bytes();
    evict(&path);
    let t = Instant::now();
    let l = load(&path).expect("load");
    let cold = t.elapsed().as_secs_f64();
    drop(l);
    let t = Instant::now();
    let l = load(&path).expect("load");
    let warm = t.elapsed().as_secs_f64();
    assert_eq!(l.components, ckpt.components, "round trip");
    let (raw, save, pair) = (median(&mut raws), median(&mut saves), median(&mut pairs));
    println!(
        "raw write+fsync:      {:.3} GB/s ({raw_bytes} bytes, median of {rounds})",
        gbps(raw_bytes, raw)
    );
    println!(
        "durable save:         {:.3} GB/s ({saved} bytes incl. state.json, median of {rounds})",
        gbps(saved, save)
    );
    println!(
        "ratio save/raw:       {:.3} of medians, {:.3} median of per-round ratios (target >= 0.9)",
        raw / save,
        pair
    );
    println!("load+verify (cold):   {:.3} GB/s", gbps(saved, cold));
    println!("load+verify (warm):   {:.3} GB/s", gbps(saved, warm));
}

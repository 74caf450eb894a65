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
//! renames, `latest`). Rounds alternate; the best of each is reported, with the ratio
//! save/raw (target >= 0.9). Load+verify is measured after evicting the files from the
//! page cache with `posix_fadvise(DONTNEED)` (cold) and again warm.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use relume_ckpt::{load, Checkpoint, CheckpointDir, DType, StateDict, TensorBytes, TensorData};

const ROUNDS: usize = 3;

fn gib_from_args() -> f64 {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<f64>().ok())
        .or_else(|| std::env::var("RELUME_BENCH_GIB").ok().and_then(|s| s.parse().ok()))
        .unwrap_or(1.0)
}

/// Many tensors of mixed sizes (4 KiB .. 64 MiB), split over two components.
fn build_state(total: u64) -> Checkpoint {
    let sizes: [u64; 6] = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20];
    let mut model = StateDict::new();
    let mut opt = StateDict::new();
    let (mut used, mut i, mut seed) = (0u64, 0usize, 0x9E37_79B9_7F4A_7C15u64);
    while used < total {
        let bytes = sizes[i % sizes.len()].min(total - used).max(4) / 4 * 4;
        let mut v = vec![0u8; bytes as usize];
        for c in v.chunks_exact_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            c.copy_from_slice(&seed.to_le_bytes());
        }
        let t = TensorData::new(DType::F32, vec![bytes as usize / 4], TensorBytes::owned(v)).expect("tensor");
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

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let gib = gib_from_args();
    let total = (gib * (1u64 << 30) as f64) as u64;
    let base = std::env::var_os("RELUME_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).expect("temp dir");
    let ckpt = build_state(total);
    let n_tensors: usize = ckpt.components.values().map(|c| c.tensors().count()).sum();
    println!("ckpt_save: {gib} GiB in {n_tensors} tensors, writing under {}", work.path().display());
    let dir = CheckpointDir::open(work.path().join("run")).expect("open run dir");
    let (mut best_raw, mut best_save) = (f64::MAX, f64::MAX);
    let mut raw_bytes = 0;
    let mut last = None;
    for round in 0..ROUNDS {
        let raw_dir = work.path().join(format!("raw{round}"));
        let t = Instant::now();
        raw_bytes = raw_write(&raw_dir, &ckpt).expect("raw write");
        let raw = t.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&raw_dir).expect("cleanup");
        let t = Instant::now();
        let p = dir.save(&format!("step={round:06}"), &ckpt).expect("save");
        let save = t.elapsed().as_secs_f64();
        println!("  round {round}: raw write+fsync {:.2} GB/s, durable save {:.2} GB/s", gbps(raw_bytes, raw), gbps(raw_bytes, save));
        best_raw = best_raw.min(raw);
        best_save = best_save.min(save);
        if let Some(prev) = last.replace(p) {
            let name = Path::new(&prev).file_name().and_then(|n| n.to_str()).map(str::to_string).expect("name");
            dir.delete(&name).expect("delete");
        }
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
    println!("raw write+fsync:      {:.3} GB/s ({} bytes, best of {ROUNDS})", gbps(raw_bytes, best_raw), raw_bytes);
    println!("durable save:         {:.3} GB/s ({} bytes incl. state.json, best of {ROUNDS})", gbps(saved, best_save), saved);
    println!("ratio save/raw:       {:.3} (target >= 0.9)", best_raw / best_save);
    println!("load+verify (cold):   {:.3} GB/s", gbps(saved, cold));
    println!("load+verify (warm):   {:.3} GB/s", gbps(saved, warm));
}

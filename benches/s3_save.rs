//! Save and load+verify throughput of a checkpoint in an S3 bucket, against raw
//! `object_store` multipart uploads (and GETs) of the same bytes in the same run.
//!
//! Needs an S3 server in the environment (`eval "$(.ci/s3-server.sh start)"` for the
//! local one); the bucket is `RELUME_S3_TEST_BUCKET`. `RELUME_BENCH_MIB` sets the state
//! size (default 256 MiB, in 32 MiB tensors across 2 components); `RELUME_BENCH_REPS`
//! the repetitions (default 3, the best of each is reported).

use std::time::Instant;

use futures_util::StreamExt;
use object_store::{ObjectStoreExt, WriteMultipart};
use relume_ckpt::remote::{store_for, MAX_PARTS_IN_FLIGHT, PART_BYTES};
use relume_ckpt::{load, verify, Checkpoint, CheckpointDir, StateDict, TensorData};

fn main() {
    let Ok(bucket) = std::env::var("RELUME_S3_TEST_BUCKET") else {
        eprintln!(
            "s3_save: no S3 server configured: run `eval \"$(.ci/s3-server.sh start)\"` first"
        );
        return;
    };
    let mib: usize = std::env::var("RELUME_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let reps: usize = std::env::var("RELUME_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tensor_mib = 32.min(mib);
    let n_tensors = mib / tensor_mib;
    let mut ckpt = Checkpoint::default();
    for c in ["model", "optimizer"] {
        ckpt.components.insert(c.into(), StateDict::new());
    }
    for i in 0..n_tensors {
        let n = tensor_mib << 18;
        let w: Vec<f32> = (0..n).map(|j| (j ^ i) as f32 * 1e-3).collect();
        let comp = if i % 2 == 0 { "model" } else { "optimizer" };
        if let Some(sd) = ckpt.components.get_mut(comp) {
            sd.insert_tensor(
                format!("t{i:03}"),
                TensorData::from_f32(vec![n], &w).expect("tensor"),
            );
        }
    }
    let total: u64 = ckpt
        .components
        .values()
        .flat_map(|sd| sd.tensors().map(|(_, t)| t.bytes().len() as u64))
        .sum();
    // The same bytes per component, as one object each.
    let blobs: Vec<Vec<u8>> = ckpt
        .components
        .values()
        .map(|sd| sd.tensors().flat_map(|(_, t)| t.bytes().to_vec()).collect())
        .collect();
    let store = store_for(&bucket).expect("store");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let gb = total as f64 / 1e9;
    let mut best = [f64::MAX; 5];
    for rep in 0..reps {
        // Raw: a multipart upload per component, part size and concurrency as relume's.
        let t = Instant::now();
        rt.block_on(async {
            for (i, b) in blobs.iter().enumerate() {
                let loc = object_store::path::Path::from(format!("bench-raw-{run_id}/{rep}/{i}"));
                let up = store.put_multipart(&loc).await.expect("multipart");
                let mut w = WriteMultipart::new_with_chunk_size(up, PART_BYTES);
                for piece in b.chunks(32 << 20) {
                    w.wait_for_capacity(MAX_PARTS_IN_FLIGHT)
                        .await
                        .expect("capacity");
                    w.write(piece);
                }
                w.finish().await.expect("finish");
            }
        });
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        rt.block_on(async {
            for (i, blob) in blobs.iter().enumerate() {
                let loc = object_store::path::Path::from(format!("bench-raw-{run_id}/{rep}/{i}"));
                let mut s = store.get(&loc).await.expect("get").into_stream();
                let mut n = 0usize;
                while let Some(p) = s.next().await {
                    n += p.expect("piece").len();
                }
                assert_eq!(n, blob.len());
            }
        });
        best[1] = best[1].min(t.elapsed().as_secs_f64());
        // relume: the full commit protocol (hashing, manifest, marker).
        let run = format!("s3://{bucket}/bench-relume-{run_id}-{rep}");
        let dir = CheckpointDir::open(&run).expect("open");
        let t = Instant::now();
        let path = dir.save("step=000001", &ckpt).expect("save");
        best[2] = best[2].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let loaded = load(&path).expect("load");
        best[3] = best[3].min(t.elapsed().as_secs_f64());
        drop(loaded);
        let t = Instant::now();
        assert!(verify(&path).is_ok());
        best[4] = best[4].min(t.elapsed().as_secs_f64());
    }
    println!("s3_save: {mib} MiB of state ({n_tensors} tensors, 2 components), best of {reps}, bucket {bucket}");
    let row = |what: &str, secs: f64, base: f64| {
        println!(
            "  {what:<36} {:>7.3} GB/s  {:>6.2} s  {:>5.2}x raw",
            gb / secs,
            secs,
            base / secs
        );
    };
    row("raw object_store multipart upload", best[0], best[0]);
    row("relume save (commit protocol)", best[2], best[0]);
    row("raw object_store GET", best[1], best[1]);
    row("relume load (verified, in memory)", best[3], best[1]);
    row("relume verify (streamed)", best[4], best[1]);
}

//! How many CPU threads candle's kernels use.
//!
//! candle 0.11 reads its thread count from the environment:
//! `candle_core::utils::get_num_threads()` returns `RAYON_NUM_THREADS` when set to a
//! positive integer, and otherwise the number of *physical* cores the process may
//! run on (its affinity mask), not hyper-threads. Matrix multiplications read it on
//! every call; candle's worker pools (rayon pool, barrier pool for element-wise
//! kernels, which also honour `CANDLE_NUM_THREADS`) read it once, at first use.
//!
//! Without `RAYON_NUM_THREADS`, that default is computed by parsing `/proc/cpuinfo`
//! on Linux, **on every matmul call**: on the digits MLP this alone made candle's
//! training step about 1.5× slower. Calling [`set_cpu_threads`] once at start-up
//! removes it. relume's fused layers ([`crate::nn`]) run products below 4M
//! multiply-adds on the calling thread, and ask candle for its thread count once,
//! at the first larger product.
//!
//! **Default:** relume keeps candle's default (physical cores). It is the right
//! choice for one training process per machine. When several processes share a
//! machine (data-parallel workers, CI runners, benchmarks), give each
//! `cores / processes` threads with [`set_cpu_threads`]; oversubscription makes
//! every matmul slower. relume's own fused optimizer kernels are single-threaded
//! and memory-bound, so they are unaffected.

/// How long candle's barrier-pool workers spin for the next element-wise kernel
/// before they sleep, when [`set_cpu_threads`] sets it (candle's default is 25000).
///
/// relume's products and fused layers run on rayon's pool, and candle's
/// element-wise ops (autograd's gradient sums among them) on candle's own barrier
/// pool; at candle's default, a barrier worker keeps spinning on a core through the
/// product that follows, which then runs short of a core. On the GPT bench in one
/// process with 2 threads, 1000 gave 2–13% more tokens/s than 25000 in 3
/// interleaved pairs (17.6–18.6k against 16.1–18.2k).
pub const BARRIER_POOL_SPIN_LIMIT: u32 = 1000;

/// Sets the number of CPU threads candle uses, by setting `RAYON_NUM_THREADS` and
/// `CANDLE_NUM_THREADS`, and, unless the environment already has one,
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`BARRIER_POOL_SPIN_LIMIT`].
///
/// Call it at program start, before any tensor operation and before other threads
/// are spawned: environment writes race with concurrent reads on some platforms, and
/// candle's pools keep the size they had when first used (matmuls follow the new
/// value immediately). `n = 0` is treated as 1.
pub fn set_cpu_threads(n: usize) {
    let n = n.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var(
            "CANDLE_BARRIER_POOL_SPIN_LIMIT",
            BARRIER_POOL_SPIN_LIMIT.to_string(),
        );
    }
}

/// The number of CPU threads candle's matmuls use now.
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_threads_changes_candle_thread_count() {
        let before = std::env::var("RAYON_NUM_THREADS").ok();
        set_cpu_threads(3);
        assert_eq!(cpu_threads(), 3);
        set_cpu_threads(0);
        assert_eq!(cpu_threads(), 1);
        match before {
            Some(v) => std::env::set_var("RAYON_NUM_THREADS", v),
            None => std::env::remove_var("RAYON_NUM_THREADS"),
        }
    }
}

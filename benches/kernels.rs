//! The fused kernels against their composite candle fallbacks, forward + backward,
//! at the shapes of a small GPT (batch·time = 4096 rows, width 128–256, 4–8 heads
//! of 32, context 128–256, vocabulary ~100).
//!
//! Each case builds its inputs as variables, then times `forward`, a weighted sum
//! against a fixed random upstream gradient, and `backward`, for the fused op and
//! the composite in the same run; it prints the median of `BENCH_ITERS` runs
//! (default 10) after two warm-ups, and the composite/fused ratio.
//!
//! `cargo bench --bench kernels` (`RAYON_NUM_THREADS=1` for one thread, `BENCH_ONLY=name`
//! for the cases whose name contains it). Like the GPT job, it runs on mimalloc with
//! freed memory kept mapped, and `relume::set_cpu_threads` (default: the available
//! cores).

// The GPT job's allocator and thread settings, so that the timings are the
// kernels' and not glibc's page faults on every fresh tensor.
#[path = "../examples/gpt_model.rs"]
#[allow(dead_code)]
mod gpt_model;

use std::time::Instant;

use candle_core::{Device, Module, Tensor, Var};
use relume::nn::{causal_attention, composite, cross_entropy, gelu, LayerNorm};
use relume::rng::Rng;

type Op = Box<dyn Fn(&[Tensor]) -> Tensor>;

/// Median seconds of forward + backward of `f` on fresh variables of `inputs`.
fn time(inputs: &[Tensor], f: &Op, iters: usize) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let probe = f(&ts);
    let up = Rng::new(1, "upstream")
        .uniform_tensor(probe.shape(), -1.0, 1.0, &Device::Cpu)
        .unwrap();
    let mut samples = Vec::new();
    for i in 0..iters + 2 {
        let start = Instant::now();
        let y = f(&ts);
        let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&ts[0]).is_some(), "no gradient");
        if i >= 2 {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    gpt_model::keep_freed_memory();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        relume::set_cpu_threads(
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        );
    }
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // `BENCH_ONLY=gelu` runs the cases whose name contains it.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let dev = Device::Cpu;
    let mut rng = Rng::new(0, "bench");
    let mut u =
        |shape: &[usize], lo: f32, hi: f32| rng.uniform_tensor(shape, lo, hi, &dev).unwrap();
    println!(
        "threads: {}, median of {iters} forward+backward runs",
        relume::threads::cpu_threads()
    );
    println!(
        "{:<40} {:>11} {:>11} {:>7}",
        "op", "fused ms", "candle ms", "ratio"
    );
    let mut cases: Vec<(String, Vec<Tensor>, Op, Op)> = Vec::new();
    for c in [128, 256] {
        cases.push((
            format!("layer_norm [4096, {c}]"),
            vec![
                u(&[4096, c], -2.0, 2.0),
                u(&[c], 0.5, 1.5),
                u(&[c], -0.5, 0.5),
            ],
            Box::new(|t| {
                LayerNorm::new(t[1].clone(), t[2].clone(), 1e-5)
                    .forward(&t[0])
                    .unwrap()
            }),
            Box::new(|t| composite::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()),
        ));
    }
    for c in [512, 1024] {
        cases.push((
            format!("gelu [4096, {c}]"),
            vec![u(&[4096, c], -4.0, 4.0)],
            Box::new(|t| gelu(&t[0]).unwrap()),
            Box::new(|t| composite::gelu(&t[0]).unwrap()),
        ));
    }
    for (b, h, t, d) in [(32, 4, 128, 32), (16, 8, 256, 32)] {
        let shape = [b, h, t, d];
        cases.push((
            format!("causal_attention [{b}, {h}, {t}, {d}]"),
            vec![
                u(&shape, -1.0, 1.0),
                u(&shape, -1.0, 1.0),
                u(&shape, -1.0, 1.0),
            ],
            Box::new(|t| causal_attention(&t[0], &t[1], &t[2]).unwrap()),
            Box::new(|t| composite::causal_attention(&t[0], &t[1], &t[2]).unwrap()),
        ));
    }
    // What every row pays outside the op: the weighted sum, its backward and
    // candle's gradient accumulation.
    cases.push((
        "harness only (y = x) [4096, 1024]".into(),
        vec![u(&[4096, 1024], -1.0, 1.0)],
        Box::new(|t| t[0].clone()),
        Box::new(|t| t[0].clone()),
    ));
    let targets: Vec<u32> = (0..4096u32).map(|i| (i * 37) % 100).collect();
    let targets = Tensor::new(targets, &dev).unwrap();
    let (t1, t2) = (targets.clone(), targets);
    cases.push((
        "cross_entropy [4096, 100]".into(),
        vec![u(&[4096, 100], -3.0, 3.0)],
        Box::new(move |t| cross_entropy(&t[0], &t1).unwrap()),
        Box::new(move |t| candle_nn::loss::cross_entropy(&t[0], &t2).unwrap()),
    ));
    for (name, inputs, fused, reference) in &cases {
        if !name.contains(&only) {
            continue;
        }
        let f = time(inputs, fused, iters);
        let r = time(inputs, reference, iters);
        println!(
            "{name:<40} {:>11.3} {:>11.3} {:>6.2}x",
            f * 1e3,
            r * 1e3,
            r / f
        );
    }
}

//! One optimizer step, relume's fused AdamW against candle-nn's `AdamW`, on the
//! digits MLP (64-256-128-10) and on a ~10M-parameter MLP, at several CPU thread
//! counts. Run: `cargo bench -p relume --bench optim_step`.
//!
//! Each thread count runs in a child process, because candle sizes its worker
//! pools once per process. Prints time per step, parameters updated per second and
//! the ratio relume / candle-nn (lower is better; target <= 0.15).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW as CandleAdamW, Optimizer as _, ParamsAdamW};
use relume::optim::{AdamConfig, AdamW, Grads, Optimizer};
use relume::params::{Init, ParamStore};
use relume::rng::Rng;

type Shapes = &'static [(&'static str, &'static [usize])];

const DIGITS: Shapes = &[
    ("l1.weight", &[256, 64]),
    ("l1.bias", &[256]),
    ("l2.weight", &[128, 256]),
    ("l2.bias", &[128]),
    ("l3.weight", &[10, 128]),
    ("l3.bias", &[10]),
];

const BIG: Shapes = &[
    ("l1.weight", &[4096, 1024]),
    ("l1.bias", &[4096]),
    ("l2.weight", &[1024, 4096]),
    ("l2.bias", &[1024]),
    ("l3.weight", &[1536, 1024]),
    ("l3.bias", &[1536]),
];

fn setup(
    shapes: Shapes,
) -> anyhow::Result<(ParamStore, Vec<Var>, candle_core::backprop::GradStore)> {
    let store = ParamStore::new(Device::Cpu);
    let mut rng = Rng::new(0, "bench-init");
    let mut loss: Option<Tensor> = None;
    for (name, shape) in shapes {
        let p = store.get_or_init(
            name,
            shape.to_vec(),
            Init::KaimingUniform { a: 5f32.sqrt() },
            &mut rng,
        )?;
        let r = Init::Normal {
            mean: 0.0,
            std: 1.0,
        }
        .sample(&p.shape().clone(), &mut rng, &Device::Cpu)?;
        let term = (p * r)?.sum_all()?;
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term)?,
        });
    }
    let grads = loss
        .ok_or_else(|| anyhow::anyhow!("no parameters"))?
        .backward()?;
    let vars = store.named_vars().into_iter().map(|(_, v)| v).collect();
    Ok((store, vars, grads))
}

fn time_per_step(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..(iters / 5).max(2) {
        f()?;
    }
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn bench(label: &str, shapes: Shapes, iters: usize) -> anyhow::Result<()> {
    let (store, vars, store_grads) = setup(shapes)?;
    let n: usize = store.num_elements();
    let grads = Grads::from_backward(&store_grads, &store);
    let mut ours = AdamW::from_store(&store, AdamConfig::adamw())?;
    let t_ours = time_per_step(iters, || Ok(ours.step(&grads)?))?;
    let mut theirs = CandleAdamW::new(vars, ParamsAdamW::default())?;
    let t_theirs = time_per_step(iters, || Ok(theirs.step(&store_grads)?))?;
    println!(
        "threads={:<2} {label:<7} params={n:>9}  relume {:>9.3} ms/step ({:>7.1} Mparam/s)  candle-nn {:>9.3} ms/step ({:>7.1} Mparam/s)  ratio {:.3}",
        relume::threads::cpu_threads(),
        t_ours * 1e3,
        n as f64 / t_ours / 1e6,
        t_theirs * 1e3,
        n as f64 / t_theirs / 1e6,
        t_ours / t_theirs,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if let Ok(t) = std::env::var("OPTIM_BENCH_THREADS") {
        if let Ok(n) = t.parse::<usize>() {
            if n > 0 {
                relume::set_cpu_threads(n);
            }
        }
        bench("digits", DIGITS, 2000)?;
        bench("10M", BIG, 10)?;
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    // 0 = candle's default (physical cores); bench args (e.g. `--bench`) are ignored.
    for threads in ["0", "1", "2"] {
        let status = std::process::Command::new(&exe)
            .env("OPTIM_BENCH_THREADS", threads)
            .env_remove("RAYON_NUM_THREADS")
            .env_remove("CANDLE_NUM_THREADS")
            .status()?;
        if !status.success() {
            anyhow::bail!("bench child with {threads} threads failed: {status}");
        }
    }
    Ok(())
}

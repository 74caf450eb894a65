//! `Stateful::snapshot` resolves to exactly `state_dict()` for every component
//! that overrides it (the async-save fast path must write the bytes a
//! synchronous save would), whether tensors are copied into fresh or recycled
//! buffers.

use candle_core::{Device, Tensor};
use relume::optim::{AdamConfig, AdamW, Grads, Optimizer, Sgd, SgdConfig};
use relume::params::{Init, ParamStore};
use relume::rng::{Rng, RngStreams};
use relume::trainer::LoopState;
use relume_ckpt::{BufferPool, StateDict, Stateful};

fn pools() -> [BufferPool; 2] {
    [BufferPool::new(), BufferPool::with_min_pooled(0)]
}

/// `snapshot` then `resolve`, three times over one pool (so later rounds copy
/// into buffers recycled from the earlier ones), each equal to `state_dict`.
fn check<S: Stateful>(s: &S) -> StateDict
where
    S::Error: std::fmt::Debug,
{
    let want = s.state_dict().unwrap();
    for pool in pools() {
        for _ in 0..3 {
            let got = s.snapshot(&pool).unwrap().resolve().unwrap();
            assert_eq!(got, want);
            pool.recycle([got]);
        }
    }
    want
}

fn store() -> ParamStore {
    let store = ParamStore::new(Device::Cpu);
    let mut rng = Rng::new(0, "init");
    store
        .get_or_init(
            "a.weight",
            (8, 4),
            Init::Uniform { lo: -1.0, hi: 1.0 },
            &mut rng,
        )
        .unwrap();
    store
        .get_or_init(
            "b.bias",
            300_000,
            Init::Uniform { lo: -1.0, hi: 1.0 },
            &mut rng,
        )
        .unwrap();
    store
}

fn grads(store: &ParamStore) -> Grads {
    let mut g = Grads::new();
    for (name, v) in store.named_vars() {
        g.insert(name, Tensor::ones_like(v.as_tensor()).unwrap());
    }
    g
}

#[test]
fn parameters_snapshot_as_their_state_dict() {
    let sd = check(&store());
    assert_eq!(sd.tensors().count(), 2);
}

#[test]
fn optimizers_snapshot_as_their_state_dict() {
    let s = store();
    let mut adam = AdamW::from_store(&s, AdamConfig::adamw().with_lr(1e-2)).unwrap();
    check(&adam); // before any step: no moments
    adam.step(&grads(&s)).unwrap();
    adam.step(&grads(&s)).unwrap();
    let sd = check(&adam);
    assert!(sd.get_tensor("b.bias/exp_avg_sq").is_some());
    let mut sgd = Sgd::from_store(&s, SgdConfig::default().with_momentum(0.9)).unwrap();
    sgd.step(&grads(&s)).unwrap();
    let sd = check(&sgd);
    assert!(sd.get_tensor("a.weight/momentum_buffer").is_some());
}

#[test]
fn rng_and_loop_state_snapshot_as_their_state_dict() {
    let mut r = RngStreams::new(7);
    r.stream("data").uniform_f32();
    r.stream("dropout");
    check(&r);
    check(&LoopState {
        global_step: 12,
        callbacks: vec!["cb".into()],
        ..LoopState::default()
    });
}

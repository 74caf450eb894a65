//! Optimizer state: save mid-run, restore into fresh objects, continue, and get the
//! same bytes as the uninterrupted run; every error on bad state or bad settings.

use candle_core::{Device, Tensor, Var};
use relume::optim::{
    report_to_error, Adam, AdamConfig, AdamW, Grads, Optimizer, ParamGroup, Sgd, SgdConfig,
};
use relume::params::{Init, ParamStore};
use relume::rng::Rng;
use relume::Error;
use relume_ckpt::{RestoreReport, StateDict, Stateful};

const SHAPES: &[(&str, &[usize])] = &[("a.weight", &[5, 3]), ("a.bias", &[5]), ("c.sparse", &[7])];

fn store(shapes: &[(&str, &[usize])]) -> ParamStore {
    let s = ParamStore::new(Device::Cpu);
    let mut rng = Rng::new(7, "init");
    for (n, sh) in shapes {
        s.get_or_init(
            n,
            sh.to_vec(),
            Init::Uniform { lo: -1.0, hi: 1.0 },
            &mut rng,
        )
        .unwrap();
    }
    s
}

/// Deterministic gradients for step `k`; `c.sparse` only gets one every other step
/// so its step counter differs from the others.
fn grads_at(k: u64) -> Grads {
    let mut rng = Rng::new(k, "grads");
    let mut g = Grads::new();
    for (n, sh) in SHAPES {
        if *n == "c.sparse" && k % 2 == 1 {
            continue;
        }
        let len: usize = sh.iter().product();
        let t =
            Tensor::from_vec(rng.uniform_vec(len, -2.0, 2.0), sh.to_vec(), &Device::Cpu).unwrap();
        g.insert(*n, t);
    }
    g
}

type Make = fn(&ParamStore) -> Box<dyn Optimizer>;

fn makers() -> Vec<(&'static str, Make)> {
    vec![
        ("sgd", |s| {
            let cfg = SgdConfig::default()
                .with_lr(0.05)
                .with_momentum(0.9)
                .with_nesterov(true)
                .with_weight_decay(0.01);
            Box::new(Sgd::from_store(s, cfg).unwrap())
        }),
        ("sgd_plain", |s| {
            Box::new(Sgd::from_store(s, SgdConfig::default().with_lr(0.1)).unwrap())
        }),
        ("adam", |s| {
            let cfg = AdamConfig::adam()
                .with_lr(0.01)
                .with_weight_decay(0.1)
                .with_amsgrad(true);
            Box::new(Adam::from_store(s, cfg).unwrap())
        }),
        ("adamw", |s| {
            let cfg = AdamConfig::adamw()
                .with_lr(0.01)
                .with_betas(0.8, 0.95)
                .with_amsgrad(true);
            Box::new(AdamW::from_store(s, cfg).unwrap())
        }),
        ("adamw_fallback", |s| {
            let cfg = AdamConfig::adamw().with_lr(0.01).with_fused(false);
            Box::new(AdamW::from_store(s, cfg).unwrap())
        }),
    ]
}

fn param_bytes(s: &ParamStore) -> Vec<(String, Vec<u32>)> {
    s.named_vars()
        .into_iter()
        .map(|(n, v)| {
            let vals: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            (n, vals.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn state_bytes(sd: &StateDict) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = sd
        .tensors()
        .map(|(k, t)| (k.to_string(), t.bytes().to_vec()))
        .collect();
    out.extend(
        sd.json_leaves()
            .map(|(k, v)| (k.to_string(), v.to_string().into_bytes())),
    );
    out
}

#[test]
fn save_restore_continue_is_bit_identical() {
    for (label, make) in makers() {
        // Uninterrupted run of 10 steps.
        let s_full = store(SHAPES);
        let mut full = make(&s_full);
        for k in 0..10 {
            full.step(&grads_at(k)).unwrap();
        }
        // 5 steps, save, fresh process-like objects, restore, 5 more.
        let s_a = store(SHAPES);
        let mut a = make(&s_a);
        for k in 0..5 {
            a.step(&grads_at(k)).unwrap();
        }
        let saved = a.state_dict().unwrap();
        let s_b = store(SHAPES);
        for (n, v) in s_a.named_vars() {
            s_b.get(&n)
                .unwrap()
                .set(&v.as_tensor().copy().unwrap())
                .unwrap();
        }
        let mut b = make(&s_b);
        let report = b.load_state_dict(&saved).unwrap();
        assert!(report.is_clean(), "{label}: {report:?}");
        for k in 5..10 {
            b.step(&grads_at(k)).unwrap();
        }
        assert_eq!(
            param_bytes(&s_full),
            param_bytes(&s_b),
            "{label}: params differ"
        );
        assert_eq!(
            state_bytes(&full.state_dict().unwrap()),
            state_bytes(&b.state_dict().unwrap()),
            "{label}: optimizer state differs"
        );
        // The per-parameter step counters differ: c.sparse only stepped on even k.
        let sd = b.state_dict().unwrap();
        assert_eq!(
            sd.require_value::<u64>("a.bias/step").unwrap(),
            10,
            "{label}"
        );
        assert_eq!(
            sd.require_value::<u64>("c.sparse/step").unwrap(),
            5,
            "{label}"
        );
    }
}

#[test]
fn state_layout_uses_parameter_names() {
    let s = store(SHAPES);
    let mut opt = AdamW::from_store(&s, AdamConfig::adamw().with_amsgrad(true)).unwrap();
    opt.step(&grads_at(0)).unwrap();
    let sd = opt.state_dict().unwrap();
    for n in ["a.weight", "a.bias", "c.sparse"] {
        for b in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
            let t = sd.get_tensor(&format!("{n}/{b}")).unwrap();
            assert_eq!(t.shape(), s.get(n).unwrap().dims());
        }
        assert_eq!(sd.require_value::<u64>(&format!("{n}/step")).unwrap(), 1);
    }
    assert_eq!(sd.require_value::<String>("kind").unwrap(), "AdamW");
    let groups: serde_json::Value = sd.require_value("param_groups").unwrap();
    assert_eq!(groups[0]["lr"], 1e-3);
    assert_eq!(groups[0]["weight_decay"], 1e-2);
    assert_eq!(groups[0]["betas"][1], 0.999);
}

/// After one real gradient the moments decay geometrically (β1 = 0.9 per step for
/// `exp_avg`, the momentum for SGD). Without the flush they reach the subnormal
/// range (~4e-43 after 900 steps), where every CPU operation on them is slow; the
/// fused kernels store them as zero instead, and never as a subnormal.
#[test]
fn decaying_buffers_never_become_subnormal() {
    let shapes: &[(&str, &[usize])] = &[("w", &[3])];
    let s = store(shapes);
    let mut adam = AdamW::from_store(&s, AdamConfig::adamw()).unwrap();
    let s2 = store(shapes);
    let mut sgd = Sgd::from_store(&s2, SgdConfig::default().with_momentum(0.9)).unwrap();
    let grad = |v: f32| {
        let mut g = Grads::new();
        g.insert("w", Tensor::new(&[v, -v, 0.5 * v], &Device::Cpu).unwrap());
        g
    };
    adam.step(&grad(0.1)).unwrap();
    sgd.step(&grad(0.1)).unwrap();
    for _ in 0..900 {
        adam.step(&grad(0.0)).unwrap();
        sgd.step(&grad(0.0)).unwrap();
    }
    let a = adam.state_dict().unwrap();
    let b = sgd.state_dict().unwrap();
    for (sd, key) in [
        (&a, "w/exp_avg"),
        (&a, "w/exp_avg_sq"),
        (&b, "w/momentum_buffer"),
    ] {
        let vals = sd.get_tensor(key).unwrap().to_f32_vec().unwrap();
        assert!(
            vals.iter().all(|v| *v == 0.0 || v.is_normal()),
            "{key} holds a subnormal: {vals:?}"
        );
    }
    // exp_avg went 0.1·0.9^900 ≈ 4e-43 → flushed; exp_avg_sq (β2 = 0.999) is still normal.
    assert!(a
        .get_tensor("w/exp_avg")
        .unwrap()
        .to_f32_vec()
        .unwrap()
        .iter()
        .all(|v| *v == 0.0));
    assert!(a
        .get_tensor("w/exp_avg_sq")
        .unwrap()
        .to_f32_vec()
        .unwrap()
        .iter()
        .all(|v| v.is_normal()));
}

#[test]
fn other_kind_of_state_is_a_state_kind_error() {
    let s = store(SHAPES);
    let mut adam = Adam::from_store(&s, AdamConfig::adam()).unwrap();
    adam.step(&grads_at(0)).unwrap();
    let mut adamw = AdamW::from_store(&s, AdamConfig::adamw()).unwrap();
    let err = adamw
        .load_state_dict(&adam.state_dict().unwrap())
        .unwrap_err();
    assert!(
        matches!(err, Error::StateKind { ref saved, ref live, .. } if saved == "Adam" && live == "AdamW"),
        "{err}"
    );
}

#[test]
fn every_mismatched_parameter_is_listed_and_nothing_changes() {
    let s = store(SHAPES);
    let mut old = AdamW::from_store(&s, AdamConfig::adamw()).unwrap();
    old.step(&grads_at(0)).unwrap();
    let saved = old.state_dict().unwrap();

    // Live model: a.bias renamed to a.offset, c.sparse with another shape.
    let other = store(&[
        ("a.weight", &[5, 3]),
        ("a.offset", &[5]),
        ("c.sparse", &[8]),
    ]);
    let mut live = AdamW::from_store(&other, AdamConfig::adamw()).unwrap();
    live.step(&{
        let mut g = Grads::new();
        g.insert(
            "a.offset",
            Tensor::ones(5, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        g
    })
    .unwrap();
    let before = live.state_dict().unwrap();
    let err = live.load_state_dict(&saved).unwrap_err();
    let Error::StateMismatch { problems, .. } = &err else {
        panic!("wrong error {err}")
    };
    let text = problems.join("\n");
    for needle in [
        "a.offset",
        "a.bias",
        "c.sparse/exp_avg",
        "c.sparse/exp_avg_sq",
    ] {
        assert!(text.contains(needle), "{needle} not listed in:\n{text}");
    }
    assert!(
        !text.contains("a.weight"),
        "a.weight fits and must not be listed:\n{text}"
    );
    assert_eq!(
        state_bytes(&before),
        state_bytes(&live.state_dict().unwrap())
    );
}

#[test]
fn report_to_error_lists_every_key() {
    let mut r = RestoreReport::new();
    r.missing("x/exp_avg");
    r.unexpected("y/step");
    r.mismatched("z/exp_avg", "shape [2]", "shape [3]");
    let Err(Error::StateMismatch {
        component,
        problems,
    }) = report_to_error("AdamW", &r)
    else {
        panic!("expected StateMismatch")
    };
    assert_eq!(component, "AdamW");
    assert_eq!(problems.len(), 3);
    assert!(
        problems[0].contains("x/exp_avg")
            && problems[1].contains("y/step")
            && problems[2].contains("z/exp_avg")
    );
    assert!(report_to_error("AdamW", &RestoreReport::new()).is_ok());
}

fn is_bad_hp<T: std::fmt::Debug>(r: relume::Result<T>, what: &str) -> bool {
    matches!(r, Err(Error::InvalidHyperParameter { what: ref w, .. }) if w == what)
}

#[test]
fn nan_inf_negative_lr_rejected_at_construction() {
    let s = store(SHAPES);
    for lr in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.1] {
        assert!(
            is_bad_hp(Sgd::from_store(&s, SgdConfig::default().with_lr(lr)), "lr"),
            "sgd {lr}"
        );
        assert!(
            is_bad_hp(Adam::from_store(&s, AdamConfig::adam().with_lr(lr)), "lr"),
            "adam {lr}"
        );
        assert!(
            is_bad_hp(AdamW::from_store(&s, AdamConfig::adamw().with_lr(lr)), "lr"),
            "adamw {lr}"
        );
        let groups = vec![ParamGroup {
            params: s.named_vars(),
            lr,
            weight_decay: 0.0,
        }];
        assert!(
            is_bad_hp(AdamW::new(groups, AdamConfig::adamw()), "lr"),
            "group {lr}"
        );
    }
}

#[test]
fn nan_inf_lr_rejected_by_set_lr() {
    let s = store(SHAPES);
    let opts: Vec<Box<dyn Optimizer>> = vec![
        Box::new(Sgd::from_store(&s, SgdConfig::default()).unwrap()),
        Box::new(Adam::from_store(&s, AdamConfig::adam()).unwrap()),
        Box::new(AdamW::from_store(&s, AdamConfig::adamw()).unwrap()),
    ];
    for mut o in opts {
        for lr in [f64::NAN, f64::INFINITY, -1.0] {
            assert!(is_bad_hp(o.set_lr(0, lr), "lr"), "{} {lr}", o.kind());
            assert_eq!(o.lr(0), 1e-3, "a rejected lr must not be applied");
        }
        assert!(is_bad_hp(o.set_lr(1, 0.1), "param group index"));
        o.set_lr(0, 0.5).unwrap();
        assert_eq!(o.lrs(), vec![0.5]);
    }
}

#[test]
fn other_bad_hyper_parameters_rejected() {
    let s = store(SHAPES);
    assert!(is_bad_hp(
        Adam::from_store(&s, AdamConfig::adam().with_betas(1.0, 0.999)),
        "betas.0"
    ));
    assert!(is_bad_hp(
        AdamW::from_store(&s, AdamConfig::adamw().with_betas(0.9, f64::NAN)),
        "betas.1"
    ));
    assert!(is_bad_hp(
        AdamW::from_store(&s, AdamConfig::adamw().with_eps(-1.0)),
        "eps"
    ));
    assert!(is_bad_hp(
        AdamW::from_store(&s, AdamConfig::adamw().with_weight_decay(f64::INFINITY)),
        "weight_decay"
    ));
    assert!(is_bad_hp(
        Sgd::from_store(&s, SgdConfig::default().with_momentum(-0.5)),
        "momentum"
    ));
    assert!(is_bad_hp(
        Sgd::from_store(&s, SgdConfig::default().with_nesterov(true)),
        "momentum (nesterov)"
    ));
}

#[test]
fn param_groups_have_their_own_lr_and_restore_them() {
    let s = store(SHAPES);
    let vars = s.named_vars();
    type Named = Vec<(String, Var)>;
    let (g0, g1): (Named, Named) = vars.into_iter().partition(|(n, _)| n.starts_with("a."));
    let groups = vec![
        ParamGroup {
            params: g0.clone(),
            lr: 0.0,
            weight_decay: 0.0,
        },
        ParamGroup {
            params: g1.clone(),
            lr: 0.1,
            weight_decay: 0.0,
        },
    ];
    let mut opt = Sgd::new(groups.clone(), SgdConfig::default()).unwrap();
    let before: Vec<f32> = g0[0].1.flatten_all().unwrap().to_vec1().unwrap();
    let before_c: Vec<f32> = g1[0].1.flatten_all().unwrap().to_vec1().unwrap();
    opt.step(&grads_at(0)).unwrap();
    assert_eq!(
        before,
        g0[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "lr 0 group moved"
    );
    assert_ne!(
        before_c,
        g1[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "lr 0.1 group did not move"
    );
    opt.set_lr(1, 0.25).unwrap();
    let saved = opt.state_dict().unwrap();
    let mut fresh = Sgd::new(groups, SgdConfig::default()).unwrap();
    fresh.load_state_dict(&saved).unwrap();
    assert_eq!(fresh.lrs(), vec![0.0, 0.25]);
}

#[test]
fn duplicate_parameter_across_groups_rejected() {
    let s = store(SHAPES);
    let vars = s.named_vars();
    let groups = vec![
        ParamGroup {
            params: vars.clone(),
            lr: 0.1,
            weight_decay: 0.0,
        },
        ParamGroup {
            params: vars[..1].to_vec(),
            lr: 0.1,
            weight_decay: 0.0,
        },
    ];
    assert!(matches!(
        Adam::new(groups, AdamConfig::adam()),
        Err(Error::StateMismatch { .. })
    ));
}

#[test]
fn maximize_equals_minimizing_the_negated_gradient() {
    fn neg(g: &Grads) -> Grads {
        let mut out = Grads::new();
        for (n, t) in g.iter() {
            out.insert(n, t.neg().unwrap());
        }
        out
    }
    type Pair = fn(&ParamStore, bool) -> Box<dyn Optimizer>;
    let pairs: [Pair; 2] = [
        |s, m| {
            let cfg = SgdConfig::default()
                .with_lr(0.1)
                .with_momentum(0.9)
                .with_maximize(m);
            Box::new(Sgd::from_store(s, cfg).unwrap())
        },
        |s, m| Box::new(AdamW::from_store(s, AdamConfig::adamw().with_maximize(m)).unwrap()),
    ];
    for make in pairs {
        let (s1, s2) = (store(SHAPES), store(SHAPES));
        let (mut max, mut min) = (make(&s1, true), make(&s2, false));
        for k in 0..4 {
            max.step(&grads_at(k)).unwrap();
            min.step(&neg(&grads_at(k))).unwrap();
        }
        assert_eq!(param_bytes(&s1), param_bytes(&s2), "{}", max.kind());
    }
}

//! Scheduler state contracts: save at any step, restore into a fresh scheduler,
//! continue both and get bit-identical rates; every bad input is a clear error.

use relume::sched::{
    AnnealStrategy, CosineAnnealingLR, CosineAnnealingWarmRestarts, ExponentialLR, LinearLR,
    LrScheduler, MultiStepLR, OneCycleLR, OneCycleOptions, PlateauMode, PlateauOptions,
    PolynomialLR, ReduceLROnPlateau, SequentialLR, StepLR, ThresholdMode,
};
use relume::Error;
use relume_ckpt::{Leaf, StateDict, Stateful};
use serde_json::{json, Value};

type Factory = fn() -> Box<dyn LrScheduler>;
type Built = Result<Box<dyn LrScheduler>, Error>;
type Chain = (Vec<Box<dyn LrScheduler>>, Vec<u64>, &'static str);

fn base() -> Vec<f64> {
    vec![0.1, 0.02]
}

fn factories() -> Vec<(&'static str, Factory)> {
    vec![
        ("StepLR", || Box::new(StepLR::new(base(), 3, 0.5).unwrap())),
        ("MultiStepLR", || {
            Box::new(MultiStepLR::new(base(), vec![2, 5, 5, 9], 0.3).unwrap())
        }),
        ("ExponentialLR", || {
            Box::new(ExponentialLR::new(base(), 0.93).unwrap())
        }),
        ("CosineAnnealingLR", || {
            Box::new(CosineAnnealingLR::new(base(), 7, 0.001).unwrap())
        }),
        ("CosineAnnealingWarmRestarts", || {
            Box::new(CosineAnnealingWarmRestarts::new(base(), 3, 2, 0.0005).unwrap())
        }),
        ("LinearLR", || {
            Box::new(LinearLR::new(base(), 0.25, 0.9, 6).unwrap())
        }),
        ("SequentialLR", || {
            Box::new(
                SequentialLR::new(
                    vec![
                        Box::new(LinearLR::new(base(), 0.1, 1.0, 3).unwrap()),
                        Box::new(CosineAnnealingWarmRestarts::new(base(), 4, 1, 0.0).unwrap()),
                        Box::new(CosineAnnealingLR::new(base(), 10, 0.0).unwrap()),
                    ],
                    vec![3, 11],
                )
                .unwrap(),
            )
        }),
        ("OneCycleLR", || {
            Box::new(
                OneCycleLR::new(
                    vec![0.1, 0.05],
                    60,
                    OneCycleOptions {
                        three_phase: true,
                        anneal_strategy: AnnealStrategy::Linear,
                        ..OneCycleOptions::default()
                    },
                )
                .unwrap(),
            )
        }),
        ("PolynomialLR", || {
            Box::new(PolynomialLR::new(base(), 12, 1.5).unwrap())
        }),
        ("ReduceLROnPlateau", || {
            Box::new(
                ReduceLROnPlateau::new(
                    base(),
                    PlateauOptions {
                        patience: 1,
                        cooldown: 2,
                        factor: 0.5,
                        min_lrs: vec![0.01, 0.001],
                        ..PlateauOptions::default()
                    },
                )
                .unwrap(),
            )
        }),
    ]
}

/// A metric that improves, stalls and wobbles, for the plateau scheduler.
fn metric(i: usize) -> Option<f64> {
    Some(1.0 - 0.01 * i as f64 + 0.05 * ((i * 7) % 5) as f64)
}

/// Writes every JSON leaf to text and parses it back, as a checkpoint on disk does.
fn through_json(sd: &StateDict) -> StateDict {
    sd.iter()
        .map(|(k, leaf)| match leaf {
            Leaf::Json(v) => {
                let text = serde_json::to_string(v).unwrap();
                (
                    k.to_string(),
                    Leaf::Json(serde_json::from_str(&text).unwrap()),
                )
            }
            Leaf::Tensor(t) => (k.to_string(), Leaf::Tensor(t.clone())),
        })
        .collect()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn restore_at_every_step_continues_bit_identically() {
    for (kind, make) in factories() {
        for k in 0..24 {
            let mut a = make();
            assert_eq!(a.kind(), kind);
            for i in 0..k {
                a.step(metric(i)).unwrap();
            }
            let saved = through_json(&a.state_dict().unwrap());
            let mut b = make();
            let report = b.load_state_dict(&saved).unwrap();
            assert!(report.is_clean(), "{kind} at {k}: {report:?}");
            assert_eq!(report.restored.len(), saved.len(), "{kind}: {report:?}");
            assert_eq!(bits(&a.lrs()), bits(&b.lrs()), "{kind} at {k}");
            for i in k..k + 16 {
                let ra = a.step(metric(i)).unwrap();
                let rb = b.step(metric(i)).unwrap();
                assert_eq!(bits(&ra), bits(&rb), "{kind}: saved at {k}, step {i}");
            }
            assert_eq!(a.state_dict().unwrap(), b.state_dict().unwrap(), "{kind}");
        }
    }
}

#[test]
fn restored_scheduler_differs_from_a_fresh_one() {
    // The test above could pass if restore did nothing and both started fresh at
    // step 0; check that state really moved.
    for (kind, make) in factories() {
        let mut a = make();
        for i in 0..10 {
            a.step(metric(i)).unwrap();
        }
        let mut b = make();
        let fresh = b.state_dict().unwrap();
        b.load_state_dict(&a.state_dict().unwrap()).unwrap();
        assert_ne!(b.state_dict().unwrap(), fresh, "{kind}");
        assert_eq!(
            b.state_dict().unwrap().get_json("last_epoch"),
            Some(&json!(10))
        );
    }
}

#[test]
fn state_of_another_kind_is_a_state_kind_error() {
    let f = factories();
    for i in 0..f.len() {
        let other = (f[(i + 1) % f.len()].1)().state_dict().unwrap();
        let mut live = (f[i].1)();
        let before = live.state_dict().unwrap();
        match live.load_state_dict(&other) {
            Err(Error::StateKind { saved, live: l, .. }) => {
                assert_eq!(saved, f[(i + 1) % f.len()].0);
                assert_eq!(l, f[i].0);
            }
            other => panic!("{}: expected StateKind, got {other:?}", f[i].0),
        }
        assert_eq!(live.state_dict().unwrap(), before);
    }
}

#[test]
fn different_number_of_groups_is_a_state_mismatch_naming_groups() {
    let saved = StepLR::new(vec![0.1, 0.2, 0.3], 3, 0.5)
        .unwrap()
        .state_dict()
        .unwrap();
    let mut live = StepLR::new(vec![0.1], 3, 0.5).unwrap();
    match live.load_state_dict(&saved) {
        Err(Error::StateMismatch {
            component,
            problems,
        }) => {
            assert_eq!(component, "StepLR");
            assert!(problems[0].contains("1 param groups"), "{problems:?}");
            assert!(problems[0].contains("has 3"), "{problems:?}");
        }
        other => panic!("expected StateMismatch, got {other:?}"),
    }
}

#[test]
fn non_finite_rate_in_state_is_rejected_and_nothing_applied() {
    for (kind, make) in factories() {
        let mut a = make();
        a.step(metric(0)).unwrap();
        let mut sd = a.state_dict().unwrap();
        sd.insert_json("lrs", json!(["NaN", "0.1"]));
        let mut b = make();
        let before = b.state_dict().unwrap();
        let err = b.load_state_dict(&sd).unwrap_err();
        assert!(
            matches!(err, Error::InvalidHyperParameter { ref what, .. } if what == "lr"),
            "{kind}: {err:?}"
        );
        assert_eq!(b.state_dict().unwrap(), before, "{kind}");
    }
}

#[test]
fn float_leaf_written_as_number_is_a_json_error() {
    let mut sd = ExponentialLR::new(vec![0.1], 0.9)
        .unwrap()
        .state_dict()
        .unwrap();
    sd.insert_json("lrs", json!([0.1]));
    let err = ExponentialLR::new(vec![0.1], 0.9)
        .unwrap()
        .load_state_dict(&sd)
        .unwrap_err();
    assert!(
        matches!(err, Error::Ckpt(relume_ckpt::Error::JsonValue { ref key, .. }) if key == "lrs"),
        "{err:?}"
    );
}

#[test]
fn non_finite_base_rate_is_rejected_by_every_constructor() {
    let bad = vec![f64::NAN];
    let results: Vec<(&str, Built)> = vec![
        (
            "StepLR",
            StepLR::new(bad.clone(), 1, 0.5).map(|s| Box::new(s) as _),
        ),
        (
            "MultiStepLR",
            MultiStepLR::new(bad.clone(), vec![1], 0.5).map(|s| Box::new(s) as _),
        ),
        (
            "ExponentialLR",
            ExponentialLR::new(bad.clone(), 0.5).map(|s| Box::new(s) as _),
        ),
        (
            "CosineAnnealingLR",
            CosineAnnealingLR::new(bad.clone(), 5, 0.0).map(|s| Box::new(s) as _),
        ),
        (
            "CosineAnnealingWarmRestarts",
            CosineAnnealingWarmRestarts::new(bad.clone(), 5, 1, 0.0).map(|s| Box::new(s) as _),
        ),
        (
            "LinearLR",
            LinearLR::new(bad.clone(), 0.1, 1.0, 5).map(|s| Box::new(s) as _),
        ),
        (
            "OneCycleLR",
            OneCycleLR::new(vec![f64::INFINITY], 10, OneCycleOptions::default())
                .map(|s| Box::new(s) as _),
        ),
        (
            "PolynomialLR",
            PolynomialLR::new(bad.clone(), 5, 1.0).map(|s| Box::new(s) as _),
        ),
        (
            "ReduceLROnPlateau",
            ReduceLROnPlateau::new(bad.clone(), PlateauOptions::default())
                .map(|s| Box::new(s) as _),
        ),
    ];
    for (kind, r) in results {
        match r {
            Err(Error::InvalidHyperParameter { component, .. }) => {
                assert!(component.starts_with(kind), "{component}")
            }
            other => panic!(
                "{kind}: expected InvalidHyperParameter, got {:?}",
                other.err()
            ),
        }
    }
}

#[test]
fn bad_settings_are_invalid_hyper_parameters() {
    let b = || vec![0.1];
    let errs = [
        StepLR::new(b(), 0, 0.5).err(),
        StepLR::new(b(), 1, f64::NAN).err(),
        ExponentialLR::new(b(), -1.0).err(),
        CosineAnnealingLR::new(b(), 0, 0.0).err(),
        CosineAnnealingLR::new(b(), 5, f64::INFINITY).err(),
        CosineAnnealingWarmRestarts::new(b(), 0, 1, 0.0).err(),
        CosineAnnealingWarmRestarts::new(b(), 1, 0, 0.0).err(),
        LinearLR::new(b(), 0.0, 1.0, 5).err(),
        LinearLR::new(b(), 0.5, 1.5, 5).err(),
        LinearLR::new(b(), 0.5, 1.0, 0).err(),
        PolynomialLR::new(b(), 0, 1.0).err(),
        PolynomialLR::new(b(), 5, -1.0).err(),
        OneCycleLR::new(b(), 0, OneCycleOptions::default()).err(),
        OneCycleLR::new(
            b(),
            10,
            OneCycleOptions {
                pct_start: 1.5,
                ..Default::default()
            },
        )
        .err(),
        ReduceLROnPlateau::new(
            b(),
            PlateauOptions {
                factor: 1.0,
                ..Default::default()
            },
        )
        .err(),
        ReduceLROnPlateau::new(
            b(),
            PlateauOptions {
                min_lrs: vec![f64::NAN],
                ..Default::default()
            },
        )
        .err(),
    ];
    for (i, e) in errs.into_iter().enumerate() {
        assert!(
            matches!(e, Some(Error::InvalidHyperParameter { .. })),
            "case {i}: {e:?}"
        );
    }
}

#[test]
fn non_finite_rate_produced_by_step_is_an_error_and_state_is_unchanged() {
    let mut s = ExponentialLR::new(vec![1e300], 1e10).unwrap();
    let before = s.state_dict().unwrap();
    let err = s.step(None).unwrap_err();
    assert!(
        matches!(err, Error::InvalidHyperParameter { value, .. } if value.is_infinite()),
        "{err:?}"
    );
    assert_eq!(s.state_dict().unwrap(), before);
}

#[test]
fn plateau_without_metric_is_missing_metric() {
    let mut s = ReduceLROnPlateau::new(vec![0.1], PlateauOptions::default()).unwrap();
    assert!(s.needs_metric());
    let before = s.state_dict().unwrap();
    let err = s.step(None).unwrap_err();
    assert!(
        matches!(err, Error::MissingMetric { ref scheduler } if scheduler == "ReduceLROnPlateau")
    );
    assert!(err.to_string().contains("validation loss"));
    assert_eq!(s.state_dict().unwrap(), before);
}

#[test]
fn plateau_max_abs_mode_and_infinite_best_round_trip() {
    let opts = PlateauOptions {
        mode: PlateauMode::Max,
        threshold_mode: ThresholdMode::Abs,
        threshold: 0.1,
        patience: 0,
        ..PlateauOptions::default()
    };
    let mut s = ReduceLROnPlateau::new(vec![0.1], opts.clone()).unwrap();
    // best = -inf before any metric: it must survive JSON.
    let sd = through_json(&s.state_dict().unwrap());
    assert_eq!(sd.get_json("best"), Some(&json!("-inf")));
    let mut t = ReduceLROnPlateau::new(vec![0.1], opts).unwrap();
    assert!(t.load_state_dict(&sd).unwrap().is_clean());
    assert_eq!(s.step(Some(0.5)).unwrap(), vec![0.1]); // improves on -inf
    assert_eq!(s.step(Some(0.55)).unwrap(), vec![0.010000000000000002]); // < best + 0.1
    t.step(Some(0.5)).unwrap();
    assert_eq!(bits(&t.step(Some(0.55)).unwrap()), bits(&s.lrs()));
}

#[test]
fn one_cycle_past_total_steps_is_schedule_exhausted() {
    let mut s = OneCycleLR::new(vec![0.1], 3, OneCycleOptions::default()).unwrap();
    for _ in 0..3 {
        s.step(None).unwrap();
    }
    let before = s.state_dict().unwrap();
    let err = s.step(None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ScheduleExhausted {
                step: 4,
                total_steps: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(s.state_dict().unwrap(), before);
}

fn lin() -> Box<dyn LrScheduler> {
    Box::new(LinearLR::new(vec![0.1], 0.1, 1.0, 3).unwrap())
}

fn cos() -> Box<dyn LrScheduler> {
    Box::new(CosineAnnealingLR::new(vec![0.1], 10, 0.0).unwrap())
}

#[test]
fn sequential_rejects_bad_chains() {
    let mut stepped = cos();
    stepped.step(None).unwrap();
    let plateau: Box<dyn LrScheduler> =
        Box::new(ReduceLROnPlateau::new(vec![0.1], PlateauOptions::default()).unwrap());
    let nested: Box<dyn LrScheduler> =
        Box::new(SequentialLR::new(vec![lin(), cos()], vec![3]).unwrap());
    let two_groups: Box<dyn LrScheduler> =
        Box::new(ExponentialLR::new(vec![0.1, 0.2], 0.9).unwrap());
    let cases: Vec<Chain> = vec![
        (vec![], vec![], "at least one"),
        (vec![lin(), cos()], vec![], "need 1 milestones"),
        (vec![lin(), cos(), cos()], vec![5, 5], "strictly increasing"),
        (vec![lin(), cos()], vec![0], "strictly increasing"),
        (vec![lin(), stepped], vec![3], "already stepped"),
        (vec![lin(), plateau], vec![3], "needs a metric"),
        (vec![lin(), nested], vec![3], "nesting"),
        (vec![lin(), two_groups], vec![3], "param groups"),
    ];
    for (children, milestones, needle) in cases {
        match SequentialLR::new(children, milestones) {
            Err(Error::InvalidSchedule { scheduler, reason }) => {
                assert_eq!(scheduler, "SequentialLR");
                assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
            }
            other => panic!("expected InvalidSchedule ({needle}), got {:?}", other.err()),
        }
    }
}

#[test]
fn sequential_restore_is_all_or_nothing() {
    let make = || SequentialLR::new(vec![lin(), cos()], vec![3]).unwrap();
    let mut a = make();
    for _ in 0..5 {
        a.step(None).unwrap();
    }
    let mut sd = a.state_dict().unwrap();
    assert!(sd.contains_key("children/1/t_max") || sd.contains_key("children/1/last_epoch"));
    sd.insert_json("children/1/kind", json!("StepLR"));
    let mut b = make();
    let before = b.state_dict().unwrap();
    assert!(matches!(
        b.load_state_dict(&sd),
        Err(Error::StateKind { .. })
    ));
    assert_eq!(
        b.state_dict().unwrap(),
        before,
        "child 0 was not rolled back"
    );
}

#[test]
fn sequential_reports_missing_and_unexpected_children() {
    let make = || SequentialLR::new(vec![lin(), cos()], vec![3]).unwrap();
    let mut sd = make().state_dict().unwrap();
    let child1: Vec<String> = sd
        .keys()
        .filter(|k| k.starts_with("children/1/"))
        .map(String::from)
        .collect();
    for k in child1 {
        sd.remove(&k);
    }
    sd.insert_json("children/7/kind", json!("StepLR"));
    let report = make().load_state_dict(&sd).unwrap();
    assert_eq!(report.missing, vec!["children/1/kind"]);
    assert_eq!(report.unexpected, vec!["children/7/kind"]);
}

#[test]
fn missing_leaf_is_reported_and_nothing_applied() {
    let mut a = CosineAnnealingWarmRestarts::new(vec![0.1], 3, 2, 0.0).unwrap();
    for _ in 0..4 {
        a.step(None).unwrap();
    }
    let mut sd = a.state_dict().unwrap();
    sd.remove("t_cur");
    sd.insert_json("surprise", json!(1));
    let mut b = CosineAnnealingWarmRestarts::new(vec![0.1], 3, 2, 0.0).unwrap();
    let before = b.state_dict().unwrap();
    let report = b.load_state_dict(&sd).unwrap();
    assert_eq!(report.missing, vec!["t_cur"]);
    assert_eq!(report.unexpected, vec!["surprise"]);
    assert!(report.restored.is_empty());
    assert_eq!(b.state_dict().unwrap(), before);
}

#[test]
fn warm_restart_counters_out_of_range_are_a_state_mismatch() {
    let mut sd = CosineAnnealingWarmRestarts::new(vec![0.1], 3, 2, 0.0)
        .unwrap()
        .state_dict()
        .unwrap();
    sd.insert_json("t_cur", json!(3));
    let err = CosineAnnealingWarmRestarts::new(vec![0.1], 3, 2, 0.0)
        .unwrap()
        .load_state_dict(&sd)
        .unwrap_err();
    assert!(matches!(err, Error::StateMismatch { .. }), "{err:?}");
}

#[test]
fn changed_settings_are_reported_as_a_config_mismatch() {
    let saved = StepLR::new(vec![0.1], 3, 0.5)
        .unwrap()
        .state_dict()
        .unwrap();
    let mut live = StepLR::new(vec![0.1], 3, 0.1).unwrap();
    let report = live.load_state_dict(&saved).unwrap();
    assert_eq!(report.mismatched.len(), 1);
    assert_eq!(report.mismatched[0].key, "config");
    assert!(report.mismatched[0].got.contains("0.5"));
    assert!(report.mismatched[0].expected.contains("0.1"));
}

#[test]
fn config_names_kind_and_settings() {
    let s = SequentialLR::new(vec![lin(), cos()], vec![3]).unwrap();
    let c: Value = s.config();
    assert_eq!(c["kind"], "SequentialLR");
    assert_eq!(c["children"][1]["kind"], "CosineAnnealingLR");
    assert_eq!(c["children"][1]["t_max"], 10);
    assert_eq!(c["milestones"], json!([3]));
}

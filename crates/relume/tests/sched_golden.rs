//! Every scheduler reproduces the learning-rate sequence torch itself produced
//! (`tests/data/torch_golden.json`, key `schedulers`) to 1e-9 relative.

use relume::sched::{
    CosineAnnealingLR, CosineAnnealingWarmRestarts, ExponentialLR, LinearLR, LrScheduler,
    MultiStepLR, OneCycleLR, OneCycleOptions, PlateauOptions, PolynomialLR, ReduceLROnPlateau,
    SequentialLR, StepLR,
};
use serde_json::Value;

fn golden_text() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/torch_golden.json"
    ))
    .unwrap()
}

fn golden() -> Vec<Value> {
    let v: Value = serde_json::from_str(&golden_text()).unwrap();
    v["schedulers"].as_array().unwrap().clone()
}

/// The float list `key` of configuration `name`, parsed from the file's text with
/// Rust's correctly rounded `str::parse`: serde_json's default number parser is
/// off by an ulp for some 17-digit values (13 of these 300 rates), which would
/// hide whether relume matches torch to the bit.
fn exact_floats(text: &str, name: &str, key: &str) -> Option<Vec<f64>> {
    let at = text.find(&format!("\"name\": \"{name}\""))?;
    let rest = &text[at..];
    let end_of_case = rest[1..].find("\"name\": ").map_or(rest.len(), |e| e + 1);
    let case = &rest[..end_of_case];
    let start = case.find(&format!("\"{key}\": ["))? + key.len() + 5;
    let len = case[start..].find(']')?;
    Some(
        case[start..start + len]
            .split(',')
            .map(|x| x.trim().parse::<f64>().unwrap())
            .collect(),
    )
}

/// The scheduler of each golden configuration (parameters from its `spec`).
fn build(name: &str, base: f64) -> Box<dyn LrScheduler> {
    let b = vec![base];
    match name {
        "step" => Box::new(StepLR::new(b, 7, 0.5).unwrap()),
        "multistep" => Box::new(MultiStepLR::new(b, vec![5, 12], 0.1).unwrap()),
        "exponential" => Box::new(ExponentialLR::new(b, 0.9).unwrap()),
        "cosine" => Box::new(CosineAnnealingLR::new(b, 10, 0.001).unwrap()),
        "cosine_warm_restarts" => Box::new(CosineAnnealingWarmRestarts::new(b, 5, 2, 0.0).unwrap()),
        "linear_warmup" => Box::new(LinearLR::new(b, 0.1, 1.0, 5).unwrap()),
        "warmup_then_cosine" => Box::new(
            SequentialLR::new(
                vec![
                    Box::new(LinearLR::new(b.clone(), 0.1, 1.0, 5).unwrap()),
                    Box::new(CosineAnnealingLR::new(b, 25, 0.0).unwrap()),
                ],
                vec![5],
            )
            .unwrap(),
        ),
        "one_cycle" => Box::new(OneCycleLR::new(b, 30, OneCycleOptions::default()).unwrap()),
        "polynomial" => Box::new(PolynomialLR::new(b, 20, 2.0).unwrap()),
        "plateau" => Box::new(
            ReduceLROnPlateau::new(
                b,
                PlateauOptions {
                    factor: 0.5,
                    patience: 2,
                    threshold: 1e-4,
                    cooldown: 0,
                    min_lrs: vec![0.001],
                    ..PlateauOptions::default()
                },
            )
            .unwrap(),
        ),
        other => panic!("golden configuration {other:?} has no builder"),
    }
}

fn assert_close(name: &str, i: usize, got: f64, want: f64) {
    let tol = 1e-9 * want.abs().max(f64::MIN_POSITIVE);
    assert!(
        (got - want).abs() <= tol,
        "{name}: lr before step {i}: got {got:e}, torch {want:e}"
    );
}

#[test]
fn all_ten_sequences_match_torch() {
    let cases = golden();
    let text = golden_text();
    assert_eq!(cases.len(), 10);
    let mut exact = 0;
    let mut total = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let want = exact_floats(&text, name, "lr_before_each_step").unwrap();
        let metrics = exact_floats(&text, name, "metrics");
        assert_eq!(want.len(), 30, "{name}");
        let mut s = build(name, case["base_lr"].as_f64().unwrap());
        for (i, &w) in want.iter().enumerate() {
            if i > 0 {
                let metric = metrics.as_ref().map(|m| m[i - 1]);
                s.step(metric).unwrap();
            }
            let got = s.lrs()[0];
            assert_close(name, i, got, w);
            exact += usize::from(got.to_bits() == w.to_bits());
            total += 1;
        }
    }
    // The arithmetic replays torch's, so every value should agree to the bit.
    assert_eq!(
        exact, total,
        "only {exact} of {total} rates are bit-identical"
    );
}

#[test]
fn golden_covers_every_kind() {
    let kinds: std::collections::BTreeSet<&str> = golden()
        .iter()
        .map(|c| build(c["name"].as_str().unwrap(), 0.1).kind())
        .collect();
    assert_eq!(kinds.len(), 10, "{kinds:?}");
}

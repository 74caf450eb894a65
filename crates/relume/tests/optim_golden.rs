//! Every optimizer against PyTorch's own trajectories
//! (`tests/data/torch_golden.json`): parameters after each of 6 steps and the final
//! state tensors, for both the fused CPU kernel and the tensor-op fallback.

use candle_core::{Device, Tensor, Var};
use relume::optim::{Adam, AdamConfig, AdamW, Grads, Optimizer, Sgd, SgdConfig};
use serde_json::Value;

/// The fused CPU kernels fuse multiply-adds exactly where torch's CPU kernels do and
/// agree to within 1e-6 relative (in practice ~1 ulp).
const REL_TOL: f64 = 1e-6;
/// The tensor-op fallback (for non-CPU devices) cannot fuse multiply-adds, so moments
/// that nearly cancel differ by an ulp of their inputs.
const FALLBACK_REL_TOL: f64 = 1e-4;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn build(spec: &Value, params: Vec<(String, Var)>, fused: bool) -> Box<dyn Optimizer> {
    let kw = &spec["kwargs"];
    let f = |k: &str, d: f64| kw.get(k).and_then(Value::as_f64).unwrap_or(d);
    let b = |k: &str| kw.get(k).and_then(Value::as_bool).unwrap_or(false);
    match spec["optimizer"].as_str().unwrap() {
        "SGD" => Box::new(
            Sgd::from_params(
                params,
                SgdConfig::default()
                    .with_lr(f("lr", 1e-3))
                    .with_momentum(f("momentum", 0.0))
                    .with_dampening(f("dampening", 0.0))
                    .with_weight_decay(f("weight_decay", 0.0))
                    .with_nesterov(b("nesterov"))
                    .with_fused(fused),
            )
            .unwrap(),
        ),
        kind @ ("Adam" | "AdamW") => {
            let base = if kind == "Adam" {
                AdamConfig::adam()
            } else {
                AdamConfig::adamw()
            };
            let betas = kw.get("betas").map(f32s).unwrap_or_default();
            let mut cfg = base
                .with_lr(f("lr", 1e-3))
                .with_eps(f("eps", 1e-8))
                .with_amsgrad(b("amsgrad"))
                .with_fused(fused);
            let wd = f("weight_decay", cfg.weight_decay);
            cfg = cfg.with_weight_decay(wd);
            if !betas.is_empty() {
                let b = kw["betas"].as_array().unwrap();
                cfg = cfg.with_betas(b[0].as_f64().unwrap(), b[1].as_f64().unwrap());
            }
            if kind == "Adam" {
                Box::new(Adam::from_params(params, cfg).unwrap())
            } else {
                Box::new(AdamW::from_params(params, cfg).unwrap())
            }
        }
        other => panic!("unknown optimizer {other}"),
    }
}

fn close(what: &str, got: &[f32], want: &[f32], worst: &mut f64, tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (*g as f64, *w as f64);
        let err = (g - w).abs() / w.abs().max(1e-6);
        *worst = worst.max(err);
        if err > tol {
            eprintln!("MISMATCH {what}[{i}]: got {g:e}, torch {w:e} (rel err {err:e})");
        }
    }
}

fn run_all(fused: bool) {
    let tol = if fused { REL_TOL } else { FALLBACK_REL_TOL };
    let gold = golden();
    let names = ["b", "w"];
    let mut worst = 0.0f64;
    for spec in gold["optimizers"].as_array().unwrap() {
        let cname = spec["name"].as_str().unwrap();
        let vars: Vec<(String, Var)> = names
            .iter()
            .map(|n| {
                let t = Tensor::from_vec(
                    f32s(&gold["params_initial"][n]),
                    dims(&gold["shapes"][n]),
                    &Device::Cpu,
                )
                .unwrap();
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let mut opt = build(spec, vars.clone(), fused);
        let steps = spec["params_after_each_step"].as_array().unwrap();
        for (s, grad) in gold["grads"].as_array().unwrap().iter().enumerate() {
            let mut grads = Grads::new();
            for n in names {
                let g = Tensor::from_vec(f32s(&grad[n]), dims(&gold["shapes"][n]), &Device::Cpu)
                    .unwrap();
                grads.insert(n, g);
            }
            opt.step(&grads).unwrap();
            for (n, v) in &vars {
                let got: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
                close(
                    &format!("{cname} step {} param {n}", s + 1),
                    &got,
                    &f32s(&steps[s][n]),
                    &mut worst,
                    tol,
                );
            }
        }
        let sd = opt.state_dict().unwrap();
        for (n, st) in spec["final_state"].as_object().unwrap() {
            for (k, want) in st.as_object().unwrap() {
                if k == "step" {
                    let got: u64 = sd.require_value(&format!("{n}/step")).unwrap();
                    assert_eq!(got as f64, want.as_f64().unwrap(), "{cname} {n}/step");
                } else {
                    let t = sd
                        .get_tensor(&format!("{n}/{k}"))
                        .unwrap_or_else(|| panic!("{cname}: no {n}/{k}"));
                    close(
                        &format!("{cname} final {n}/{k}"),
                        &t.to_f32_vec().unwrap(),
                        &f32s(want),
                        &mut worst,
                        tol,
                    );
                }
            }
        }
    }
    eprintln!("fused={fused}: worst relative error vs torch {worst:e}");
    assert!(worst <= tol, "worst relative error {worst:e} > {tol:e}");
}

#[test]
fn fused_kernels_match_torch() {
    run_all(true);
}

#[test]
fn tensor_fallback_matches_torch() {
    run_all(false);
}

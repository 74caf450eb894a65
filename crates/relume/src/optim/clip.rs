//! Gradient clipping, as PyTorch's `clip_grad_norm_` and `clip_grad_value_`.
//!
//! Norms are accumulated in f64 over all gradients in name order, so the result is
//! the same in every process.

use candle_core::DType;

use super::state::check_range;
use super::Grads;
use crate::error::Result;

/// Scales all gradients so that their joint `norm_type`-norm is at most `max_norm`,
/// and returns the joint norm before clipping.
///
/// As in PyTorch: `clip_coef = max_norm / (total_norm + 1e-6)`, clamped to at most
/// 1, and every gradient is multiplied by it. `norm_type` is any `p > 0` (usually
/// `2.0`) or `f64::INFINITY` (largest absolute value). An empty `grads` has norm 0.
///
/// # Errors
/// [`crate::Error::InvalidHyperParameter`] for a negative or non-finite `max_norm`,
/// or a `norm_type` that is NaN or `<= 0`; candle errors.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64, norm_type: f64) -> Result<f64> {
    check_range(
        "clip_grad_norm",
        "max_norm",
        max_norm,
        max_norm >= 0.0,
        ">= 0",
    )?;
    let ok = norm_type > 0.0;
    if norm_type != f64::INFINITY {
        check_range(
            "clip_grad_norm",
            "norm_type",
            norm_type,
            ok,
            "> 0 or infinity",
        )?;
    }
    let total = total_norm(grads, norm_type)?;
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef == 1.0 {
        // Multiplying by one changes no value: skip the pass over every gradient.
        return Ok(total);
    }
    for (_, g) in grads.iter_mut() {
        *g = g.affine(coef, 0.0)?;
    }
    Ok(total)
}

/// `Σ v²` in f64 over a contiguous f32 CPU tensor, read in place: eight partial
/// sums (element `i` into sum `i % 8`, each in index order) added pairwise at the
/// end, a fixed order that vectorises. `None` for other dtypes, devices and
/// layouts, which take candle's ops.
fn f32_sum_of_squares(g: &candle_core::Tensor) -> Option<f64> {
    const LANES: usize = 8;
    if g.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    let v = cpu.as_slice::<f32>().ok()?.get(a..b)?;
    let mut acc = [0.0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let x = f64::from(c[l]);
            acc[l] += x * x;
        }
    }
    for (s, &x) in acc.iter_mut().zip(chunks.remainder()) {
        let x = f64::from(x);
        *s += x * x;
    }
    for w in [4, 2, 1] {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    Some(acc[0])
}

/// The joint `norm_type`-norm of all gradients (see [`clip_grad_norm`]).
///
/// # Errors
/// candle errors.
pub fn total_norm(grads: &Grads, norm_type: f64) -> Result<f64> {
    if norm_type == f64::INFINITY {
        let mut m = 0.0f64;
        for (_, g) in grads.iter() {
            if g.elem_count() > 0 {
                let v = g
                    .to_dtype(DType::F64)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f64>()?;
                m = if v.is_nan() { v } else { m.max(v) };
            }
        }
        return Ok(m);
    }
    let mut acc = 0.0f64;
    for (_, g) in grads.iter() {
        if norm_type == 2.0 {
            if let Some(s) = f32_sum_of_squares(g) {
                acc += s;
                continue;
            }
        }
        let g = g.to_dtype(DType::F64)?;
        let s = if norm_type == 2.0 {
            g.sqr()?.sum_all()?.to_scalar::<f64>()?
        } else {
            g.abs()?.powf(norm_type)?.sum_all()?.to_scalar::<f64>()?
        };
        acc += s;
    }
    Ok(if norm_type == 2.0 {
        acc.sqrt()
    } else {
        acc.powf(1.0 / norm_type)
    })
}

/// Clamps every gradient element into `[-clip, clip]` (PyTorch's
/// `clip_grad_value_`).
///
/// # Errors
/// [`crate::Error::InvalidHyperParameter`] for a negative or non-finite `clip`;
/// candle errors.
pub fn clip_grad_value(grads: &mut Grads, clip: f64) -> Result<()> {
    check_range("clip_grad_value", "clip_value", clip, clip >= 0.0, ">= 0")?;
    for (_, g) in grads.iter_mut() {
        *g = g.clamp(-clip, clip)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn grads() -> Grads {
        let mut g = Grads::new();
        g.insert("a", Tensor::new(&[3.0f32, -4.0], &Device::Cpu).unwrap());
        g.insert("b", Tensor::new(&[[12.0f32]], &Device::Cpu).unwrap());
        g
    }

    fn vals(g: &Grads, n: &str) -> Vec<f32> {
        g.get(n).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn l2_norm_clips_by_hand_computed_factor() {
        // sqrt(9 + 16 + 144) = 13; coef = 6.5 / (13 + 1e-6).
        let mut g = grads();
        let n = clip_grad_norm(&mut g, 6.5, 2.0).unwrap();
        assert!((n - 13.0).abs() < 1e-12);
        let coef = 6.5 / (13.0 + 1e-6);
        let a = vals(&g, "a");
        assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-6);
        assert!((a[1] as f64 + 4.0 * coef).abs() < 1e-6);
        assert!((vals(&g, "b")[0] as f64 - 12.0 * coef).abs() < 1e-6);
    }

    #[test]
    fn the_in_place_l2_sum_matches_candles_f64_ops_and_strided_gradients_fall_back() {
        let v: Vec<f32> = (0..1001)
            .map(|i| ((i * 29 % 97) as f32 - 48.0) * 0.013)
            .collect();
        let t = Tensor::from_vec(v, (7, 143), &Device::Cpu).unwrap();
        let by_candle = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let fast = f32_sum_of_squares(&t).unwrap();
        assert!(
            (fast - by_candle(&t)).abs() <= 1e-12 * by_candle(&t),
            "{fast}"
        );
        let strided = t.t().unwrap();
        assert!(f32_sum_of_squares(&strided).is_none());
        assert!(f32_sum_of_squares(&t.to_dtype(DType::F64).unwrap()).is_none());
        let mut g = Grads::new();
        g.insert("a", t.clone());
        g.insert("b", strided);
        let n = total_norm(&g, 2.0).unwrap();
        assert!((n - (2.0 * by_candle(&t)).sqrt()).abs() < 1e-9, "{n}");
    }

    #[test]
    fn norm_below_max_leaves_grads_unchanged() {
        let mut g = grads();
        let n = clip_grad_norm(&mut g, 100.0, 2.0).unwrap();
        assert_eq!(n, 13.0);
        assert_eq!(vals(&g, "a"), vec![3.0, -4.0]);
        assert_eq!(vals(&g, "b"), vec![12.0]);
    }

    #[test]
    fn inf_and_l1_norms() {
        let mut g = grads();
        let n = clip_grad_norm(&mut g, 6.0, f64::INFINITY).unwrap();
        assert_eq!(n, 12.0);
        assert!((vals(&g, "b")[0] as f64 - 12.0 * 6.0 / (12.0 + 1e-6)).abs() < 1e-6);
        let n1 = total_norm(&grads(), 1.0).unwrap();
        assert!((n1 - 19.0).abs() < 1e-9);
    }

    #[test]
    fn clip_value_clamps() {
        let mut g = grads();
        clip_grad_value(&mut g, 3.5).unwrap();
        assert_eq!(vals(&g, "a"), vec![3.0, -3.5]);
        assert_eq!(vals(&g, "b"), vec![3.5]);
    }

    #[test]
    fn bad_arguments_are_invalid_hyper_parameters() {
        use crate::Error;
        let bad = |r: Result<f64>| matches!(r, Err(Error::InvalidHyperParameter { .. }));
        assert!(bad(clip_grad_norm(&mut grads(), f64::NAN, 2.0)));
        assert!(bad(clip_grad_norm(&mut grads(), -1.0, 2.0)));
        assert!(bad(clip_grad_norm(&mut grads(), 1.0, 0.0)));
        assert!(bad(clip_grad_norm(&mut grads(), 1.0, f64::NAN)));
        assert!(matches!(
            clip_grad_value(&mut grads(), f64::INFINITY),
            Err(Error::InvalidHyperParameter { .. })
        ));
    }
}

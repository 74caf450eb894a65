//! Shared checks for the fused ops' tests: each against its composite reference.

use candle_core::{Tensor, Var};

use crate::rng::Rng;

/// The bit patterns of every element of `t`, for exact comparisons.
pub(crate) fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Every element of `a` within `tol · (1 + |b|)` of `b`, and the same shape.
pub(crate) fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

/// Runs `fused` and `reference` on variables holding `inputs`, checks their outputs
/// agree, then backpropagates the same random upstream gradient through both and
/// checks the gradient of every input. The closures may reshape or transpose the
/// variables they are given.
pub(crate) fn check_grads(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let yf = fused(&ts);
    let yr = reference(&ts);
    assert_close(&yf, &yr, tol);
    let up = Rng::new(11, "upstream")
        .uniform_tensor(yr.shape(), -1.0, 1.0, yr.device())
        .unwrap();
    let gf = (&yf * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&yr * &up).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, t) in ts.iter().enumerate() {
        let a = gf
            .get(t)
            .unwrap_or_else(|| panic!("the fused op gave input {i} no gradient"));
        let b = gr.get(t).expect("reference gradient");
        assert_close(a, b, tol);
    }
}

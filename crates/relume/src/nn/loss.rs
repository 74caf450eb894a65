//! [`cross_entropy`]: mean softmax cross-entropy as one fused op.
//!
//! candle-nn composes it from a log-softmax (max, subtract, exp, sum, log,
//! subtract), a gather and a mean, and differentiates each step. The fused op reads
//! the logits once forward and writes `(softmax − one_hot) · g / N` once backward.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::kernels::{dims2, f32_slice, for_chunks, parallel};
use crate::error::Result;
use candle_core::backend::BackendStorage;

/// Mean cross-entropy between `logits [N, C]` and class indices `target [N]`
/// (u8, u32 or i64), like `torch.nn.functional.cross_entropy` with its defaults
/// except `ignore_index`, which is not supported: every target must be in `0..C`.
///
/// f32 logits on the CPU use the fused op; anything else uses candle-nn's
/// composite implementation.
///
/// # Errors
/// Shapes other than `[N, C]` and `[N]`, a target outside `0..C` (naming the row),
/// candle errors.
pub fn cross_entropy(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        return Ok(candle_nn::loss::cross_entropy(logits, target)?);
    }
    Ok(logits
        .contiguous()?
        .apply_op2(&target.contiguous()?, CrossEntropy)?)
}

/// Class indices as usize, checked against `classes`.
fn targets(
    s: &CpuStorage,
    l: &Layout,
    rows: usize,
    classes: usize,
) -> candle_core::Result<Vec<usize>> {
    if l.dims() != [rows] {
        bail!(
            "cross_entropy: target shape {:?}, expected [{rows}] (one class index per row of the logits)",
            l.dims()
        );
    }
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("cross_entropy: target must be contiguous");
    };
    let t: Vec<i64> = match s {
        CpuStorage::U8(v) => v[a..b].iter().map(|&x| i64::from(x)).collect(),
        CpuStorage::U32(v) => v[a..b].iter().map(|&x| i64::from(x)).collect(),
        CpuStorage::I64(v) => v[a..b].to_vec(),
        other => bail!(
            "cross_entropy: target must be u8, u32 or i64 class indices, got {:?}",
            other.dtype()
        ),
    };
    t.iter()
        .enumerate()
        .map(|(row, &c)| match usize::try_from(c) {
            Ok(c) if c < classes => Ok(c),
            _ => bail!("cross_entropy: target {c} in row {row} is outside 0..{classes}"),
        })
        .collect()
}

/// `(N, C, logits, targets)`, checked.
fn logits_and_targets<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(usize, usize, &'a [f32], Vec<usize>)> {
    let (n, c) = dims2(l1, "cross_entropy logits")?;
    let x = f32_slice(s1, l1, "cross_entropy logits")?;
    let t = targets(s2, l2, n, c)?;
    Ok((n, c, x, t))
}

/// Rows per task when the loss or its gradient is split across threads.
const ROWS: usize = 64;

/// The max and `ln Σ exp(v − max)` of one row; NaN anywhere gives NaN.
fn row_lse(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|&v| (v - m).exp()).sum();
    (m, s.ln())
}

/// The forward op: `(logits, target)` → scalar mean loss.
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "relume-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, x, t) = logits_and_targets(s1, l1, s2, l2)?;
        // Per-row losses on any thread, then one sum in row order: the same bits
        // whatever the thread count.
        let mut losses = vec![0.0f32; n];
        for_chunks(&mut losses, ROWS, parallel(x.len()), |i, out| {
            for (j, o) in out.iter_mut().enumerate() {
                let r = i * ROWS + j;
                let row = &x[r * c..(r + 1) * c];
                let (m, lse) = row_lse(row);
                *o = m + lse - row[t[r]];
            }
        });
        let total: f64 = losses.iter().map(|&l| f64::from(l)).sum();
        let mean = if n == 0 {
            f32::NAN
        } else {
            (total / n as f64) as f32
        };
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        target: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(target, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

/// The backward op: `(logits, target, g)` → `(softmax − one_hot) · g / N`.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "relume-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, x, t) = logits_and_targets(s1, l1, s2, l2)?;
        let g = match f32_slice(s3, l3, "cross_entropy output gradient")? {
            [g] => *g,
            other => bail!(
                "cross_entropy: output gradient has {} values, expected 1",
                other.len()
            ),
        };
        let scale = g / n.max(1) as f32;
        let mut out = vec![0.0f32; n * c];
        for_chunks(&mut out, ROWS * c, parallel(x.len()), |i, out| {
            for (j, o) in out.chunks_exact_mut(c.max(1)).enumerate() {
                let r = i * ROWS + j;
                let row = &x[r * c..(r + 1) * c];
                let (m, lse) = row_lse(row);
                let shift = m + lse;
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - shift).exp() * scale;
                }
                o[t[r]] -= scale;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_nn_value_and_gradient() {
        let dev = Device::Cpu;
        let x = Rng::new(5, "x")
            .uniform_tensor((6, 4), -3.0, 3.0, &dev)
            .unwrap();
        let x = Var::from_tensor(&x).unwrap();
        for t in [
            Tensor::new(&[0u32, 3, 1, 2, 2, 0], &dev).unwrap(),
            Tensor::new(&[0i64, 3, 1, 2, 2, 0], &dev).unwrap(),
            Tensor::new(&[0u8, 3, 1, 2, 2, 0], &dev).unwrap(),
        ] {
            let ours = cross_entropy(x.as_tensor(), &t).unwrap();
            let theirs = candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap();
            let (a, b) = (
                ours.to_scalar::<f32>().unwrap(),
                theirs.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-6 * b.abs().max(1.0), "{a} vs {b}");
            // Scale the loss so the gradient's `g` is not 1.
            let ga = (ours * 2.5).unwrap().backward().unwrap();
            let gb = (theirs * 2.5).unwrap().backward().unwrap();
            let ga = ga.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let gb = gb.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            for (ra, rb) in ga.iter().zip(&gb) {
                for (p, q) in ra.iter().zip(rb) {
                    assert!((p - q).abs() < 1e-6, "{p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn split_across_threads_matches_candle_nn() {
        let dev = Device::Cpu;
        let (n, c) = (3001, 20);
        let x = Rng::new(6, "x")
            .uniform_tensor((n, c), -3.0, 3.0, &dev)
            .unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % c as u32).collect();
        let t = Tensor::new(t, &dev).unwrap();
        crate::nn::test_util::check_grads(
            &[x],
            |v| cross_entropy(&v[0], &t).unwrap(),
            |v| candle_nn::loss::cross_entropy(&v[0], &t).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn out_of_range_target_names_the_row() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[0u32, 4, 1], &dev).unwrap();
        let e = cross_entropy(&x, &t).unwrap_err().to_string();
        assert!(e.contains("target 4 in row 1") && e.contains("0..4"), "{e}");
        let neg = Tensor::new(&[0i64, 1, -100], &dev).unwrap();
        let e = cross_entropy(&x, &neg).unwrap_err().to_string();
        assert!(e.contains("row 2"), "{e}");
    }

    #[test]
    fn shape_and_dtype_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let short = Tensor::new(&[0u32, 1], &dev).unwrap();
        assert!(cross_entropy(&x, &short)
            .unwrap_err()
            .to_string()
            .contains("expected [3]"));
        let float = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert!(cross_entropy(&x, &float)
            .unwrap_err()
            .to_string()
            .contains("u8, u32 or i64"));
    }

    #[test]
    fn nan_logits_give_a_nan_loss() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.0f32, f32::NAN]], &dev).unwrap();
        let t = Tensor::new(&[0u32], &dev).unwrap();
        assert!(cross_entropy(&x, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .is_nan());
    }
}

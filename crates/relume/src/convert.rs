//! Conversion between candle tensors and relume-ckpt tensor leaves.

use candle_core::{DType as CDType, Device, Tensor};
use relume_ckpt::{DType, TensorBytes, TensorData};

use crate::error::{Error, Result};

/// Maps a candle dtype to a checkpoint dtype; `None` for dtypes relume does not store.
pub fn ckpt_dtype(d: CDType) -> Option<DType> {
    Some(match d {
        CDType::F32 => DType::F32,
        CDType::F64 => DType::F64,
        CDType::F16 => DType::F16,
        CDType::BF16 => DType::BF16,
        CDType::I64 => DType::I64,
        CDType::U8 => DType::U8,
        CDType::U32 => return None,
        _ => return None,
    })
}

/// Copies a candle tensor (any layout, any device) into a checkpoint leaf.
///
/// # Errors
/// [`Error::StateMismatch`] for a dtype relume cannot store; candle errors.
pub fn tensor_to_data(t: &Tensor, name: &str) -> Result<TensorData> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    let bytes: Vec<u8> = match t.dtype() {
        CDType::F32 => le_bytes(&flat.to_vec1::<f32>()?, |v| v.to_le_bytes()),
        CDType::F64 => le_bytes(&flat.to_vec1::<f64>()?, |v| v.to_le_bytes()),
        CDType::F16 => le_bytes(&flat.to_vec1::<half::f16>()?, |v| v.to_le_bytes()),
        CDType::BF16 => le_bytes(&flat.to_vec1::<half::bf16>()?, |v| v.to_le_bytes()),
        CDType::I64 => le_bytes(&flat.to_vec1::<i64>()?, |v| v.to_le_bytes()),
        CDType::U8 => flat.to_vec1::<u8>()?,
        other => {
            return Err(Error::StateMismatch {
                component: name.to_string(),
                problems: vec![format!("dtype {other:?} cannot be stored in a checkpoint")],
            })
        }
    };
    let dtype = ckpt_dtype(t.dtype()).ok_or_else(|| Error::StateMismatch {
        component: name.to_string(),
        problems: vec![format!(
            "dtype {:?} cannot be stored in a checkpoint",
            t.dtype()
        )],
    })?;
    Ok(TensorData::new(dtype, shape, TensorBytes::owned(bytes)).map_err(|e| e.with_key(name))?)
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for x in v {
        out.extend_from_slice(&f(*x));
    }
    out
}

/// Builds a candle tensor on `device` from a checkpoint leaf.
///
/// # Errors
/// [`Error::StateMismatch`] for I32 and BOOL leaves, which candle has no dtype for;
/// candle errors.
pub fn data_to_tensor(d: &TensorData, device: &Device, name: &str) -> Result<Tensor> {
    let shape = d.shape().to_vec();
    let b: &[u8] = d.bytes();
    let t = match d.dtype() {
        DType::F32 => Tensor::from_vec(from_le(b, f32::from_le_bytes), shape, device)?,
        DType::F64 => Tensor::from_vec(from_le(b, f64::from_le_bytes), shape, device)?,
        DType::F16 => Tensor::from_vec(from_le(b, half::f16::from_le_bytes), shape, device)?,
        DType::BF16 => Tensor::from_vec(from_le(b, half::bf16::from_le_bytes), shape, device)?,
        DType::I64 => Tensor::from_vec(from_le(b, i64::from_le_bytes), shape, device)?,
        DType::U8 => Tensor::from_vec(b.to_vec(), shape, device)?,
        other => {
            return Err(Error::StateMismatch {
                component: name.to_string(),
                problems: vec![format!("dtype {other} has no candle equivalent")],
            })
        }
    };
    Ok(t)
}

fn from_le<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    b.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

/// A short description like `F32[256, 64]`, used in mismatch reports.
pub fn describe(dtype: DType, shape: &[usize]) -> String {
    format!("{dtype}{shape:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_transposed() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let tt = t.t().unwrap();
        let d = tensor_to_data(&tt, "x").unwrap();
        assert_eq!(d.shape(), &[3, 2]);
        let back = data_to_tensor(&d, &Device::Cpu, "x").unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), tt.to_vec2::<f32>().unwrap());
    }
}

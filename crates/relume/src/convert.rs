//! Conversion between candle tensors and relume-ckpt tensor leaves.

use candle_core::{DType as CDType, Device, Tensor};
use relume_ckpt::{BufferPool, DType, TensorBytes, TensorData};

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
    tensor_to_data_with(t, name, |b| TensorBytes::owned(b.to_vec()))
}

/// As [`tensor_to_data`], copying a contiguous CPU tensor's bytes with
/// [`BufferPool::copy`] (large ones into recycled staging buffers: the snapshot
/// path of async saves).
///
/// # Errors
/// As [`tensor_to_data`].
pub fn tensor_to_data_pooled(t: &Tensor, name: &str, pool: &BufferPool) -> Result<TensorData> {
    tensor_to_data_with(t, name, |b| pool.copy(b))
}

fn tensor_to_data_with(
    t: &Tensor,
    name: &str,
    copy: impl FnOnce(&[u8]) -> TensorBytes,
) -> Result<TensorData> {
    let shape = t.dims().to_vec();
    if let Some(bytes) = contiguous_cpu_bytes(t, copy)? {
        let dtype = ckpt_dtype(t.dtype()).ok_or_else(|| Error::StateMismatch {
            component: name.to_string(),
            problems: vec![format!(
                "dtype {:?} cannot be stored in a checkpoint",
                t.dtype()
            )],
        })?;
        return Ok(TensorData::new(dtype, shape, bytes).map_err(|e| e.with_key(name))?);
    }
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

/// The bytes of a contiguous f32/f64/f16/bf16/i64/u8 CPU tensor, copied with one
/// `memcpy` (on little-endian hosts the in-memory bytes are the checkpoint's bytes).
/// `None` for other layouts, devices or dtypes, which take the element-wise path.
fn contiguous_cpu_bytes(
    t: &Tensor,
    copy_bytes: impl FnOnce(&[u8]) -> TensorBytes,
) -> Result<Option<TensorBytes>> {
    if cfg!(target_endian = "big") || ckpt_dtype(t.dtype()).is_none() {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    fn bytes<T: candle_core::WithDType + bytemuck::Pod>(
        cpu: &candle_core::CpuStorage,
        start: usize,
        end: usize,
    ) -> Result<Option<&[u8]>> {
        let all = cpu.as_slice::<T>()?;
        Ok(all.get(start..end).map(bytemuck::cast_slice::<T, u8>))
    }
    let src = match t.dtype() {
        CDType::F32 => bytes::<f32>(cpu, start, end)?,
        CDType::F64 => bytes::<f64>(cpu, start, end)?,
        CDType::I64 => bytes::<i64>(cpu, start, end)?,
        CDType::U8 => bytes::<u8>(cpu, start, end)?,
        _ => None,
    };
    Ok(src.map(copy_bytes))
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
    fn contiguous_fast_path_matches_element_wise() {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let narrow = t.narrow(0, 1, 2).unwrap(); // contiguous with a storage offset
        let d = tensor_to_data(&narrow, "n").unwrap();
        assert_eq!(
            d.to_f32_vec().unwrap(),
            (4..12).map(|v| v as f32).collect::<Vec<_>>()
        );
        let i = Tensor::new(&[1i64, -2, 3], &Device::Cpu).unwrap();
        assert_eq!(
            tensor_to_data(&i, "i").unwrap().to_i64_vec().unwrap(),
            vec![1, -2, 3]
        );
    }

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

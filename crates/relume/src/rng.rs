//! relume's own seeded, serialisable random number generator.
//!
//! candle's CPU RNG cannot be seeded, so relume never uses it: every random number
//! (initialisation, dropout, data order) comes from an [`Rng`] here.
//!
//! ## Why ChaCha12
//! - Its whole state is a 256-bit key, a 64-bit stream id and a 128-bit word
//!   position: three small integers to save and restore exactly, with no buffered
//!   hidden state (the position counts consumed 32-bit words).
//! - It is seekable and has independent streams, which gives named sub-streams for
//!   free; it is portable (no platform-dependent output), and fast enough that
//!   dropout masks cost nothing next to a matmul. 12 rounds is `rand`'s own
//!   default trade-off between speed and margin.
//!
//! ## Named streams
//! [`RngStreams`] hands out one independent generator per name (`"init"`,
//! `"dropout"`, `"data"`). The key of a stream is derived from the root seed and
//! the stream name, so drawing dropout masks never shifts the data order.

use std::collections::BTreeMap;

use candle_core::{Device, Shape, Tensor};
use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};
use relume_ckpt::{RestoreReport, StateDict, Stateful};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state_json::{read_single_json, single_json_state};

/// A seeded, seekable generator whose whole state is `(seed, stream, word_pos)`.
///
/// # Example
/// ```
/// use relume::rng::Rng;
/// let mut a = Rng::new(7, "data");
/// let mut b = Rng::new(7, "data");
/// assert_eq!(a.next_u64(), b.next_u64());
/// ```
#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    stream: String,
    inner: ChaCha12Rng,
}

/// The exported state of one [`Rng`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Root seed.
    pub seed: u64,
    /// Stream name.
    pub stream: String,
    /// Position in 32-bit words, as a decimal string (JSON numbers cannot hold u128).
    pub word_pos: String,
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Derives the 256-bit ChaCha key for `(seed, stream)`.
fn derive_key(seed: u64, stream: &str) -> [u8; 32] {
    let mut x = seed ^ fnv1a(stream).rotate_left(17);
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut x).to_le_bytes());
    }
    key
}

impl Rng {
    /// A generator for `stream` under the root `seed`.
    pub fn new(seed: u64, stream: &str) -> Self {
        Rng {
            seed,
            stream: stream.to_string(),
            inner: ChaCha12Rng::from_seed(derive_key(seed, stream)),
        }
    }

    /// A generator for `(seed, stream)` positioned on sub-stream `index`: used for
    /// values that must be a pure function of an index (e.g. the shuffle of epoch N).
    pub fn for_index(seed: u64, stream: &str, index: u64) -> Self {
        let mut r = Rng::new(seed, stream);
        r.inner.set_stream(index);
        r
    }

    /// Root seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Position in 32-bit words since the start of the stream.
    pub fn word_pos(&self) -> u128 {
        self.inner.get_word_pos()
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }

    /// Fills `out` with the next `out.len()` 32-bit words: the same values, in the
    /// same order, as that many calls of [`Rng::next_u32`], generated in bulk.
    pub fn fill_u32(&mut self, out: &mut [u32]) {
        self.inner.fill_bytes(bytemuck::cast_slice_mut(out));
        if cfg!(target_endian = "big") {
            for v in out.iter_mut() {
                *v = u32::from_le(*v);
            }
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// A uniform f64 in `[0, 1)` with 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform f32 in `[0, 1)` with 24 random bits.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A uniform integer in `[0, n)`, without modulo bias. `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        // Lemire's nearly-divisionless method.
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        let mut low = m as u64;
        if low < n {
            let threshold = n.wrapping_neg() % n;
            while low < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
                low = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// A standard normal f64 (Box–Muller, two uniforms per sample, nothing cached).
    pub fn normal_f64(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform_f64(); // (0, 1]
        let u2 = self.uniform_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` uniform f32 values in `[lo, hi)`.
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * self.uniform_f32())
            .collect()
    }

    /// `n` normal f32 values with the given mean and standard deviation.
    pub fn normal_vec(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| mean + std * self.normal_f64() as f32)
            .collect()
    }

    /// A f32 tensor of uniform values in `[lo, hi)`.
    ///
    /// # Errors
    /// When candle cannot build the tensor on `device`.
    pub fn uniform_tensor(
        &mut self,
        shape: impl Into<Shape>,
        lo: f32,
        hi: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let v = self.uniform_vec(shape.elem_count(), lo, hi);
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// A f32 tensor of normal values.
    ///
    /// # Errors
    /// When candle cannot build the tensor on `device`.
    pub fn normal_tensor(
        &mut self,
        shape: impl Into<Shape>,
        mean: f32,
        std: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let v = self.normal_vec(shape.elem_count(), mean, std);
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// An inverted-dropout mask: each element is `0` with probability `p`, else
    /// `1 / (1 - p)`. Multiply activations by it during training.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] unless `0 <= p < 1`; candle errors.
    pub fn dropout_mask(
        &mut self,
        shape: impl Into<Shape>,
        p: f32,
        device: &Device,
    ) -> Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidHyperParameter {
                component: "dropout".into(),
                what: "p".into(),
                value: f64::from(p),
                rule: "in [0, 1)".into(),
            });
        }
        let shape: Shape = shape.into();
        let scale = 1.0 / (1.0 - p);
        // One word per element, dropped when `uniform_f32() < p` would be: the same
        // stream and the same decisions as drawing the words one by one.
        let mut words = vec![0u32; shape.elem_count()];
        self.fill_u32(&mut words);
        let unit = 1.0 / (1u32 << 24) as f32;
        let v: Vec<f32> = words
            .iter()
            .map(|&w| {
                if ((w >> 8) as f32 * unit) < p {
                    0.0
                } else {
                    scale
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// The exported state.
    pub fn export(&self) -> RngState {
        RngState {
            seed: self.seed,
            stream: self.stream.clone(),
            word_pos: self.word_pos().to_string(),
        }
    }

    /// Rebuilds a generator from exported state.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] when `word_pos` is not a decimal u128.
    pub fn import(state: &RngState) -> Result<Self> {
        let pos: u128 = state.word_pos.parse().map_err(|_| Error::StateMismatch {
            component: format!("rng/{}", state.stream),
            problems: vec![format!(
                "word_pos {:?} is not a decimal integer",
                state.word_pos
            )],
        })?;
        let mut r = Rng::new(state.seed, &state.stream);
        r.inner.set_word_pos(pos);
        Ok(r)
    }
}

impl Stateful for Rng {
    type Error = Error;

    fn state_dict(&self) -> Result<StateDict> {
        single_json_state("state", &self.export())
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let (mut report, saved) = read_single_json::<RngState>(state, "state")?;
        if let Some(s) = saved {
            if s.stream != self.stream || s.seed != self.seed {
                report.mismatched(
                    "state",
                    format!("stream {:?} seed {}", self.stream, self.seed),
                    format!("stream {:?} seed {}", s.stream, s.seed),
                );
            } else {
                *self = Rng::import(&s)?;
                report.restored("state");
            }
        }
        Ok(report)
    }
}

/// Named, independent generators under one root seed.
///
/// # Example
/// ```
/// use relume::rng::RngStreams;
/// let mut s = RngStreams::new(42);
/// let d1 = s.stream("data").next_u64();
/// let mut t = RngStreams::new(42);
/// t.stream("dropout").next_u64(); // drawing dropout does not shift data
/// assert_eq!(t.stream("data").next_u64(), d1);
/// ```
#[derive(Clone, Debug)]
pub struct RngStreams {
    seed: u64,
    streams: BTreeMap<String, Rng>,
    /// In a data-parallel training micro-batch: its global index, and the streams
    /// derived from it (not saved: they are a pure function of the index).
    batch: Option<u64>,
    batch_streams: BTreeMap<String, Rng>,
}

impl RngStreams {
    /// Streams under the root `seed`; each is created on first use.
    pub fn new(seed: u64) -> Self {
        RngStreams {
            seed,
            streams: BTreeMap::new(),
            batch: None,
            batch_streams: BTreeMap::new(),
        }
    }

    /// From now on until the next call, [`RngStreams::stream`] returns generators
    /// derived from `(seed, name, index)` (a data-parallel micro-batch's, the same
    /// on whichever rank computes it); `None` returns to the saved streams.
    pub fn set_batch(&mut self, index: Option<u64>) {
        self.batch = index;
        self.batch_streams.clear();
    }

    /// Root seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The generator named `name`, created at position 0 on first use.
    pub fn stream(&mut self, name: &str) -> &mut Rng {
        let seed = self.seed;
        if let Some(i) = self.batch {
            return self
                .batch_streams
                .entry(name.to_string())
                .or_insert_with(|| Rng::for_index(seed, &format!("{name}/micro-batch"), i));
        }
        self.streams
            .entry(name.to_string())
            .or_insert_with(|| Rng::new(seed, name))
    }

    /// Names of the streams created so far, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.streams.keys().map(String::as_str)
    }
}

impl Stateful for RngStreams {
    type Error = Error;

    /// A copy of the streams' words; the JSON is built when the snapshot resolves.
    fn snapshot(&self, _pool: &relume_ckpt::BufferPool) -> Result<relume_ckpt::Snapshot<Error>> {
        let copy = self.clone();
        Ok(relume_ckpt::Snapshot::deferred(move || copy.state_dict()))
    }

    /// Keys: `seed`, and `streams/<name>` holding each stream's [`RngState`].
    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("seed", serde_json::json!(self.seed));
        for (name, rng) in &self.streams {
            let v =
                serde_json::to_value(rng.export()).map_err(|e| relume_ckpt::Error::JsonValue {
                    key: format!("streams/{name}"),
                    reason: e.to_string(),
                })?;
            sd.insert_json(format!("streams/{name}"), v);
        }
        Ok(sd)
    }

    /// Restores every saved stream. A seed that differs from the live one is a
    /// mismatch (the run's seed changed); saved streams the live object has not
    /// created yet are created from their saved position.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut report = RestoreReport::new();
        let seed: u64 = match state.get("seed") {
            None => {
                report.missing("seed");
                return Ok(report);
            }
            Some(_) => state.require_value("seed")?,
        };
        if seed != self.seed {
            report.mismatched("seed", self.seed.to_string(), seed.to_string());
            return Ok(report);
        }
        report.restored("seed");
        let mut streams = BTreeMap::new();
        for (key, _) in state.iter() {
            if key == "seed" {
                continue;
            }
            let Some(name) = key.strip_prefix("streams/") else {
                report.unexpected(key);
                continue;
            };
            let s: RngState = state.require_value(key)?;
            if s.stream != name || s.seed != seed {
                report.mismatched(
                    key,
                    format!("stream {name:?} seed {seed}"),
                    format!("stream {:?} seed {}", s.stream, s.seed),
                );
                continue;
            }
            streams.insert(name.to_string(), Rng::import(&s)?);
            report.restored(key);
        }
        for name in self.streams.keys() {
            if !streams.contains_key(name) {
                report.missing(format!("streams/{name}"));
            }
        }
        if report.is_clean() {
            self.streams = streams;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_continues_bit_for_bit() {
        let mut a = Rng::new(3, "dropout");
        for _ in 0..7 {
            a.next_u32(); // odd count: leaves a half-used 64-bit block
        }
        let saved = a.state_dict().unwrap();
        let mut b = Rng::new(3, "dropout");
        let report = b.load_state_dict(&saved).unwrap();
        assert!(report.is_clean());
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn streams_are_independent_and_restorable() {
        let mut s = RngStreams::new(9);
        s.stream("init").next_u64();
        s.stream("dropout").uniform_f32();
        let sd = s.state_dict().unwrap();
        let mut t = RngStreams::new(9);
        assert!(t.load_state_dict(&sd).unwrap().is_clean());
        assert_eq!(
            s.stream("dropout").next_u64(),
            t.stream("dropout").next_u64()
        );
        assert_eq!(s.stream("init").next_u64(), t.stream("init").next_u64());
        assert_ne!(
            Rng::new(9, "init").next_u64(),
            Rng::new(9, "data").next_u64()
        );
    }

    #[test]
    fn changed_seed_is_a_mismatch() {
        let s = RngStreams::new(1);
        let sd = s.state_dict().unwrap();
        let mut t = RngStreams::new(2);
        let r = t.load_state_dict(&sd).unwrap();
        assert_eq!(r.mismatched.len(), 1);
    }

    #[test]
    fn below_is_in_range_and_shuffle_is_a_permutation() {
        let mut r = Rng::new(0, "x");
        for n in [1u64, 2, 3, 10, 1000] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
        let mut v: Vec<usize> = (0..50).collect();
        r.shuffle(&mut v);
        let mut w = v.clone();
        w.sort_unstable();
        assert_eq!(w, (0..50).collect::<Vec<_>>());
        assert_ne!(v, w);
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(5, "n");
        let v = r.normal_vec(20000, 0.0, 1.0);
        let mean: f32 = v.iter().sum::<f32>() / v.len() as f32;
        let var: f32 = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn dropout_rejects_bad_p() {
        let mut r = Rng::new(0, "d");
        assert!(r.dropout_mask(4, 1.0, &Device::Cpu).is_err());
        let m = r
            .dropout_mask(1000, 0.5, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(m.iter().all(|&x| x == 0.0 || x == 2.0));
    }

    #[test]
    fn bulk_words_and_masks_follow_the_word_stream() {
        let mut a = Rng::new(9, "d");
        let mut b = Rng::new(9, "d");
        a.next_u32(); // an odd word offset must not matter
        b.next_u32();
        let mut words = [0u32; 37];
        a.fill_u32(&mut words);
        for w in words {
            assert_eq!(w, b.next_u32());
        }
        assert_eq!(a.word_pos(), b.word_pos());
        let mask = a
            .dropout_mask(1000, 0.3, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = 1.0 / (1.0 - 0.3f32);
        for m in mask {
            let want = if b.uniform_f32() < 0.3 { 0.0 } else { scale };
            assert_eq!(m, want);
        }
        assert_eq!(a.word_pos(), b.word_pos());
    }
}

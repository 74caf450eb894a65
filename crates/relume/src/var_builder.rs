//! [`ParamStore`] as a candle-nn [`VarBuilder`] backend: any candle-nn layer
//! (`linear`, `embedding`, `layer_norm`, `conv2d`, candle-transformers blocks)
//! creates its trainable variables in the store, under its dotted name.
//!
//! ## Determinism
//! Each parameter is drawn from a generator of its own, derived from the builder's
//! seed and the parameter's full name (`Rng::new(seed, "init/<name>")`). Its values
//! therefore depend only on (seed, name, shape, init), never on the order layers
//! are built in: adding a layer does not change any other.
//!
//! ## Initialisation
//! candle-nn's [`candle_nn::Init`] hints map onto relume's seeded [`Init`]
//! ([`init_from_candle`]); candle's own unseedable RNG is never used.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::params::{Init, ParamStore};

/// The relume [`Init`] that draws what candle-nn's `hint` describes for a tensor of
/// `shape`: `Const` → [`Init::Constant`], `Randn` → [`Init::Normal`], `Uniform` →
/// [`Init::Uniform`], `Kaiming` → the uniform or normal law with candle's (and
/// PyTorch's) std = gain/√fan.
///
/// # Example
/// ```
/// use relume::params::Init;
/// use relume::var_builder::init_from_candle;
/// let shape = candle_core::Shape::from((4, 16));
/// let init = init_from_candle(candle_nn::init::DEFAULT_KAIMING_UNIFORM, &shape);
/// // sqrt(3) * gain(relu) / sqrt(fan_in), computed in f64 as candle does
/// let bound = (3f64.sqrt() * 2f64.sqrt() / 4.0) as f32;
/// assert_eq!(init, Init::Uniform { lo: -bound, hi: bound });
/// ```
pub fn init_from_candle(hint: candle_nn::Init, shape: &Shape) -> Init {
    match hint {
        candle_nn::Init::Const(c) => Init::Constant(c as f32),
        candle_nn::Init::Randn { mean, stdev } => Init::Normal {
            mean: mean as f32,
            std: stdev as f32,
        },
        candle_nn::Init::Uniform { lo, up } => Init::Uniform {
            lo: lo as f32,
            hi: up as f32,
        },
        candle_nn::Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = (3f64.sqrt() * std) as f32;
                    Init::Uniform {
                        lo: -bound,
                        hi: bound,
                    }
                }
                NormalOrUniform::Normal => Init::Normal {
                    mean: 0.0,
                    std: std as f32,
                },
            }
        }
    }
}

/// The [`SimpleBackend`] behind [`ParamStore::var_builder`]. Public so that a
/// program can wrap it (`VarBuilder::from_backend(Box::new(backend), ...)`).
#[derive(Clone, Debug)]
pub struct StoreBackend {
    store: ParamStore,
    seed: u64,
}

impl StoreBackend {
    /// A backend creating parameters in `store`, each drawn from `(seed, name)`.
    pub fn new(store: ParamStore, seed: u64) -> Self {
        StoreBackend { store, seed }
    }
}

/// A relume error as a candle one, keeping its message (which names the parameter).
fn to_candle(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl SimpleBackend for StoreBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !dev.same_device(self.store.device()) {
            return Err(candle_core::Error::Msg(format!(
                "parameter {name:?}: requested on {dev:?} but the ParamStore lives on {:?}; build the VarBuilder with store.var_builder(seed)",
                self.store.device()
            )));
        }
        let init = init_from_candle(h, &s);
        self.store
            .get_or_init_named(name, &s, init, dtype, self.seed)
            .map_err(to_candle)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(var) = self.store.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "parameter {name:?} is not in the ParamStore, and get_unchecked cannot create it (no shape); use vb.get(shape, name), or load weights first"
            )));
        };
        if var.dtype() != dtype {
            return Err(to_candle(crate::Error::ParamConflict {
                name: name.to_string(),
                existing: format!("{:?}{:?}", var.dtype(), var.dims()),
                requested: format!("{dtype:?}"),
            }));
        }
        Ok(if self.store.is_frozen(name) {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.store.get(name).is_some()
    }
}

impl ParamStore {
    /// A candle-nn [`VarBuilder`] (f32, on the store's device) that creates its
    /// variables in this store: the way to build any candle-nn layer as relume
    /// parameters. Each parameter is drawn from `(seed, its full name)`, so the
    /// values do not depend on the order the layers are built in.
    ///
    /// # Example
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use relume::params::ParamStore;
    ///
    /// let store = ParamStore::new(Device::Cpu);
    /// let vb = store.var_builder(0);
    /// let emb = candle_nn::embedding(100, 16, vb.pp("tok"))?;
    /// let ln = candle_nn::layer_norm(16, 1e-5, vb.pp("ln"))?;
    /// let head = candle_nn::linear(16, 100, vb.pp("head"))?;
    /// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
    /// let logits = head.forward(&ln.forward(&emb.forward(&ids)?)?)?;
    /// assert_eq!(logits.dims(), &[1, 3, 100]);
    /// assert_eq!(
    ///     store.names(),
    ///     ["head.bias", "head.weight", "ln.bias", "ln.weight", "tok.weight"]
    /// );
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn var_builder(&self, seed: u64) -> VarBuilder<'static> {
        self.var_builder_dtype(seed, DType::F32)
    }

    /// As [`ParamStore::var_builder`], creating parameters of `dtype`.
    pub fn var_builder_dtype(&self, seed: u64, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(StoreBackend::new(self.clone(), seed)),
            dtype,
            self.device().clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn build(store: &ParamStore, seed: u64, order: &[&str]) -> candle_core::Result<()> {
        let vb = store.var_builder(seed);
        for part in order {
            match *part {
                "l1" => drop(candle_nn::linear(8, 4, vb.pp("l1"))?),
                "emb" => drop(candle_nn::embedding(10, 8, vb.pp("emb"))?),
                "ln" => drop(candle_nn::layer_norm(8, 1e-5, vb.pp("ln"))?),
                "conv" => drop(candle_nn::conv2d(
                    2,
                    3,
                    3,
                    Default::default(),
                    vb.pp("conv"),
                )?),
                other => unreachable!("{other}"),
            }
        }
        Ok(())
    }

    fn values(store: &ParamStore) -> Vec<(String, Vec<f32>)> {
        store
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                let x = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (n, x)
            })
            .collect()
    }

    #[test]
    fn order_of_construction_does_not_change_values() {
        let a = ParamStore::new(Device::Cpu);
        build(&a, 3, &["l1", "emb", "ln", "conv"]).unwrap();
        let b = ParamStore::new(Device::Cpu);
        build(&b, 3, &["conv", "ln", "emb", "l1"]).unwrap();
        assert_eq!(values(&a), values(&b));
        // Adding a layer leaves the others alone.
        let c = ParamStore::new(Device::Cpu);
        build(&c, 3, &["emb", "l1"]).unwrap();
        for (name, v) in values(&c) {
            assert_eq!(
                Some(&v),
                values(&a).iter().find(|(n, _)| *n == name).map(|x| &x.1)
            );
        }
        // Another seed gives other values.
        let d = ParamStore::new(Device::Cpu);
        build(&d, 4, &["l1", "emb", "ln", "conv"]).unwrap();
        assert_ne!(values(&a), values(&d));
    }

    #[test]
    fn candle_hints_draw_from_the_named_stream() {
        let store = ParamStore::new(Device::Cpu);
        build(&store, 0, &["l1", "ln"]).unwrap();
        // candle_nn::linear: kaiming-normal weight (std = sqrt(2)/sqrt(fan_in)),
        // bias uniform in ±1/sqrt(fan_in).
        let shape = Shape::from((4, 8));
        let mut rng = crate::rng::Rng::new(0, "init/l1.weight");
        let want = Init::Normal {
            mean: 0.0,
            std: (2f64.sqrt() / 8f64.sqrt()) as f32,
        }
        .sample(&shape, &mut rng, &Device::Cpu)
        .unwrap();
        let got = store.get("l1.weight").unwrap();
        assert_eq!(
            got.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let bound = 1.0 / 8f32.sqrt();
        let b = store
            .get("l1.bias")
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            b.iter().all(|x| x.abs() <= bound) && b.iter().any(|x| *x != 0.0),
            "{b:?}"
        );
        let g = store
            .get("ln.weight")
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(g, vec![1.0; 8]);
        let beta = store
            .get("ln.bias")
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(beta, vec![0.0; 8]);
    }

    #[test]
    fn a_conflicting_shape_names_the_parameter() {
        let store = ParamStore::new(Device::Cpu);
        let vb = store.var_builder(0);
        candle_nn::linear(8, 4, vb.pp("l1")).unwrap();
        let e = candle_nn::linear(8, 5, vb.pp("l1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"l1.weight\"") && e.contains("[4, 8]") && e.contains("[5, 8]"),
            "{e}"
        );
        let e = vb
            .pp("l1")
            .get_with_hints_dtype((4, 8), "weight", candle_nn::init::ZERO, DType::F64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"l1.weight\"") && e.contains("F64"), "{e}");
    }

    #[test]
    fn a_frozen_parameter_is_handed_out_detached() {
        let store = ParamStore::new(Device::Cpu);
        store.freeze("enc");
        let vb = store.var_builder(0);
        let enc = candle_nn::linear(4, 4, vb.pp("enc")).unwrap();
        let dec = candle_nn::linear(4, 2, vb.pp("dec")).unwrap();
        let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        let loss = dec
            .forward(&enc.forward(&x).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = crate::optim::Grads::from_backward(&grads, &store);
        assert!(g.get("dec.weight").is_some());
        assert!(g.get("enc.weight").is_none() && g.get("enc.bias").is_none());
        assert_eq!(store.frozen_names(), ["enc.bias", "enc.weight"]);
        assert_eq!(
            store
                .trainable_vars()
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            ["dec.bias", "dec.weight"]
        );
        // The detached tensor still sees a restore into the variable.
        store
            .get("enc.bias")
            .unwrap()
            .set(&Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let y = enc
            .forward(&Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0; 4]
        );
    }

    #[test]
    fn freeze_rule_matching_nothing_is_an_error() {
        let store = ParamStore::new(Device::Cpu);
        build(&store, 0, &["l1"]).unwrap();
        store.freeze("l");
        let e = store.check_freeze_rules().unwrap_err().to_string();
        assert!(e.contains("\"l\"") && e.contains("l1"), "{e}");
        store.unfreeze("l");
        store.freeze("l1");
        store.check_freeze_rules().unwrap();
    }
}

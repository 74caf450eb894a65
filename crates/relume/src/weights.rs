//! Fine-tuning from weights: Lightning's `load_from_checkpoint` with the silent
//! parts made loud.
//!
//! [`ParamStore::load_weights`] copies tensors from a safetensors file, a relume
//! checkpoint (its verified `model` component) or a run directory (its latest
//! checkpoint) into the store, with strict accounting:
//! - a model parameter the file lacks (**missing**), a file tensor the model lacks
//!   (**unexpected**) and a dtype or shape disagreement (**mismatched**) are each an
//!   error ([`Error::WeightsMismatch`]) unless explicitly allow-listed;
//! - an allow-list entry or a prefix remapping that matches nothing is an error too
//!   ([`Error::WeightsRuleUnused`]), so a typo never passes as "allowed";
//! - nothing is copied unless everything is accounted for;
//! - the [`WeightsReport`] says what was loaded and what each allow-list let
//!   through, and is logged.
//!
//! Names are remapped before they are compared: [`WeightsOptions::strip_prefix`]
//! removes a prefix from the file's names (a Lightning `model.` wrapper),
//! [`WeightsOptions::add_prefix`] adds one (a pretrained backbone loaded under
//! `backbone.`); the strip runs first.
//!
//! # Example
//! ```
//! use candle_core::Device;
//! use relume::params::ParamStore;
//! use relume::weights::WeightsOptions;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // A pretrained encoder, saved as a plain safetensors file.
//! let pretrained = ParamStore::new(Device::Cpu);
//! candle_nn::linear(4, 8, pretrained.var_builder(1).pp("enc"))?;
//! let file = dir.path().join("encoder.safetensors");
//! pretrained.save_safetensors(&file)?;
//!
//! // The new model: the encoder under `backbone.`, a new head.
//! let store = ParamStore::new(Device::Cpu);
//! let vb = store.var_builder(2);
//! candle_nn::linear(4, 8, vb.pp("backbone.enc"))?;
//! candle_nn::linear(8, 3, vb.pp("head"))?;
//! let report = store.load_weights(
//!     &file,
//!     &WeightsOptions::strict().add_prefix("backbone.").allow_missing("head"),
//! )?;
//! assert_eq!(report.loaded, ["backbone.enc.bias", "backbone.enc.weight"]);
//! assert_eq!(report.allowed_missing, ["head.bias", "head.weight"]);
//! store.freeze("backbone"); // train the head only
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use relume_ckpt::{CheckpointDir, Leaf, StateDict, TensorData};

use crate::convert::{ckpt_dtype, data_to_tensor, describe, tensor_to_data};
use crate::error::{Error, Result};
use crate::params::{rule_covers, ParamStore};

/// How [`ParamStore::load_weights`] maps and accounts for names. The default
/// ([`WeightsOptions::strict`]) allows nothing and renames nothing.
#[derive(Clone, Debug, Default)]
pub struct WeightsOptions {
    strip_prefix: Option<String>,
    add_prefix: Option<String>,
    allow_missing: Vec<String>,
    allow_unexpected: Vec<String>,
    allow_mismatched: Vec<String>,
}

impl WeightsOptions {
    /// Every model parameter must be in the file with its dtype and shape, and every
    /// file tensor must be a model parameter.
    pub fn strict() -> Self {
        WeightsOptions::default()
    }

    /// Removes `prefix` from the file's names (those without it keep their name).
    /// Matching no file name is an error.
    pub fn strip_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.strip_prefix = Some(prefix.into());
        self
    }

    /// Puts `prefix` before every file name (after [`Self::strip_prefix`]).
    pub fn add_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.add_prefix = Some(prefix.into());
        self
    }

    /// Allows the model parameter `rule` (or every one under it) to be absent from
    /// the file; it keeps its current (initial) value.
    pub fn allow_missing(mut self, rule: impl Into<String>) -> Self {
        self.allow_missing.push(rule.into());
        self
    }

    /// Allows the file tensor `rule` (after remapping, or every one under it) to
    /// have no model parameter; it is ignored.
    pub fn allow_unexpected(mut self, rule: impl Into<String>) -> Self {
        self.allow_unexpected.push(rule.into());
        self
    }

    /// Allows the parameter `rule` (or every one under it) to differ in dtype or
    /// shape from the file (a new classifier head); it keeps its current value.
    pub fn allow_mismatched(mut self, rule: impl Into<String>) -> Self {
        self.allow_mismatched.push(rule.into());
        self
    }
}

/// What [`ParamStore::load_weights`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsReport {
    /// The file or checkpoint the weights came from.
    pub source: PathBuf,
    /// Parameters copied from the file, in name order.
    pub loaded: Vec<String>,
    /// Model parameters absent from the file that `allow_missing` let through.
    pub allowed_missing: Vec<String>,
    /// File tensors (remapped names) with no parameter that `allow_unexpected` let through.
    pub allowed_unexpected: Vec<String>,
    /// Parameters whose dtype or shape differ that `allow_mismatched` let through.
    pub allowed_mismatched: Vec<String>,
}

impl fmt::Display for WeightsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "weights from {}: {} loaded",
            self.source.display(),
            self.loaded.len()
        )?;
        for (what, names) in [
            (
                "allowed missing (kept initial values)",
                &self.allowed_missing,
            ),
            ("allowed unexpected (ignored)", &self.allowed_unexpected),
            (
                "allowed mismatched (kept initial values)",
                &self.allowed_mismatched,
            ),
        ] {
            if !names.is_empty() {
                write!(f, "; {what}: {names:?}")?;
            }
        }
        Ok(())
    }
}

/// The weights at `path`: a safetensors file, a checkpoint directory (its verified
/// `model` component) or a run directory (its latest checkpoint's). Returns the
/// tensors and the path they were read from.
fn read_weights(path: &Path) -> Result<(StateDict, PathBuf)> {
    let remote = relume_ckpt::is_remote(path);
    if !remote && !path.is_dir() {
        return Ok((relume_ckpt::read_safetensors(path)?, path.to_path_buf()));
    }
    // A remote path is a checkpoint URL (its marker) or a run URL (its latest).
    let ckpt = if relume_ckpt::is_committed(path)? {
        path.to_path_buf()
    } else {
        CheckpointDir::open_read_only(path)?
            .latest()?
            .ok_or_else(|| Error::NoCheckpoint {
                dir: path.to_path_buf(),
                source_desc: "latest (to load weights from)".into(),
            })?
    };
    let loaded = relume_ckpt::load(&ckpt)?;
    let model = loaded
        .components
        .get("model")
        .cloned()
        .ok_or_else(|| Error::WeightsMismatch {
            path: ckpt.clone(),
            missing: vec!["model (the component holding the parameters)".into()],
            unexpected: loaded.components.keys().cloned().collect(),
            mismatched: Vec::new(),
        })?;
    Ok((model, ckpt))
}

/// Applies the remapping to one file name; sets `stripped` when the strip applied.
fn remap(name: &str, opts: &WeightsOptions, stripped: &mut bool) -> String {
    let mut n = name;
    if let Some(p) = &opts.strip_prefix {
        if let Some(rest) = n.strip_prefix(p.as_str()) {
            *stripped = true;
            n = rest;
        }
    }
    match &opts.add_prefix {
        Some(p) => format!("{p}{n}"),
        None => n.to_string(),
    }
}

fn covered(rules: &[String], name: &str) -> bool {
    rules.iter().any(|r| rule_covers(r, name))
}

impl ParamStore {
    /// Copies the weights at `path` (a safetensors file, a checkpoint directory,
    /// or a run directory's latest checkpoint) into the store's parameters, with
    /// the strict accounting described in [`crate::weights`]. Nothing is copied
    /// unless every name is accounted for. The report is logged at INFO.
    ///
    /// # Errors
    /// [`Error::WeightsMismatch`] naming every missing, unexpected and mismatched
    /// name not allow-listed; [`Error::WeightsRuleUnused`] for an allow-list entry
    /// or prefix that matches nothing; the reader's errors (a missing file, a
    /// damaged header, a checkpoint that fails verification).
    pub fn load_weights(
        &self,
        path: impl AsRef<Path>,
        opts: &WeightsOptions,
    ) -> Result<WeightsReport> {
        let (file, source) = read_weights(path.as_ref())?;
        let mut stripped = false;
        let mut tensors: Vec<(String, &TensorData)> = Vec::new();
        for (key, leaf) in file.iter() {
            if let Leaf::Tensor(t) = leaf {
                tensors.push((remap(key, opts, &mut stripped), t));
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let unused = |what: &'static str, entry: &str| Error::WeightsRuleUnused {
            path: source.clone(),
            what,
            entry: entry.to_string(),
        };
        if let (Some(p), false) = (&opts.strip_prefix, stripped) {
            return Err(unused("strip_prefix", p));
        }
        let vars = self.named_vars();
        let mut report = WeightsReport {
            source: source.clone(),
            loaded: Vec::new(),
            allowed_missing: Vec::new(),
            allowed_unexpected: Vec::new(),
            allowed_mismatched: Vec::new(),
        };
        let (mut missing, mut unexpected, mut mismatched) = (Vec::new(), Vec::new(), Vec::new());
        let mut apply = Vec::new();
        for (name, var) in &vars {
            let Some((_, saved)) = tensors.iter().find(|(n, _)| n == name) else {
                if covered(&opts.allow_missing, name) {
                    report.allowed_missing.push(name.clone());
                } else {
                    missing.push(name.clone());
                }
                continue;
            };
            let live = ckpt_dtype(var.dtype());
            if live != Some(saved.dtype()) || var.dims() != saved.shape() {
                if covered(&opts.allow_mismatched, name) {
                    report.allowed_mismatched.push(name.clone());
                } else {
                    let live = match live {
                        Some(d) => describe(d, var.dims()),
                        None => format!("{:?}{:?}", var.dtype(), var.dims()),
                    };
                    mismatched.push(format!(
                        "{name}: model {live} vs file {}",
                        describe(saved.dtype(), saved.shape())
                    ));
                }
                continue;
            }
            apply.push((name.clone(), var.clone(), *saved));
        }
        for (name, _) in &tensors {
            if vars.iter().all(|(n, _)| n != name) {
                if covered(&opts.allow_unexpected, name) {
                    report.allowed_unexpected.push(name.clone());
                } else {
                    unexpected.push(name.clone());
                }
            }
        }
        if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
            return Err(Error::WeightsMismatch {
                path: source,
                missing,
                unexpected,
                mismatched,
            });
        }
        for (what, rules, hits) in [
            (
                "allow_missing",
                &opts.allow_missing,
                &report.allowed_missing,
            ),
            (
                "allow_unexpected",
                &opts.allow_unexpected,
                &report.allowed_unexpected,
            ),
            (
                "allow_mismatched",
                &opts.allow_mismatched,
                &report.allowed_mismatched,
            ),
        ] {
            if let Some(r) = rules
                .iter()
                .find(|r| !hits.iter().any(|h| rule_covers(r, h)))
            {
                return Err(unused(what, r));
            }
        }
        // Convert everything first, so a failure leaves the store untouched.
        let mut ready = Vec::with_capacity(apply.len());
        for (name, var, saved) in apply {
            ready.push((
                name.clone(),
                var,
                data_to_tensor(saved, self.device(), &name)?,
            ));
        }
        for (name, var, t) in ready {
            var.set(&t)?;
            report.loaded.push(name);
        }
        tracing::info!("{report}");
        Ok(report)
    }

    /// Writes every parameter (frozen or not) to a safetensors file at `path`, in
    /// name order: the weights a later run can start from with
    /// [`ParamStore::load_weights`], readable by any safetensors reader.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path; candle errors.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let vars = self.named_vars();
        let mut datas = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            datas.push((name.as_str(), tensor_to_data(var.as_tensor(), name)?));
        }
        let refs: Vec<(&str, &TensorData)> = datas.iter().map(|(n, d)| (*n, d)).collect();
        let mut bytes = relume_ckpt::tensor_file::encode_header(&refs);
        for (_, d) in &refs {
            d.bytes().for_each_piece(|p| bytes.extend_from_slice(p));
        }
        std::fs::write(path, bytes).map_err(|source| Error::Io {
            op: "write",
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn model(seed: u64, prefix: &str, head: usize) -> ParamStore {
        let s = ParamStore::new(Device::Cpu);
        let vb = s.var_builder(seed);
        candle_nn::linear(4, 8, vb.pp(format!("{prefix}enc"))).unwrap();
        candle_nn::linear(8, head, vb.pp("head")).unwrap();
        s
    }

    fn saved(store: &ParamStore) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        store.save_safetensors(&p).unwrap();
        (dir, p)
    }

    #[test]
    fn strict_load_copies_everything_or_nothing() {
        let src = model(1, "", 3);
        let (_d, file) = saved(&src);
        let dst = model(2, "", 3);
        let r = dst.load_weights(&file, &WeightsOptions::strict()).unwrap();
        assert_eq!(r.loaded.len(), 4);
        assert_eq!(dst.state_dict_for_test(), src.state_dict_for_test());

        // A head of another size: mismatched, named, nothing copied.
        let other = model(3, "", 5);
        let before = other.state_dict_for_test();
        let e = other
            .load_weights(&file, &WeightsOptions::strict())
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("head.weight: model F32[5, 8] vs file F32[3, 8]"),
            "{msg}"
        );
        assert_eq!(other.state_dict_for_test(), before);
        // Allowed: the encoder loads, the head keeps its init, the report says so.
        let r = other
            .load_weights(&file, &WeightsOptions::strict().allow_mismatched("head"))
            .unwrap();
        assert_eq!(r.loaded, ["enc.bias", "enc.weight"]);
        assert_eq!(r.allowed_mismatched, ["head.bias", "head.weight"]);
        assert!(r.to_string().contains("allowed mismatched"), "{r}");
    }

    #[test]
    fn missing_and_unexpected_names_are_errors_unless_allowed() {
        let src = model(1, "", 3);
        let (_d, file) = saved(&src);
        let dst = model(2, "backbone.", 3);
        let e = dst
            .load_weights(&file, &WeightsOptions::strict())
            .unwrap_err();
        match e {
            Error::WeightsMismatch {
                missing,
                unexpected,
                ..
            } => {
                assert_eq!(missing, ["backbone.enc.bias", "backbone.enc.weight"]);
                assert_eq!(unexpected, ["enc.bias", "enc.weight"]);
            }
            other => panic!("{other}"),
        }
        // add_prefix maps enc.* onto backbone.enc.*, but then the file's head.* become
        // backbone.head.*: unexpected, and the model's head.* missing.
        let opts = WeightsOptions::strict()
            .add_prefix("backbone.")
            .allow_unexpected("backbone.head")
            .allow_missing("head");
        let r = dst.load_weights(&file, &opts).unwrap();
        assert_eq!(r.loaded, ["backbone.enc.bias", "backbone.enc.weight"]);
        assert_eq!(
            r.allowed_unexpected,
            ["backbone.head.bias", "backbone.head.weight"]
        );
        assert_eq!(r.allowed_missing, ["head.bias", "head.weight"]);
    }

    #[test]
    fn rules_that_match_nothing_are_errors() {
        let src = model(1, "", 3);
        let (_d, file) = saved(&src);
        let dst = model(2, "", 3);
        for (opts, what) in [
            (
                WeightsOptions::strict().allow_missing("decoder"),
                "allow_missing",
            ),
            (
                WeightsOptions::strict().allow_unexpected("hed"),
                "allow_unexpected",
            ),
            (
                WeightsOptions::strict().allow_mismatched("head"),
                "allow_mismatched",
            ),
            (
                WeightsOptions::strict().strip_prefix("model."),
                "strip_prefix",
            ),
        ] {
            let e = dst.load_weights(&file, &opts).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("matches nothing"), "{e}");
        }
    }

    #[test]
    fn strip_prefix_unwraps_a_lightning_style_name() {
        let src = model(1, "model.", 3);
        let (_d, file) = saved(&src);
        let dst = model(2, "", 3);
        let opts = WeightsOptions::strict()
            .strip_prefix("model.")
            .allow_unexpected("head")
            .allow_missing("head");
        // head.* of the file are not under model., so they stay head.*: both sides have
        // them, they load; the allow-list entries then match nothing.
        let e = dst.load_weights(&file, &opts).unwrap_err().to_string();
        assert!(e.contains("matches nothing"), "{e}");
        let r = dst
            .load_weights(&file, &WeightsOptions::strict().strip_prefix("model."))
            .unwrap();
        assert_eq!(r.loaded.len(), 4);
    }

    #[test]
    fn bad_files_are_named() {
        let dst = model(2, "", 3);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.safetensors");
        let e = dst
            .load_weights(&missing, &WeightsOptions::strict())
            .unwrap_err();
        assert!(e.to_string().contains("nope.safetensors"), "{e}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a safetensors file at all").unwrap();
        let e = dst
            .load_weights(&junk, &WeightsOptions::strict())
            .unwrap_err();
        assert!(e.to_string().contains("junk.safetensors"), "{e}");
        let empty_run = dir.path().join("run");
        std::fs::create_dir(&empty_run).unwrap();
        let e = dst
            .load_weights(&empty_run, &WeightsOptions::strict())
            .unwrap_err();
        assert!(e.to_string().contains("run"), "{e}");
    }

    impl ParamStore {
        fn state_dict_for_test(&self) -> Vec<(String, Vec<f32>)> {
            self.named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
                .collect()
        }
    }
}

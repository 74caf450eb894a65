//! Shared state of every scheduler and its exact JSON encoding.
//!
//! Every scheduler keeps a [`Core`]: its kind, the base rates it was built from,
//! the current rates (torch's `group["lr"]`) and `last_epoch`. The common leaves
//! are `kind`, `config`, `last_epoch`, `base_lrs` and `lrs`; floats are decimal
//! strings in Rust's shortest round-trip form so that they parse back to the same
//! bits whatever JSON parser reads the checkpoint.

use relume_ckpt::{RestoreReport, StateDict};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::optim::check_lr;

/// Leaves every scheduler writes.
pub(crate) const COMMON_KEYS: [&str; 5] = ["kind", "config", "last_epoch", "base_lrs", "lrs"];

/// The state every scheduler shares.
#[derive(Clone, Debug)]
pub(crate) struct Core {
    pub kind: &'static str,
    pub base_lrs: Vec<f64>,
    pub lrs: Vec<f64>,
    pub last_epoch: u64,
}

impl Core {
    /// A core at `last_epoch = 0` whose current rates are `base_lrs` (the caller
    /// replaces them with its epoch-0 rates).
    pub fn new(kind: &'static str, base_lrs: Vec<f64>) -> Result<Core> {
        if base_lrs.is_empty() {
            return Err(Error::InvalidSchedule {
                scheduler: kind.to_string(),
                reason: "base_lrs is empty; pass one initial learning rate per param group".into(),
            });
        }
        check_lrs(kind, &base_lrs)?;
        Ok(Core {
            kind,
            lrs: base_lrs.clone(),
            base_lrs,
            last_epoch: 0,
        })
    }

    /// Validates `lrs` and makes them current at `epoch`.
    pub fn commit(&mut self, epoch: u64, lrs: Vec<f64>) -> Result<Vec<f64>> {
        check_lrs(self.kind, &lrs)?;
        self.last_epoch = epoch;
        self.lrs = lrs;
        Ok(self.lrs.clone())
    }

    /// Writes the common leaves.
    pub fn save(&self, config: &Value) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("kind", Value::String(self.kind.to_string()));
        sd.insert_json("config", Value::String(config_string(config)?));
        sd.insert_json("last_epoch", Value::from(self.last_epoch));
        sd.insert_json("base_lrs", floats_to_json(&self.base_lrs));
        sd.insert_json("lrs", floats_to_json(&self.lrs));
        Ok(sd)
    }

    /// Checks kind, keys, group count and config of `state` against this live core
    /// and parses the common leaves. Returns `None` (with the gaps in `report`)
    /// when a leaf is missing; then nothing may be applied.
    pub fn load(
        &self,
        config: &Value,
        extra_keys: &[&str],
        state: &StateDict,
        report: &mut RestoreReport,
    ) -> Result<Option<Common>> {
        if state.contains_key("kind") {
            let saved: String = state.require_value("kind")?;
            if saved != self.kind {
                return Err(Error::StateKind {
                    key: "kind".into(),
                    saved,
                    live: self.kind.to_string(),
                });
            }
        }
        report.diff_keys(COMMON_KEYS.iter().chain(extra_keys).copied(), state);
        if !report.missing.is_empty() {
            return Ok(None);
        }
        let last_epoch: u64 = state.require_value("last_epoch")?;
        let base_lrs = floats_from_json("base_lrs", state.require_json("base_lrs")?)?;
        let lrs = floats_from_json("lrs", state.require_json("lrs")?)?;
        let groups = self.lrs.len();
        let mut problems = Vec::new();
        for (key, got) in [("base_lrs", base_lrs.len()), ("lrs", lrs.len())] {
            if got != groups {
                problems.push(format!(
                    "{key}: the live scheduler has {groups} param groups but the saved state has {got}"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::StateMismatch {
                component: self.kind.to_string(),
                problems,
            });
        }
        check_lrs(self.kind, &base_lrs)?;
        check_lrs(self.kind, &lrs)?;
        let live = config_string(config)?;
        let saved: String = state.require_value("config")?;
        if saved == live {
            report.restored("config");
        } else {
            report.mismatched("config", live, saved);
        }
        for k in ["kind", "last_epoch", "base_lrs", "lrs"] {
            report.restored(k);
        }
        Ok(Some(Common {
            last_epoch,
            base_lrs,
            lrs,
        }))
    }

    /// Applies parsed common leaves.
    pub fn apply(&mut self, common: Common) {
        self.last_epoch = common.last_epoch;
        self.base_lrs = common.base_lrs;
        self.lrs = common.lrs;
    }
}

/// The parsed common leaves of a saved state.
pub(crate) struct Common {
    pub last_epoch: u64,
    pub base_lrs: Vec<f64>,
    pub lrs: Vec<f64>,
}

/// Every rate must be finite and non-negative.
pub(crate) fn check_lrs(kind: &str, lrs: &[f64]) -> Result<()> {
    for (g, &lr) in lrs.iter().enumerate() {
        check_lr(&format!("{kind} param group {g}"), lr)?;
    }
    Ok(())
}

/// Rejects a non-finite or out-of-range setting.
pub(crate) fn check_setting(
    kind: &str,
    what: &str,
    value: f64,
    ok: bool,
    rule: &str,
) -> Result<()> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidHyperParameter {
            component: kind.to_string(),
            what: what.to_string(),
            value,
            rule: rule.to_string(),
        })
    }
}

/// Compact JSON text of a config, compared byte for byte on restore.
fn config_string(config: &Value) -> Result<String> {
    serde_json::to_string(config).map_err(|e| {
        Error::Ckpt(relume_ckpt::Error::JsonValue {
            key: "config".into(),
            reason: e.to_string(),
        })
    })
}

/// `x` as its shortest round-trip decimal string (`"0.1"`, `"4e-7"`, `"inf"`).
pub(crate) fn float_to_json(x: f64) -> Value {
    Value::String(format!("{x:?}"))
}

/// Parses a float written by [`float_to_json`].
pub(crate) fn float_from_json(key: &str, v: &Value) -> Result<f64> {
    let bad = |reason: String| {
        Error::Ckpt(relume_ckpt::Error::JsonValue {
            key: key.to_string(),
            reason,
        })
    };
    match v {
        Value::String(s) => s
            .parse::<f64>()
            .map_err(|e| bad(format!("{s:?} is not a float: {e}"))),
        other => Err(bad(format!(
            "expected a float written as a decimal string, found {other}"
        ))),
    }
}

/// A list of floats as strings.
pub(crate) fn floats_to_json(xs: &[f64]) -> Value {
    Value::Array(xs.iter().map(|&x| float_to_json(x)).collect())
}

/// Parses a list written by [`floats_to_json`].
pub(crate) fn floats_from_json(key: &str, v: &Value) -> Result<Vec<f64>> {
    match v {
        Value::Array(items) => items.iter().map(|x| float_from_json(key, x)).collect(),
        other => Err(Error::Ckpt(relume_ckpt::Error::JsonValue {
            key: key.to_string(),
            reason: format!("expected a list of floats, found {other}"),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_bit_for_bit() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut values = vec![
            0.1,
            0.010000000000000002,
            4e-7,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
        ];
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if !f.is_nan() {
                values.push(f);
            }
        }
        for v in values {
            let text = serde_json::to_string(&float_to_json(v)).unwrap();
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                float_from_json("x", &back).unwrap().to_bits(),
                v.to_bits(),
                "{v:e}"
            );
        }
    }

    #[test]
    fn non_string_float_is_an_error() {
        let err = float_from_json("lrs", &serde_json::json!(0.1)).unwrap_err();
        assert!(matches!(
            err,
            Error::Ckpt(relume_ckpt::Error::JsonValue { .. })
        ));
    }

    #[test]
    fn empty_base_lrs_is_rejected() {
        assert!(matches!(
            Core::new("StepLR", vec![]),
            Err(Error::InvalidSchedule { .. })
        ));
    }
}

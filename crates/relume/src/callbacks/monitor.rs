//! [`Mode`]: how a monitored metric is compared, and its exact JSON encoding.
//!
//! Scores are saved in callback state as JSON numbers (exact: serde_json's
//! float round-trip), except the non-finite ones JSON cannot hold, which are
//! saved as the strings `"inf"`, `"-inf"` and `"nan"`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Whether a lower or a higher monitored value is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

impl Mode {
    /// `"min"` or `"max"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Min => "min",
            Mode::Max => "max",
        }
    }

    /// True when `a` is strictly better than `b` by more than `min_delta` (>= 0).
    /// NaN is never better, and anything finite is better than NaN.
    pub fn better(self, a: f64, b: f64, min_delta: f64) -> bool {
        if a.is_nan() {
            return false;
        }
        if b.is_nan() {
            return true;
        }
        match self {
            Mode::Min => a < b - min_delta,
            Mode::Max => a > b + min_delta,
        }
    }

    /// The worst possible score (the start value of a running best).
    pub fn worst(self) -> f64 {
        match self {
            Mode::Min => f64::INFINITY,
            Mode::Max => f64::NEG_INFINITY,
        }
    }

    /// `score` with NaN replaced by the worst value (as Lightning ranks NaN).
    pub fn rank_value(self, score: f64) -> f64 {
        if score.is_nan() {
            self.worst()
        } else {
            score
        }
    }
}

/// A score as JSON: a number, or `"inf"`/`"-inf"`/`"nan"`.
pub fn score_to_json(v: f64) -> Value {
    if v.is_finite() {
        Value::from(v)
    } else if v.is_nan() {
        Value::from("nan")
    } else if v > 0.0 {
        Value::from("inf")
    } else {
        Value::from("-inf")
    }
}

/// Reads a score written by [`score_to_json`].
///
/// # Errors
/// [`relume_ckpt::Error::JsonValue`] naming `key` for anything else.
pub fn score_from_json(key: &str, v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if s == "inf" => Some(f64::INFINITY),
        Value::String(s) if s == "-inf" => Some(f64::NEG_INFINITY),
        Value::String(s) if s == "nan" => Some(f64::NAN),
        _ => None,
    }
    .ok_or_else(|| {
        Error::from(relume_ckpt::Error::JsonValue {
            key: key.to_string(),
            reason: format!("expected a score (number, \"inf\", \"-inf\" or \"nan\"), got {v}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn better_respects_mode_delta_and_nan() {
        assert!(Mode::Min.better(0.5, 0.7, 0.1));
        assert!(!Mode::Min.better(0.65, 0.7, 0.1));
        assert!(Mode::Max.better(0.9, 0.7, 0.0));
        assert!(!Mode::Max.better(0.7, 0.7, 0.0));
        assert!(!Mode::Min.better(f64::NAN, 1.0, 0.0));
        assert!(Mode::Min.better(1.0, f64::NAN, 0.0));
        assert!(Mode::Min.better(1.0, Mode::Min.worst(), 0.0));
    }

    #[test]
    fn scores_round_trip_including_non_finite() {
        for v in [0.1 + 0.2, -3.5e-300, f64::INFINITY, f64::NEG_INFINITY] {
            let back = score_from_json("s", &score_to_json(v)).unwrap();
            assert_eq!(back.to_bits(), v.to_bits());
        }
        assert!(score_from_json("s", &score_to_json(f64::NAN))
            .unwrap()
            .is_nan());
        let e = score_from_json("best", &Value::Bool(true)).unwrap_err();
        assert!(e.to_string().contains("best"), "{e}");
    }
}

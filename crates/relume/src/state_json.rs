//! The state layout shared by small components (an RNG stream, the CSV and
//! TensorBoard loggers): a single JSON leaf holding one serialisable struct,
//! which may record the component's kind.

use relume_ckpt::{RestoreReport, StateDict};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// A state dict whose only leaf is `value` as JSON under `key`.
///
/// # Errors
/// [`relume_ckpt::Error::JsonValue`] naming `key` when `value` does not
/// serialise.
pub(crate) fn single_json_state<T: Serialize>(key: &str, value: &T) -> Result<StateDict> {
    let v = serde_json::to_value(value).map_err(|e| relume_ckpt::Error::JsonValue {
        key: key.into(),
        reason: e.to_string(),
    })?;
    let mut sd = StateDict::new();
    sd.insert_json(key, v);
    Ok(sd)
}

/// Reads the single JSON leaf `key` of `state`: the report of missing and
/// unexpected keys, and the value when present (the caller records it restored
/// once applied).
///
/// # Errors
/// [`relume_ckpt::Error`] when the leaf is not JSON of type `T`.
pub(crate) fn read_single_json<T: DeserializeOwned>(
    state: &StateDict,
    key: &str,
) -> Result<(RestoreReport, Option<T>)> {
    let mut report = RestoreReport::new();
    report.diff_keys([key], state);
    if !state.contains_key(key) {
        return Ok((report, None));
    }
    Ok((report, Some(state.require_value(key)?)))
}

/// Checks the kind recorded in a component's state.
///
/// # Errors
/// [`Error::StateKind`] naming `component` when `saved` is not `live`.
pub(crate) fn check_kind(component: &str, saved: &str, live: &str) -> Result<()> {
    if saved == live {
        return Ok(());
    }
    Err(Error::StateKind {
        key: component.to_string(),
        saved: saved.to_string(),
        live: live.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct S {
        kind: String,
        n: u64,
    }

    #[test]
    fn single_json_round_trips_and_reports_missing_and_unexpected() {
        let s = S {
            kind: "k".into(),
            n: 3,
        };
        let sd = single_json_state("state", &s).unwrap();
        assert_eq!(sd.len(), 1);
        let (report, back) = read_single_json::<S>(&sd, "state").unwrap();
        assert!(report.is_clean());
        assert_eq!(back, Some(s));
        let mut other = StateDict::new();
        other.insert_json("x", serde_json::json!(1));
        let (report, back) = read_single_json::<S>(&other, "state").unwrap();
        assert_eq!(back, None);
        assert_eq!(report.missing, vec!["state".to_string()]);
        assert_eq!(report.unexpected, vec!["x".to_string()]);
        assert!(read_single_json::<u64>(&sd, "state").is_err());
    }

    #[test]
    fn kind_mismatch_names_the_component() {
        assert!(check_kind("loggers/csv", "csv", "csv").is_ok());
        let e = check_kind("loggers/csv", "tensorboard", "csv").unwrap_err();
        assert!(
            matches!(e, Error::StateKind { ref key, ref saved, .. } if key == "loggers/csv" && saved == "tensorboard")
        );
    }
}

//! State leaves stored in an exact encoding, decoded for display.
//!
//! To restore bit for bit whatever JSON parser reads `state.json`, the trainer
//! stores some floats in forms a person cannot read:
//! - the `loop` component's `metrics` leaf (the metric aggregation,
//!   `relume::trainer::Metrics`) holds every f64 as its bit pattern, a `u64`:
//!   `{"latest": {"train_loss": 4572677910192258434}, "epoch": {"val_loss":
//!   {"sum": …, "weight": …}}}`;
//! - a scheduler (`scheduler.<i>` components) writes its rates `lrs`, `base_lrs`
//!   and ReduceLROnPlateau's `best` as decimal strings (`["0.003"]`), and its
//!   `config` as a JSON document inside a string.
//!
//! [`decode_leaf`] turns these into plain JSON numbers (non-finite ones into the
//! strings `"NaN"`, `"inf"`, `"-inf"`, which JSON cannot hold as numbers) and
//! returns the exact bit pattern of every float it decoded, keyed by
//! `KEY/PATH`, for `--json` output. Other leaves are left as stored.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::table::num;

/// A leaf decoded for display.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The leaf with its exactly-encoded floats as JSON numbers.
    pub value: Value,
    /// `KEY/PATH` → the f64's bit pattern as `0x` and 16 hex digits, for every
    /// float decoded (empty when nothing was).
    pub exact: BTreeMap<String, String>,
}

/// Decodes leaf `key` of component `component` (see the [module docs](self)).
/// Leaves in no exact encoding come back unchanged with an empty `exact`.
pub fn decode_leaf(component: &str, key: &str, value: &Value) -> Decoded {
    let mut exact = BTreeMap::new();
    let last = key.rsplit('/').next().unwrap_or(key);
    let value = if component == "loop" && key == "metrics" {
        let mut v = value.clone();
        if let Value::Object(m) = &mut v {
            for part in ["latest", "epoch"] {
                if let Some(sub) = m.get_mut(part) {
                    bits_to_floats(sub, &format!("{key}/{part}"), &mut exact);
                }
            }
        }
        v
    } else if is_scheduler(component) && matches!(last, "lrs" | "base_lrs" | "best") {
        let mut v = value.clone();
        strings_to_floats(&mut v, key, &mut exact);
        v
    } else if is_scheduler(component) && last == "config" {
        value
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_else(|| value.clone())
    } else {
        value.clone()
    };
    Decoded { value, exact }
}

fn is_scheduler(component: &str) -> bool {
    component == "scheduler" || component.starts_with("scheduler.")
}

/// `x` as a JSON number, or its name when JSON cannot hold it.
fn float_value(x: f64) -> Value {
    serde_json::Number::from_f64(x)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(x.to_string()))
}

/// The bit pattern of `x` in hex, as `--json` shows it.
pub fn bits_hex(x: f64) -> String {
    format!("{:#018x}", x.to_bits())
}

/// Replaces every `u64` under `v` by the f64 with that bit pattern.
fn bits_to_floats(v: &mut Value, path: &str, exact: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                bits_to_floats(x, &format!("{path}/{k}"), exact);
            }
        }
        Value::Number(n) => {
            if let Some(bits) = n.as_u64() {
                let x = f64::from_bits(bits);
                exact.insert(path.to_string(), bits_hex(x));
                *v = float_value(x);
            }
        }
        _ => {}
    }
}

/// Replaces every string under `v` that parses as an f64 by that number.
fn strings_to_floats(v: &mut Value, path: &str, exact: &mut BTreeMap<String, String>) {
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                strings_to_floats(x, &format!("{path}/{i}"), exact);
            }
        }
        Value::String(s) => {
            if let Ok(x) = s.parse::<f64>() {
                exact.insert(path.to_string(), bits_hex(x));
                *v = float_value(x);
            }
        }
        _ => {}
    }
}

/// `v` in one short line for a table: compact JSON, with floats written as
/// [`num`] writes them (`5.653e-6`, `0.983287`).
pub fn display(v: &Value) -> String {
    fn go(v: &Value, out: &mut String) {
        match v {
            Value::Number(n) if !(n.is_u64() || n.is_i64()) => {
                out.push_str(&n.as_f64().map(num).unwrap_or_else(|| n.to_string()));
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go(x, out);
                }
                out.push(']');
            }
            Value::Object(m) => {
                out.push('{');
                for (i, (k, x)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    go(x, out);
                }
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    go(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metric_bits_become_numbers() {
        let stored = json!({
            "latest": {"train_loss": 0.0123f64.to_bits()},
            "epoch": {"val_loss": {"sum": 2.5f64.to_bits(), "weight": 4.0f64.to_bits()}},
            "prog_bar": ["train_loss"],
        });
        let d = decode_leaf("loop", "metrics", &stored);
        assert_eq!(
            d.value,
            json!({"latest": {"train_loss": 0.0123},
                   "epoch": {"val_loss": {"sum": 2.5, "weight": 4.0}},
                   "prog_bar": ["train_loss"]})
        );
        assert_eq!(
            d.exact["metrics/latest/train_loss"],
            format!("{:#018x}", 0.0123f64.to_bits())
        );
        assert_eq!(
            d.exact["metrics/epoch/val_loss/weight"],
            "0x4010000000000000"
        );
        let nan = decode_leaf(
            "loop",
            "metrics",
            &json!({"latest": {"x": f64::NAN.to_bits()}}),
        );
        assert_eq!(nan.value["latest"]["x"], "NaN");
    }

    #[test]
    fn scheduler_strings_become_numbers() {
        let d = decode_leaf("scheduler.0", "children/1/lrs", &json!(["0.003", "inf"]));
        assert_eq!(d.value, json!([0.003, "inf"]));
        assert_eq!(d.exact.len(), 2);
        assert_eq!(d.exact["children/1/lrs/1"], "0x7ff0000000000000");
        let c = decode_leaf("scheduler.0", "config", &json!("{\"kind\":\"StepLR\"}"));
        assert_eq!(c.value, json!({"kind": "StepLR"}));
        // Elsewhere the same names are left alone.
        let o = decode_leaf("optimizer.0", "lrs", &json!(["0.1"]));
        assert_eq!(o.value, json!(["0.1"]));
        assert!(o.exact.is_empty());
    }

    #[test]
    fn display_shortens_floats() {
        let v = json!({"a": [5.6534052227332015e-6, 0.9832869080779945], "n": 18000, "s": "x"});
        assert_eq!(
            display(&v),
            r#"{"a":[5.653e-6,0.983287],"n":18000,"s":"x"}"#
        );
    }
}

//! The state fingerprint: a deterministic BLAKE3 hash over every leaf.
//!
//! It is written into the manifest at save time and recomputed from the live
//! objects after a restore; equality proves the restored state is the saved state.
//!
//! The hash covers, for each component in name order and each leaf in key order:
//! the key, the leaf kind, and for tensors the dtype, shape and bytes, for JSON a
//! canonical encoding (object keys sorted, no whitespace). Every variable-length
//! field is length-prefixed, so no two different trees hash the same input.

use std::collections::BTreeMap;

use crate::state::{Leaf, StateDict};

/// Prefix of fingerprint strings, naming the algorithm.
pub const FINGERPRINT_PREFIX: &str = "blake3:";

/// Computes the fingerprint of a set of named components.
///
/// # Example
/// ```
/// use std::collections::BTreeMap;
/// use relume_ckpt::{fingerprint, StateDict};
/// let mut c = BTreeMap::new();
/// let mut sd = StateDict::new();
/// sd.insert_json("step", serde_json::json!(1));
/// c.insert("loop".to_string(), sd);
/// let fp = fingerprint(&c);
/// assert!(fp.starts_with("blake3:"));
/// assert_eq!(fp, fingerprint(&c.clone()));
/// ```
pub fn fingerprint(components: &BTreeMap<String, StateDict>) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"relume-fingerprint-v1");
    put_u64(&mut h, components.len() as u64);
    for (name, sd) in components {
        put_str(&mut h, name);
        hash_state_dict(&mut h, sd);
    }
    format!("{FINGERPRINT_PREFIX}{}", h.finalize().to_hex())
}

/// Fingerprint of a single state dict (used for per-component fingerprints).
pub fn fingerprint_state_dict(sd: &StateDict) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"relume-fingerprint-v1/sd");
    hash_state_dict(&mut h, sd);
    format!("{FINGERPRINT_PREFIX}{}", h.finalize().to_hex())
}

fn hash_state_dict(h: &mut blake3::Hasher, sd: &StateDict) {
    put_u64(h, sd.len() as u64);
    for (key, leaf) in sd.iter() {
        put_str(h, key);
        match leaf {
            Leaf::Tensor(t) => {
                h.update(b"T");
                put_str(h, t.dtype().as_str());
                put_u64(h, t.shape().len() as u64);
                for d in t.shape() {
                    put_u64(h, *d as u64);
                }
                put_u64(h, t.bytes().len() as u64);
                t.bytes().for_each_piece(|p| {
                    h.update(p);
                });
            }
            Leaf::Json(v) => {
                h.update(b"J");
                let mut s = String::new();
                canonical_json(v, &mut s);
                put_str(h, &s);
            }
        }
    }
}

/// Writes `v` as canonical JSON: object keys sorted, no whitespace.
///
/// Independent of serde_json's `preserve_order` feature, so the fingerprint does not
/// change when some dependency turns that feature on.
pub fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            out.push('{');
            for (i, (k, val)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(val, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn put_u64(h: &mut blake3::Hasher, v: u64) {
    h.update(&v.to_le_bytes());
}

fn put_str(h: &mut blake3::Hasher, s: &str) {
    put_u64(h, s.len() as u64);
    h.update(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TensorData;

    fn comps(v: f32) -> BTreeMap<String, StateDict> {
        let mut sd = StateDict::new();
        sd.insert_tensor("w", TensorData::from_f32(vec![2], &[1.0, v]).unwrap());
        sd.insert_json("meta", serde_json::json!({"b": 1, "a": [1.5, "x"]}));
        let mut m = BTreeMap::new();
        m.insert("model".to_string(), sd);
        m
    }

    #[test]
    fn changes_with_any_bit() {
        assert_eq!(fingerprint(&comps(2.0)), fingerprint(&comps(2.0)));
        assert_ne!(fingerprint(&comps(2.0)), fingerprint(&comps(2.000_001)));
    }

    #[test]
    fn json_key_order_does_not_matter() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":{"d":2,"c":3}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"b":{"c":3,"d":2},"a":1}"#).unwrap();
        let (mut sa, mut sb) = (String::new(), String::new());
        canonical_json(&a, &mut sa);
        canonical_json(&b, &mut sb);
        assert_eq!(sa, sb);
        assert_eq!(sa, r#"{"a":1,"b":{"c":3,"d":2}}"#);
    }

    #[test]
    fn component_boundaries_matter() {
        let mut a = BTreeMap::new();
        let mut sd = StateDict::new();
        sd.insert_json("x", serde_json::json!(1));
        a.insert("ab".to_string(), sd.clone());
        let mut b = BTreeMap::new();
        let mut sd2 = StateDict::new();
        sd2.insert_json("bx", serde_json::json!(1));
        b.insert("a".to_string(), sd2);
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }
}

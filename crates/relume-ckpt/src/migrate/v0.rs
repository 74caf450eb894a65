//! Format v0: the pre-release layout, and its migration to v1.
//!
//! ```text
//! step-5/
//!   manifest.json       {"version": 0, "relume": "0.0.3", "timestamp": <unix secs>,
//!                        "files": [{"name", "size", "blake3"}], "components": [names],
//!                        "progress": {}, "config": {}, "complete": true}
//!   tensors.safetensors every component's tensors, keyed "<component>/<key>"
//!   state.json          {"<component>": {"<key>": value}}
//! ```
//!
//! v0 differs from v1 in field names (`version`, `relume`, `timestamp`, `name`,
//! `size`), in having one tensor file for all components, no metrics block, no
//! fingerprint and no manifest self-checksum.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::Migratable;
use crate::bytes::TensorBytes;
use crate::error::{Error, Result};
use crate::manifest::{check_relative_path, rfc3339, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use crate::state::{StateDict, TensorData};
use crate::tensor_file::parse_header;

/// The v0 tensor file name.
pub const V0_TENSORS: &str = "tensors.safetensors";

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::ManifestInvalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads and verifies a v0 checkpoint (sizes and BLAKE3 of every file).
///
/// # Errors
/// [`Error::ManifestInvalid`], [`Error::IncompleteManifest`], [`Error::UnsafePath`],
/// [`Error::MissingFile`], [`Error::FileSize`], [`Error::ChecksumMismatch`],
/// header errors of the tensor file, [`Error::Io`].
pub fn read(dir: &Path) -> Result<Migratable> {
    let mpath = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&mpath).map_err(|source| Error::Io {
        op: "read",
        path: mpath.clone(),
        source,
    })?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(Error::LimitExceeded {
            path: mpath,
            what: "manifest bytes",
            got: bytes.len() as u64,
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let manifest: Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(&mpath, format!("not JSON: {e}")))?;
    if manifest.get("complete") != Some(&Value::Bool(true)) {
        return Err(Error::IncompleteManifest { path: mpath });
    }
    let files = manifest
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(&mpath, "no files list"))?;
    let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for f in files {
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&mpath, "file without name"))?;
        let size = f
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid(&mpath, "file without size"))?;
        let hash = f
            .get("blake3")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&mpath, "file without blake3"))?;
        check_relative_path(&mpath, name)?;
        let path = dir.join(name);
        let content = match std::fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::MissingFile { path })
            }
            Err(source) => {
                return Err(Error::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        if content.len() as u64 != size {
            return Err(Error::FileSize {
                path,
                tensor: None,
                expected: size,
                got: content.len() as u64,
            });
        }
        let got = blake3::hash(&content).to_hex().to_string();
        if got != hash {
            return Err(Error::ChecksumMismatch {
                path,
                tensor: None,
                expected: hash.to_string(),
                got,
            });
        }
        data.insert(name.to_string(), content);
    }
    let names: Vec<String> = manifest
        .get("components")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .ok_or_else(|| invalid(&mpath, "components is not a list of names"))?;
    let mut components: BTreeMap<String, StateDict> = names
        .iter()
        .map(|n| (n.clone(), StateDict::new()))
        .collect();
    if let Some(tbytes) = data.remove(V0_TENSORS) {
        let tpath = dir.join(V0_TENSORS);
        let entries = parse_header(&tpath, &tbytes, tbytes.len() as u64)?;
        for e in entries {
            let (comp, key) = e.key.split_once('/').ok_or_else(|| {
                invalid(
                    &tpath,
                    format!("tensor {:?} has no component prefix", e.key),
                )
            })?;
            let sd = components.get_mut(comp).ok_or_else(|| {
                invalid(
                    &tpath,
                    format!("tensor {:?} names an unlisted component", e.key),
                )
            })?;
            let raw = tbytes[e.start as usize..e.end as usize].to_vec();
            let t = TensorData::new(e.dtype, e.shape, TensorBytes::owned(raw))
                .map_err(|err| err.with_key(&e.key))?;
            sd.insert_tensor(key, t);
        }
    }
    if let Some(sbytes) = data.remove("state.json") {
        let spath = dir.join("state.json");
        let state: BTreeMap<String, serde_json::Map<String, Value>> =
            serde_json::from_slice(&sbytes)
                .map_err(|e| invalid(&spath, format!("state.json: {e}")))?;
        for (comp, leaves) in state {
            let sd = components
                .get_mut(&comp)
                .ok_or_else(|| invalid(&spath, format!("state of unlisted component {comp:?}")))?;
            for (k, v) in leaves {
                sd.insert_json(k, v);
            }
        }
    }
    Ok(Migratable {
        manifest,
        components,
    })
}

/// The v0 → v1 migration: renames the manifest fields, converts the Unix timestamp
/// to RFC 3339 and adds an empty metrics block. The state passes through unchanged
/// (v1 splits tensor files per component, which the writer does).
///
/// # Errors
/// [`Error::Migration`] when a v0 field is missing or has the wrong type.
pub fn to_v1(m: Migratable) -> Result<Migratable> {
    let bad = |reason: &str| Error::Migration {
        from: 0,
        reason: reason.to_string(),
    };
    let v = &m.manifest;
    if v.get("version").and_then(Value::as_u64) != Some(0) {
        return Err(bad("manifest is not version 0"));
    }
    let relume = v
        .get("relume")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing \"relume\""))?;
    let ts = v
        .get("timestamp")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("missing \"timestamp\""))?;
    let manifest = json!({
        "format_version": 1,
        "relume_version": relume,
        "created_at": rfc3339(ts),
        "progress": v.get("progress").cloned().unwrap_or(json!({})),
        "config": v.get("config").cloned().unwrap_or(json!({})),
        "metrics": {},
    });
    Ok(Migratable {
        manifest,
        components: m.components,
    })
}

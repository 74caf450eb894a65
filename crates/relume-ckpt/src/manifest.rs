//! The manifest: `manifest.json`, the commit record of a checkpoint.
//!
//! A [`Manifest`] can only be obtained from [`Manifest::parse`] (which validates
//! everything a reader must check before trusting the file list) or from the writer.
//! The file ends with a `manifest_blake3` field: the BLAKE3 of the manifest's own
//! bytes with that field's value replaced by 64 zeros, so a flipped bit anywhere in
//! the manifest is detected, not only in the files it lists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::{Error, Result};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// Largest `manifest.json` a reader accepts (bytes).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Longest relative path a manifest may list (bytes).
pub const MAX_PATH_LEN: usize = 255;
/// Most files a manifest may list.
pub const MAX_FILES: usize = 10_000;
/// Name of the manifest file inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the JSON state file inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";

const CHECKSUM_KEY: &str = "\"manifest_blake3\": \"";
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the checkpoint directory (no `..`, not absolute).
    pub path: String,
    /// Exact size in bytes.
    pub bytes: u64,
    /// BLAKE3 of the whole file, 64 lowercase hex digits.
    pub blake3: String,
}

/// What the manifest records about one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentEntry {
    /// The safetensors file holding this component's tensors, if it has any.
    pub file: Option<String>,
    /// Number of tensor leaves.
    pub tensors: u64,
    /// Keys of the JSON leaves (stored in `state.json` under the component's name).
    pub json_keys: Vec<String>,
    /// CRC32 of each tensor's bytes, used only to name the damaged tensor after a
    /// file checksum mismatch (integrity itself rests on the file's BLAKE3).
    pub tensor_crc32: BTreeMap<String, u32>,
}

/// The parsed, validated manifest of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Manifest {
    /// Integer format version ([`FORMAT_VERSION`]), independent of the crate version.
    pub format_version: u64,
    /// Version of relume that wrote the checkpoint.
    pub relume_version: String,
    /// UTC time of the save, RFC 3339 (`2026-01-31T12:00:00Z`).
    pub created_at: String,
    /// Every file of the checkpoint except the manifest, with size and checksum.
    pub files: Vec<FileEntry>,
    /// The components, by name.
    pub components: BTreeMap<String, ComponentEntry>,
    /// Training progress (step, epoch, ...), free-form JSON.
    pub progress: Value,
    /// Training configuration, free-form JSON.
    pub config: Value,
    /// Scalar metrics at save time; non-finite values are stored as strings.
    #[serde(serialize_with = "ser_metrics", deserialize_with = "de_metrics")]
    pub metrics: BTreeMap<String, f64>,
    /// [`crate::fingerprint`](fn@crate::fingerprint) of all components.
    pub fingerprint: String,
    /// Always `true` in a committed checkpoint.
    pub complete: bool,
    /// Commit order within the checkpoints directory: one more than the largest
    /// `commit_seq` present when this checkpoint was committed by
    /// [`crate::CheckpointDir::save`]. Orders checkpoints of the same step. Absent in
    /// checkpoints written by [`crate::write_checkpoint`] directly and by older writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_seq: Option<u64>,
    /// The names of every checkpoint saved at the same step boundary from the same
    /// state, this one included (empty: saved alone). Such a group is committed only
    /// when all its members are: see [`crate::CheckpointDir`]'s reconciliation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<String>,
}

fn ser_metrics<S: Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let v: BTreeMap<&String, Value> = m
        .iter()
        .map(|(k, x)| {
            let val = if x.is_finite() {
                serde_json::json!(x)
            } else {
                Value::String(x.to_string())
            };
            (k, val)
        })
        .collect();
    v.serialize(s)
}

fn de_metrics<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    let raw: BTreeMap<String, Value> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let x = match &v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.parse::<f64>().ok().filter(|x| !x.is_finite()),
                _ => None,
            };
            x.map(|x| (k.clone(), x)).ok_or_else(|| {
                serde::de::Error::custom(format!("metric {k:?} is not a number: {v}"))
            })
        })
        .collect()
}

impl Manifest {
    /// Parses and validates manifest bytes read from `path`.
    ///
    /// Checks, in order: size bound, the self-checksum, the format version, the
    /// structure, `complete: true`, every path (relative, no `..`, bounded length,
    /// unique), and that every component's file is listed.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`], [`Error::ManifestChecksum`], [`Error::ManifestInvalid`],
    /// [`Error::UnsupportedFormatVersion`], [`Error::OldFormatVersion`],
    /// [`Error::IncompleteManifest`], [`Error::UnsafePath`].
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let value = match parse_sealed(path, bytes) {
            Ok(v) => v,
            // An older or newer format may not carry a self-checksum: report its
            // version rather than a damaged manifest.
            Err(e @ Error::ManifestInvalid { .. }) => {
                match serde_json::from_slice::<Value>(bytes) {
                    Ok(v)
                        if v.get("version").is_some()
                            || v.get("format_version")
                                .is_some_and(|f| f.as_u64() != Some(FORMAT_VERSION)) =>
                    {
                        v
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        Manifest::from_value(path, value)
    }

    /// Validates a manifest given as JSON (without `manifest_blake3`).
    ///
    /// # Errors
    /// As [`Manifest::parse`], minus the checksum.
    pub fn from_value(path: &Path, value: Value) -> Result<Manifest> {
        let invalid = |reason: String| Error::ManifestInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let version = match value.get("format_version") {
            Some(v) => v.as_u64().ok_or_else(|| {
                invalid(format!("format_version {v} is not a non-negative integer"))
            })?,
            None if value.get("version").is_some() => 0,
            None => return Err(invalid("no format_version field".into())),
        };
        if version > FORMAT_VERSION {
            return Err(Error::UnsupportedFormatVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if version < FORMAT_VERSION {
            return Err(Error::OldFormatVersion {
                path: path.parent().unwrap_or(path).to_path_buf(),
                found: version,
                current: FORMAT_VERSION,
            });
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        if !m.complete {
            return Err(Error::IncompleteManifest {
                path: path.to_path_buf(),
            });
        }
        if m.files.len() > MAX_FILES {
            return Err(Error::LimitExceeded {
                path: path.to_path_buf(),
                what: "file count",
                got: m.files.len() as u64,
                limit: MAX_FILES as u64,
            });
        }
        let mut seen = BTreeSet::new();
        for f in &m.files {
            check_relative_path(path, &f.path)?;
            if f.path == MANIFEST_FILE || !seen.insert(f.path.as_str()) {
                return Err(invalid(format!("file {:?} is listed twice", f.path)));
            }
            if f.blake3.len() != 64 || !f.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!(
                    "file {:?}: blake3 is not 64 hex digits",
                    f.path
                )));
            }
        }
        for (name, c) in &m.components {
            if let Some(file) = &c.file {
                if !seen.contains(file.as_str()) {
                    return Err(invalid(format!(
                        "component {name:?} names file {file:?}, which is not listed"
                    )));
                }
            }
        }
        Ok(m)
    }

    /// Encodes the manifest as the exact bytes written to `manifest.json`.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain data (strings, numbers, maps) cannot fail.
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        seal(&v)
    }

    /// Total bytes of all listed files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// The training step recorded in `progress.step` or `progress.global_step`, if any.
    pub fn step(&self) -> Option<u64> {
        progress_step(&self.progress)
    }
}

/// The training step a progress block records (`step`, or `global_step`), if any.
pub fn progress_step(progress: &Value) -> Option<u64> {
    progress
        .get("step")
        .or_else(|| progress.get("global_step"))
        .and_then(Value::as_u64)
}

/// Encodes a JSON object as manifest bytes: pretty JSON whose last field is
/// `manifest_blake3`, the BLAKE3 of these bytes with that value zeroed.
///
/// Used by the writer, by migrations, and by tests that craft manifests.
pub fn seal(v: &Value) -> Vec<u8> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    // Strip the closing brace and append the checksum field last.
    while body
        .last()
        .is_some_and(|b| b.is_ascii_whitespace() || *b == b'}')
    {
        body.pop();
    }
    let sep: &[u8] = if body.last() == Some(&b'{') {
        b"\n  "
    } else {
        b",\n  "
    };
    body.extend_from_slice(sep);
    let field_at = body.len();
    body.extend_from_slice(CHECKSUM_KEY.as_bytes());
    body.extend_from_slice(ZERO_HASH.as_bytes());
    body.extend_from_slice(b"\"\n}\n");
    let h = blake3::hash(&body).to_hex();
    let start = field_at + CHECKSUM_KEY.len();
    body[start..start + 64].copy_from_slice(h.as_bytes());
    body
}

/// Checks the self-checksum of manifest bytes and returns the JSON without it.
///
/// # Errors
/// [`Error::LimitExceeded`], [`Error::ManifestInvalid`], [`Error::ManifestChecksum`].
pub fn parse_sealed(path: &Path, bytes: &[u8]) -> Result<Value> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(Error::LimitExceeded {
            path: path.to_path_buf(),
            what: "manifest bytes",
            got: bytes.len() as u64,
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let invalid = |reason: String| Error::ManifestInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let key = CHECKSUM_KEY.as_bytes();
    let at = bytes
        .windows(key.len())
        .rposition(|w| w == key)
        .ok_or_else(|| {
            invalid(
                "no manifest_blake3 field; the manifest is damaged or was not written by relume"
                    .into(),
            )
        })?;
    let start = at + key.len();
    let Some(stored) = bytes.get(start..start + 64) else {
        return Err(invalid("manifest_blake3 is cut off".into()));
    };
    let stored = String::from_utf8_lossy(stored).into_owned();
    let mut zeroed = bytes.to_vec();
    zeroed[start..start + 64].copy_from_slice(ZERO_HASH.as_bytes());
    let got = blake3::hash(&zeroed).to_hex().to_string();
    if got != stored {
        return Err(Error::ManifestChecksum {
            path: path.to_path_buf(),
            expected: stored,
            got,
        });
    }
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    match v.as_object_mut() {
        Some(o) => {
            o.remove("manifest_blake3");
        }
        None => return Err(invalid("not a JSON object".into())),
    }
    Ok(v)
}

/// Rejects a manifest path that is empty, too long, absolute, or not a plain
/// downward path (`..`, `.`, root or prefix components, backslashes, NUL).
///
/// # Errors
/// [`Error::UnsafePath`] naming the entry.
pub fn check_relative_path(manifest: &Path, entry: &str) -> Result<()> {
    let reject = |reason: &'static str| {
        Err(Error::UnsafePath {
            path: manifest.to_path_buf(),
            entry: entry.to_string(),
            reason,
        })
    };
    if entry.is_empty() {
        return reject("empty");
    }
    if entry.len() > MAX_PATH_LEN {
        return reject("longer than the path limit");
    }
    if entry.contains('\\') || entry.contains('\0') {
        return reject("contains a backslash or NUL");
    }
    let p = Path::new(entry);
    if p.is_absolute() || entry.starts_with('/') {
        return reject("absolute");
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return reject("contains `..`"),
            _ => return reject("contains `.`, a root or a prefix"),
        }
    }
    Ok(())
}

/// Formats seconds since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "format_version": 1, "relume_version": "0.1.0", "created_at": "x",
            "files": [{"path": "state.json", "bytes": 2, "blake3": ZERO_HASH}],
            "components": {}, "progress": {"step": 3}, "config": {},
            "metrics": {"loss": 0.5, "bad": "NaN"}, "fingerprint": "blake3:0", "complete": true
        })
    }

    #[test]
    fn seal_round_trips_and_detects_any_flip() {
        let bytes = seal(&sample());
        let m = Manifest::parse(Path::new("m"), &bytes).unwrap();
        assert_eq!(m.step(), Some(3));
        assert!(m.metrics["bad"].is_nan());
        assert_eq!(m.to_bytes(), bytes);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1 << (i % 8);
            assert!(Manifest::parse(Path::new("m"), &b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn incomplete_manifest_is_rejected() {
        let mut v = sample();
        v["complete"] = json!(false);
        let err = Manifest::parse(Path::new("ck/manifest.json"), &seal(&v)).unwrap_err();
        assert!(matches!(err, Error::IncompleteManifest { .. }), "{err}");
        assert!(err.to_string().contains("ck/manifest.json"));
    }

    #[test]
    fn future_and_old_versions_are_rejected() {
        let mut v = sample();
        v["format_version"] = json!(2);
        let err = Manifest::parse(Path::new("m"), &seal(&v)).unwrap_err();
        assert!(matches!(
            err,
            Error::UnsupportedFormatVersion {
                found: 2,
                supported: 1,
                ..
            }
        ));
        let err = Manifest::parse(Path::new("m"), &seal(&json!({"version": 0}))).unwrap_err();
        assert!(matches!(err, Error::OldFormatVersion { found: 0, .. }));
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        for bad in ["/etc/passwd", "../x", "a/../../x", "./a", "", "a\\b"] {
            let mut v = sample();
            v["files"][0]["path"] = json!(bad);
            let err = Manifest::parse(Path::new("m"), &seal(&v)).unwrap_err();
            assert!(matches!(err, Error::UnsafePath { .. }), "{bad}: {err}");
        }
        assert!(check_relative_path(Path::new("m"), "sub/model.safetensors").is_ok());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_208_000), "2024-02-29T12:00:00Z");
    }
}

//! The [`Stateful`] trait and restore accounting.

use std::collections::BTreeSet;

use crate::error::Error;
pub use crate::error::Mismatch;
use crate::snapshot::{BufferPool, Snapshot};
use crate::state::{join_key, StateDict};

/// A component whose whole state can be exported and restored exactly.
///
/// Every component the trainer checkpoints (parameters, optimizers, schedulers,
/// RNG streams, data loaders, callbacks, loggers) implements it. A restore never
/// fails silently: `load_state_dict` returns a [`RestoreReport`] that accounts for
/// every key, and [`RestoreReport::check_strict`] turns any gap into an error.
pub trait Stateful {
    /// The error type of the component.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Exports the complete state.
    ///
    /// # Errors
    /// When the state cannot be read (for example a device copy fails).
    fn state_dict(&self) -> Result<StateDict, Self::Error>;

    /// Restores from `state` and reports what was restored, missing, unexpected or
    /// mismatched. Implementations restore what matches and report the rest; they
    /// return an error only when the state is unusable as a whole (wrong kind, bad
    /// JSON).
    ///
    /// # Errors
    /// When the state cannot be applied at all.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport, Self::Error>;

    /// The state for an asynchronous save, taken with as little work as possible
    /// on the calling (training) thread: tensor bytes copied into buffers from
    /// `pool`, small state captured as plain data and turned into JSON leaves
    /// later by [`Snapshot::resolve`] on the writer thread.
    ///
    /// The resolved state dict must equal what [`Stateful::state_dict`] returns
    /// now. The default is exactly that: a ready `state_dict()`, which is always
    /// correct; components on the hot path (parameters, optimizers, RNG streams,
    /// loop counters) override it.
    ///
    /// # Errors
    /// As [`Stateful::state_dict`].
    fn snapshot(&self, _pool: &BufferPool) -> Result<Snapshot<Self::Error>, Self::Error> {
        Ok(Snapshot::ready(self.state_dict()?))
    }
}

/// What a restore did: every key is in exactly one list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Keys applied to live state.
    pub restored: Vec<String>,
    /// Keys the live component needs that the checkpoint lacks.
    pub missing: Vec<String>,
    /// Keys in the checkpoint that the live component does not know.
    pub unexpected: Vec<String>,
    /// Keys present on both sides whose shape or dtype disagree.
    pub mismatched: Vec<Mismatch>,
}

impl RestoreReport {
    /// An empty report.
    pub fn new() -> Self {
        RestoreReport::default()
    }

    /// A report where every key of `state` was restored.
    pub fn all_restored(state: &StateDict) -> Self {
        RestoreReport {
            restored: state.keys().map(str::to_string).collect(),
            ..RestoreReport::default()
        }
    }

    /// Records a restored key.
    pub fn restored(&mut self, key: impl Into<String>) {
        self.restored.push(key.into());
    }

    /// Records a missing key.
    pub fn missing(&mut self, key: impl Into<String>) {
        self.missing.push(key.into());
    }

    /// Records an unexpected key.
    pub fn unexpected(&mut self, key: impl Into<String>) {
        self.unexpected.push(key.into());
    }

    /// Records a shape or dtype mismatch.
    pub fn mismatched(
        &mut self,
        key: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) {
        self.mismatched.push(Mismatch {
            key: key.into(),
            expected: expected.into(),
            got: got.into(),
        });
    }

    /// Compares the key sets: every `expected` key absent from `state` is missing,
    /// every key of `state` not in `expected` is unexpected. Restored keys are not
    /// recorded; the caller records them as it applies them.
    pub fn diff_keys<'a>(
        &mut self,
        expected: impl IntoIterator<Item = &'a str>,
        state: &StateDict,
    ) {
        let expected: BTreeSet<&str> = expected.into_iter().collect();
        for k in &expected {
            if !state.contains_key(k) {
                self.missing(*k);
            }
        }
        for k in state.keys() {
            if !expected.contains(k) {
                self.unexpected(k);
            }
        }
    }

    /// Appends `other` with every key prefixed by `prefix/`.
    pub fn merge_prefixed(&mut self, prefix: &str, other: RestoreReport) {
        self.restored
            .extend(other.restored.into_iter().map(|k| join_key(prefix, &k)));
        self.missing
            .extend(other.missing.into_iter().map(|k| join_key(prefix, &k)));
        self.unexpected
            .extend(other.unexpected.into_iter().map(|k| join_key(prefix, &k)));
        self.mismatched
            .extend(other.mismatched.into_iter().map(|m| Mismatch {
                key: join_key(prefix, &m.key),
                ..m
            }));
    }

    /// True when nothing is missing, unexpected or mismatched.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// Strict mode: any missing, unexpected or mismatched key that `allow` does not
    /// cover is an error listing every offending key.
    ///
    /// # Errors
    /// [`Error::StrictRestore`] naming all offending keys.
    pub fn check_strict(&self, allow: &AllowList) -> Result<(), Error> {
        let missing: Vec<String> = self
            .missing
            .iter()
            .filter(|k| !allow.allows(k))
            .cloned()
            .collect();
        let unexpected: Vec<String> = self
            .unexpected
            .iter()
            .filter(|k| !allow.allows(k))
            .cloned()
            .collect();
        let mismatched: Vec<Mismatch> = self
            .mismatched
            .iter()
            .filter(|m| !allow.allows(&m.key))
            .cloned()
            .collect();
        if missing.is_empty() && unexpected.is_empty() && mismatched.is_empty() {
            Ok(())
        } else {
            Err(Error::StrictRestore {
                missing,
                unexpected,
                mismatched,
            })
        }
    }
}

/// Keys exempt from strict restore, by exact key or by prefix. Empty by default:
/// allow-listing is always explicit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    keys: BTreeSet<String>,
    prefixes: Vec<String>,
}

impl AllowList {
    /// An empty allow-list (fully strict).
    pub fn none() -> Self {
        AllowList::default()
    }

    /// Allows one exact key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.keys.insert(key.into());
        self
    }

    /// Allows every key equal to `prefix` or under `prefix/`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefixes.push(prefix.into());
        self
    }

    /// True when `key` is allow-listed.
    pub fn allows(&self, key: &str) -> bool {
        self.keys.contains(key)
            || self.prefixes.iter().any(|p| {
                key == p
                    || (key.len() > p.len()
                        && key.starts_with(p.as_str())
                        && key[p.len()..].starts_with('/'))
            })
    }

    /// True when nothing is allow-listed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_keys_and_strict() {
        let mut sd = StateDict::new();
        sd.insert_json("a", serde_json::json!(1));
        sd.insert_json("extra", serde_json::json!(1));
        let mut r = RestoreReport::new();
        r.diff_keys(["a", "b"], &sd);
        assert_eq!(r.missing, vec!["b"]);
        assert_eq!(r.unexpected, vec!["extra"]);
        let err = r.check_strict(&AllowList::none()).unwrap_err();
        match err {
            Error::StrictRestore {
                missing,
                unexpected,
                ..
            } => {
                assert_eq!(missing, vec!["b"]);
                assert_eq!(unexpected, vec!["extra"]);
            }
            other => panic!("wrong error {other:?}"),
        }
        assert!(r
            .check_strict(&AllowList::none().key("b").prefix("extra"))
            .is_ok());
    }

    #[test]
    fn prefix_allow_matches_segments_only() {
        let a = AllowList::none().prefix("optimizer/0");
        assert!(a.allows("optimizer/0"));
        assert!(a.allows("optimizer/0/w/exp_avg"));
        assert!(!a.allows("optimizer/01/w"));
        assert!(!a.allows("optimizer/1"));
    }

    #[test]
    fn merge_prefixes_every_list() {
        let mut inner = RestoreReport::new();
        inner.restored("w");
        inner.mismatched("v", "F32[2]", "F32[3]");
        let mut outer = RestoreReport::new();
        outer.merge_prefixed("model", inner);
        assert_eq!(outer.restored, vec!["model/w"]);
        assert_eq!(outer.mismatched[0].key, "model/v");
        assert!(!outer.is_clean());
    }
}

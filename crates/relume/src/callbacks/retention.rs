//! Retention as pure functions: which checkpoints [`ModelCheckpoint`] keeps and
//! which it asks to delete. Nothing here touches the disk, so every rule is unit
//! tested directly.
//!
//! The rules (invariant 11):
//! - a deletion is only *requested* here; the trainer carries it out after the
//!   checkpoint saved at the same boundary has **committed** (after the async
//!   writer reported the commit), and never for a save that failed;
//! - the checkpoint the run resumed from is never deleted while the run is in
//!   progress ([`KeepReason::ResumedFrom`]); [`ModelCheckpoint`] defers its
//!   deletion to the end of a completed fit (see its docs);
//! - only plain names inside the run's `checkpoints/` are deleted (never a path);
//! - at least one of the callback's checkpoints is always kept.
//!
//! [`ModelCheckpoint`]: super::ModelCheckpoint

use std::collections::{BTreeMap, BTreeSet};

use super::monitor::Mode;

/// What the top-k rule decided for one candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct TopKPlan {
    /// Whether the candidate is saved (it entered the top k).
    pub save: bool,
    /// The top k after the decision (name → score).
    pub best_k: BTreeMap<String, f64>,
    /// Names that left the top k (to delete once the candidate committed).
    pub evicted: Vec<String>,
}

/// The worst entry of `best_k` under `mode` (NaN ranks worst; ties broken by the
/// greater name, so the choice is deterministic).
pub fn worst_of(best_k: &BTreeMap<String, f64>, mode: Mode) -> Option<(&String, f64)> {
    best_k
        .iter()
        .map(|(n, s)| (n, mode.rank_value(*s)))
        .fold(None, |acc, (n, s)| match acc {
            None => Some((n, s)),
            Some((an, a)) if mode.better(a, s, 0.0) || (a == s && n > an) => Some((n, s)),
            Some(x) => Some(x),
        })
}

/// The best entry of `best_k` under `mode` (ties broken by the smaller name).
pub fn best_of(best_k: &BTreeMap<String, f64>, mode: Mode) -> Option<(&String, f64)> {
    best_k
        .iter()
        .map(|(n, s)| (n, mode.rank_value(*s)))
        .fold(None, |acc, (n, s)| match acc {
            None => Some((n, s)),
            Some((_, a)) if mode.better(s, a, 0.0) => Some((n, s)),
            Some(x) => Some(x),
        })
}

/// Lightning's top-k rule for a new candidate `(name, score)`:
/// - `k == 0`: never saved;
/// - `k < 0`: always saved, nothing evicted;
/// - fewer than `k` kept: saved;
/// - otherwise saved only when strictly better than the worst kept, which is
///   evicted.
pub fn plan_top_k(
    best_k: &BTreeMap<String, f64>,
    name: &str,
    score: f64,
    k: i64,
    mode: Mode,
) -> TopKPlan {
    let mut next = best_k.clone();
    if k == 0 {
        return TopKPlan {
            save: false,
            best_k: next,
            evicted: Vec::new(),
        };
    }
    if k < 0 || (best_k.len() as i64) < k {
        next.insert(name.to_string(), score);
        return TopKPlan {
            save: true,
            best_k: next,
            evicted: Vec::new(),
        };
    }
    let mut evicted = Vec::new();
    let save = match worst_of(best_k, mode) {
        Some((_, w)) => mode.better(mode.rank_value(score), w, 0.0),
        None => true,
    };
    if save {
        next.insert(name.to_string(), score);
        while next.len() as i64 > k {
            let Some((w, _)) = worst_of(&next, mode).map(|(n, s)| (n.clone(), s)) else {
                break;
            };
            next.remove(&w);
            evicted.push(w);
        }
    }
    TopKPlan {
        save,
        best_k: next,
        evicted,
    }
}

/// Why a checkpoint that left the tracked set is not deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// It is the checkpoint this run resumed from.
    ResumedFrom,
    /// The name is not a plain name inside the checkpoints directory.
    OutsideDirectory,
    /// Deleting it would leave no checkpoint of this callback.
    LastOne,
}

/// One retention decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retain {
    /// Request deletion (carried out after the boundary's save commits).
    Delete(String),
    /// Keep it, for this reason.
    Keep {
        /// Checkpoint name.
        name: String,
        /// Why.
        reason: KeepReason,
    },
}

/// True for a plain checkpoint name: non-empty, no path separator, not `.`/`..`,
/// not hidden (temporaries and the lock start with `.`).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// The deletions for a transition of the tracked set from `before` to `after`:
/// every name in `before` but not in `after`, except the resume source
/// (`resumed_from`, a name in the same directory), names that are not plain, and
/// everything when `after` is empty (at least one is always kept). In name order.
pub fn plan_deletions(
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
    resumed_from: Option<&str>,
) -> Vec<Retain> {
    before
        .difference(after)
        .map(|name| {
            let keep = |reason| Retain::Keep {
                name: name.clone(),
                reason,
            };
            if !is_plain_name(name) {
                keep(KeepReason::OutsideDirectory)
            } else if resumed_from == Some(name.as_str()) {
                keep(KeepReason::ResumedFrom)
            } else if after.is_empty() {
                keep(KeepReason::LastOne)
            } else {
                Retain::Delete(name.clone())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: &[(&str, f64)]) -> BTreeMap<String, f64> {
        v.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }
    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn top_k_fills_then_replaces_the_worst() {
        let p = plan_top_k(&map(&[]), "a", 0.5, 2, Mode::Min);
        assert!(p.save && p.evicted.is_empty());
        let p = plan_top_k(&p.best_k, "b", 0.7, 2, Mode::Min);
        assert!(p.save && p.evicted.is_empty());
        let p2 = plan_top_k(&p.best_k, "c", 0.8, 2, Mode::Min);
        assert!(!p2.save && p2.best_k == p.best_k && p2.evicted.is_empty());
        let p3 = plan_top_k(&p.best_k, "d", 0.6, 2, Mode::Min);
        assert!(p3.save);
        assert_eq!(p3.evicted, vec!["b"]);
        assert_eq!(p3.best_k, map(&[("a", 0.5), ("d", 0.6)]));
        // max mode: higher wins; a tie is not an improvement
        let p4 = plan_top_k(&map(&[("x", 0.9)]), "y", 0.9, 1, Mode::Max);
        assert!(!p4.save);
        let p5 = plan_top_k(&map(&[("x", 0.9)]), "y", 0.95, 1, Mode::Max);
        assert_eq!((p5.save, p5.evicted), (true, vec!["x".to_string()]));
    }

    #[test]
    fn top_k_zero_and_all() {
        assert!(!plan_top_k(&map(&[]), "a", 0.1, 0, Mode::Min).save);
        let mut m = map(&[]);
        for (i, s) in [0.3, 0.2, 0.9].iter().enumerate() {
            let p = plan_top_k(&m, &format!("c{i}"), *s, -1, Mode::Min);
            assert!(p.save && p.evicted.is_empty());
            m = p.best_k;
        }
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn nan_ranks_worst() {
        let p = plan_top_k(&map(&[("a", f64::NAN)]), "b", 5.0, 1, Mode::Min);
        assert_eq!(p.evicted, vec!["a"]);
        let p = plan_top_k(&map(&[("a", 5.0)]), "b", f64::NAN, 1, Mode::Min);
        assert!(!p.save);
        assert_eq!(
            best_of(&map(&[("a", f64::NAN), ("b", 3.0)]), Mode::Max)
                .unwrap()
                .0,
            "b"
        );
    }

    #[test]
    fn deletions_spare_resume_source_foreign_names_and_the_last_one() {
        let d = plan_deletions(&set(&["a", "b", "c"]), &set(&["c", "d"]), Some("b"));
        assert_eq!(
            d,
            vec![
                Retain::Delete("a".into()),
                Retain::Keep {
                    name: "b".into(),
                    reason: KeepReason::ResumedFrom
                }
            ]
        );
        let d = plan_deletions(&set(&["../x", ".tmp-1", "a/b"]), &set(&["c"]), None);
        assert!(d.iter().all(|r| matches!(
            r,
            Retain::Keep {
                reason: KeepReason::OutsideDirectory,
                ..
            }
        )));
        let d = plan_deletions(&set(&["a"]), &set(&[]), None);
        assert_eq!(
            d,
            vec![Retain::Keep {
                name: "a".into(),
                reason: KeepReason::LastOne
            }]
        );
        assert!(plan_deletions(&set(&["a"]), &set(&["a"]), None).is_empty());
    }
}

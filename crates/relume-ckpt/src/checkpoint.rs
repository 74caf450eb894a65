//! [`Checkpoint`]: everything one checkpoint holds, as the writer takes it and
//! independent of how it is written ([`crate::commit`]) or read ([`crate::read`]).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::state::StateDict;

/// Everything a checkpoint holds, as the writer takes it.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// The components by stable name (`model`, `optimizer`, `loop`, ...).
    pub components: BTreeMap<String, StateDict>,
    /// Training progress (step, epoch, ...); `progress.step` orders listings.
    pub progress: Value,
    /// The training configuration, diffed on resume.
    pub config: Value,
    /// Scalar metrics at save time.
    pub metrics: BTreeMap<String, f64>,
    /// Every checkpoint name saved at the same step boundary from the same state, this
    /// one included; empty (the default) when it is saved alone. Recorded in the
    /// manifest's `group`: a group counts as committed only when all of it is, so a
    /// checkpoint whose state names a sibling that failed to commit is never `latest`.
    pub group: Vec<String>,
}

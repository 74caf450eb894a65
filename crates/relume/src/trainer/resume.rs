//! [`ResumePolicy`]: whether and from where `fit` resumes. Always explicit.

use std::path::PathBuf;

/// Which checkpoint to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A checkpoint directory (absolute, or relative to the working directory).
    Path(PathBuf),
    /// The run directory's `checkpoints/latest` pointer.
    Last,
    /// The best checkpoint, as tracked by a callback (ModelCheckpoint) in the
    /// state saved with the latest checkpoint.
    Best,
}

/// Whether `fit` resumes.
///
/// There is no implicit default in the trainer's behaviour: the builder's default
/// is [`ResumePolicy::Never`], and both resuming policies log exactly what they did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumePolicy {
    /// Resume from `Source`; finding nothing is [`crate::Error::NoCheckpoint`].
    Required(Source),
    /// Resume from `Source` if it exists; otherwise log one line
    /// (`no checkpoint in DIR, starting fresh`) and start fresh.
    IfExists(Source),
    /// Always start fresh (existing checkpoints in the run directory are kept;
    /// new ones are added next to them).
    Never,
}

impl ResumePolicy {
    /// The source, unless `Never`.
    pub fn source(&self) -> Option<&Source> {
        match self {
            ResumePolicy::Required(s) | ResumePolicy::IfExists(s) => Some(s),
            ResumePolicy::Never => None,
        }
    }

    /// True for `Required`.
    pub fn is_required(&self) -> bool {
        matches!(self, ResumePolicy::Required(_))
    }
}

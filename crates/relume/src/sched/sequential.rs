//! Chains schedulers at milestones ([`SequentialLR`]).

use relume_ckpt::{Leaf, RestoreReport, StateDict, Stateful};
use serde_json::{json, Value};

use super::state::Core;
use super::LrScheduler;
use crate::error::{Error, Result};

const KIND: &str = "SequentialLR";

/// Runs `children[0]` until `milestones[0]`, then `children[1]` (restarted at its
/// epoch 0, as torch's `scheduler.step(0)`) until `milestones[1]`, and so on
/// (torch `SequentialLR`). The usual warmup-then-cosine:
///
/// ```
/// use relume::sched::{CosineAnnealingLR, LinearLR, LrScheduler, SequentialLR};
/// let base = vec![0.1];
/// let sched = SequentialLR::new(
///     vec![
///         Box::new(LinearLR::new(base.clone(), 0.1, 1.0, 5)?),
///         Box::new(CosineAnnealingLR::new(base, 25, 0.0)?),
///     ],
///     vec![5],
/// )?;
/// assert_eq!(sched.kind(), "SequentialLR");
/// # Ok::<(), relume::Error>(())
/// ```
///
/// State: its own `last_epoch`/`lrs` plus every child's state under
/// `children/<i>/`.
pub struct SequentialLR {
    core: Core,
    children: Vec<Box<dyn LrScheduler>>,
    milestones: Vec<u64>,
}

impl std::fmt::Debug for SequentialLR {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequentialLR")
            .field("core", &self.core)
            .field(
                "children",
                &self.children.iter().map(|c| c.kind()).collect::<Vec<_>>(),
            )
            .field("milestones", &self.milestones)
            .finish()
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidSchedule {
        scheduler: KIND.to_string(),
        reason,
    }
}

impl SequentialLR {
    /// Chains freshly built `children` (all built from the same optimizer's rates),
    /// switching at `milestones` (strictly increasing, >= 1, one fewer than the
    /// children). The rates right after construction are `children[0]`'s.
    ///
    /// # Errors
    /// [`crate::Error::InvalidSchedule`] for no children, a wrong number of
    /// milestones, milestones not strictly increasing from 1, a child that is a
    /// `SequentialLR` or needs a metric, a later child that cannot be restarted, a
    /// child already stepped, or children with different numbers of param groups.
    pub fn new(children: Vec<Box<dyn LrScheduler>>, milestones: Vec<u64>) -> Result<Self> {
        let Some(first) = children.first() else {
            return Err(invalid("no schedulers given; pass at least one".into()));
        };
        if milestones.len() + 1 != children.len() {
            return Err(invalid(format!(
                "{} schedulers need {} milestones but {} were given",
                children.len(),
                children.len() - 1,
                milestones.len()
            )));
        }
        let mut prev = 0;
        for &m in &milestones {
            if m <= prev {
                return Err(invalid(format!(
                    "milestones {milestones:?} must be strictly increasing and >= 1"
                )));
            }
            prev = m;
        }
        let groups = first.lrs().len();
        for (i, child) in children.iter().enumerate() {
            let kind = child.kind();
            if kind == KIND {
                return Err(invalid(format!(
                    "child {i} is a SequentialLR; nesting is not supported, flatten the milestones"
                )));
            }
            if child.needs_metric() {
                return Err(invalid(format!(
                    "child {i} ({kind}) needs a metric; it cannot be chained"
                )));
            }
            if i > 0 && !child.supports_restart() {
                return Err(invalid(format!(
                    "child {i} ({kind}) cannot be restarted at a milestone"
                )));
            }
            if child.lrs().len() != groups {
                return Err(invalid(format!(
                    "child {i} ({kind}) has {} param groups but child 0 has {groups}",
                    child.lrs().len()
                )));
            }
            let sd = child.state_dict()?;
            if let Some(Leaf::Json(v)) = sd.get("last_epoch") {
                if v.as_u64() != Some(0) {
                    return Err(invalid(format!(
                        "child {i} ({kind}) was already stepped (last_epoch {v}); pass freshly built schedulers"
                    )));
                }
            }
        }
        let lrs = first.lrs();
        let core = Core::new(KIND, lrs)?;
        Ok(SequentialLR {
            core,
            children,
            milestones,
        })
    }
}

impl LrScheduler for SequentialLR {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn lrs(&self) -> Vec<f64> {
        self.core.lrs.clone()
    }

    fn step(&mut self, metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        // bisect_right(milestones, epoch)
        let idx = self.milestones.iter().take_while(|&&m| m <= epoch).count();
        let child = &mut self.children[idx];
        let lrs = if idx > 0 && self.milestones[idx - 1] == epoch {
            child.restart()?
        } else {
            child.step(metric)?
        };
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        let children: Vec<Value> = self.children.iter().map(|c| c.config()).collect();
        json!({"kind": KIND, "milestones": self.milestones, "children": children})
    }
}

impl Stateful for SequentialLR {
    type Error = Error;

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = self.core.save(&self.config())?;
        for (i, child) in self.children.iter().enumerate() {
            sd.insert_prefixed(&format!("children/{i}"), child.state_dict()?);
        }
        Ok(sd)
    }

    /// Restores its own leaves and every child's. All or nothing: on an error every
    /// child is put back as it was. When one of its own leaves is missing nothing
    /// is applied (the children are not loaded) and the report lists the gap.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut own = StateDict::new();
        let mut report = RestoreReport::new();
        for (k, leaf) in state.iter() {
            match k.strip_prefix("children/") {
                None => own.insert(k, leaf.clone()),
                Some(rest) => {
                    let index = rest.split('/').next().and_then(|i| i.parse::<usize>().ok());
                    if !matches!(index, Some(i) if i < self.children.len()) {
                        report.unexpected(k);
                    }
                }
            }
        }
        let config = self.config();
        let Some(common) = self.core.load(&config, &[], &own, &mut report)? else {
            return Ok(report);
        };
        let backups = self
            .children
            .iter()
            .map(|c| c.state_dict())
            .collect::<Result<Vec<_>>>()?;
        let mut result = Ok(());
        for (i, child) in self.children.iter_mut().enumerate() {
            let prefix = format!("children/{i}");
            let sub = state.sub(&prefix);
            if sub.is_empty() {
                report.missing(format!("{prefix}/kind"));
                continue;
            }
            match child.load_state_dict(&sub) {
                Ok(r) => report.merge_prefixed(&prefix, r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = result {
            for (child, backup) in self.children.iter_mut().zip(&backups) {
                child.load_state_dict(backup)?;
            }
            return Err(e);
        }
        self.core.apply(common);
        Ok(report)
    }
}

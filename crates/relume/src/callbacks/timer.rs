//! [`Timer`]: stops training after `max_time` of training time, across resumes.
//!
//! The elapsed training time is saved in the callback's state and continues
//! after a resume, so `max_time` bounds the whole run, not each process. The
//! check runs at every step boundary; when the limit is reached the Timer
//! requests a stop (the trainer saves at that boundary and returns
//! `FitOutcome::Stopped`).
//!
//! **Not deterministic by nature**: its state is wall-clock time, so two runs
//! never save the same `callbacks/Timer{..}` bytes. Byte-identical resume
//! comparisons must leave the Timer out (or compare every component but this
//! one). No other callback in relume saves time unless asked to
//! (`ModelCheckpoint::train_time_interval`).

use std::time::{Duration, Instant};

use relume_ckpt::{RestoreReport, StateDict};

use super::{Callback, HookCtx};
use crate::error::Result;

/// The time-limit callback; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Timer {
    max_time: Duration,
    base: f64,
    started: Option<Instant>,
    stopped: bool,
}

impl Timer {
    /// Stops after `max_time` of training time.
    pub fn new(max_time: Duration) -> Self {
        Timer {
            max_time,
            base: 0.0,
            started: None,
            stopped: false,
        }
    }

    /// Training time so far, including before a resume.
    pub fn elapsed(&self) -> Duration {
        Duration::from_secs_f64(self.base + self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()))
    }

    /// Time left before the limit.
    pub fn remaining(&self) -> Duration {
        self.max_time.saturating_sub(self.elapsed())
    }

    fn check(&mut self, ctx: &mut HookCtx<'_>) {
        if !self.stopped && self.elapsed() >= self.max_time {
            self.stopped = true;
            ctx.stop(format!(
                "Timer: max_time {:.3}s reached ({:.3}s of training)",
                self.max_time.as_secs_f64(),
                self.elapsed().as_secs_f64()
            ));
        }
    }
}

impl Callback for Timer {
    fn state_key(&self) -> String {
        "Timer".into()
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("elapsed", self.elapsed().as_secs_f64().into());
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        r.diff_keys(["elapsed"], state);
        if r.is_clean() {
            self.base = state.require_value("elapsed")?;
            r.restored("elapsed");
        }
        Ok(r)
    }

    fn on_fit_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        self.started = Some(Instant::now());
        Ok(())
    }

    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, step_boundary: bool) -> Result<()> {
        if step_boundary {
            self.check(ctx);
        }
        Ok(())
    }

    fn on_train_epoch_end(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        self.check(ctx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_continues_after_restore() {
        let mut t = Timer::new(Duration::from_secs(10));
        let mut sd = StateDict::new();
        sd.insert_json("elapsed", 7.5.into());
        assert!(t.load_state_dict(&sd).unwrap().is_clean());
        assert!(t.elapsed() >= Duration::from_secs_f64(7.5));
        assert!(t.remaining() <= Duration::from_secs_f64(2.5));
        assert_eq!(
            t.state_dict()
                .unwrap()
                .require_value::<f64>("elapsed")
                .unwrap(),
            7.5
        );
    }
}

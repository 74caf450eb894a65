//! `TrainerBuilder::async_writer_priority` reaches the writer thread: its
//! scheduling class, read from `/proc` while training runs, is Linux's
//! `SCHED_IDLE` by default and the normal class when asked. (Its own test binary:
//! no other test's writer thread is alive in this process.)
#![cfg(target_os = "linux")]

mod cb_common;

use std::sync::{Arc, Mutex};

use cb_common::{builder, loaders, Spec, Tiny};
use relume::callbacks::{Callback, HookCtx, SavedCheckpoint};
use relume::preempt::Preemption;
use relume_ckpt::{WriterPriority, WRITER_THREAD_NAME};

/// The scheduling policy of every writer thread alive now.
fn writer_policies() -> Vec<i32> {
    let comm: String = WRITER_THREAD_NAME.chars().take(15).collect();
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            if name.trim_end() != comm {
                return None;
            }
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(38)?
                .parse()
                .ok()
        })
        .collect()
}

/// Records the writer threads' policies when the first async save is reported
/// committed: the writer has run by then (it sets its name and class when it
/// starts) and lives until `fit` returns.
struct Probe(Arc<Mutex<Option<Vec<i32>>>>);

impl Callback for Probe {
    fn state_key(&self) -> String {
        "probe".into()
    }
    fn on_save_checkpoint(
        &mut self,
        _ctx: &mut HookCtx<'_>,
        _saved: &SavedCheckpoint,
    ) -> relume::Result<()> {
        let mut seen = self.0.lock().unwrap();
        if seen.is_none() {
            *seen = Some(writer_policies());
        }
        Ok(())
    }
}

fn policies_during_fit(priority: Option<WriterPriority>) -> Vec<i32> {
    let run = tempfile::tempdir().unwrap();
    let spec = Spec {
        max_epochs: 2,
        async_ckpt: true,
        resume: false,
        ..Spec::default()
    };
    let seen = Arc::new(Mutex::new(None));
    let mut b = builder(&spec, run.path(), Arc::new(Preemption::manual()))
        .unwrap()
        .callback(Box::new(Probe(Arc::clone(&seen))));
    if let Some(p) = priority {
        b = b.async_writer_priority(p);
    }
    let (mut train, val) = loaders();
    let mut module = Tiny::new().unwrap();
    b.build()
        .unwrap()
        .fit(&mut module, &mut train, Some(&val))
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    seen.expect("an async save was reported during fit")
}

#[test]
fn async_writer_priority_reaches_the_writer_thread() {
    assert_eq!(policies_during_fit(None), vec![libc::SCHED_IDLE], "default");
    assert_eq!(
        policies_during_fit(Some(WriterPriority::Normal)),
        vec![libc::SCHED_OTHER]
    );
    assert_eq!(
        policies_during_fit(Some(WriterPriority::Background)),
        vec![libc::SCHED_IDLE]
    );
}

//! The trainer's data-parallel half (see [`crate::dist`] for the contract): which
//! micro-batches a rank computes, the exchange that folds a window's gradients and
//! metric logs in micro-batch order on every rank, and the agreements around
//! checkpoints (configuration at start, state fingerprint before a commit, rank 0's
//! commit and resume choice after).

use std::collections::BTreeMap;
use std::path::PathBuf;

use relume_ckpt::StateDict;
use serde_json::Value;

use crate::dist::{owner, Collective};
use crate::error::{Error, Result};
use crate::optim::Grads;
use crate::trainer::builder::TrainerConfig;
use crate::trainer::context::{Stage, StepCtx};
use crate::trainer::fit::FitRun;
use crate::trainer::metrics::{LogCall, Metrics};
use crate::trainer::module::TrainModule;

/// The micro-batches this rank computed in the current accumulation window.
#[derive(Default)]
pub(super) struct Window {
    entries: Vec<Entry>,
}

struct Entry {
    /// Position in the window.
    position: u64,
    /// `Grads::encode` bytes.
    grads: Vec<u8>,
    /// The `log` calls of its `training_step`.
    calls: Vec<LogCall>,
}

/// An entry of another rank's message, its gradient bytes borrowed from it.
struct Received<'a> {
    position: u64,
    grads: &'a [u8],
    calls: Vec<LogCall>,
}

impl Window {
    /// `head | count | per entry: position, grads length, grads, calls length, calls
    /// JSON` (u64 little-endian lengths), in one allocation of the exact size.
    fn encode(&self, head: u8) -> Result<Vec<u8>> {
        let calls = self
            .entries
            .iter()
            .map(|e| {
                serde_json::to_vec(&e.calls).map_err(|err| Error::InvalidSetting {
                    setting: "a logged metric".into(),
                    value: err.to_string(),
                    rule: "must serialize".into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let len = 9 + self
            .entries
            .iter()
            .zip(&calls)
            .map(|(e, c)| 24 + e.grads.len() + c.len())
            .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.push(head);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (e, calls) in self.entries.iter().zip(&calls) {
            out.extend_from_slice(&e.position.to_le_bytes());
            out.extend_from_slice(&(e.grads.len() as u64).to_le_bytes());
            out.extend_from_slice(&e.grads);
            out.extend_from_slice(&(calls.len() as u64).to_le_bytes());
            out.extend_from_slice(calls);
        }
        Ok(out)
    }

    /// The inverse of [`Window::encode`] after the head byte; `None` for malformed
    /// bytes.
    fn decode<'a>(bytes: &'a [u8]) -> Option<Vec<Received<'a>>> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Option<&'a [u8]> {
            let end = pos.checked_add(n).filter(|e| *e <= bytes.len())?;
            let s = &bytes[pos..end];
            pos = end;
            Some(s)
        };
        let u64_next = |take: &mut dyn FnMut(usize) -> Option<&'a [u8]>| -> Option<u64> {
            Some(u64::from_le_bytes(take(8)?.try_into().ok()?))
        };
        let n = u64_next(&mut take)?;
        let mut out = Vec::new();
        for _ in 0..n {
            let position = u64_next(&mut take)?;
            let glen = usize::try_from(u64_next(&mut take)?).ok()?;
            let grads = take(glen)?;
            let clen = usize::try_from(u64_next(&mut take)?).ok()?;
            let calls = serde_json::from_slice(take(clen)?).ok()?;
            out.push(Received {
                position,
                grads,
                calls,
            });
        }
        Some(out)
    }
}

/// Refuses settings a data-parallel run cannot honour.
///
/// # Errors
/// [`Error::InvalidSetting`] for an `accumulate_grad_batches` that is not a
/// multiple of the world size, or async checkpointing.
pub(super) fn check_settings(cfg: &TrainerConfig, c: &dyn Collective) -> Result<()> {
    let w = c.world_size() as u64;
    if w == 0 || c.rank() as u64 >= w {
        return Err(Error::InvalidSetting {
            setting: "collective".into(),
            value: format!("rank {} of world size {w}", c.rank()),
            rule: "the rank must be below a world size of at least 1".into(),
        });
    }
    if cfg.accumulate_grad_batches % w != 0 {
        return Err(Error::InvalidSetting {
            setting: "accumulate_grad_batches".into(),
            value: cfg.accumulate_grad_batches.to_string(),
            rule: format!(
                "must be a multiple of the world size {w}: each rank computes accumulate_grad_batches / world_size micro-batches of every step (the global batch is batch_size × accumulate_grad_batches)"
            ),
        });
    }
    if cfg.async_checkpointing {
        return Err(Error::InvalidSetting {
            setting: "async_checkpointing".into(),
            value: "true".into(),
            rule: "data-parallel runs save synchronously (the ranks agree on the state before rank 0 commits it)".into(),
        });
    }
    Ok(())
}

/// Every rank must run the same configuration: its `config` block is compared
/// with rank 0's, and the first differing setting is named.
///
/// # Errors
/// [`Error::RankDisagrees`], [`Error::RankTimeout`].
pub(super) fn agree_on_config(c: &dyn Collective, config: &Value) -> Result<()> {
    // The program too: the same relume version and the same executable bytes.
    static PROGRAM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let program = PROGRAM.get_or_init(|| match std::env::current_exe().map(std::fs::read) {
        Ok(Ok(bytes)) => format!("crc32c {:08x}", crc32c::crc32c(&bytes)),
        _ => "unreadable".to_string(),
    });
    let mut with_program = config.clone();
    with_program["program"] = serde_json::json!({
        "relume": env!("CARGO_PKG_VERSION"),
        "executable": program,
    });
    let mut text = String::new();
    relume_ckpt::canonical_json(&with_program, &mut text);
    let mine = text.into_bytes();
    let all = c.all_gather_bytes("the configuration check at start", &mine)?;
    let parse = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap_or(Value::Null);
    let root = parse(&all[0]);
    for (r, bytes) in all.iter().enumerate().skip(1) {
        if bytes != &all[0] {
            let theirs = parse(bytes);
            let detail = match super::config::first_difference(&root, &theirs) {
                Some((key, s, l)) => format!("{key} is {l} there and {s} on rank 0"),
                None => "the configuration differs from rank 0's".into(),
            };
            return Err(Error::RankDisagrees {
                rank: r,
                what: "the run's configuration".into(),
                detail,
            });
        }
    }
    Ok(())
}

fn decode_outcome(b: &[u8]) -> std::result::Result<String, String> {
    let s = String::from_utf8_lossy(b);
    match s.split_once('\n') {
        Some(("ok", t)) => Ok(t.to_string()),
        Some((_, m)) => Err(m.to_string()),
        None => Err(format!("malformed message {s:?}")),
    }
}

/// Every rank's outcome of the same operation; the local error wins, then the
/// first other rank's failure is named.
///
/// # Errors
/// The local error, [`Error::RankDisagrees`] naming a failed rank,
/// [`Error::RankTimeout`].
pub(super) fn agree_on<T>(c: &dyn Collective, what: &str, mine: Result<T>) -> Result<T> {
    let bytes = match &mine {
        Ok(_) => b"ok\n".to_vec(),
        Err(e) => format!("err\n{e}").into_bytes(),
    };
    let all = c.all_gather_bytes(what, &bytes)?;
    let v = mine?;
    for (r, b) in all.iter().enumerate() {
        if let Err(m) = decode_outcome(b) {
            return Err(Error::RankDisagrees {
                rank: r,
                what: what.to_string(),
                detail: format!("it failed: {m}"),
            });
        }
    }
    Ok(v)
}

/// Rank 0's resume choice on every rank.
///
/// # Errors
/// Rank 0's resolve error (on rank 0 itself, or named on the others),
/// [`Error::RankTimeout`].
pub(super) fn broadcast_choice(
    c: &dyn Collective,
    resolved: Result<Option<PathBuf>>,
) -> Result<Option<PathBuf>> {
    let mut data = match &resolved {
        Ok(Some(p)) => format!("ok\n{}", p.display()),
        Ok(None) => "ok\n".to_string(),
        Err(e) => format!("err\n{e}"),
    }
    .into_bytes();
    c.broadcast_bytes("the resume choice of rank 0", 0, &mut data)?;
    if c.rank() == 0 {
        return resolved;
    }
    match decode_outcome(&data) {
        Ok(t) if t.is_empty() => Ok(None),
        Ok(t) => Ok(Some(PathBuf::from(t))),
        Err(m) => Err(Error::RankDisagrees {
            rank: 0,
            what: "the resume choice".into(),
            detail: format!("rank 0 failed to resolve it: {m}"),
        }),
    }
}

/// Rank 0's commit of checkpoint `name` on every rank (the path it committed).
///
/// # Errors
/// Rank 0's save error (on rank 0 itself, or named on the others),
/// [`Error::RankTimeout`].
pub(super) fn broadcast_commit(
    c: &dyn Collective,
    name: &str,
    saved: Result<PathBuf>,
) -> Result<PathBuf> {
    let mut data = match &saved {
        Ok(p) => format!("ok\n{}", p.display()).into_bytes(),
        Err(e) => format!("err\n{e}").into_bytes(),
    };
    c.broadcast_bytes(&format!("the commit of {name}"), 0, &mut data)?;
    if c.rank() == 0 {
        return saved;
    }
    decode_outcome(&data)
        .map(PathBuf::from)
        .map_err(|m| Error::RankDisagrees {
            rank: 0,
            what: format!("the commit of {name}"),
            detail: format!("rank 0 failed to commit it: {m}"),
        })
}

/// Before rank 0 commits, every rank's state must hash to the same fingerprint
/// (the loggers, which only rank 0 drives, aside).
///
/// # Errors
/// [`Error::RankDisagrees`] naming the diverged rank, [`Error::RankTimeout`].
pub(super) fn agree_on_state(
    c: &dyn Collective,
    components: &BTreeMap<String, StateDict>,
    step: u64,
) -> Result<()> {
    let shared: BTreeMap<String, StateDict> = components
        .iter()
        .filter(|(k, _)| k.as_str() != "loggers")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let fp = relume_ckpt::fingerprint(&shared);
    let what = format!("the state to commit at step {step}");
    let all = c.all_gather_bytes(&what, fp.as_bytes())?;
    for (r, b) in all.iter().enumerate() {
        if b != &all[0] {
            return Err(Error::RankDisagrees {
                rank: r,
                what,
                detail: format!(
                    "its state fingerprint is {} and rank 0's is {}: the replicas diverged, nothing is committed",
                    String::from_utf8_lossy(b),
                    String::from_utf8_lossy(&all[0])
                ),
            });
        }
    }
    Ok(())
}

impl<M> FitRun<'_, M>
where
    M: TrainModule,
    M::Batch: Send + 'static,
{
    fn collective(&self) -> Result<&dyn Collective> {
        self.cfg
            .collective
            .as_deref()
            .ok_or_else(|| Error::InvalidSetting {
                setting: "collective".into(),
                value: "none".into(),
                rule: "a data-parallel step needs TrainerBuilder::collective".into(),
            })
    }

    /// Computes the micro-batch at the current window position if this rank owns
    /// it: its random streams derive from its global index, its logs are recorded.
    pub(super) fn dp_micro_batch(
        &mut self,
        batch: M::Batch,
        accum: u64,
        window: &mut Window,
    ) -> Result<()> {
        let c = self.collective()?;
        let (rank, world) = (c.rank(), c.world_size());
        let position = self.state.accumulation_position;
        if owner(position, accum, world) != rank {
            return Ok(());
        }
        let index = (self.state.epoch << 32) | self.state.batch_in_epoch;
        self.rng.set_batch(Some(index));
        let mut record = Metrics::recorder();
        let loss = {
            let mut ctx = StepCtx::new(
                Stage::Train,
                &mut self.rng,
                &mut record,
                self.state.global_step,
                self.state.epoch,
                self.state.batch_in_epoch,
            );
            self.module.training_step(batch, &mut ctx)
        };
        self.rng.set_batch(None);
        let loss = loss?;
        let loss = if accum > 1 {
            (loss / accum as f64)?
        } else {
            loss
        };
        let g = Grads::from_backward(&loss.backward()?, self.module.params());
        window.entries.push(Entry {
            position,
            grads: g.encode()?,
            calls: record.into_calls(),
        });
        Ok(())
    }

    /// Gathers every rank's micro-batches of the window and folds them in window
    /// order: gradients summed as one process accumulating them would, logs
    /// replayed into the metrics.
    pub(super) fn dp_fold_window(&mut self, window: Window) -> Result<Option<Grads>> {
        let c = self.collective()?;
        let mine = window.encode(u8::from(
            self.interrupt
                .iter()
                .any(crate::trainer::builder::Interrupt::is_set),
        ))?;
        drop(window);
        let what = format!("the gradients of step {}", self.state.global_step + 1);
        let all = c.all_gather_bytes(&what, &mine)?;
        drop(mine);
        let mut entries: Vec<Received<'_>> = Vec::new();
        let mut interrupted = false;
        for (r, bytes) in all.iter().enumerate() {
            interrupted |= bytes.first() == Some(&1);
            let body = bytes.get(1..).unwrap_or_default();
            let mut theirs = Window::decode(body).ok_or_else(|| Error::RankDisagrees {
                rank: r,
                what: what.clone(),
                detail: "its message does not parse: another relume version?".into(),
            })?;
            entries.append(&mut theirs);
        }
        self.dp_interrupt = Some(interrupted);
        entries.sort_by_key(|e| e.position);
        let device = self.module.params().device().clone();
        let mut acc: Option<Grads> = None;
        for e in entries {
            let g = Grads::decode(e.grads, &device)?;
            match &mut acc {
                Some(a) => a.accumulate(g)?,
                None => acc = Some(g),
            }
            self.state.metrics.replay(&e.calls);
        }
        Ok(acc)
    }
}

//! Typed summaries of a Lightning checkpoint's parts: optimizers, schedulers, callbacks
//! and loop progress, each inferred from the layout Lightning and torch write.

use super::value::{PyValue, TorchTensor};

/// The optimizer type, inferred from its per-parameter state and group settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// `exp_avg`/`exp_avg_sq` state with `decoupled_weight_decay: False`.
    Adam,
    /// `exp_avg`/`exp_avg_sq` state with `decoupled_weight_decay: True`.
    AdamW,
    /// `exp_avg`/`exp_avg_sq` state without the setting that tells the two apart.
    AdamOrAdamW,
    /// `momentum_buffer` state, or `momentum`/`nesterov`/`dampening` settings.
    Sgd,
    /// `square_avg` state.
    RmsProp,
    /// `sum` state.
    Adagrad,
    /// Anything else.
    Unknown,
}

impl OptimizerKind {
    /// A display name (`"Adam"`, `"SGD"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "Adam",
            OptimizerKind::AdamW => "AdamW",
            OptimizerKind::AdamOrAdamW => "Adam/AdamW",
            OptimizerKind::Sgd => "SGD",
            OptimizerKind::RmsProp => "RMSprop",
            OptimizerKind::Adagrad => "Adagrad",
            OptimizerKind::Unknown => "unknown",
        }
    }
}

/// One optimizer of `optimizer_states`.
#[derive(Debug, Clone)]
pub struct OptimizerSummary<'a> {
    /// Inferred type.
    pub kind: OptimizerKind,
    /// Each param group: its settings (without `params`) and parameter indices.
    pub param_groups: Vec<ParamGroupSummary<'a>>,
    /// Per-parameter state, by parameter index then state name, in file order.
    pub state: Vec<(String, Vec<(String, &'a PyValue)>)>,
}

/// One param group.
#[derive(Debug, Clone)]
pub struct ParamGroupSummary<'a> {
    /// Indices of the parameters in the group (`params`).
    pub params: Vec<i64>,
    /// Every other setting (`lr`, `betas`, `momentum`, ...), in file order.
    pub settings: Vec<(String, &'a PyValue)>,
}

impl<'a> OptimizerSummary<'a> {
    /// Summarises one entry of `optimizer_states`; `None` if it is not a dict.
    pub fn from_value(v: &'a PyValue) -> Option<Self> {
        let mut state = Vec::new();
        if let Some(items) = v.get("state").and_then(PyValue::dict_items) {
            for (k, s) in items {
                let entries = s
                    .dict_items()
                    .map(|e| e.iter().map(|(n, x)| (n.key_label(), x)).collect())
                    .unwrap_or_default();
                state.push((k.key_label(), entries));
            }
        }
        let mut param_groups = Vec::new();
        if let Some(groups) = v.get("param_groups").and_then(PyValue::as_seq) {
            for g in groups {
                let items = g.dict_items()?;
                let params = g
                    .get("params")
                    .and_then(PyValue::as_seq)
                    .map(|p| p.iter().filter_map(PyValue::as_i64).collect())
                    .unwrap_or_default();
                let settings = items
                    .iter()
                    .filter(|(k, _)| !k.key_matches("params"))
                    .map(|(k, x)| (k.key_label(), x))
                    .collect();
                param_groups.push(ParamGroupSummary { params, settings });
            }
        }
        v.dict_items()?;
        let has = |name: &str| {
            state
                .iter()
                .any(|(_, e): &(String, Vec<(String, &PyValue)>)| e.iter().any(|(n, _)| n == name))
        };
        let setting = |name: &str| {
            v.get_path(&["param_groups"])
                .and_then(|g| g.as_seq()?.first()?.get(name))
        };
        let kind = if has("exp_avg") || has("exp_avg_sq") {
            match setting("decoupled_weight_decay").and_then(PyValue::as_bool) {
                Some(true) => OptimizerKind::AdamW,
                Some(false) => OptimizerKind::Adam,
                None => OptimizerKind::AdamOrAdamW,
            }
        } else if has("momentum_buffer")
            || (setting("nesterov").is_some() && setting("dampening").is_some())
        {
            OptimizerKind::Sgd
        } else if has("square_avg") {
            OptimizerKind::RmsProp
        } else if has("sum") {
            OptimizerKind::Adagrad
        } else {
            OptimizerKind::Unknown
        };
        Some(OptimizerSummary {
            kind,
            param_groups,
            state,
        })
    }

    /// Every state tensor as `("<param index>/<name>", tensor)`.
    pub fn state_tensors(&self) -> Vec<(String, &'a TorchTensor)> {
        self.state
            .iter()
            .flat_map(|(p, e)| {
                e.iter()
                    .filter_map(move |(n, v)| v.as_tensor().map(|t| (format!("{p}/{n}"), t)))
            })
            .collect()
    }
}

/// One entry of `lr_schedulers`.
#[derive(Debug, Clone)]
pub struct SchedulerSummary<'a> {
    /// Inferred torch class name (`"StepLR"`, `"CosineAnnealingLR"`, ...), or `"unknown"`.
    pub kind: &'static str,
    /// `last_epoch`: how many times `step()` ran since construction.
    pub last_epoch: Option<i64>,
    /// `_last_lr`: the learning rates after the last step.
    pub last_lr: Vec<f64>,
    /// Settings that do not start with `_`, in file order.
    pub settings: Vec<(String, &'a PyValue)>,
}

impl<'a> SchedulerSummary<'a> {
    /// Summarises one scheduler state dict; `None` if it is not a dict.
    pub fn from_value(v: &'a PyValue) -> Option<Self> {
        let items = v.dict_items()?;
        let has = |k: &str| v.get(k).is_some();
        let kind = if has("T_0") {
            "CosineAnnealingWarmRestarts"
        } else if has("T_max") {
            "CosineAnnealingLR"
        } else if has("milestones") {
            "MultiStepLR"
        } else if has("step_size") {
            "StepLR"
        } else if has("total_steps") || has("max_lrs") {
            "OneCycleLR"
        } else if has("patience") && has("mode") {
            "ReduceLROnPlateau"
        } else if has("lr_lambdas") {
            "LambdaLR"
        } else if has("start_factor") && has("end_factor") {
            "LinearLR"
        } else if has("gamma") {
            "ExponentialLR"
        } else {
            "unknown"
        };
        Some(SchedulerSummary {
            kind,
            last_epoch: v.get("last_epoch").and_then(PyValue::as_i64),
            last_lr: v
                .get("_last_lr")
                .and_then(PyValue::as_seq)
                .map(|l| l.iter().filter_map(PyValue::as_f64).collect())
                .unwrap_or_default(),
            settings: items
                .iter()
                .filter(|(k, _)| !k.key_label().starts_with('_'))
                .map(|(k, x)| (k.key_label(), x))
                .collect(),
        })
    }
}

/// One entry of `callbacks`, keyed by Lightning's state key.
#[derive(Debug, Clone)]
pub struct CallbackSummary<'a> {
    /// The state key, e.g. `"ModelCheckpoint{'monitor': 'val_loss', ...}"`.
    pub key: String,
    /// The class name: the key up to its first `{`.
    pub name: String,
    /// The values a person looks for first (best path/score, wait count, ...).
    pub highlights: Vec<(String, &'a PyValue)>,
    /// The whole state.
    pub state: &'a PyValue,
}

impl<'a> CallbackSummary<'a> {
    /// Summarises callback `key` with state `state`.
    pub fn new(key: String, state: &'a PyValue) -> Self {
        let name = key.split('{').next().unwrap_or_default().to_string();
        let wanted: &[&str] = match name.as_str() {
            "ModelCheckpoint" => &[
                "monitor",
                "best_model_path",
                "best_model_score",
                "last_model_path",
                "kth_best_model_path",
            ],
            "EarlyStopping" => &["wait_count", "patience", "best_score", "stopped_epoch"],
            _ => &[],
        };
        let highlights = match wanted {
            [] => state
                .dict_items()
                .unwrap_or_default()
                .iter()
                .filter(|(_, v)| {
                    matches!(
                        v,
                        PyValue::Int(_) | PyValue::Float(_) | PyValue::Str(_) | PyValue::Bool(_)
                    )
                })
                .map(|(k, v)| (k.key_label(), v))
                .collect(),
            keys => keys
                .iter()
                .filter_map(|k| state.get(k).map(|v| (k.to_string(), v)))
                .collect(),
        };
        CallbackSummary {
            key,
            name,
            highlights,
            state,
        }
    }
}

/// Where the fit loop stood when the checkpoint was written (`loops.fit_loop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoopProgress {
    /// Epochs completed (`epoch_progress.current.completed`).
    pub epochs_completed: i64,
    /// Epochs started (`epoch_progress.current.started`).
    pub epochs_started: i64,
    /// Batches processed in the current epoch (`epoch_loop.batch_progress.current.processed`).
    pub batches_in_epoch: i64,
    /// Batches processed over the run (`epoch_loop.batch_progress.total.processed`).
    pub batches_total: i64,
    /// Whether the last processed batch was the last of its epoch.
    pub is_last_batch: bool,
    /// Optimizer steps over the run (`optim_progress.optimizer.step.total.completed`).
    pub optimizer_steps: i64,
    /// Whether a dataloader state was saved (`fit_loop.state_dict.combined_loader`).
    pub loader_state_saved: bool,
}

impl LoopProgress {
    /// Reads the progress from `loops`; `None` without `fit_loop`.
    pub fn from_loops(loops: &PyValue) -> Option<Self> {
        let fit = loops.get("fit_loop")?;
        let int = |path: &[&str]| fit.get_path(path).and_then(PyValue::as_i64).unwrap_or(0);
        let batch = "epoch_loop.batch_progress";
        Some(LoopProgress {
            epochs_completed: int(&["epoch_progress", "current", "completed"]),
            epochs_started: int(&["epoch_progress", "current", "started"]),
            batches_in_epoch: int(&[batch, "current", "processed"]),
            batches_total: int(&[batch, "total", "processed"]),
            is_last_batch: fit
                .get_path(&[batch, "is_last_batch"])
                .and_then(PyValue::as_bool)
                .unwrap_or(false),
            optimizer_steps: int(&[
                "epoch_loop.automatic_optimization.optim_progress",
                "optimizer",
                "step",
                "total",
                "completed",
            ]),
            loader_state_saved: fit.get_path(&["state_dict", "combined_loader"]).is_some(),
        })
    }

    /// A checkpoint written inside an epoch: some batches processed, not the last one.
    pub fn is_mid_epoch(&self) -> bool {
        self.batches_in_epoch > 0 && !self.is_last_batch
    }
}

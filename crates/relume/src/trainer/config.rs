//! The run's `config` block and its diff on resume: every setting that changes the
//! result is recorded in the checkpoint's `config` block and compared with the live
//! one ([`diff_config`]); which changes a continuation may make ([`GROWABLE_KEYS`]
//! grow; scheduler settings follow with
//! [`TrainerBuilder::extend_schedules`](super::TrainerBuilder::extend_schedules)).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::data::DataLoader;
use crate::optim::Optimizer;
use crate::trainer::builder::TrainerConfig;
use crate::trainer::module::SchedulerConfig;

/// The checkpoint's `config` block: every setting that changes the result.
pub(crate) fn config_json<B: Send + 'static>(
    cfg: &TrainerConfig,
    train: &DataLoader<B>,
    val: Option<&DataLoader<B>>,
    optimizers: &[Box<dyn Optimizer>],
    schedulers: &[Option<SchedulerConfig>],
) -> Value {
    let loader = |l: &DataLoader<B>| {
        let c = l.config();
        json!({
            "batch_size": c.batch_size,
            "shuffle": c.shuffle,
            "drop_last": c.drop_last,
            "seed": c.seed,
            "dataset_len": l.dataset_len(),
        })
    };
    json!({
        "world_size": 1,
        "seed": cfg.seed,
        "max_epochs": cfg.max_epochs,
        "max_steps": cfg.max_steps,
        "accumulate_grad_batches": cfg.accumulate_grad_batches,
        "gradient_clip": cfg.gradient_clip.map(|(v, a)| json!({"value": v, "algorithm": a})),
        "val_check_interval": cfg.val_check_interval,
        "check_val_every_n_epoch": cfg.check_val_every_n_epoch,
        "limit_train_batches": cfg.limit_train_batches,
        "limit_val_batches": cfg.limit_val_batches,
        "train_loader": loader(train),
        "val_loader": val.map(loader),
        "optimizers": optimizers.iter().map(|o| o.config()).collect::<Vec<_>>(),
        "schedulers": schedulers
            .iter()
            .map(|s| s.as_ref().map_or(Value::Null, SchedulerConfig::config))
            .collect::<Vec<_>>(),
    })
}

/// The first setting (dotted key, `a`'s value, `b`'s value) where `a` and `b`
/// differ at all: no growth or override is excused (ranks of one run must agree).
pub(crate) fn first_difference(a: &Value, b: &Value) -> Option<(String, String, String)> {
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", a, &mut fa);
    flatten("", b, &mut fb);
    let keys: std::collections::BTreeSet<String> = fa.keys().chain(fb.keys()).cloned().collect();
    keys.into_iter().find_map(|k| {
        let (x, y) = (
            fa.get(&k).unwrap_or(&Value::Null).to_string(),
            fb.get(&k).unwrap_or(&Value::Null).to_string(),
        );
        (x != y).then_some((k, x, y))
    })
}

/// Flattens a JSON value into `dotted.key -> value` (arrays index as `key.0`).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        Value::Array(a) => {
            out.insert(format!("{prefix}.len"), Value::from(a.len()));
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), x, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// A scheduler's own settings leaf in the restore report (`scheduler.0/config`,
/// `scheduler.0/children/1/config`).
pub(crate) fn is_scheduler_config(key: &str) -> bool {
    key.starts_with("scheduler.") && key.ends_with("/config")
}

/// Whether the live config raises `max_epochs` or `max_steps` over the saved one
/// (a continuation: training longer).
pub(crate) fn run_grows(saved: &Value, live: &Value) -> bool {
    GROWABLE_KEYS.iter().any(|k| {
        match (
            saved.get(*k).map(Value::as_u64),
            live.get(*k).map(Value::as_u64),
        ) {
            (Some(Some(s)), Some(Some(l))) => l > s,
            (Some(Some(_)), Some(None)) => live.get(*k).is_some_and(Value::is_null),
            _ => false,
        }
    })
}

/// Config keys whose growth is allowed on resume (continuing a run).
pub const GROWABLE_KEYS: [&str; 2] = ["max_epochs", "max_steps"];

/// Differences between the saved and live config blocks that are not allowed:
/// `(key, saved, live)` as compact JSON, in key order. A key under an entry of
/// `overrides` (exact or as a dotted prefix) may change; `max_epochs` and
/// `max_steps` may grow (`null` = unbounded).
pub fn diff_config(
    saved: &Value,
    live: &Value,
    overrides: &[String],
) -> Vec<(String, String, String)> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", saved, &mut a);
    flatten("", live, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let (s, l) = (
            a.get(k).unwrap_or(&Value::Null),
            b.get(k).unwrap_or(&Value::Null),
        );
        if s == l {
            continue;
        }
        if k == "world_size" {
            // The global batch (batch_size × accumulate_grad_batches) is compared
            // on its own; the world size only says how it was split (`crate::dist`).
            tracing::info!("world size changed from {s} to {l}; the global batch is unchanged");
            continue;
        }
        if overrides
            .iter()
            .any(|o| k == o || k.starts_with(&format!("{o}.")))
        {
            tracing::info!("config {k} changed from {s} to {l} (overridden)");
            continue;
        }
        if GROWABLE_KEYS.contains(&k.as_str()) {
            let grows = match (s.as_u64(), l.as_u64()) {
                (Some(x), Some(y)) => y >= x,
                (_, None) => l.is_null(),
                (None, Some(_)) => false,
            };
            if grows {
                tracing::info!("config {k} raised from {s} to {l}; continuing the run");
                continue;
            }
        }
        out.push((k.clone(), s.to_string(), l.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_diff_names_key_and_allows_growth() {
        let saved = json!({"max_epochs": 3, "max_steps": null, "seed": 1,
            "train_loader": {"batch_size": 8}, "optimizers": [{"lr": 0.1}]});
        let mut live = saved.clone();
        live["max_epochs"] = json!(5);
        assert!(diff_config(&saved, &live, &[]).is_empty());
        live["max_epochs"] = json!(2);
        assert_eq!(diff_config(&saved, &live, &[])[0].0, "max_epochs");
        live["max_epochs"] = json!(3);
        live["train_loader"]["batch_size"] = json!(16);
        let d = diff_config(&saved, &live, &[]);
        assert_eq!(
            d,
            vec![(
                "train_loader.batch_size".to_string(),
                "8".to_string(),
                "16".to_string()
            )]
        );
        assert!(diff_config(&saved, &live, &["train_loader".to_string()]).is_empty());
        live["train_loader"]["batch_size"] = json!(8);
        live["optimizers"] = json!([{"lr": 0.1}, {"lr": 0.2}]);
        assert_eq!(diff_config(&saved, &live, &[])[0].0, "optimizers.1.lr");
    }
}

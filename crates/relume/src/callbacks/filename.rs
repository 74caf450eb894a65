//! Checkpoint name templates: `step={step}-val_loss={val_loss:.4f}`.
//!
//! A `{field}` is replaced by its value; `{field:.Nf}` formats a number with `N`
//! decimals and `{field:0N}` pads an integer with zeros to `N` digits. The fields
//! are `step` (global step), `epoch` (0-based) and every logged metric. Text
//! outside braces is kept as written (so the template decides whether names
//! read `step=12` or just `12`). A `/` in a metric's value or the template is
//! replaced by `_`, so the result is always a plain directory name.

use std::collections::BTreeMap;

use crate::callbacks::Progress;
use crate::error::{Error, Result};

/// Formats `template` with the loop position and `metrics`.
///
/// # Errors
/// [`Error::MetricNotLogged`] naming a field that is neither `step`, `epoch`
/// nor a logged metric; [`Error::InvalidSetting`] for an unclosed brace or an
/// unknown format spec.
pub fn format_name(
    template: &str,
    progress: Progress,
    metrics: &BTreeMap<String, f64>,
) -> Result<String> {
    let bad = |rule: &str| Error::InvalidSetting {
        setting: "ModelCheckpoint filename".into(),
        value: template.to_string(),
        rule: rule.to_string(),
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| bad("has an unclosed '{'"))?;
        let field = &after[..close];
        rest = &after[close + 1..];
        let (name, spec) = field.split_once(':').unwrap_or((field, ""));
        let value = match name {
            "step" => progress.global_step as f64,
            "epoch" => progress.epoch as f64,
            m => *metrics.get(m).ok_or_else(|| Error::MetricNotLogged {
                metric: m.to_string(),
                needed_by: format!("ModelCheckpoint filename {template:?}"),
            })?,
        };
        let integer = matches!(name, "step" | "epoch");
        let text = if let Some(p) = spec.strip_prefix('.').and_then(|s| s.strip_suffix('f')) {
            let p: usize = p
                .parse()
                .map_err(|_| bad("uses a bad precision (write {x:.4f})"))?;
            format!("{value:.p$}")
        } else if let Some(w) = spec.strip_prefix('0') {
            let w: usize = w
                .parse()
                .map_err(|_| bad("uses a bad width (write {step:06})"))?;
            format!("{:0w$}", value as i64)
        } else if spec.is_empty() {
            if integer {
                format!("{}", value as u64)
            } else {
                format!("{value}")
            }
        } else {
            return Err(bad("uses an unknown format spec (use :.Nf or :0N)"));
        };
        out.push_str(&text);
    }
    out.push_str(rest);
    Ok(out.replace(['/', '\\'], "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Progress {
        Progress {
            global_step: 12,
            epoch: 2,
            batch_in_epoch: 0,
        }
    }

    #[test]
    fn formats_fields_and_specs() {
        let mut m = BTreeMap::new();
        m.insert("val_loss".to_string(), 0.123456);
        m.insert("acc/top1".to_string(), 0.5);
        let s = format_name("step={step}-val_loss={val_loss:.4f}", p(), &m).unwrap();
        assert_eq!(s, "step=12-val_loss=0.1235");
        assert_eq!(
            format_name("{epoch}-{step:06}", p(), &m).unwrap(),
            "2-000012"
        );
        assert_eq!(format_name("a/{acc/top1}", p(), &m).unwrap(), "a_0.5");
    }

    #[test]
    fn errors_name_the_problem() {
        let m = BTreeMap::new();
        let e = format_name("{val_loss:.2f}", p(), &m).unwrap_err();
        assert!(matches!(&e, Error::MetricNotLogged { metric, .. } if metric == "val_loss"));
        let e = format_name("{step", p(), &m).unwrap_err();
        assert!(matches!(e, Error::InvalidSetting { .. }));
        let e = format_name("{step:x}", p(), &m).unwrap_err();
        assert!(matches!(e, Error::InvalidSetting { .. }));
    }
}

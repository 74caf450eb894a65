//! Logger contract: TensorBoard itself reads our event files, and a resume after
//! a crash leaves one continuous series (CSV and TensorBoard) with every step
//! exactly once.
//!
//! The TensorBoard checks run `python3` with the `tensorboard` package
//! (`.ci/requirements.txt`). When it is missing they are skipped with a note,
//! unless the `CI` environment variable is set, where they fail.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use relume::loggers::{CsvLogger, Logger, TensorBoardLogger};
use relume_ckpt::Stateful;

fn metrics(step: u64) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert("train_loss".to_string(), 1.0 / step as f64);
    if step % 2 == 0 {
        m.insert("val_loss".to_string(), 2.0 / step as f64);
    }
    m
}

/// Reads `dir` with TensorBoard's `EventAccumulator`; returns, per tag, the
/// `(step, value)` pairs in order. `None` when the package is unavailable
/// outside CI.
fn read_with_tensorboard(dir: &Path) -> Option<BTreeMap<String, Vec<(u64, f64)>>> {
    const SCRIPT: &str = r#"
import json, sys
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError as e:
    print("MISSING " + str(e))
    sys.exit(3)
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
out = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
print(json.dumps(out))
"#;
    let output = match Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir)
        .output()
    {
        Ok(o) => o,
        Err(e) => return skip_or_fail(&format!("cannot run python3: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.code() == Some(3) {
        return skip_or_fail(&format!("python module missing: {}", stdout.trim()));
    }
    assert!(
        output.status.success(),
        "tensorboard reader failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: BTreeMap<String, Vec<(u64, f64)>> =
        serde_json::from_str(stdout.trim()).expect("reader output is JSON");
    Some(parsed)
}

fn skip_or_fail<T>(why: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI must install .ci/requirements.txt");
    }
    eprintln!(
        "note: skipping the TensorBoard reader check: {why} (pip install -r .ci/requirements.txt)"
    );
    None
}

fn tb_log(log: &mut TensorBoardLogger, steps: std::ops::RangeInclusive<u64>) {
    for s in steps {
        log.log_metrics(s, &metrics(s)).unwrap();
    }
}

fn csv_log(log: &mut CsvLogger, steps: std::ops::RangeInclusive<u64>) {
    for s in steps {
        log.log_metrics(s, &metrics(s)).unwrap();
    }
}

fn expected(steps: std::ops::RangeInclusive<u64>) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for s in steps {
        for (k, v) in metrics(s) {
            out.entry(k).or_default().push((s, f64::from(v as f32)));
        }
    }
    out
}

fn event_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("events.out.tfevents."))
        .collect();
    names.sort();
    names
}

#[test]
fn tensorboard_reads_tags_steps_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = TensorBoardLogger::new(dir.path().join("logs"));
    tb_log(&mut log, 1..=5);
    log.flush().unwrap();
    let name = log.path().unwrap();
    let name = name.file_name().unwrap().to_string_lossy();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let Some(read) = read_with_tensorboard(&dir.path().join("logs")) else {
        return;
    };
    assert_eq!(read, expected(1..=5));
}

#[test]
fn tensorboard_resume_after_crash_is_one_continuous_series() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let mut log = TensorBoardLogger::new(&logs);
    tb_log(&mut log, 1..=6);
    log.flush().unwrap();
    let saved = log.state_dict().unwrap();
    tb_log(&mut log, 7..=10);
    log.flush().unwrap();
    drop(log); // the crash: steps 7..10 are on disk but after the checkpoint

    let mut log = TensorBoardLogger::new(&logs);
    assert!(log.load_state_dict(&saved).unwrap().is_clean());
    tb_log(&mut log, 7..=12);
    log.flush().unwrap();
    assert_eq!(event_files(&logs).len(), 1, "{:?}", event_files(&logs));

    let Some(read) = read_with_tensorboard(&logs) else {
        return;
    };
    assert_eq!(read, expected(1..=12));
}

#[test]
fn tensorboard_resume_twice_and_fresh_restart_leave_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    // An attempt that never checkpointed.
    let mut stale = TensorBoardLogger::new(&logs);
    tb_log(&mut stale, 1..=3);
    stale.flush().unwrap();
    drop(stale);
    std::fs::rename(
        event_files(&logs)
            .into_iter()
            .next()
            .map(|n| logs.join(n))
            .unwrap(),
        logs.join("events.out.tfevents.1.stale"),
    )
    .unwrap();
    // A fresh start, then two crash-and-resume cycles.
    let mut log = TensorBoardLogger::new(&logs);
    tb_log(&mut log, 1..=4);
    log.flush().unwrap();
    let s4 = log.state_dict().unwrap();
    tb_log(&mut log, 5..=6);
    drop(log);
    let mut log = TensorBoardLogger::new(&logs);
    log.load_state_dict(&s4).unwrap();
    tb_log(&mut log, 5..=8);
    log.flush().unwrap();
    let s8 = log.state_dict().unwrap();
    tb_log(&mut log, 9..=9);
    drop(log);
    let mut log = TensorBoardLogger::new(&logs);
    log.load_state_dict(&s8).unwrap();
    tb_log(&mut log, 9..=10);
    log.flush().unwrap();
    assert_eq!(event_files(&logs).len(), 1, "{:?}", event_files(&logs));
    let Some(read) = read_with_tensorboard(&logs) else {
        return;
    };
    assert_eq!(read, expected(1..=10));
}

#[test]
fn csv_resume_after_crash_has_no_duplicated_or_missing_steps() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let mut log = CsvLogger::new(&logs);
    csv_log(&mut log, 1..=6);
    log.flush().unwrap();
    let saved = log.state_dict().unwrap();
    csv_log(&mut log, 7..=10);
    log.flush().unwrap();
    drop(log);

    let mut log = CsvLogger::new(&logs);
    assert!(log.load_state_dict(&saved).unwrap().is_clean());
    csv_log(&mut log, 7..=12);
    log.flush().unwrap();

    let text = std::fs::read_to_string(logs.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,train_loss,val_loss"));
    let steps: Vec<u64> = lines
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    for line in text.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let s: u64 = cells[0].parse().unwrap();
        let m = metrics(s);
        assert_eq!(cells[1].parse::<f64>().unwrap(), m["train_loss"]);
        match m.get("val_loss") {
            Some(v) => assert_eq!(cells[2].parse::<f64>().unwrap(), *v),
            None => assert_eq!(cells[2], ""),
        }
    }
}

#[test]
fn csv_is_readable_by_python_csv_module() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = CsvLogger::new(dir.path());
    let mut m = BTreeMap::new();
    m.insert("odd, \"name\"".to_string(), 1e-7);
    m.insert("loss".to_string(), f64::INFINITY);
    log.log_metrics(3, &m).unwrap();
    log.flush().unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg("import csv,sys,json; print(json.dumps([[c for c in r] for r in csv.reader(open(sys.argv[1]))]))")
        .arg(log.path())
        .output();
    let Ok(out) = out else {
        let _skipped: Option<()> = skip_or_fail("cannot run python3");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<String>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows,
        vec![
            vec!["step", "loss", "odd, \"name\""],
            vec!["3", "inf", "1e-7"]
        ]
    );
}

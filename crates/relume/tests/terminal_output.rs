//! What the digits job prints, to a pipe and to a terminal (issue #8 A.2–A.4,
//! A.10): no escape codes in redirected logs, colour only on a terminal and
//! without `NO_COLOR`, the `epoch N/M` lines, one "already finished" line and a
//! missing data file's OS error shown once.

use std::path::PathBuf;
use std::process::{Command, Output};

mod support;

/// `target/debug/examples/digits`, built by `cargo test` beside this test.
fn digits() -> PathBuf {
    support::digits_example()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_piped(args: &[&str]) -> Output {
    Command::new(digits())
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .expect("run the digits example")
}

#[test]
fn piped_logs_have_no_escape_codes_and_plain_lines() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let run_dir = run_dir.to_str().unwrap();
    let out = run_piped(&["--run-dir", run_dir, "--max-epochs", "2"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        !all.contains('\x1b'),
        "escape code in a redirected log:\n{all}"
    );
    assert!(all.contains(" INFO no checkpoint in "), "{all}");
    let summaries: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with("epoch ") && l.contains(" done 45/45 in "))
        .collect();
    assert_eq!(summaries.len(), 2, "{all}");
    assert!(
        summaries[1].starts_with("epoch 2/2 done 45/45 in "),
        "{all}"
    );
    assert!(summaries[1].contains(" it/s step 90 "), "{all}");
    assert!(summaries[1].contains("val_acc="), "{all}");
    assert!(all.contains("epoch 1/2 100% 45/45 "), "{all}");

    // Run again: already finished, said once.
    let out = run_piped(&["--run-dir", run_dir, "--max-epochs", "2"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert_eq!(all.matches("already finished").count(), 1, "{all}");
}

#[test]
fn missing_data_file_prints_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.csv");
    let run_dir = dir.path().join("run");
    let out = run_piped(&[
        "--data",
        missing.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let once = err.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(once, 1, "{err}");
    assert!(err.contains("nope.csv"), "{err}");
    // ENOENT's text ("No such file or directory (os error 2)" on Linux), once.
    let os_text = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    assert_eq!(err.matches(&os_text).count(), 1, "{os_text}: {err}");
}

/// Runs `digits` on a pseudo-terminal with util-linux `script`; None when
/// `script` is not installed.
fn run_on_pty(args: &str, no_color: bool) -> Option<String> {
    let cmd = format!("{} {args}", digits().display());
    let mut c = Command::new("script");
    c.args(["-qfec", &cmd, "/dev/null"]).env_remove("RUST_LOG");
    if no_color {
        c.env("NO_COLOR", "1");
    } else {
        c.env_remove("NO_COLOR");
    }
    match c.output() {
        Ok(out) => {
            assert!(out.status.success(), "{}", text(&out));
            Some(text(&out))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("script: {e}"),
    }
}

#[test]
fn colour_on_a_terminal_unless_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let args = format!("--run-dir {} --max-epochs 1", run_dir.display());
    let Some(coloured) = run_on_pty(&args, false) else {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    };
    // The level is coloured on a terminal, and the line is there.
    assert!(coloured.contains("\x1b[32m INFO\x1b[0m"), "{coloured:?}");
    assert!(
        coloured.contains("epoch 1/1 done 45/45 in "),
        "{coloured:?}"
    );
    let args = format!("--run-dir {} --max-epochs 1 --fresh", run_dir.display());
    let plain = run_on_pty(&args, true).unwrap_or_default();
    assert!(plain.contains(" INFO "), "{plain:?}");
    assert!(
        !plain.contains("\x1b[32m"),
        "NO_COLOR=1 still coloured: {plain:?}"
    );
    assert!(
        !plain.contains("\x1b[2m"),
        "NO_COLOR=1 still coloured: {plain:?}"
    );
}

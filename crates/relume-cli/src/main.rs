//! The `relume` command-line tool: inspect, verify, diff, migrate and plot
//! checkpoints; inspect and convert PyTorch Lightning `.ckpt` files.
//!
//! A thin binary: each subcommand's flags ([`clap`] derive) are turned into one
//! validated options struct, then the `relume-ckpt` library (`relume-lightning` for
//! `relume lightning`) does the work. Output
//! is aligned tables for a person, or JSON with `--json`.
//!
//! Exit status: `0` ok; `1` problems found (verify found damage, diff found
//! differences, a checkpoint is damaged or will not resume); `2` usage or I/O
//! error (including clap's own usage errors). Errors are printed with their
//! cause chain.
#![deny(missing_docs)]

mod cmd;
mod decode;
mod lightning;
// `plot::plot` (default size) is kept for callers and plot.rs's own tests.
#[allow(dead_code)]
mod plot;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cmd::Status;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "relume",
    version,
    about = "Inspect, verify, diff, migrate and plot relume checkpoints",
    after_help = "Examples:\n  relume ls runs/digits\n  relume inspect runs/digits/checkpoints/step=000120-epoch=2\n  relume verify runs/digits\n  relume diff runs/a/checkpoints/step=000100 runs/b/checkpoints/step=000100 --tolerance 1e-6\n  relume migrate old/step-5 --out new/step-5\n  relume plot runs/digits -o curves.png\n  relume lightning inspect epoch=3-step=120.ckpt\n  relume lightning convert epoch=3-step=120.ckpt runs/converted\n\nExit status: 0 ok, 1 problems found, 2 usage or I/O error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands. Adding one is a variant here and an arm in [`run`].
#[derive(Debug, Subcommand)]
enum Command {
    /// List a run directory's checkpoints with step, epoch, metrics, size, latest and best.
    Ls(cmd::ls::LsArgs),
    /// Show what a checkpoint holds and whether it can resume training.
    Inspect(cmd::inspect::InspectArgs),
    /// Check every checksum and the structure of a checkpoint or of a whole run directory.
    Verify(cmd::verify::VerifyArgs),
    /// Compare two checkpoints: components, keys, tensor values and JSON state.
    Diff(cmd::diff::DiffArgs),
    /// Upgrade a checkpoint to the current format version.
    Migrate(cmd::migrate::MigrateArgs),
    /// Draw training and validation curves from a run's metrics.csv.
    Plot(plot::PlotArgs),
    /// Read PyTorch Lightning `.ckpt` files safely (nothing in them is executed).
    #[command(subcommand)]
    Lightning(LightningCommand),
}

/// `relume lightning ...`: the reader's own subcommands plus `convert`.
#[derive(Debug, Subcommand)]
enum LightningCommand {
    #[command(flatten)]
    Read(lightning::LightningCommand),
    /// Convert a Lightning `.ckpt` into a relume checkpoint plus a `model.safetensors`.
    Convert(cmd::lightning_convert::ConvertArgs),
}

/// Refuses an `s3://` URL in a command that only works on local files (ls,
/// inspect, verify and diff take URLs), rather than treating it as a relative path.
fn refuse_urls(command: &Command) -> anyhow::Result<()> {
    use cmd::local_only;
    let copy =
        "copy the checkpoint to a local directory first (for example with `aws s3 cp --recursive`)";
    match command {
        Command::Migrate(a) => {
            local_only("migrate", &a.ckpt, "an object store only holds checkpoints in the current format; migrate a local copy")?;
            if let Some(out) = &a.out {
                local_only("migrate", out, "write to a local directory")?;
            }
        }
        Command::Plot(a) => {
            local_only("plot", &a.run_dir, "the logs of an s3:// run stay local: pass the local run directory that holds logs/metrics.csv")?;
            local_only("plot", &a.out, "write the image to a local file")?;
        }
        Command::Lightning(LightningCommand::Read(lightning::LightningCommand::Inspect(a))) => {
            local_only("lightning inspect", &a.path, copy)?;
        }
        Command::Lightning(LightningCommand::Convert(a)) => {
            local_only("lightning convert", &a.ckpt, copy)?;
            local_only(
                "lightning convert",
                &a.out,
                "convert into a local run directory, then train with the s3:// run URL",
            )?;
        }
        Command::Ls(_) | Command::Inspect(_) | Command::Verify(_) | Command::Diff(_) => {}
    }
    Ok(())
}

/// Runs one parsed command.
fn run(command: Command) -> anyhow::Result<Status> {
    refuse_urls(&command)?;
    match command {
        Command::Ls(a) => cmd::ls::run(&a.validate()?),
        Command::Inspect(a) => cmd::inspect::run(&a.validate()?),
        Command::Verify(a) => cmd::verify::run(&a.validate()?),
        Command::Diff(a) => cmd::diff::run(&a.validate()?),
        Command::Migrate(a) => cmd::migrate::run(&a.validate()?),
        Command::Plot(a) => plot::run(&a).map(|()| Status::Ok),
        Command::Lightning(LightningCommand::Read(c)) => lightning::run(&c).map(Status::from_code),
        Command::Lightning(LightningCommand::Convert(a)) => {
            cmd::lightning_convert::run(&a.validate()?)
        }
    }
}

fn main() -> ExitCode {
    // clap prints usage errors and exits with status 2 itself.
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELUME_LOG")
        // `ls` and `verify` report unlistable checkpoints themselves; the listing's
        // own warning would say it twice.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,relume_ckpt::dir=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(status) => ExitCode::from(status.code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cmd::exit_code_of(&e))
        }
    }
}

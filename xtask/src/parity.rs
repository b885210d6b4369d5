//! `cargo xtask parity [--device D] DIR [DIR...]`: runs performer-pytorch parity fixtures (the
//! layout of ../shared/FIXTURES.md) through the Rust models. A DIR is a fixture directory or a
//! folder of them (searched recursively). Prints one line per fixture and fails if any fails.
//!
//! `--device emulated` or `--device cuda:N` runs every fixture on that device with the CPU's
//! tolerances (performer_models::parity::run_fixture_on); it needs xtask's `cuda` feature:
//! `cargo run --release -p xtask --features cuda -- parity --device emulated`.

use std::path::PathBuf;

use clap::Parser;
use performer_models::parity::{find_fixtures, run_fixture_on};
use performer_tensor::Device;

/// Command line of `cargo xtask parity`.
#[derive(Parser, Debug)]
#[command(
    about = "Run performer-pytorch parity fixtures (FIXTURES.md layout) through the Rust models"
)]
struct Args {
    /// Where the modules run: cpu, emulated, cuda or cuda:N (devices other than cpu need
    /// xtask's `cuda` feature).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Fixture directories, or folders of them (default: the committed fixtures/).
    dirs: Vec<PathBuf>,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse::<Device>().map_err(|e| e.to_string())
}

/// Whether this binary can put tensors on `device`: an error naming the feature to build with
/// when it cannot (checked before any fixture runs, so that a build without the feature does not
/// report every fixture as failed).
fn check_device(device: Device) -> Result<(), String> {
    if device.is_cpu() || cfg!(feature = "cuda") {
        return Ok(());
    }
    Err(format!(
        "--device {device}: this xtask was built without its `cuda` feature; run \
         `cargo run --release -p xtask --features cuda -- parity --device {device} ...`"
    ))
}

/// Entry point.
pub fn run(args: &[String]) -> Result<(), String> {
    let args: Args = crate::cli::parse("parity", args)?;
    check_device(args.device)?;
    let paths = if args.dirs.is_empty() {
        vec![crate::workspace::root().join("fixtures")]
    } else {
        args.dirs
    };
    let dirs = find_fixtures(&paths).map_err(|e| e.to_string())?;
    if dirs.is_empty() {
        return Err(format!(
            "no fixtures (directories with config.json) under {paths:?}"
        ));
    }
    // A panic inside a fixture's run (ops with infallible CPU signatures panic on a device
    // failure) is caught and reported on the fixture's line; the default hook's message and
    // backtrace would only bury the table.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = 0;
    for d in &dirs {
        let report = run_fixture_on(d, args.device);
        println!("{report}");
        failed += usize::from(!report.passed);
    }
    std::panic::set_hook(hook);
    println!(
        "{} fixtures on {}, {} passed, {failed} failed",
        dirs.len(),
        args.device,
        dirs.len() - failed
    );
    if failed > 0 {
        Err(format!("{failed} fixture(s) failed"))
    } else {
        Ok(())
    }
}

//! `cargo xtask parity DIR [DIR...]`: runs performer-pytorch parity fixtures (the layout of
//! ../shared/FIXTURES.md) through the Rust models. A DIR is a fixture directory or a folder of
//! them (searched recursively). Prints one line per fixture and fails if any fails.

use std::path::PathBuf;

use clap::Parser;
use performer_models::parity::{find_fixtures, run_fixture};

/// Command line of `cargo xtask parity`.
#[derive(Parser, Debug)]
#[command(
    about = "Run performer-pytorch parity fixtures (FIXTURES.md layout) through the Rust models"
)]
struct Args {
    /// Fixture directories, or folders of them (default: the committed fixtures/).
    dirs: Vec<PathBuf>,
}

/// Entry point.
pub fn run(args: &[String]) -> Result<(), String> {
    let args: Args = crate::cli::parse("parity", args)?;
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
    let mut failed = 0;
    for d in &dirs {
        let report = run_fixture(d);
        println!("{report}");
        failed += usize::from(!report.passed);
    }
    println!(
        "{} fixtures, {} passed, {failed} failed",
        dirs.len(),
        dirs.len() - failed
    );
    if failed > 0 {
        Err(format!("{failed} fixture(s) failed"))
    } else {
        Ok(())
    }
}

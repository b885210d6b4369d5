//! Project automation: `cargo xtask <command> [args]`.
//!
//! One binary, one module per command (rust-analyzer's xtask layout), each reading its
//! arguments with a clap parser through [`cli::parse`]. To add a command, add a module and a
//! row to `COMMANDS`.

mod bench;
mod cli;
mod device_bundle;
mod kernels;
mod parity;
mod quality;
mod tidy;
mod workspace;

/// A command: name, one-line help, entry point taking the remaining arguments.
type Command = (
    &'static str,
    &'static str,
    fn(&[String]) -> Result<(), String>,
);

const COMMANDS: &[Command] = &[
    (
        "bench",
        "run the BENCHMARKS.md workloads, one process each: table, target/bench/report.json, scaling.svg (--reference: vs performer-pytorch)",
        bench::run,
    ),
    (
        "parity",
        "run performer-pytorch parity fixtures (FIXTURES.md layout): DIR... or the committed fixtures/",
        parity::run,
    ),
    (
        "quality",
        "train the same PerformerLM once per attention variant on the same batches: validation bits per byte, tokens/s, peak memory (target/quality/report.json, curves.svg)",
        quality::run,
    ),
    (
        "kernels",
        "write NVRTC (and nvcc, when present) PTX of the CUDA kernels for sm_80/sm_90 and print ptxas register/spill use",
        kernels::run,
    ),
    (
        "device-bundle",
        "build the CUDA test and benchmark binaries in release into .device/ with run.sh and the comparison wheels",
        device_bundle::run,
    ),
    (
        "tidy",
        "structural checks: no module imports another that imports it back, in every crate (-v: every import)",
        tidy::run,
    ),
];

fn usage() -> String {
    let mut s = String::from("usage: cargo xtask <command> [args]\n\ncommands:\n");
    for (name, help, _) in COMMANDS {
        s.push_str(&format!("  {name:<15} {help}\n"));
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{}", usage());
        std::process::exit(2);
    };
    let Some((_, _, run)) = COMMANDS.iter().find(|(name, _, _)| name == cmd) else {
        eprint!("unknown command {cmd:?}\n\n{}", usage());
        std::process::exit(2);
    };
    if let Err(e) = run(&args[1..]) {
        eprintln!("xtask {cmd}: {e}");
        std::process::exit(1);
    }
}

//! `cargo xtask device-bundle`: prepares `.device/` for one run on a GPU machine that has no
//! Rust toolchain and no network (see shared GPU.md):
//!
//! * the release test binaries of performer-cuda and performer-favor's CUDA integration test
//!   (found with `cargo test --no-run
//!   --message-format=json`) and the `cuda_bench` example, stripped, in `.device/bin/`;
//! * `run.sh` (tests, then benchmarks, table last) and the Python comparison scripts;
//! * the wheels the comparison needs (performer-pytorch and its pure-Python dependencies,
//!   flash-linear-attention), fetched here with `pip download` for Python 3.12, or reused from
//!   `.device/wheels` when already there.
//!
//! Fails if the bundle exceeds 60 MiB.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const RUN_SH: &str = include_str!("../assets/run.sh");
const BENCH_REFERENCE: &str = include_str!("../assets/bench_reference.py");
const BENCH_TABLE: &str = include_str!("../assets/bench_table.py");

/// Wheels for the comparison, pinned to what was checked against the reference venv.
/// einops and the performer-pytorch dependencies are pure Python; fla-core holds the kernels.
const WHEELS: &[&str] = &[
    "performer-pytorch==1.1.4",
    "local-attention==1.11.2",
    "axial-positional-embedding==0.3.12",
    "hyper-connections==0.4.11",
    "torch-einops-utils==0.2.0",
    "einops==0.8.2",
    "flash-linear-attention==0.6.0",
    "fla-core==0.6.0",
];

const LIMIT_BYTES: u64 = 60 * 1024 * 1024;

/// Command line of `cargo xtask device-bundle`.
#[derive(clap::Parser, Debug)]
#[command(
    about = "Build the CUDA test and benchmark binaries in release into .device/ with run.sh and the comparison wheels"
)]
struct Args {
    /// Do not download the comparison wheels.
    #[arg(long)]
    no_wheels: bool,
}

/// Entry point.
pub fn run(args: &[String]) -> Result<(), String> {
    let Args {
        no_wheels: skip_wheels,
    } = crate::cli::parse("device-bundle", args)?;
    let root = crate::workspace::root();
    let bundle = root.join(".device");
    let bin = bundle.join("bin");
    // Fresh binaries every time; wheels are kept (they only change with the pins above).
    if bin.exists() {
        std::fs::remove_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    }
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;

    let mut tests = cargo_executables(
        &root,
        &["test", "--release", "-p", "performer-cuda", "--no-run"],
    )?;
    // FastAttention::use_cuda against the CPU path (performer-favor's `cuda` feature).
    tests.extend(cargo_executables(
        &root,
        &[
            "test",
            "--release",
            "-p",
            "performer-favor",
            "--features",
            "cuda",
            "--test",
            "cuda",
            "--no-run",
        ],
    )?);
    // A whole PerformerLM with its attention on the device (the facade's `cuda` feature).
    tests.extend(cargo_executables(
        &root,
        &[
            "test",
            "--release",
            "-p",
            "performer",
            "--features",
            "cuda",
            "--test",
            "cuda_model",
            "--no-run",
        ],
    )?);
    let bench = cargo_executables(
        &root,
        &[
            "build",
            "--release",
            "-p",
            "performer-cuda",
            "--example",
            "cuda_bench",
        ],
    )?;
    if tests.is_empty() || bench.is_empty() {
        return Err("cargo reported no test or benchmark executables".into());
    }
    for (name, exe) in tests.iter().chain(bench.iter()) {
        let dest = bin.join(name);
        std::fs::copy(exe, &dest)
            .map_err(|e| format!("copy {} -> {}: {e}", exe.display(), dest.display()))?;
        // Debug line tables are for local profiling; the bundle has a size limit.
        let _ = Command::new("strip")
            .arg("--strip-debug")
            .arg(&dest)
            .status();
        println!("bundled {}", dest.display());
    }

    write(&bundle.join("run.sh"), RUN_SH)?;
    write(&bundle.join("bench_reference.py"), BENCH_REFERENCE)?;
    write(&bundle.join("bench_table.py"), BENCH_TABLE)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            bundle.join("run.sh"),
            std::fs::Permissions::from_mode(0o755),
        );
    }

    if !skip_wheels {
        fetch_wheels(&bundle.join("wheels"))?;
    }
    let size = dir_size(&bundle.join("bin"))? + dir_size(&bundle.join("wheels")).unwrap_or(0);
    println!(
        "bundle {}: {:.1} MiB (limit {} MiB)",
        bundle.display(),
        size as f64 / (1024.0 * 1024.0),
        LIMIT_BYTES / (1024 * 1024)
    );
    if size > LIMIT_BYTES {
        return Err(format!(
            "bundle is {size} bytes, over the {LIMIT_BYTES}-byte limit"
        ));
    }
    println!("on the GPU machine: bash .device/run.sh   (logs in $OUT or .device/out)");
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs cargo with `--message-format=json` and returns (target name, executable) for every
/// artifact with an executable. Test targets of one crate share names across kinds (the
/// library's unit tests are named after the crate), so the kind is kept in the name.
fn cargo_executables(root: &Path, args: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(root)
        .args(args)
        .arg("--message-format=json")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo {args:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo {args:?} failed ({})", output.status));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or("unnamed");
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("bin");
        let label = match kind {
            "lib" | "rlib" => format!("{}-unit", name.replace('-', "_")),
            _ => name.to_string(),
        };
        found.push((label, PathBuf::from(exe)));
    }
    Ok(found)
}

fn fetch_wheels(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let have = |spec: &str| -> bool {
        let (name, version) = spec.split_once("==").unwrap_or((spec, ""));
        let prefix = format!("{}-{}", name.replace('-', "_"), version);
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            })
            .unwrap_or(false)
    };
    let missing: Vec<&str> = WHEELS.iter().copied().filter(|w| !have(w)).collect();
    if missing.is_empty() {
        println!("wheels already in {}", dir.display());
        return Ok(());
    }
    let pip = ["pip3", "pip"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok()
        })
        .ok_or("pip not found: install Python's pip, or pass --no-wheels")?;
    let status = Command::new(pip)
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
        ])
        .args(["--platform", "manylinux_2_28_x86_64", "-d"])
        .arg(dir)
        .args(&missing)
        .status()
        .map_err(|e| format!("running pip download: {e}"))?;
    if !status.success() {
        return Err(format!("pip download {missing:?} failed ({status})"));
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64, String> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let meta = entry.metadata().map_err(|e| e.to_string())?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

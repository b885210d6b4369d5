//! `cargo xtask device-bundle`: prepares `.device/` for one run on a GPU machine that has no
//! Rust toolchain and no network (see shared GPU.md):
//!
//! * the release test binaries of performer-cuda and performer-favor's CUDA integration test
//!   (found with `cargo test --no-run
//!   --message-format=json`) and the `cuda_bench` example, stripped, in `.device/bin/`;
//! * `tools/xtask` (built with its `cuda` feature) with a copy of `fixtures/`, and
//!   `tools/train_lm` (the facade's `cuda` feature): run.sh runs every parity fixture on cuda:0
//!   and one training step on cuda:0 (f32, `--amp`, and under compute-sanitizer's memcheck and
//!   racecheck), and `tools/lm_bench` (the PerformerLM training step and generate, timed
//!   against performer-pytorch by `bench_reference.py --lm`);
//! * `bin/` and `tools/` then go into one gzip tarball, `binaries.tar.gz`, which `run.sh`
//!   unpacks beside itself first: the binaries compress about 3.5x (79 MiB to 22 MiB), and
//!   what travels to the device machine is limited (64 MiB in all);
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

/// The tarball of `bin/` and `tools/` in the bundle (the name run.sh unpacks).
const PAYLOAD: &str = "binaries.tar.gz";

/// The folders of the bundle that travel packed in [`PAYLOAD`].
const PACKED: [&str; 2] = ["bin", "tools"];

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
    let payload = bundle.join(PAYLOAD);
    if payload.exists() {
        std::fs::remove_file(&payload).map_err(|e| format!("{}: {e}", payload.display()))?;
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
    // The whole stack on the device: xtask with its cuda feature (parity --device cuda:0 over
    // the fixtures, copied beside it) and train_lm with the facade's (one step, plain, --amp and
    // under compute-sanitizer). In tools/, so that run.sh does not take them for tests.
    let tools = bundle.join("tools");
    if tools.exists() {
        std::fs::remove_dir_all(&tools).map_err(|e| format!("{}: {e}", tools.display()))?;
    }
    std::fs::create_dir_all(&tools).map_err(|e| format!("{}: {e}", tools.display()))?;
    let mut tool_exes = named(
        cargo_executables(
            &root,
            &["build", "--release", "-p", "xtask", "--features", "cuda"],
        )?,
        "xtask",
    )?;
    let facade_examples = cargo_executables(
        &root,
        &[
            "build",
            "--release",
            "-p",
            "performer",
            "--features",
            "cuda",
            "--example",
            "train_lm",
            "--example",
            "lm_bench",
        ],
    )?;
    tool_exes.extend(named(facade_examples.clone(), "train_lm")?);
    tool_exes.extend(named(facade_examples, "lm_bench")?);
    for (name, exe) in &tool_exes {
        copy_stripped(exe, &tools.join(name))?;
    }
    let fixtures = bundle.join("fixtures");
    if fixtures.exists() {
        std::fs::remove_dir_all(&fixtures).map_err(|e| format!("{}: {e}", fixtures.display()))?;
    }
    copy_dir(&root.join("fixtures"), &fixtures)?;

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
        copy_stripped(exe, &bin.join(name))?;
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

    pack(&bundle, &PACKED, PAYLOAD)?;

    if !skip_wheels {
        fetch_wheels(&bundle.join("wheels"))?;
    }
    let size =
        file_size(&payload)? + dir_size(&fixtures)? + dir_size(&bundle.join("wheels")).unwrap_or(0);
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

/// Copies `exe` to `dest` and strips its debug line tables (they are for local profiling; the
/// bundle has a size limit).
fn copy_stripped(exe: &Path, dest: &Path) -> Result<(), String> {
    std::fs::copy(exe, dest)
        .map_err(|e| format!("copy {} -> {}: {e}", exe.display(), dest.display()))?;
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(dest)
        .status();
    println!("bundled {}", dest.display());
    Ok(())
}

/// The executables of `found` named `name` (one expected): an error naming what cargo built
/// otherwise.
fn named(found: Vec<(String, PathBuf)>, name: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let names: Vec<String> = found.iter().map(|(n, _)| n.clone()).collect();
    let picked: Vec<(String, PathBuf)> = found.into_iter().filter(|(n, _)| n == name).collect();
    if picked.is_empty() {
        return Err(format!(
            "cargo built no executable named {name} (built: {names:?})"
        ));
    }
    Ok(picked)
}

/// Packs the folders `dirs` of `bundle` into the gzip tarball `bundle/name` (written under a
/// temporary name, then renamed, so that a failed run leaves no half tarball) and removes the
/// folders: the tarball is what travels. Needs `tar` with gzip, as the device machine does to
/// unpack it.
fn pack(bundle: &Path, dirs: &[&str], name: &str) -> Result<(), String> {
    let (tarball, partial) = (bundle.join(name), bundle.join(format!("{name}.partial")));
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&partial)
        .arg("-C")
        .arg(bundle)
        .args(dirs)
        .status()
        .map_err(|e| format!("running tar: {e}"))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(format!(
            "tar -czf {} {dirs:?} failed ({status})",
            partial.display()
        ));
    }
    std::fs::rename(&partial, &tarball)
        .map_err(|e| format!("{} -> {}: {e}", partial.display(), tarball.display()))?;
    for dir in dirs {
        let path = bundle.join(dir);
        std::fs::remove_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("packed {dirs:?} into {}", tarball.display());
    Ok(())
}

fn file_size(path: &Path) -> Result<u64, String> {
    Ok(std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len())
}

/// Copies the directory tree `from` to `to` (regular files and folders).
fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(|e| e.to_string())?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)
                .map_err(|e| format!("copy {} -> {}: {e}", src.display(), dst.display()))?;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_sh_parses_and_runs_the_device_stages() {
        let path = std::env::temp_dir().join(format!("run-sh-{}.sh", std::process::id()));
        std::fs::write(&path, RUN_SH).unwrap();
        let status = Command::new("bash").arg("-n").arg(&path).status();
        let _ = std::fs::remove_file(&path);
        assert!(status.unwrap().success(), "bash -n rejects run.sh");
        for stage in [
            "tools/xtask\" parity --device cuda:0",
            "--tool \"$tool\"",
            "for tool in memcheck racecheck",
            "\"${STEP[@]}\" --amp",
            "tools/lm_bench\" --device cuda:0",
            "bench_reference.py\" --lm",
            "\"$LM_OURS\" \"$LM_REF\"",
        ] {
            assert!(RUN_SH.contains(stage), "run.sh lacks {stage:?}");
        }
    }

    /// `pack` leaves one tarball in place of the folders, and run.sh's own unpacking brings
    /// back every file, byte for byte and still executable.
    #[cfg(unix)]
    #[test]
    fn packed_folders_come_back_as_run_sh_unpacks_them() {
        use std::os::unix::fs::PermissionsExt;
        let bundle = std::env::temp_dir().join(format!("bundle-pack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&bundle);
        let files = [
            ("bin/a_test", b"\x7fELF test".to_vec()),
            ("tools/xtask", vec![0u8, 1, 2, 255, 254]),
            ("tools/train_lm", vec![7u8; 100_000]),
        ];
        for (path, bytes) in &files {
            let path = bundle.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        pack(&bundle, &PACKED, PAYLOAD).unwrap();
        assert!(bundle.join(PAYLOAD).is_file());
        assert!(!bundle.join("bin").exists() && !bundle.join("tools").exists());
        assert!(!bundle.join(format!("{PAYLOAD}.partial")).exists());
        // run.sh's unpacking lines, as they stand in it.
        let unpack: String = RUN_SH
            .lines()
            .skip_while(|l| !l.starts_with("# --- binaries"))
            .take_while(|l| !l.starts_with("# --- environment"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            unpack.contains("tar -xzf"),
            "run.sh does not unpack: {unpack}"
        );
        let script = format!(
            "set -u\nHERE={}\nSUMMARY=/dev/null\nFAILED=0\n{unpack}\nexit $FAILED\n",
            bundle.display()
        );
        let status = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .status()
            .unwrap();
        for (path, bytes) in &files {
            let path = bundle.join(path);
            assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{}", path.display());
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert!(mode & 0o100 != 0, "{} lost its execute bit", path.display());
        }
        let _ = std::fs::remove_dir_all(&bundle);
        assert!(status.success());
    }

    /// The comparison scripts compile, and the table reads sample PerformerLM lines of both
    /// sides into the ratios the issue sets goals for (skipped without python3; CI has it).
    #[test]
    fn bench_scripts_compile_and_the_table_gives_the_lm_ratios() {
        if Command::new("python3").arg("--version").output().is_err() {
            eprintln!("skipped: no python3");
            return;
        }
        let dir = std::env::temp_dir().join(format!("bench-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (reference, table) = (dir.join("bench_reference.py"), dir.join("bench_table.py"));
        std::fs::write(&reference, BENCH_REFERENCE).unwrap();
        std::fs::write(&table, BENCH_TABLE).unwrap();
        for script in [&reference, &table] {
            let ok = Command::new("python3")
                .args(["-m", "py_compile"])
                .arg(script)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{} does not compile", script.display());
        }
        let line = |imp: &str, workload: &str, precision: &str, ms: f64, tokens: f64| {
            format!(
                r#"{{"impl":"{imp}","workload":"{workload}","precision":"{precision}","tokens":{tokens},"median_ms":{ms},"tokens_per_s":{}}}"#,
                tokens / (ms / 1e3)
            )
        };
        let ours = [
            line("performer-rs", "train_step", "f32", 100.0, 8192.0),
            line("performer-rs", "train_step", "bf16", 40.0, 8192.0),
            line("performer-rs", "generate", "f32", 64.0, 64.0),
        ]
        .join("\n");
        let reference_lines = [
            line("performer-pytorch", "train_step", "f32", 250.0, 8192.0),
            r#"{"impl":"performer-pytorch","workload":"train_step","precision":"bf16","tokens":8192,"error":"OutOfMemoryError: x"}"#.to_string(),
            line("performer-pytorch", "generate", "f32", 3200.0, 64.0),
        ]
        .join("\n");
        let (a, b) = (dir.join("ours.jsonl"), dir.join("ref.jsonl"));
        std::fs::write(&a, ours).unwrap();
        std::fs::write(&b, reference_lines).unwrap();
        let out = Command::new("python3")
            .arg(&table)
            .arg(&a)
            .arg(&b)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            "2.50x performer-pytorch's tokens/s (misses the goal 3x)",
            "50.00x performer-pytorch's tokens/s (misses the goal 100x)",
            "error: OutOfMemoryError: x",
            "bf16 autocast speedup of the training step, performer-rs: 2.50x",
        ] {
            assert!(text.contains(want), "table lacks {want:?}:\n{text}");
        }
    }

    #[test]
    fn copy_dir_copies_the_tree_and_named_picks_by_name() {
        let root = std::env::temp_dir().join(format!("copy-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f.txt"), "x").unwrap();
        std::fs::write(root.join("a/g.txt"), "y").unwrap();
        copy_dir(&root.join("a"), &root.join("c")).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("c/b/f.txt")).unwrap(),
            "x"
        );
        assert_eq!(std::fs::read_to_string(root.join("c/g.txt")).unwrap(), "y");
        let _ = std::fs::remove_dir_all(&root);
        let found = vec![
            ("xtask".to_string(), PathBuf::from("/x")),
            ("build-script-build".to_string(), PathBuf::from("/y")),
        ];
        assert_eq!(named(found.clone(), "xtask").unwrap().len(), 1);
        let err = named(found, "train_lm").unwrap_err();
        assert!(err.contains("train_lm") && err.contains("xtask"), "{err}");
    }
}

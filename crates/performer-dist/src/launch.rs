//! Starting a local MPI job from a program (tests, examples): finding `mpirun` and the flags a
//! single machine needs. Jobs on several machines are started by hand or by a scheduler (see
//! the project README), not from here.

use std::path::PathBuf;
use std::process::Command;

/// The `mpirun` on `PATH`, if any.
pub fn find_mpirun() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("mpirun"))
        .find(|candidate| candidate.is_file())
}

/// `mpirun -np ranks` for this machine, ready for the program and its arguments:
/// `--oversubscribe` (more ranks than cores is allowed: tests run 2 ranks on 2 cores beside
/// other work), `--bind-to none` (ranks are not pinned to cores they would then share with
/// each other's threads), `--allow-run-as-root` (containers and CI often run as root), and
/// one thread per rank unless the caller sets `RAYON_NUM_THREADS` itself. `None` where
/// `mpirun` is not on `PATH`.
pub fn local_mpirun(ranks: usize) -> Option<Command> {
    let mpirun = find_mpirun()?;
    let mut cmd = Command::new(mpirun);
    cmd.args([
        "--oversubscribe",
        "--bind-to",
        "none",
        "--allow-run-as-root",
        "-np",
        &ranks.to_string(),
    ]);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", "1");
    }
    Some(cmd)
}

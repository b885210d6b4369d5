//! Runs one workload process and measures it from outside.
//!
//! Peak RSS is the child's `ru_maxrss` as returned by `wait4(2)` when it is reaped (Linux: KiB):
//! the kernel's high-water mark of the process's resident set over its whole life, sampled by the
//! kernel, so no peak between two polls is missed (polling `/proc/PID/status` `VmHWM` would read
//! the same counter, but only while the process is alive). The process is the workload binary
//! itself (no shell in between), so the figure is that workload's own.

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Exit status with which `bench_workload` says a workload is not implemented yet.
pub const EXIT_NOT_IMPLEMENTED: i32 = 3;

/// How `bench_workload` starts the last stderr line when it exits with
/// [`EXIT_NOT_IMPLEMENTED`]: `not implemented yet: REASON`.
pub const NOT_IMPLEMENTED: &str = "not implemented yet";

/// The JSON line a workload process prints last on stdout.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ProcessLine {
    /// Median of `times_ms` as the process computed it.
    pub median_ms: f64,
    /// Every timed repetition, milliseconds.
    #[serde(default)]
    pub times_ms: Vec<f64>,
    /// Tokens one repetition processes.
    pub tokens: usize,
}

/// A finished measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// What the process printed.
    pub line: ProcessLine,
    /// Peak RSS of the process, MiB (`ru_maxrss` from `wait4`).
    pub peak_rss_mib: f64,
}

/// Why a process gave no measurement.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The workload exists in the contract but not yet in this implementation.
    NotImplemented(String),
    /// It ran past the time limit and was killed.
    TimedOut(Duration),
    /// It failed otherwise (non-zero exit, signal, no JSON line).
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotImplemented(why) if why.starts_with(NOT_IMPLEMENTED) => f.write_str(why),
            Failure::NotImplemented(why) => write!(f, "{NOT_IMPLEMENTED}: {why}"),
            Failure::TimedOut(limit) => {
                write!(f, "timed out after {} s and was killed", limit.as_secs())
            }
            Failure::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// Finds the last stdout line that parses as the process's JSON object (libraries may print
/// other lines before it).
pub fn parse_process_line(stdout: &str) -> Option<ProcessLine> {
    last_json_line(stdout)
}

/// The last line of `stdout` that parses as a `T` (a JSON object).
pub fn last_json_line<T: serde::de::DeserializeOwned>(stdout: &str) -> Option<T> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
}

/// The last non-empty line of a text, for short error messages.
fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

fn read_all(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Spawns `cmd`, waits for it (killing it after `timeout`), and returns its JSON line and peak
/// RSS. Stdout and stderr are captured; stderr's last line explains failures.
pub fn run(cmd: Command, timeout: Duration) -> Result<Measurement, Failure> {
    let done = run_process(cmd, timeout)?;
    let line = parse_process_line(&done.stdout).ok_or_else(|| {
        Failure::Failed(format!(
            "no JSON line on stdout; stderr: {}",
            last_line(&done.stderr)
        ))
    })?;
    Ok(Measurement {
        line,
        peak_rss_mib: done.peak_rss_mib,
    })
}

/// A process that exited with status 0.
#[derive(Clone, Debug)]
pub struct Finished {
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// Its peak RSS, MiB (`ru_maxrss` from `wait4`).
    pub peak_rss_mib: f64,
}

/// Spawns `cmd`, waits for it (killing it after `timeout`), and returns its output and peak
/// RSS; a non-zero exit, a signal or the timeout is a [`Failure`] (stderr's last line says
/// why).
pub fn run_process(mut cmd: Command, timeout: Duration) -> Result<Finished, Failure> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::Failed(format!("cannot start {shown}: {e}")))?;
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let pid = child.id() as libc::pid_t;

    let start = Instant::now();
    let mut timed_out = false;
    let (status, usage) = loop {
        let mut status: libc::c_int = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if timed_out { 0 } else { libc::WNOHANG };
        // SAFETY: `pid` is our unreaped child; status and usage point to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
        if r == pid {
            break (status, usage);
        }
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Failure::Failed(format!("wait4 on {shown}: {err}")));
        }
        if start.elapsed() >= timeout {
            // SAFETY: the child is not reaped yet, so `pid` still names it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            timed_out = true;
            continue;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    // Linux reports ru_maxrss in KiB.
    let peak_rss_mib = usage.ru_maxrss as f64 / 1024.0;

    if timed_out {
        return Err(Failure::TimedOut(timeout));
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let hint = if sig == libc::SIGKILL {
            " (out of memory?)"
        } else {
            ""
        };
        return Err(Failure::Failed(format!(
            "killed by signal {sig}{hint} at {peak_rss_mib:.0} MiB peak RSS; {}",
            last_line(&stderr)
        )));
    }
    let code = libc::WEXITSTATUS(status);
    if code == EXIT_NOT_IMPLEMENTED {
        return Err(Failure::NotImplemented(last_line(&stderr)));
    }
    if code != 0 {
        return Err(Failure::Failed(format!(
            "exit status {code}: {}",
            last_line(&stderr)
        )));
    }
    Ok(Finished {
        stdout,
        stderr,
        peak_rss_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_json_line() {
        let out = "unable to import cuda code\n{\"median_ms\": 1.5, \"times_ms\": [1.0, 1.5, 2.0], \"tokens\": 64}\n\n";
        let line = parse_process_line(out).unwrap();
        assert_eq!(
            line,
            ProcessLine {
                median_ms: 1.5,
                times_ms: vec![1.0, 1.5, 2.0],
                tokens: 64
            }
        );
        assert_eq!(parse_process_line("no json here\n{broken"), None);
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn measures_a_process_and_classifies_failures() {
        let ok = run(
            sh("echo noise; echo '{\"median_ms\":2,\"times_ms\":[2],\"tokens\":8}'"),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(ok.line.tokens, 8);
        assert!(ok.peak_rss_mib > 0.0);

        let ni = run(
            sh("echo 'workload x: not implemented yet' >&2; exit 3"),
            Duration::from_secs(30),
        );
        assert_eq!(
            ni,
            Err(Failure::NotImplemented(
                "workload x: not implemented yet".into()
            ))
        );

        let failed = run(sh("echo boom >&2; exit 1"), Duration::from_secs(30));
        assert_eq!(failed, Err(Failure::Failed("exit status 1: boom".into())));

        let slow = run(sh("exec sleep 5"), Duration::from_millis(200));
        assert_eq!(slow, Err(Failure::TimedOut(Duration::from_millis(200))));
    }
}

//! `cargo xtask tidy`: structural checks that review would otherwise have to repeat.
//!
//! - One-way imports: inside every crate of the workspace, no module imports another that
//!   imports it back, directly or through others (the graph of [`module_graph`] has no cycle).
//!   Each cycle is printed with one import per edge, file and line, to show where to cut it.

mod lexer;
mod module_graph;

use std::path::PathBuf;

use module_graph::{ModPath, cycles, scan};

/// Command line of `cargo xtask tidy`.
#[derive(clap::Parser, Debug)]
#[command(
    about = "Structural checks: no module imports another that imports it back, in every crate"
)]
struct Args {
    /// Also print every import between modules, with the file and line that makes it.
    #[arg(short, long)]
    verbose: bool,
    /// The workspace to check (default: this one).
    #[arg(long)]
    root: Option<PathBuf>,
}

/// Entry point.
pub fn run(args: &[String]) -> Result<(), String> {
    let args: Args = crate::cli::parse("tidy", args)?;
    let root = args.root.unwrap_or_else(crate::workspace::root);
    check(&root, args.verbose)
}

/// The source folders of the workspace's crates, relative to its root.
const CRATE_SOURCES: &[&str] = &[
    "src",
    "crates/performer-tensor/src",
    "crates/performer-favor/src",
    "crates/performer-cuda/src",
    "crates/performer-layers/src",
    "crates/performer-models/src",
    "xtask/src",
];

fn show(m: &ModPath) -> String {
    if m.is_empty() {
        "(crate root)".into()
    } else {
        m.join("::")
    }
}

/// Checks every crate under `root` (the workspace's by default); `Err` lists what failed.
pub fn check(root: &std::path::Path, verbose: bool) -> Result<(), String> {
    let mut failures = Vec::new();
    let mut crates = Vec::new();
    for dir in CRATE_SOURCES {
        let src = root.join(dir);
        if src.is_dir() {
            crates.push(src);
        }
    }
    // Crates added later are checked too.
    if let Ok(entries) = std::fs::read_dir(root.join("crates")) {
        let mut extra: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path().join("src")))
            .filter(|p| p.is_dir() && !crates.contains(p))
            .collect();
        extra.sort();
        crates.extend(extra);
    }
    for src in crates {
        let graph = scan(&src)?;
        let imports: usize = graph.edges.values().map(|e| e.len()).sum();
        let found = cycles(&graph);
        let name = src.strip_prefix(root).unwrap_or(&src).display().to_string();
        println!(
            "{name:<34} {:>3} modules {imports:>4} imports between them: {}",
            graph.edges.len(),
            if found.is_empty() {
                "one way".to_string()
            } else {
                format!("{} cycle(s)", found.len())
            }
        );
        if verbose {
            for (from, tos) in &graph.edges {
                for (to, ev) in tos {
                    println!(
                        "    {} -> {}   ({}:{} {})",
                        show(from),
                        show(to),
                        ev.file.display(),
                        ev.line,
                        ev.path
                    );
                }
            }
        }
        for cycle in found {
            let mut text = format!(
                "{name}: modules that import each other: {}",
                cycle.iter().map(show).collect::<Vec<_>>().join(", ")
            );
            for from in &cycle {
                for (to, ev) in &graph.edges[from] {
                    if cycle.contains(to) {
                        text.push_str(&format!(
                            "\n    {} -> {}: {}:{} ({})",
                            show(from),
                            show(to),
                            ev.file.display(),
                            ev.line,
                            ev.path
                        ));
                    }
                }
            }
            failures.push(text);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

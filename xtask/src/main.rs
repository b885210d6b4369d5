//! Project automation: `cargo xtask <bench|parity|kernels|device-bundle>`.
fn main() {
    eprintln!("usage: cargo xtask <bench|parity|kernels|device-bundle>");
    std::process::exit(2);
}

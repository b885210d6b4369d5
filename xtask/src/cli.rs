//! The one way every command reads its arguments: a clap `Parser` per command, parsed from
//! the arguments after the command's name.

use clap::Parser;

/// Parses `args` (what follows `cargo xtask <command>`) into the command's `A`. `--help`
/// prints the help and exits; a bad argument prints clap's message and is an error.
pub fn parse<A: Parser>(command: &str, args: &[String]) -> Result<A, String> {
    let argv = std::iter::once(format!("cargo xtask {command}")).chain(args.iter().cloned());
    A::try_parse_from(argv).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            String::from("bad arguments")
        } else {
            std::process::exit(0)
        }
    })
}

//! The `demo` subcommand (interim until the test guest lands).

use crate::config::cli::DemoArgs;

/// Runs the demo; returns the exit status.
pub fn main(_args: &DemoArgs) -> i32 {
    eprintln!("error: the demo needs the embedded test guest, which is not built yet");
    1
}

//! The `pgflow` command-line tool.
fn main() {}

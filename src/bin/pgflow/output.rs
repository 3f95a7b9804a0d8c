//! Writing to stdout: every write returns its error, so that a closed pipe ends the command
//! quietly instead of a `println!` panic.

use std::io::Write;

use serde::Serialize;

use crate::CliResult;

/// Where commands write what they show: colours stay on a terminal and are dropped when
/// stdout is a pipe or a file, or `NO_COLOR` is set.
pub(crate) fn stdout() -> impl Write {
    anstream::stdout().lock()
}

pub(crate) fn print_json(out: &mut impl Write, value: &impl Serialize) -> CliResult {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

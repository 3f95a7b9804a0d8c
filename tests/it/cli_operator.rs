//! The `pgflow` binary as an operator meets it: pipes, servers that do not answer, exit
//! statuses, argument checks, colour and the run view.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    // The schema is larger than a pipe's buffer: pgflow is still writing when the reader goes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .arg("schema")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("CREATE"), "{first}");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.is_empty(), "{stderr}");
}

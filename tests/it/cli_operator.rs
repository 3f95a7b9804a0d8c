//! The `pgflow` binary as an operator meets it: pipes, servers that do not answer, exit
//! statuses, argument checks, colour and the run view.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::pgflow;

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

/// `pgflow flows` against `url`, with how long it took.
fn flows_at(url: &str, extra: &[&str]) -> (std::process::Output, Duration) {
    let began = Instant::now();
    let output = pgflow(url, &[&["flows"], extra].concat());
    (output, began.elapsed())
}

#[test]
fn a_port_nothing_listens_on_fails_at_once_with_the_cause_and_the_masked_url() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://operator:s3cret@127.0.0.1:{port}/orders");
    let (output, took) = flows_at(&url, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        stderr.contains(&format!("postgres://operator:***@127.0.0.1:{port}/orders")),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn a_server_that_never_answers_is_given_up_on_after_the_connect_timeout() {
    // Accepts connections (the kernel's backlog) and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgres://operator@127.0.0.1:{port}/orders");
    let (output, took) = flows_at(&url, &["--connect-timeout", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        stderr.contains(&format!(
            "cannot connect to {url}: no answer within 1s (on a slow network, raise --connect-timeout)"
        )),
        "{stderr}"
    );
    drop(silent);
}

//! How a command ends when it does not simply succeed: the exit status and what stderr says.

use std::io::{self, Write as _};
use std::process::ExitCode;

use crate::style;

/// A command's unhappy end.
#[derive(Debug)]
pub(crate) struct Failure {
    status: u8,
    message: Option<String>,
}

impl Failure {
    /// Exit status 1 with `message` on stderr: the command could not do its job.
    pub(crate) fn error(message: impl Into<String>) -> Self {
        Self::with_status(1, message)
    }

    /// An exit status that tells outcomes apart (`watch`), with why on stderr.
    pub(crate) fn with_status(status: u8, message: impl Into<String>) -> Self {
        Self {
            status,
            message: Some(message.into()),
        }
    }

    /// Says why on stderr and gives the process's exit status.
    pub(crate) fn report(self) -> ExitCode {
        if let Some(message) = self.message {
            // Nothing is left to tell of a stderr that cannot be written to.
            let _ = writeln!(io::stderr(), "error: {}", style::visible_lines(&message));
        }
        ExitCode::from(self.status)
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        // The reader went away (`pgflow schema | head`): as any Unix tool, end quietly; the
        // reader got what it wanted.
        if err.kind() == io::ErrorKind::BrokenPipe {
            return Self {
                status: 0,
                message: None,
            };
        }
        Self::error(format!("cannot write the output: {err}"))
    }
}

impl From<pgflow_client::Error> for Failure {
    fn from(err: pgflow_client::Error) -> Self {
        Self::error(err.to_string())
    }
}

impl From<serde_json::Error> for Failure {
    fn from(err: serde_json::Error) -> Self {
        Self::error(err.to_string())
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Self::error(message)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::error(message)
    }
}

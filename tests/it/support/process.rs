//! The `herald` binary as a child process: a command that never picks up the
//! developer's environment (server URL, database), a one-shot run, `herald
//! serve` on an ephemeral port with a throwaway store of its own, and signals.

use std::{ffi::OsStr, path::Path, process::Stdio};

use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::transport::Channel;

use super::PATIENCE;

/// `herald` with warnings only, no `HERALD_SERVER` or `DATABASE_URL` from the
/// environment, no stdin, and killed when dropped.
pub fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env("RUST_LOG", "warn")
        .env_remove("HERALD_SERVER")
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// What a finished `herald` command printed.
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `herald ARGS` to completion (within the tests' patience).
pub async fn run(args: &[&str]) -> Output {
    let output = tokio::time::timeout(PATIENCE, herald().args(args).output())
        .await
        .expect("the command finishes in time")
        .expect("run herald");
    Output {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The tests' example contract, for `--proto`.
pub fn test_proto() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/proto/herald_test.proto")
        .display()
        .to_string()
}

/// A `herald serve` process on 127.0.0.1, port 0; killed when dropped.
pub struct ServeProcess {
    pub child: Child,
    pub url: String,
    /// Holds the SQLite store unless the arguments named a database.
    _store: Option<TempDir>,
}

impl ServeProcess {
    /// `herald serve --listen 127.0.0.1:0 ARGS`, with an SQLite store in a
    /// temporary directory unless ARGS has `--database-url`. Errors only go to
    /// the test's stderr.
    pub async fn start<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut command = herald();
        command
            .env("RUST_LOG", "error")
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(&args);
        let store = if args.iter().any(|a| a == "--database-url") {
            None
        } else {
            let dir = tempfile::tempdir().expect("temp dir");
            command
                .arg("--database-url")
                .arg(dir.path().join("herald.db"));
            Some(dir)
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn herald serve");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::time::timeout(PATIENCE, BufReader::new(stdout).lines().next_line())
            .await
            .expect("serve starts in time")
            .expect("read stdout")
            .expect("serve prints its address");
        let addr = line
            .strip_prefix("herald listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        Self {
            url: format!("http://{addr}"),
            child,
            _store: store,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(&self.child, "-TERM");
    }
}

/// Sends a signal (`-TERM`, `-KILL`, …) to a running child.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

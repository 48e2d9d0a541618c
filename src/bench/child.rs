//! A broker in a child process (this same executable), for measurements that
//! must not share a process with the load generator: the idle-memory benchmark
//! reads the child's resident set from `/proc`, and `bench fanout --broker child`
//! keeps the broker's work off the benchmark's own runtime. The child runs in a
//! directory of its own, without the caller's `DATABASE_URL`, so that whatever
//! a broker writes by default (an embedded database) is private to the run and
//! removed with it.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::BenchError;

/// How long the child may take to print the address it listens on.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the child may take to exit once killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The line `herald serve` (and `herald bench broker`) prints first.
const LISTENING_PREFIX: &str = "herald listening on ";

/// A running broker process; killed when dropped.
#[derive(Debug)]
pub struct ChildBroker {
    child: Child,
    addr: SocketAddr,
    /// The child's working directory; removed when this is dropped, after the
    /// child (fields drop in order).
    _workdir: TempDir,
}

impl ChildBroker {
    /// Runs this executable with `args` (which must make it listen on a
    /// loopback address and print where) and waits until it listens.
    pub async fn spawn(args: &[&str]) -> Result<Self, BenchError> {
        let exe = std::env::current_exe().map_err(|source| BenchError::Io {
            what: "finding the herald executable".to_owned(),
            source,
        })?;
        let workdir = tempfile::Builder::new()
            .prefix("herald-bench-")
            .tempdir()
            .map_err(|source| BenchError::Io {
                what: "creating the broker's working directory".to_owned(),
                source,
            })?;
        let mut child = Command::new(&exe)
            .args(args)
            .current_dir(workdir.path())
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BenchError::Io {
                what: format!("starting {} {}", exe.display(), args.join(" ")),
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Broker("the child's stdout is not piped".to_owned()))?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| BenchError::Timeout {
                what: "starting the broker process",
                after: START_TIMEOUT,
            })?
            .map_err(|source| BenchError::Io {
                what: "reading the broker process's output".to_owned(),
                source,
            })?
            .ok_or_else(|| BenchError::Broker("the broker process exited at start".to_owned()))?;
        let addr = first
            .strip_prefix(LISTENING_PREFIX)
            .and_then(|addr| addr.trim().parse().ok())
            .ok_or_else(|| {
                BenchError::Broker(format!("unexpected first line from the broker: {first}"))
            })?;
        // Keep reading so that a later line can never block the child on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            addr,
            _workdir: workdir,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The child's resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> Result<u64, BenchError> {
        let (path, status) = self.read_proc("status")?;
        vm_rss_kib(&status)
            .ok_or_else(|| BenchError::Broker(format!("{path} has no readable VmRSS line")))
    }

    /// CPU time the child has used so far, all threads, user and system, from
    /// `/proc/<pid>/stat`. On a machine shared with other work this is a
    /// steadier measure of the broker's cost than wall-clock rates.
    pub fn cpu_time(&self) -> Result<Duration, BenchError> {
        let (path, stat) = self.read_proc("stat")?;
        cpu_ticks(&stat)
            .map(|ticks| Duration::from_millis(ticks * 1000 / USER_HZ))
            .ok_or_else(|| BenchError::Broker(format!("{path} has no readable CPU times")))
    }

    fn read_proc(&self, file: &str) -> Result<(String, String), BenchError> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| BenchError::Broker("the broker process has exited".to_owned()))?;
        let path = format!("/proc/{pid}/{file}");
        let text = std::fs::read_to_string(&path).map_err(|source| BenchError::Io {
            what: format!("reading {path}"),
            source,
        })?;
        Ok((path, text))
    }

    /// Kills the child and waits for it to exit.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        self.child.start_kill().map_err(|source| BenchError::Io {
            what: "stopping the broker process".to_owned(),
            source,
        })?;
        tokio::time::timeout(EXIT_TIMEOUT, self.child.wait())
            .await
            .map_err(|_| BenchError::Timeout {
                what: "stopping the broker process",
                after: EXIT_TIMEOUT,
            })?
            .map_err(|source| BenchError::Io {
                what: "waiting for the broker process".to_owned(),
                source,
            })?;
        Ok(())
    }
}

/// The unit of CPU times in `/proc/<pid>/stat`: Linux fixes USER_HZ at 100
/// for that interface whatever the kernel's own tick rate.
const USER_HZ: u64 = 100;

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command
/// name in field 2 may hold spaces and parentheses, so count from its end.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// The `VmRSS:   1234 kB` value of a `/proc/<pid>/status` text.
fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_from_proc_status() {
        let status = "Name:\therald\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_kib(status), Some(12345));
        assert_eq!(vm_rss_kib("Name:\therald\n"), None);
    }

    #[test]
    fn reads_cpu_ticks_from_proc_stat() {
        let stat = "4242 (herald (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 3";
        assert_eq!(cpu_ticks(stat), Some(287));
        assert_eq!(cpu_ticks("4242 (herald) S 1"), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("procfs");
        assert!(cpu_ticks(&own).is_some());
    }

    #[test]
    fn reads_our_own_resident_set() {
        let own = std::fs::read_to_string("/proc/self/status").expect("procfs");
        assert!(vm_rss_kib(&own).is_some_and(|kib| kib > 0));
    }
}

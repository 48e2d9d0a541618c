//! A fresh PostgreSQL database per test. With `DATABASE_URL` set, databases are
//! created on that server; otherwise one private throwaway server is started
//! from the local PostgreSQL binaries for the whole test run, so these tests
//! never skip silently. Databases are dropped when the test ends; the private
//! server stops and its directory is removed when the test process exits, even
//! if it is killed.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use reqwest::Url;
use sqlx::{Connection, PgConnection};

/// A database that exists for one test.
pub struct TestDatabase {
    pub url: String,
    server_url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let server_url = server_url().to_owned();
        let name = format!("herald_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = connect_with_retry(&server_url).await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        let mut url = Url::parse(&server_url).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        Self {
            url: url.to_string(),
            server_url,
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server_url = self.server_url.clone();
        let name = self.name.clone();
        // Drop runs inside a test's runtime, where blocking on async is not
        // allowed: use a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&server_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

async fn connect_with_retry(url: &str) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match PgConnection::connect(url).await {
            Ok(connection) => return connection,
            // The server may still be starting up.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => panic!("cannot connect to the test PostgreSQL at {url}: {error}"),
        }
    }
}

/// The server to create test databases on (DATABASE_URL, or the private one).
pub fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => url,
        _ => start_private_server(),
    })
}

/// Starts a throwaway PostgreSQL on a free loopback port, owned by a shell that
/// stops it and removes its directory as soon as this process's end of its
/// stdin closes (that is, when the test process exits, however it exits).
fn start_private_server() -> String {
    let bin = postgres_bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("herald-test-pg-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let port = free_port();
    let as_root = is_root();
    if as_root {
        // PostgreSQL refuses to run as root: hand the directory to `postgres`.
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir));
    }
    let data = dir.join("data");
    let initdb = format!(
        "{} -D '{}' -U postgres --auth=trust --no-sync -E UTF8 >/dev/null",
        bin.join("initdb").display(),
        data.display()
    );
    run(&mut shell(as_root, &initdb));
    let script = format!(
        "{postgres} -D '{data}' -k '{dir}' -h 127.0.0.1 -p {port} -c fsync=off -c synchronous_commit=off \
           -c max_connections=300 >'{dir}/log' 2>&1 &
         pid=$!
         read _
         kill -INT $pid; wait $pid; rm -rf '{dir}'",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let mut keeper = shell(as_root, &script)
        .stdin(Stdio::piped())
        .spawn()
        .expect("start the private PostgreSQL");
    // Keep the write end open for the life of the process; leaking the child
    // handle is deliberate.
    let stdin = keeper.stdin.take().expect("stdin");
    std::mem::forget(stdin);
    std::mem::forget(keeper);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the private PostgreSQL did not start; see {}/log",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

fn shell(as_root: bool, script: &str) -> Command {
    if as_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", "sh", "-c", script]);
        command
    } else {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }
}

fn run(command: &mut Command) {
    let status = command.status().expect("run a PostgreSQL setup command");
    assert!(status.success(), "{command:?} failed: {status}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// Where `initdb` and `postgres` are: on PATH, or Debian's versioned directory.
fn postgres_bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        && out.status.success()
    {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // Resolve symlinks so that `postgres` is found beside `initdb`.
        let real = std::fs::canonicalize(&path).unwrap_or(path);
        if let Some(dir) = real.parent() {
            return dir.to_path_buf();
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|dir| dir.join("initdb").exists())
        .expect("PostgreSQL server binaries (initdb, postgres) are needed: install the postgresql package or set DATABASE_URL")
}

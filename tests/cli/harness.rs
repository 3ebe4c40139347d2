//! A small harness in the spirit of ripgrep's `TestCommand`: each test gets its own temporary
//! directory, and a failure prints the command, its output and the directory listing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// `twotower prepare` of `items.csv` and `events.csv` in a test's directory into `data`.
pub const PREPARE_FILES: [&str; 9] = [
    "prepare",
    "--dataset",
    "files",
    "--items",
    "items.csv",
    "--events",
    "events.csv",
    "--out",
    "data",
];

/// The smallest model that still trains meaningfully: a training config for `--config`.
pub const TINY_MODEL: &str = "epochs = 1\nbatch_size = 128\nwarmup_steps = 5\n[tower]\ndim = 16\ntoken_dim = 16\ngru_hidden = 16\nitem_hidden = [32]\nuser_hidden = [32]\nhistory_len = 10\n";

/// A loopback port nobody listens on (right now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `twotower serve` process, killed if a test fails before stopping it.
pub struct Server(pub Child);

impl Server {
    /// Sends SIGTERM and waits (at most 30 s) for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let kill = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let started = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `twotower serve ARGS --addr 127.0.0.1:PORT` in `dir` and waits (at most 60 s) until
/// `twotower health` says SERVING. Returns the server and its `http://` address.
pub fn start_server(dir: &Dir, args: &[&str]) -> (Server, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{addr}");
    let child = Command::new(env!("CARGO_BIN_EXE_twotower"))
        .arg("serve")
        .args(args)
        .args(["--addr", &addr])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let started = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_twotower"))
            .args(["health", "--addr", &url])
            .output()
            .unwrap();
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
            return (server, url);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "server never became healthy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(status) = server.0.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut pipe) = server.0.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
            }
            panic!("server exited early: {status}\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A temporary working directory and the `twotower` binary under test.
pub struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            tmp: tempfile::tempdir().expect("temporary directory"),
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// A `twotower` command running in this directory.
    pub fn command(&self, args: &[&str]) -> TestCommand {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twotower"));
        cmd.args(args)
            .current_dir(self.path())
            .env("RUST_LOG", "warn");
        TestCommand {
            cmd,
            dir: self.path().to_path_buf(),
        }
    }
}

pub struct TestCommand {
    cmd: Command,
    dir: PathBuf,
}

impl TestCommand {
    fn run(&mut self) -> Output {
        self.cmd.output().expect("twotower binary runs")
    }

    fn describe(&self, out: &Output) -> String {
        let listing: Vec<String> = walk(&self.dir)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "command: {:?}\nstatus: {}\nstdout:\n{}\nstderr:\n{}\nfiles:\n{}",
            self.cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            listing.join("\n")
        )
    }

    /// Runs, asserts success, returns stdout.
    pub fn ok(mut self) -> String {
        let out = self.run();
        assert!(
            out.status.success(),
            "expected success\n{}",
            self.describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs, asserts failure, returns stderr.
    pub fn fails(mut self) -> String {
        let out = self.run();
        assert!(
            !out.status.success(),
            "expected failure\n{}",
            self.describe(&out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

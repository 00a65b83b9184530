//! A private NATS server with JetStream (Debian's `nats-server`), and an independent reader of
//! its streams (`tests/consumers/nats_read.py`, nats-py from PyPI: not the relay's client).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, repo_root, wait_listening};

/// `nats-server -js` on a free port of 127.0.0.1 with its store in a temp dir; it can be killed
/// and started again on the same port and store.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// `--auth`: clients must present this token.
    token: Option<String>,
}

fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nats-server")
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with_token(None)
    }

    /// A server that admits only clients presenting `token` (`--auth`).
    pub fn start_with_token(token: Option<&str>) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("nats-")
            .tempdir()
            .expect("temp dir");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            dir,
            token: token.map(str::to_owned),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("log");
        let mut cmd = Command::new(nats_server_bin());
        if let Some(token) = &self.token {
            cmd.args(["--auth", token]);
        }
        let child = cmd
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (apt-get install nats-server; scripts/setup)");
        self.child = Some(child);
        wait_listening(self.port, "nats-server");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// kill -9, then a new server on the same port and store.
    pub fn restart(&mut self, down_for: Duration) {
        self.kill();
        std::thread::sleep(down_for);
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Every message of `stream`, in stream order, read by nats-py.
    pub fn messages(&self, stream: &str) -> Vec<NatsMessage> {
        let out = Command::new("python3")
            .arg(repo_root().join("tests/consumers/nats_read.py"))
            .args([&self.url(), stream])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "nats_read.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One stored message.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct NatsMessage {
    pub seq: u64,
    pub subject: String,
    pub headers: std::collections::HashMap<String, String>,
    pub data: String,
}

impl NatsMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

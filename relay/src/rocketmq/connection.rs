//! One TCP connection to a RocketMQ name server or broker: requests matched to responses by
//! `opaque`, one-way sends, and the requests the peer sends us (a broker's check-backs arrive on
//! the connection its producer heartbeat came on).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::acl::Credentials;
use super::remoting::Command;

type Pending = Arc<Mutex<HashMap<i32, oneshot::Sender<Command>>>>;

/// How long a frame may wait for room in the outgoing queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A live connection; cheap to clone. Dropping every clone closes it.
#[derive(Clone)]
pub struct Connection {
    addr: String,
    out: mpsc::Sender<Bytes>,
    pending: Pending,
    next_opaque: Arc<AtomicI32>,
    closed: Arc<AtomicBool>,
    /// ACL: every request leaving on this connection is signed with these.
    credentials: Option<Arc<Credentials>>,
}

impl Connection {
    /// Connects to `addr`; requests from the peer go to `incoming` (or are dropped). With
    /// `credentials` every request sent is ACL-signed.
    pub async fn open(
        addr: &str,
        incoming: Option<mpsc::Sender<(Connection, Command)>>,
        timeout: Duration,
        credentials: Option<Credentials>,
    ) -> Result<Connection, String> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to RocketMQ at {addr} timed out"))?
            .map_err(|e| format!("cannot connect to RocketMQ at {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (out, mut out_rx) = mpsc::channel::<Bytes>(256);
        let conn = Connection {
            addr: addr.to_owned(),
            out,
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_opaque: Arc::new(AtomicI32::new(1)),
            closed: Arc::new(AtomicBool::new(false)),
            credentials: credentials.map(Arc::new),
        };
        let closed = conn.closed.clone();
        // The reader stops when the writer does (every user gone, or the socket broken), even
        // if the peer never closes its side.
        let writer_done = Arc::new(tokio::sync::Notify::new());
        let done = writer_done.clone();
        tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
            }
            closed.store(true, Ordering::Release);
            done.notify_one();
        });
        // The reader holds only a weak view: the connection lives while a user holds it.
        let pending = conn.pending.clone();
        let closed = conn.closed.clone();
        let weak_out = conn.out.downgrade();
        let peer = conn.addr.clone();
        let opaque = conn.next_opaque.clone();
        let credentials = conn.credentials.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            'read: loop {
                loop {
                    match Command::decode(&mut buf) {
                        Ok(Some(cmd)) if cmd.is_response() => {
                            let waiter =
                                pending.lock().ok().and_then(|mut p| p.remove(&cmd.opaque));
                            if let Some(w) = waiter {
                                let _ = w.send(cmd);
                            }
                        }
                        Ok(Some(cmd)) => {
                            let (Some(incoming), Some(out)) = (&incoming, weak_out.upgrade())
                            else {
                                continue;
                            };
                            let me = Connection {
                                addr: peer.clone(),
                                out,
                                pending: pending.clone(),
                                next_opaque: opaque.clone(),
                                closed: closed.clone(),
                                credentials: credentials.clone(),
                            };
                            // Never block reading responses on a slow consumer: a dropped
                            // check-back is asked again by the broker.
                            if let Err(e) = incoming.try_send((me, cmd)) {
                                if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                                    break 'read;
                                }
                                tracing::warn!(peer = %peer, "too many RocketMQ requests queued; dropped one (the broker asks again)");
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(peer = %peer, error = %e, "bad frame from RocketMQ; closing the connection");
                            break 'read;
                        }
                    }
                }
                tokio::select! {
                    read = reader.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = writer_done.notified() => break,
                }
            }
            closed.store(true, Ordering::Release);
            if let Ok(mut p) = pending.lock() {
                p.clear(); // wakes every waiter with an error
            }
        });
        Ok(conn)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.out.is_closed()
    }

    /// Sends `cmd` and waits for its response.
    pub async fn request(&self, cmd: Command, timeout: Duration) -> Result<Command, String> {
        self.start(cmd, timeout).await?.await
    }

    /// Queues `cmd` (frames leave in the order of these calls) and returns a future that waits
    /// up to `timeout` for its response: requests can be pipelined without being reordered.
    pub async fn start(
        &self,
        mut cmd: Command,
        timeout: Duration,
    ) -> Result<impl Future<Output = Result<Command, String>> + Send + 'static + use<>, String>
    {
        let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        cmd.opaque = opaque;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(opaque, tx);
        }
        if let Err(e) = self.send_frame(&cmd).await {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&opaque);
            }
            return Err(e);
        }
        let pending = self.pending.clone();
        let addr = self.addr.clone();
        let code = cmd.code;
        Ok(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(_)) => Err(format!("RocketMQ at {addr} closed the connection")),
                Err(_) => {
                    if let Ok(mut p) = pending.lock() {
                        p.remove(&opaque);
                    }
                    Err(format!(
                        "RocketMQ at {addr} did not answer request code {code} within {} ms",
                        timeout.as_millis()
                    ))
                }
            }
        })
    }

    /// Sends `cmd` one-way (no response).
    pub async fn oneway(&self, cmd: Command) -> Result<(), String> {
        let mut cmd = cmd.oneway();
        cmd.opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        self.send_frame(&cmd).await
    }

    /// Queues a frame (a request signed when the connection has credentials); a peer that stops
    /// reading for [`SEND_TIMEOUT`] closes the connection.
    async fn send_frame(&self, cmd: &Command) -> Result<(), String> {
        let frame = match &self.credentials {
            Some(credentials) if !cmd.is_response() => {
                let mut signed = cmd.clone();
                credentials.sign(&mut signed)?;
                signed.encode()?
            }
            _ => cmd.encode()?,
        };
        match tokio::time::timeout(SEND_TIMEOUT, self.out.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(format!(
                "the connection to RocketMQ at {} is closed",
                self.addr
            )),
            Err(_) => {
                self.closed.store(true, Ordering::Release);
                Err(format!(
                    "RocketMQ at {} has not read what was sent for {} s; closing the connection",
                    self.addr,
                    SEND_TIMEOUT.as_secs()
                ))
            }
        }
    }
}

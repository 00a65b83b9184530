//! The messages carried inside CopyData once `START_REPLICATION` has switched the connection to
//! CopyBoth mode: XLogData and primary keepalives from the server, standby status updates from us.
//!
//! Pure codec: bytes in, values out, and the reverse. No I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use super::lsn::Lsn;
use super::wire::{DecodeError, WireReader};

/// A message the server sends while streaming.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// A chunk of decoded WAL: here, one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// The server is alive; `wal_end` is how far it has sent. `reply_requested` asks for a status
    /// update right away (the server's `wal_sender_timeout` is near).
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

impl ServerMessage {
    pub fn decode(body: Bytes) -> Result<ServerMessage, DecodeError> {
        let mut r = WireReader::new(body, "replication CopyData message");
        match r.u8("replication message tag")? {
            b'w' => Ok(ServerMessage::XLogData {
                wal_start: Lsn(r.u64("XLogData start")?),
                wal_end: Lsn(r.u64("XLogData end")?),
                send_time: r.i64("XLogData send time")?,
                data: r.rest(),
            }),
            b'k' => Ok(ServerMessage::Keepalive {
                wal_end: Lsn(r.u64("keepalive WAL end")?),
                send_time: r.i64("keepalive send time")?,
                reply_requested: r.u8("keepalive reply flag")? != 0,
            }),
            other => Err(DecodeError::new(
                "replication CopyData message",
                format!("unknown tag {:?} (0x{other:02x})", other as char),
            )),
        }
    }
}

/// Our report to the server: everything up to `flush` is durably handled and may be released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub client_time: i64,
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// A status reporting `flushed` as written, flushed and applied, stamped with the current time.
    pub fn now(flushed: Lsn) -> Self {
        StandbyStatusUpdate {
            write: flushed,
            flush: flushed,
            apply: flushed,
            client_time: pg_epoch_micros(SystemTime::now()),
            reply_requested: false,
        }
    }

    /// Writes the CopyData payload (without the CopyData frame).
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.client_time);
        out.put_u8(u8::from(self.reply_requested));
    }
}

/// Seconds between the Unix epoch and the Postgres epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET: Duration = Duration::from_secs(946_684_800);

/// Microseconds since 2000-01-01 UTC, the clock Postgres uses on the replication wire.
pub fn pg_epoch_micros(t: SystemTime) -> i64 {
    let since_unix = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let since_pg = since_unix.saturating_sub(PG_EPOCH_OFFSET);
    i64::try_from(since_pg.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_xlogdata_without_copying_payload() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(10);
        b.put_u64(20);
        b.put_i64(30);
        b.put_slice(b"Bpayload");
        let msg = ServerMessage::decode(b.freeze()).unwrap();
        assert_eq!(
            msg,
            ServerMessage::XLogData {
                wal_start: Lsn(10),
                wal_end: Lsn(20),
                send_time: 30,
                data: Bytes::from_static(b"Bpayload")
            }
        );
    }

    #[test]
    fn decodes_keepalive() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(0x2_0000_0000);
        b.put_i64(5);
        b.put_u8(1);
        assert_eq!(
            ServerMessage::decode(b.freeze()).unwrap(),
            ServerMessage::Keepalive {
                wal_end: Lsn(0x2_0000_0000),
                send_time: 5,
                reply_requested: true
            }
        );
    }

    #[test]
    fn rejects_unknown_and_truncated() {
        assert!(ServerMessage::decode(Bytes::from_static(b"x")).is_err());
        assert!(ServerMessage::decode(Bytes::from_static(b"k\0\0")).is_err());
        assert!(ServerMessage::decode(Bytes::new()).is_err());
    }

    #[test]
    fn encodes_status_update_in_wire_layout() {
        let mut out = BytesMut::new();
        StandbyStatusUpdate {
            write: Lsn(1),
            flush: Lsn(2),
            apply: Lsn(3),
            client_time: 4,
            reply_requested: true,
        }
        .encode(&mut out);
        assert_eq!(out.len(), 34);
        assert_eq!(out[0], b'r');
        assert_eq!(&out[1..9], &1u64.to_be_bytes());
        assert_eq!(&out[9..17], &2u64.to_be_bytes());
        assert_eq!(&out[17..25], &3u64.to_be_bytes());
        assert_eq!(&out[25..33], &4i64.to_be_bytes());
        assert_eq!(out[33], 1);
    }

    #[test]
    fn pg_epoch_is_2000() {
        let t = UNIX_EPOCH + Duration::from_secs(946_684_800 + 2);
        assert_eq!(pg_epoch_micros(t), 2_000_000);
    }
}

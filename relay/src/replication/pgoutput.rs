//! Decoder for the `pgoutput` logical decoding plugin, protocol version 1.
//!
//! Input is the payload of one XLogData message; output is a typed [`PgOutput`] event. The decoder
//! is pure (bytes in, value out), never touches a socket and never panics on malformed input: every
//! problem is a [`DecodeError`]. Column values keep pointing into the received buffer (no copies).
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>

use bytes::Bytes;

use super::lsn::Lsn;
use super::wire::{DecodeError, WireReader};

/// One logical replication message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutput {
    Begin(Begin),
    Commit(Commit),
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: Tuple,
    },
    Update {
        relation_id: u32,
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation_id: u32,
        old: Tuple,
    },
    Truncate {
        options: u8,
        relation_ids: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the transaction is handled.
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// A table's shape, sent before the first change to it and again after every `ALTER TABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1 set: part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One value of a row, in Postgres text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value that did not change (only in updates; inserts always carry values).
    UnchangedToast,
    Text(Bytes),
}

/// A row: one value per column of its [`Relation`], in column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<TupleValue>);

impl PgOutput {
    /// Decodes one pgoutput message.
    pub fn decode(buf: Bytes) -> Result<PgOutput, DecodeError> {
        let mut r = WireReader::new(buf, "pgoutput message");
        let tag = r.u8("message tag")?;
        let msg = match tag {
            b'B' => PgOutput::Begin(Begin {
                final_lsn: Lsn(r.u64("begin final LSN")?),
                commit_time: r.i64("begin commit time")?,
                xid: r.u32("begin xid")?,
            }),
            b'C' => PgOutput::Commit(Commit {
                flags: r.u8("commit flags")?,
                commit_lsn: Lsn(r.u64("commit LSN")?),
                end_lsn: Lsn(r.u64("commit end LSN")?),
                commit_time: r.i64("commit time")?,
            }),
            b'O' => PgOutput::Origin {
                commit_lsn: Lsn(r.u64("origin commit LSN")?),
                name: r.cstr("origin name")?,
            },
            b'R' => PgOutput::Relation(decode_relation(&mut r)?),
            b'Y' => PgOutput::Type {
                oid: r.u32("type oid")?,
                namespace: r.cstr("type namespace")?,
                name: r.cstr("type name")?,
            },
            b'I' => {
                let relation_id = r.u32("insert relation id")?;
                expect_tag(&mut r, b'N', "insert new-tuple marker")?;
                PgOutput::Insert {
                    relation_id,
                    new: decode_tuple(&mut r)?,
                }
            }
            b'U' => {
                let relation_id = r.u32("update relation id")?;
                let mut old = None;
                let mut marker = r.u8("update tuple marker")?;
                if marker == b'K' || marker == b'O' {
                    old = Some(decode_tuple(&mut r)?);
                    marker = r.u8("update new-tuple marker")?;
                }
                if marker != b'N' {
                    return Err(DecodeError::new(
                        "pgoutput message",
                        format!("update has tuple marker {:?}, expected 'N'", marker as char),
                    ));
                }
                PgOutput::Update {
                    relation_id,
                    old,
                    new: decode_tuple(&mut r)?,
                }
            }
            b'D' => {
                let relation_id = r.u32("delete relation id")?;
                let marker = r.u8("delete tuple marker")?;
                if marker != b'K' && marker != b'O' {
                    return Err(DecodeError::new(
                        "pgoutput message",
                        format!(
                            "delete has tuple marker {:?}, expected 'K' or 'O'",
                            marker as char
                        ),
                    ));
                }
                PgOutput::Delete {
                    relation_id,
                    old: decode_tuple(&mut r)?,
                }
            }
            b'T' => {
                let n = r.i32("truncate relation count")?;
                let options = r.u8("truncate options")?;
                let n = usize::try_from(n).map_err(|_| {
                    DecodeError::new("pgoutput message", "negative truncate relation count")
                })?;
                let mut relation_ids = Vec::with_capacity(n.min(r.remaining() / 4));
                for _ in 0..n {
                    relation_ids.push(r.u32("truncate relation id")?);
                }
                PgOutput::Truncate {
                    options,
                    relation_ids,
                }
            }
            b'M' => {
                let flags = r.u8("message flags")?;
                let lsn = Lsn(r.u64("message LSN")?);
                let prefix = r.cstr("message prefix")?;
                let len = r.i32("message length")?;
                let len = usize::try_from(len)
                    .map_err(|_| DecodeError::new("pgoutput message", "negative message length"))?;
                PgOutput::Message {
                    transactional: flags & 1 == 1,
                    lsn,
                    prefix,
                    content: r.bytes(len, "message content")?,
                }
            }
            other => {
                return Err(DecodeError::new(
                    "pgoutput message",
                    format!(
                        "unknown message tag {:?} (0x{other:02x}); the relay speaks pgoutput protocol version 1",
                        other as char
                    ),
                ));
            }
        };
        Ok(msg)
    }
}

fn expect_tag(r: &mut WireReader, want: u8, what: &str) -> Result<(), DecodeError> {
    let got = r.u8(what)?;
    if got != want {
        return Err(DecodeError::new(
            "pgoutput message",
            format!("{what} is {:?}, expected {:?}", got as char, want as char),
        ));
    }
    Ok(())
}

fn decode_relation(r: &mut WireReader) -> Result<Relation, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstr("relation namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("relation replica identity")?;
    let n = r.i16("relation column count")?;
    let n = usize::try_from(n)
        .map_err(|_| DecodeError::new("pgoutput message", "negative relation column count"))?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        columns.push(RelationColumn {
            flags: r.u8("column flags")?,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn decode_tuple(r: &mut WireReader) -> Result<Tuple, DecodeError> {
    let n = r.i16("tuple column count")?;
    let n = usize::try_from(n)
        .map_err(|_| DecodeError::new("pgoutput message", "negative tuple column count"))?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let value = match r.u8("tuple value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' | b'b' => {
                let len = r.i32("tuple value length")?;
                let len = usize::try_from(len).map_err(|_| {
                    DecodeError::new("pgoutput message", "negative tuple value length")
                })?;
                TupleValue::Text(r.bytes(len, "tuple value")?)
            }
            other => {
                return Err(DecodeError::new(
                    "pgoutput message",
                    format!("unknown tuple value kind {:?}", other as char),
                ));
            }
        };
        values.push(value);
    }
    Ok(Tuple(values))
}

/// Builders for pgoutput bytes, shared by the unit tests of the decoder and of the pipeline.
#[cfg(test)]
pub mod encode {
    use super::*;
    use bytes::{BufMut, BytesMut};

    pub fn begin(final_lsn: u64, xid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(final_lsn);
        b.put_i64(1_000);
        b.put_u32(xid);
        b.freeze()
    }

    pub fn commit(commit_lsn: u64, end_lsn: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(commit_lsn);
        b.put_u64(end_lsn);
        b.put_i64(1_000);
        b.freeze()
    }

    pub fn relation(id: u32, namespace: &str, name: &str, columns: &[&str]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(id);
        b.put_slice(namespace.as_bytes());
        b.put_u8(0);
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u8(b'd');
        b.put_i16(columns.len() as i16);
        for (i, c) in columns.iter().enumerate() {
            b.put_u8(u8::from(i == 0));
            b.put_slice(c.as_bytes());
            b.put_u8(0);
            b.put_u32(25);
            b.put_i32(-1);
        }
        b.freeze()
    }

    pub fn tuple(b: &mut BytesMut, values: &[Option<&str>]) {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_u8(b'n'),
                Some(s) => {
                    b.put_u8(b't');
                    b.put_i32(s.len() as i32);
                    b.put_slice(s.as_bytes());
                }
            }
        }
    }

    pub fn insert(relation_id: u32, values: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(relation_id);
        b.put_u8(b'N');
        tuple(&mut b, values);
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;
    use bytes::{BufMut, BytesMut};

    #[test]
    fn decodes_begin_and_commit() {
        assert_eq!(
            PgOutput::decode(begin(0x1_0000_0010, 42)).unwrap(),
            PgOutput::Begin(Begin {
                final_lsn: Lsn(0x1_0000_0010),
                commit_time: 1_000,
                xid: 42
            })
        );
        assert_eq!(
            PgOutput::decode(commit(100, 148)).unwrap(),
            PgOutput::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(148),
                commit_time: 1_000
            })
        );
    }

    #[test]
    fn decodes_relation_and_insert() {
        let PgOutput::Relation(rel) =
            PgOutput::decode(relation(16384, "public", "outbox", &["id", "payload"])).unwrap()
        else {
            panic!("not a relation")
        };
        assert_eq!(rel.id, 16384);
        assert_eq!(rel.namespace, "public");
        assert_eq!(rel.name, "outbox");
        assert_eq!(rel.columns.len(), 2);
        assert_eq!(rel.columns[1].name, "payload");
        assert_eq!(rel.columns[0].flags, 1);

        let msg = PgOutput::decode(insert(16384, &[Some("abc"), None])).unwrap();
        assert_eq!(
            msg,
            PgOutput::Insert {
                relation_id: 16384,
                new: Tuple(vec![
                    TupleValue::Text(Bytes::from_static(b"abc")),
                    TupleValue::Null
                ])
            }
        );
    }

    #[test]
    fn accepts_update_delete_truncate_type_origin_message() {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(7);
        b.put_u8(b'O');
        tuple(&mut b, &[Some("old")]);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b'u');
        let PgOutput::Update { old, new, .. } = PgOutput::decode(b.freeze()).unwrap() else {
            panic!("not an update")
        };
        assert!(old.is_some());
        assert_eq!(new.0, vec![TupleValue::UnchangedToast]);

        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(7);
        b.put_u8(b'N');
        tuple(&mut b, &[Some("new")]);
        assert!(matches!(
            PgOutput::decode(b.freeze()).unwrap(),
            PgOutput::Update { old: None, .. }
        ));

        let mut b = BytesMut::new();
        b.put_u8(b'D');
        b.put_u32(7);
        b.put_u8(b'K');
        tuple(&mut b, &[Some("k")]);
        assert!(matches!(
            PgOutput::decode(b.freeze()).unwrap(),
            PgOutput::Delete { relation_id: 7, .. }
        ));

        let mut b = BytesMut::new();
        b.put_u8(b'T');
        b.put_i32(2);
        b.put_u8(1);
        b.put_u32(7);
        b.put_u32(8);
        assert_eq!(
            PgOutput::decode(b.freeze()).unwrap(),
            PgOutput::Truncate {
                options: 1,
                relation_ids: vec![7, 8]
            }
        );

        let mut b = BytesMut::new();
        b.put_u8(b'Y');
        b.put_u32(99);
        b.put_slice(b"public\0mood\0");
        assert!(matches!(
            PgOutput::decode(b.freeze()).unwrap(),
            PgOutput::Type { oid: 99, .. }
        ));

        let mut b = BytesMut::new();
        b.put_u8(b'O');
        b.put_u64(5);
        b.put_slice(b"node_a\0");
        assert!(matches!(
            PgOutput::decode(b.freeze()).unwrap(),
            PgOutput::Origin { ref name, .. } if name == "node_a"
        ));

        let mut b = BytesMut::new();
        b.put_u8(b'M');
        b.put_u8(1);
        b.put_u64(77);
        b.put_slice(b"app\0");
        b.put_i32(5);
        b.put_slice(b"hello");
        assert_eq!(
            PgOutput::decode(b.freeze()).unwrap(),
            PgOutput::Message {
                transactional: true,
                lsn: Lsn(77),
                prefix: "app".into(),
                content: Bytes::from_static(b"hello")
            }
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let full = insert(1, &[Some("abcdef"), None]);
        // Every strict prefix of a valid message must fail cleanly.
        for cut in 0..full.len() {
            assert!(PgOutput::decode(full.slice(..cut)).is_err(), "prefix {cut}");
        }
        assert!(PgOutput::decode(Bytes::from_static(b"Z")).is_err());
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(-5);
        assert!(PgOutput::decode(b.freeze()).is_err());
    }

    #[test]
    fn values_share_the_input_buffer() {
        let buf = insert(1, &[Some("payload-bytes")]);
        let PgOutput::Insert { new, .. } = PgOutput::decode(buf.clone()).unwrap() else {
            panic!()
        };
        let TupleValue::Text(v) = &new.0[0] else {
            panic!()
        };
        let inside = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        assert!(inside.contains(&(v.as_ptr() as usize)));
    }
}

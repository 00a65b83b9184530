//! RocketMQ messages as stored and sent by brokers (`MessageDecoder` layout), and the properties
//! string (`name\u{1}value\u{2}…`).

use std::collections::HashMap;

use bytes::{Buf, Bytes};

use super::remoting::need;

/// Property names used here.
pub mod prop {
    /// The message key(s), space-separated.
    pub const KEYS: &str = "KEYS";
    /// The message tag (consumers filter by it); the relay puts the event type here.
    pub const TAGS: &str = "TAGS";
    /// The relay's own: the oracle key of a half message the RocketMQ sink sent,
    /// `<outbox id>:<unique message id>`. Check-backs look it up before `rocketmq.key_property`.
    pub const OUTBOX_TX_KEY: &str = "OUTBOX_TX_KEY";
    /// The client-made unique message id; RocketMQ's transaction id for half messages.
    pub const UNIQ_KEY: &str = "UNIQ_CLIENT_MESSAGE_ID_KEYIDX";
    /// `true` on a transactional (half) message.
    pub const TRAN_MSG: &str = "TRAN_MSG";
    /// The producer group of a half message: where the broker sends check-backs.
    pub const PGROUP: &str = "PGROUP";
    /// The real topic of a half message (stored under RMQ_SYS_TRANS_HALF_TOPIC).
    pub const REAL_TOPIC: &str = "REAL_TOPIC";
    /// How many times the broker has checked back on a half message.
    pub const TRANSACTION_CHECK_TIMES: &str = "TRANSACTION_CHECK_TIMES";
}

/// sysFlag bits.
pub mod sysflag {
    pub const COMPRESSED: i32 = 0x1;
    pub const TRANSACTION_PREPARED: i32 = 0x1 << 2;
    pub const BORNHOST_V6: i32 = 0x1 << 4;
    pub const STOREHOST_V6: i32 = 0x1 << 5;
}

const NAME_SEP: char = '\u{1}';
const PAIR_SEP: char = '\u{2}';

/// `name\u{1}value\u{2}` for each property.
pub fn encode_properties<'a>(props: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = String::new();
    for (k, v) in props {
        s.push_str(k);
        s.push(NAME_SEP);
        s.push_str(v);
        s.push(PAIR_SEP);
    }
    s
}

pub fn decode_properties(s: &str) -> HashMap<String, String> {
    s.split(PAIR_SEP)
        .filter_map(|pair| pair.split_once(NAME_SEP))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A stored message, as a broker sends it in a check-back or a pull.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageExt {
    pub topic: String,
    pub queue_id: i32,
    pub queue_offset: i64,
    pub commit_log_offset: i64,
    pub sys_flag: i32,
    pub born_timestamp: i64,
    pub reconsume_times: i32,
    pub prepared_transaction_offset: i64,
    pub body: Bytes,
    pub properties: HashMap<String, String>,
}

impl MessageExt {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(String::as_str)
    }

    /// The first of the space-separated `KEYS`.
    pub fn key(&self) -> Option<&str> {
        self.property(prop::KEYS)
            .and_then(|k| k.split(' ').find(|s| !s.is_empty()))
    }
}

/// Magic codes: v1 stores the topic length in one byte, v2 in two.
const MAGIC_V1: i32 = -626_843_481;
const MAGIC_V2: i32 = -626_843_477;

/// Decodes every message in `buf` (a pull response body holds several back to back).
pub fn decode_messages(mut buf: Bytes) -> Result<Vec<MessageExt>, String> {
    let mut out = Vec::new();
    while buf.has_remaining() {
        if buf.remaining() < 4 {
            return Err("truncated message".into());
        }
        let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if size < 4 || size as usize > buf.remaining() {
            return Err(format!(
                "message size {size} does not fit the {} bytes left",
                buf.remaining()
            ));
        }
        let one = buf.split_to(size as usize);
        out.push(decode_message(one)?);
    }
    Ok(out)
}

/// Decodes one stored message.
pub fn decode_message(mut b: Bytes) -> Result<MessageExt, String> {
    need(&b, 4 + 4 + 4 + 4 + 4 + 8 + 8 + 4 + 8, "the fixed header")?;
    let _total = b.get_i32();
    let magic = b.get_i32();
    if magic != MAGIC_V1 && magic != MAGIC_V2 {
        return Err(format!("unknown message magic code {magic}"));
    }
    let _body_crc = b.get_i32();
    let queue_id = b.get_i32();
    let _flag = b.get_i32();
    let queue_offset = b.get_i64();
    let commit_log_offset = b.get_i64();
    let sys_flag = b.get_i32();
    let born_timestamp = b.get_i64();
    let born_host = if sys_flag & sysflag::BORNHOST_V6 != 0 {
        16
    } else {
        4
    } + 4;
    need(&b, born_host + 8, "the born host")?;
    b.advance(born_host);
    let _store_timestamp = b.get_i64();
    let store_host = if sys_flag & sysflag::STOREHOST_V6 != 0 {
        16
    } else {
        4
    } + 4;
    need(&b, store_host + 4 + 8 + 4, "the store host")?;
    b.advance(store_host);
    let reconsume_times = b.get_i32();
    let prepared_transaction_offset = b.get_i64();
    let body_len = b.get_i32().max(0) as usize;
    need(&b, body_len, "the body")?;
    let body = b.split_to(body_len);
    let topic_len = if magic == MAGIC_V2 {
        need(&b, 2, "the topic length")?;
        b.get_u16() as usize
    } else {
        need(&b, 1, "the topic length")?;
        b.get_u8() as usize
    };
    need(&b, topic_len, "the topic")?;
    let topic = String::from_utf8_lossy(&b.split_to(topic_len)).into_owned();
    let properties = if b.remaining() >= 2 {
        let len = b.get_u16() as usize;
        need(&b, len, "the properties")?;
        decode_properties(&String::from_utf8_lossy(&b.split_to(len)))
    } else {
        HashMap::new()
    };
    Ok(MessageExt {
        topic,
        queue_id,
        queue_offset,
        commit_log_offset,
        sys_flag,
        born_timestamp,
        reconsume_times,
        prepared_transaction_offset,
        body,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn stored(topic: &str, body: &[u8], props: &str, magic: i32, sys_flag: i32) -> BytesMut {
        let mut m = BytesMut::new();
        m.put_i32(0); // total, patched below
        m.put_i32(magic);
        m.put_i32(0);
        m.put_i32(3); // queue id
        m.put_i32(0);
        m.put_i64(17); // queue offset
        m.put_i64(4096); // commit log offset
        m.put_i32(sys_flag);
        m.put_i64(1_700_000_000_000);
        m.put_slice(&[127, 0, 0, 1, 0, 0, 0x27, 0x10]);
        m.put_i64(1_700_000_000_001);
        m.put_slice(&[127, 0, 0, 1, 0, 0, 0x27, 0x11]);
        m.put_i32(0);
        m.put_i64(0);
        m.put_i32(body.len() as i32);
        m.put_slice(body);
        if magic == MAGIC_V2 {
            m.put_u16(topic.len() as u16);
        } else {
            m.put_u8(topic.len() as u8);
        }
        m.put_slice(topic.as_bytes());
        m.put_u16(props.len() as u16);
        m.put_slice(props.as_bytes());
        let len = m.len() as i32;
        m[0..4].copy_from_slice(&len.to_be_bytes());
        m
    }

    #[test]
    fn stored_messages_decode_in_both_versions() {
        let props = encode_properties([("KEYS", "order-1 other"), ("TRAN_MSG", "true")]);
        let mut two = stored("orders", b"{}", &props, MAGIC_V1, 0);
        two.extend_from_slice(&stored(
            "orders-v2",
            b"x",
            "",
            MAGIC_V2,
            sysflag::TRANSACTION_PREPARED,
        ));
        let msgs = decode_messages(two.freeze()).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].topic, "orders");
        assert_eq!(msgs[0].key(), Some("order-1"));
        assert_eq!(msgs[0].property(prop::TRAN_MSG), Some("true"));
        assert_eq!(
            (
                msgs[0].queue_id,
                msgs[0].queue_offset,
                msgs[0].commit_log_offset
            ),
            (3, 17, 4096)
        );
        assert_eq!(&msgs[0].body[..], b"{}");
        assert_eq!(msgs[1].topic, "orders-v2");
        assert_eq!(msgs[1].key(), None);
    }

    #[test]
    fn truncated_or_foreign_bytes_are_errors() {
        let m = stored("t", b"body", "", MAGIC_V1, 0).freeze();
        for cut in [3, 10, 40, m.len() - 3] {
            assert!(decode_messages(m.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = stored("t", b"", "", 12345, 0);
        bad[4..8].copy_from_slice(&12345i32.to_be_bytes());
        assert!(decode_messages(bad.freeze()).is_err());
    }
}

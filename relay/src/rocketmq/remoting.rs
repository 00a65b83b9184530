//! RocketMQ's remoting protocol: the frames and commands spoken over TCP with name servers and
//! brokers (4.x/5.x "remoting", not the 5.x gRPC proxy).
//!
//! A frame is `[total length: u32][serialize type: u8, header length: u24][header][body]`, all
//! big-endian, where the total length counts everything after itself. The header is a JSON
//! object (serialize type 0): `code`, `language`, `version`, `opaque` (matches a response to
//! its request), `flag` (bit 0: response, bit 1: one-way), `remark`, `extFields` (string to
//! string). Only the JSON header is written; frames with the binary ("ROCKETMQ", type 1) header
//! are decoded too, since a peer may answer in it.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Request codes used here.
pub mod code {
    pub const SEND_MESSAGE: i32 = 10;
    pub const PULL_MESSAGE: i32 = 11;
    pub const UPDATE_AND_CREATE_TOPIC: i32 = 17;
    pub const GET_MAX_OFFSET: i32 = 30;
    pub const HEART_BEAT: i32 = 34;
    pub const UNREGISTER_CLIENT: i32 = 35;
    pub const END_TRANSACTION: i32 = 37;
    pub const CHECK_TRANSACTION_STATE: i32 = 39;
    pub const GET_ROUTEINFO_BY_TOPIC: i32 = 105;
    pub const GET_BROKER_CLUSTER_INFO: i32 = 106;
}

/// Response codes used here.
pub mod response {
    pub const SUCCESS: i32 = 0;
    pub const SYSTEM_ERROR: i32 = 1;
    pub const NO_PERMISSION: i32 = 16;
    pub const TOPIC_NOT_EXIST: i32 = 17;
    pub const PULL_NOT_FOUND: i32 = 19;
    pub const PULL_RETRY_IMMEDIATELY: i32 = 20;
    pub const PULL_OFFSET_MOVED: i32 = 21;
}

/// What to do about a response code: for NO_PERMISSION, which keys to set.
pub fn acl_hint(code: i32) -> &'static str {
    if code == response::NO_PERMISSION {
        "; the broker checks ACLs: set rocketmq.access_key and rocketmq.secret_key \
         (RELAY_ROCKETMQ__SECRET_KEY_FILE) to a user allowed to do this (PUB on the topic to send)"
    } else {
        ""
    }
}

const FLAG_RESPONSE: i32 = 1;
const FLAG_ONEWAY: i32 = 1 << 1;

/// The version this client announces (RocketMQ 4.9.x's `MQVersion` ordinal range).
const VERSION: i32 = 453;

/// Frames larger than this are refused (RocketMQ's own default limit is 16 MiB).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// One request or response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Command {
    pub code: i32,
    pub opaque: i32,
    pub flag: i32,
    pub remark: Option<String>,
    pub ext: HashMap<String, String>,
    pub body: Bytes,
}

#[derive(Serialize, Deserialize)]
struct JsonHeader {
    code: i32,
    #[serde(default)]
    language: String,
    #[serde(default)]
    version: i32,
    #[serde(default)]
    opaque: i32,
    #[serde(default)]
    flag: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remark: Option<String>,
    #[serde(
        rename = "extFields",
        default,
        deserialize_with = "string_map",
        skip_serializing_if = "HashMap::is_empty"
    )]
    ext_fields: HashMap<String, String>,
    #[serde(
        rename = "serializeTypeCurrentRPC",
        default,
        skip_deserializing,
        skip_serializing_if = "String::is_empty"
    )]
    serialize_type: String,
}

/// `extFields` values are strings, but accept numbers and booleans from lenient peers.
fn string_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HashMap<String, String>, D::Error> {
    let raw: Option<HashMap<String, serde_json::Value>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some((k, s)),
            other => Some((k, other.to_string())),
        })
        .collect())
}

impl Command {
    /// A request with `code` and header fields `ext`.
    pub fn request(code: i32, ext: HashMap<String, String>) -> Command {
        Command {
            code,
            ext,
            ..Command::default()
        }
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Command {
        self.body = body.into();
        self
    }

    pub fn oneway(mut self) -> Command {
        self.flag |= FLAG_ONEWAY;
        self
    }

    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    pub fn is_oneway(&self) -> bool {
        self.flag & FLAG_ONEWAY != 0
    }

    /// A header field, or `""`.
    pub fn field(&self, name: &str) -> &str {
        self.ext.get(name).map(String::as_str).unwrap_or("")
    }

    /// The response's outcome as an error naming the request: `Ok` for SUCCESS.
    pub fn ok_or_describe(&self, what: &str) -> Result<(), String> {
        if self.code == response::SUCCESS {
            Ok(())
        } else {
            Err(format!(
                "{what}: the broker answered code {} ({}){}",
                self.code,
                self.remark.as_deref().unwrap_or("no remark"),
                acl_hint(self.code)
            ))
        }
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Result<Bytes, String> {
        let header = JsonHeader {
            code: self.code,
            // OTHER: known to every broker (Java 4.x has no RUST).
            language: "OTHER".into(),
            version: VERSION,
            opaque: self.opaque,
            flag: self.flag,
            remark: self.remark.clone(),
            ext_fields: self.ext.clone(),
            serialize_type: "JSON".into(),
        };
        let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        let total = 4 + header.len() + self.body.len();
        if total > MAX_FRAME || header.len() > 0x00ff_ffff {
            return Err(format!(
                "a RocketMQ frame of {total} bytes is over the {MAX_FRAME}-byte limit"
            ));
        }
        let mut out = BytesMut::with_capacity(4 + total);
        out.put_u32(total as u32);
        out.put_u32(header.len() as u32); // serialize type 0 (JSON) in the top byte
        out.put_slice(&header);
        out.put_slice(&self.body);
        Ok(out.freeze())
    }

    /// Decodes one frame from the front of `buf` if it is complete (consuming it), `Ok(None)`
    /// if more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Command>, String> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let total = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if !(4..=MAX_FRAME).contains(&total) {
            return Err(format!("bad RocketMQ frame length {total}"));
        }
        if buf.len() < 4 + total {
            buf.reserve(4 + total - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let mut frame = buf.split_to(total).freeze();
        let word = frame.get_u32();
        let kind = (word >> 24) as u8;
        let header_len = (word & 0x00ff_ffff) as usize;
        if header_len > frame.len() {
            return Err(format!(
                "RocketMQ header length {header_len} exceeds the frame ({} bytes left)",
                frame.len()
            ));
        }
        let header = frame.split_to(header_len);
        let mut cmd = match kind {
            0 => {
                let h: JsonHeader = serde_json::from_slice(&header)
                    .map_err(|e| format!("bad RocketMQ JSON header: {e}"))?;
                Command {
                    code: h.code,
                    opaque: h.opaque,
                    flag: h.flag,
                    remark: h.remark,
                    ext: h.ext_fields,
                    body: Bytes::new(),
                }
            }
            1 => decode_binary_header(header)?,
            other => return Err(format!("unknown RocketMQ serialize type {other}")),
        };
        cmd.body = frame;
        Ok(Some(cmd))
    }
}

/// RocketMQ's binary header: code i16, language u8, version i16, opaque i32, flag i32,
/// remark (i32 length + bytes), extFields (i32 length + (i16 key length, key, i32 value
/// length, value)*).
fn decode_binary_header(mut h: Bytes) -> Result<Command, String> {
    fn take_str(h: &mut Bytes, n: usize) -> Result<String, String> {
        need(h, n, "the binary header")?;
        let b = h.split_to(n);
        String::from_utf8(b.to_vec()).map_err(|_| "RocketMQ header field is not UTF-8".to_owned())
    }
    need(&h, 2 + 1 + 2 + 4 + 4 + 4, "the binary header")?;
    let code = h.get_i16() as i32;
    let _language = h.get_u8();
    let _version = h.get_i16();
    let opaque = h.get_i32();
    let flag = h.get_i32();
    let remark_len = h.get_i32();
    let remark = if remark_len > 0 {
        Some(take_str(&mut h, remark_len as usize)?)
    } else {
        None
    };
    need(&h, 4, "the binary header")?;
    let ext_len = h.get_i32().max(0) as usize;
    need(&h, ext_len, "the binary header")?;
    let mut ext_bytes = h.split_to(ext_len);
    let mut ext = HashMap::new();
    while ext_bytes.has_remaining() {
        need(&ext_bytes, 2, "the binary header")?;
        let kl = ext_bytes.get_i16().max(0) as usize;
        let k = take_str(&mut ext_bytes, kl)?;
        need(&ext_bytes, 4, "the binary header")?;
        let vl = ext_bytes.get_i32().max(0) as usize;
        let v = take_str(&mut ext_bytes, vl)?;
        ext.insert(k, v);
    }
    Ok(Command {
        code,
        opaque,
        flag,
        remark,
        ext,
        body: Bytes::new(),
    })
}

/// `Ok` if `b` holds at least `n` more bytes; else an error naming `what` was cut short.
pub(super) fn need(b: &Bytes, n: usize, what: &str) -> Result<(), String> {
    if b.remaining() < n {
        Err(format!("RocketMQ data truncated at {what}"))
    } else {
        Ok(())
    }
}

/// Header fields from pairs.
pub fn fields<const N: usize>(pairs: [(&str, String); N]) -> HashMap<String, String> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_complete_input() {
        let mut cmd = Command::request(
            code::END_TRANSACTION,
            fields([
                ("producerGroup", "g".into()),
                ("commitOrRollback", "8".into()),
            ]),
        )
        .with_body(&b"payload"[..])
        .oneway();
        cmd.opaque = 7;
        let frame = cmd.encode().unwrap();
        let mut buf = BytesMut::from(&frame[..frame.len() - 1]);
        assert_eq!(Command::decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&frame[frame.len() - 1..]);
        buf.extend_from_slice(&frame); // a second frame behind the first
        let first = Command::decode(&mut buf).unwrap().unwrap();
        assert_eq!(first, cmd);
        assert!(first.is_oneway() && !first.is_response());
        assert_eq!(Command::decode(&mut buf).unwrap().unwrap(), cmd);
        assert!(buf.is_empty());
    }

    #[test]
    fn binary_headers_decode() {
        let mut h = BytesMut::new();
        h.put_i16(39);
        h.put_u8(0);
        h.put_i16(453);
        h.put_i32(11);
        h.put_i32(0);
        h.put_i32(2);
        h.put_slice(b"hi");
        let mut ext = BytesMut::new();
        ext.put_i16(5);
        ext.put_slice(b"msgId");
        ext.put_i32(3);
        ext.put_slice(b"abc");
        h.put_i32(ext.len() as i32);
        h.put_slice(&ext);
        let mut frame = BytesMut::new();
        frame.put_u32((4 + h.len() + 2) as u32);
        frame.put_u32((1 << 24) | h.len() as u32);
        frame.put_slice(&h);
        frame.put_slice(b"xy");
        let cmd = Command::decode(&mut frame).unwrap().unwrap();
        assert_eq!(cmd.code, 39);
        assert_eq!(cmd.opaque, 11);
        assert_eq!(cmd.remark.as_deref(), Some("hi"));
        assert_eq!(cmd.field("msgId"), "abc");
        assert_eq!(&cmd.body[..], b"xy");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0][..]);
        assert!(Command::decode(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0, 0, 0, 6, 0, 0, 0, 9, 1, 2][..]);
        assert!(Command::decode(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0, 0, 0, 6, 0, 0, 0, 2, b'{', b'x'][..]);
        assert!(Command::decode(&mut buf).is_err());
    }
}

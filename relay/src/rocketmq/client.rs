//! The RocketMQ requests the relay (and its tests) make: name-server lookups, producer
//! heartbeats, half messages and END_TRANSACTION, topic creation and pulls.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;

use super::acl::Credentials;
use super::connection::Connection;
use super::message::{self, MessageExt, prop, sysflag};
use super::remoting::{Command, code, fields, response};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How a local transaction ended, as END_TRANSACTION says it (`commitOrRollback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Commit,
    Rollback,
    /// TRANSACTION_NOT_TYPE: undecided; the broker asks again later.
    Unknown,
}

impl Resolution {
    fn wire(self) -> i32 {
        match self {
            Resolution::Commit => 8,
            Resolution::Rollback => 12,
            Resolution::Unknown => 0,
        }
    }
}

/// Where a half message is, as END_TRANSACTION names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfMessage {
    pub producer_group: String,
    /// The half message's queue offset in the broker's half topic.
    pub tran_state_table_offset: i64,
    /// The half message's physical (commit log) offset: how the broker finds it.
    pub commit_log_offset: i64,
    /// The client's unique message id (UNIQ_KEY).
    pub msg_id: String,
    pub transaction_id: String,
}

/// Every master broker address the name server knows (broker id 0).
pub async fn master_brokers(name_server: &Connection) -> Result<Vec<String>, String> {
    let resp = name_server
        .request(
            Command::request(code::GET_BROKER_CLUSTER_INFO, Default::default()),
            TIMEOUT,
        )
        .await?;
    resp.ok_or_describe("GET_BROKER_CLUSTER_INFO")?;
    #[derive(Deserialize)]
    struct ClusterInfo {
        #[serde(rename = "brokerAddrTable", default)]
        brokers: std::collections::HashMap<String, BrokerData>,
    }
    let info: ClusterInfo = parse_json(&quote_numeric_keys(&resp.body), "cluster info")?;
    let mut out = BTreeSet::new();
    for b in info.brokers.values() {
        out.extend(b.master());
    }
    Ok(out.into_iter().collect())
}

/// The master brokers, from the first of the name servers `addrs` that answers, with the
/// connection that answered (to ask it again); requests signed with `credentials` (ACL).
pub async fn masters_from_any(
    addrs: &[String],
    credentials: Option<&Credentials>,
) -> Result<(Connection, Vec<String>), String> {
    let mut last = String::from("no name server configured");
    for addr in addrs {
        let attempt = async {
            let ns = Connection::open(addr, None, TIMEOUT, credentials.cloned()).await?;
            let list = master_brokers(&ns).await?;
            Ok::<_, String>((ns, list))
        };
        match attempt.await {
            Ok(found) => return Ok(found),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[derive(Deserialize)]
struct BrokerData {
    #[serde(rename = "brokerName", default)]
    name: String,
    #[serde(rename = "brokerAddrs", default)]
    addrs: std::collections::HashMap<String, String>,
}

impl BrokerData {
    fn master(&self) -> Option<String> {
        self.addrs.get("0").cloned()
    }
}

/// A topic's queues: (master broker address, queue ids that can be written/read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub queues: Vec<(String, i32)>,
}

/// The topic's route from the name server; `Ok(None)` when the topic does not exist.
pub async fn route(name_server: &Connection, topic: &str) -> Result<Option<Route>, String> {
    let resp = name_server
        .request(
            Command::request(
                code::GET_ROUTEINFO_BY_TOPIC,
                fields([("topic", topic.to_owned())]),
            ),
            TIMEOUT,
        )
        .await?;
    if resp.code == response::TOPIC_NOT_EXIST {
        return Ok(None);
    }
    resp.ok_or_describe(&format!("route of topic {topic}"))?;
    parse_route(&resp.body).map(Some)
}

/// A GET_ROUTEINFO_BY_TOPIC answer's body: the write queues of each master broker.
fn parse_route(body: &[u8]) -> Result<Route, String> {
    #[derive(Deserialize)]
    struct QueueData {
        #[serde(rename = "brokerName")]
        broker: String,
        #[serde(rename = "writeQueueNums", default)]
        write: i32,
    }
    #[derive(Deserialize)]
    struct RouteData {
        #[serde(rename = "queueDatas", default)]
        queues: Vec<QueueData>,
        #[serde(rename = "brokerDatas", default)]
        brokers: Vec<BrokerData>,
    }
    let data: RouteData = parse_json(&quote_numeric_keys(body), "topic route")?;
    let mut queues = Vec::new();
    for q in &data.queues {
        // The count sizes an allocation: a name server's word is not enough for 2^31 queues.
        if !(0..=MAX_WRITE_QUEUES).contains(&q.write) {
            return Err(format!(
                "the name server lists {} write queues for broker {} in this topic's route; \
                 more than {MAX_WRITE_QUEUES} is refused",
                q.write, q.broker
            ));
        }
        if let Some(addr) = data
            .brokers
            .iter()
            .find(|b| b.name == q.broker)
            .and_then(BrokerData::master)
        {
            queues.extend((0..q.write).map(|i| (addr.clone(), i)));
        }
    }
    Ok(Route { queues })
}

/// The most write queues a topic route may list per broker (RocketMQ's own default is 4–16).
pub const MAX_WRITE_QUEUES: i32 = 1024;

/// Java name servers write `{0:"host:port"}` (numbers as keys); make that JSON.
fn quote_numeric_keys(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_string = true;
            out.push(c);
            i += 1;
            continue;
        }
        if (c == b'{' || c == b',') && i + 1 < body.len() && body[i + 1].is_ascii_digit() {
            let start = i + 1;
            let mut end = start;
            while end < body.len() && body[end].is_ascii_digit() {
                end += 1;
            }
            if end < body.len() && body[end] == b':' {
                out.push(c);
                out.push(b'"');
                out.extend_from_slice(&body[start..end]);
                out.push(b'"');
                i = end;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("cannot read the {what} RocketMQ sent: {e}"))
}

/// Registers this connection as a producer of `groups` (the broker sends check-backs for those
/// groups over it); repeat well within 120 s or the broker forgets it.
pub async fn heartbeat(
    broker: &Connection,
    client_id: &str,
    groups: &[String],
) -> Result<(), String> {
    let body = serde_json::json!({
        "clientID": client_id,
        "producerDataSet": groups.iter().map(|g| serde_json::json!({"groupName": g})).collect::<Vec<_>>(),
        "consumerDataSet": [],
        "heartbeatFingerprint": 0,
        "withoutSub": false,
    });
    let resp = broker
        .request(
            Command::request(code::HEART_BEAT, Default::default())
                .with_body(serde_json::to_vec(&body).map_err(|e| e.to_string())?),
            TIMEOUT,
        )
        .await?;
    resp.ok_or_describe(&format!("heartbeat to {}", broker.addr()))
}

/// A message to send as a half message.
pub struct HalfSend<'a> {
    pub producer_group: &'a str,
    pub topic: &'a str,
    pub queue_id: i32,
    pub keys: &'a str,
    /// The client's unique id (UNIQ_KEY); the transaction id the broker checks back with.
    pub uniq_key: &'a str,
    pub body: Bytes,
    /// Extra user properties.
    pub properties: &'a [(&'a str, &'a str)],
}

/// Why a half message was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub message: String,
    /// Sending it again will not help (the broker refused the message itself: too large, bad
    /// properties, no permission on the topic).
    pub permanent: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl SendError {
    fn transient(message: String) -> SendError {
        SendError {
            message,
            permanent: false,
        }
    }
}

/// The SEND_MESSAGE request for a half message.
pub fn half_command(m: &HalfSend<'_>) -> Result<Command, SendError> {
    if m.body.is_empty() {
        return Err(SendError {
            message: "RocketMQ refuses transactional messages with an empty body".into(),
            permanent: true,
        });
    }
    let mut props: Vec<(&str, &str)> = vec![
        (prop::TRAN_MSG, "true"),
        (prop::PGROUP, m.producer_group),
        (prop::UNIQ_KEY, m.uniq_key),
    ];
    if !m.keys.is_empty() {
        props.push((prop::KEYS, m.keys));
    }
    props.extend_from_slice(m.properties);
    let born = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let header = fields([
        ("producerGroup", m.producer_group.to_owned()),
        ("topic", m.topic.to_owned()),
        ("defaultTopic", "TBW102".to_owned()),
        ("defaultTopicQueueNums", "4".to_owned()),
        ("queueId", m.queue_id.to_string()),
        ("sysFlag", sysflag::TRANSACTION_PREPARED.to_string()),
        ("bornTimestamp", born.to_string()),
        ("flag", "0".to_owned()),
        ("properties", message::encode_properties(props)),
        ("reconsumeTimes", "0".to_owned()),
        ("unitMode", "false".to_owned()),
        ("batch", "false".to_owned()),
    ]);
    Ok(Command::request(code::SEND_MESSAGE, header).with_body(m.body.clone()))
}

/// Reads the broker's answer to a half message. Only SEND_OK counts: like RocketMQ's own
/// transactional producer, a half message the broker could not flush or replicate
/// (FLUSH_DISK_TIMEOUT, FLUSH_SLAVE_TIMEOUT, SLAVE_NOT_AVAILABLE) is not relied on.
pub fn half_sent(
    resp: &Command,
    producer_group: &str,
    topic: &str,
    uniq_key: &str,
) -> Result<HalfMessage, SendError> {
    if resp.code != response::SUCCESS {
        // MESSAGE_ILLEGAL, VERSION_NOT_SUPPORTED, REQUEST_CODE_NOT_SUPPORTED: the message
        // itself. NO_PERMISSION (16) is about the relay's credentials or the topic's ACL, not
        // the row: retried without limit until an operator fixes it, never dead-lettered.
        let permanent = matches!(resp.code, 3 | 13 | 15);
        let hint = super::remoting::acl_hint(resp.code);
        return Err(SendError {
            message: format!(
                "half message to topic {topic}: the broker answered code {} ({}){hint}",
                resp.code,
                resp.remark.as_deref().unwrap_or("no remark")
            ),
            permanent,
        });
    }
    let offset_msg_id = resp.field("msgId");
    let commit_log_offset = commit_log_offset(offset_msg_id).ok_or_else(|| {
        SendError::transient(format!(
            "the broker's message id {offset_msg_id:?} holds no commit log offset"
        ))
    })?;
    let tran_state_table_offset = resp.field("queueOffset").parse().map_err(|_| {
        SendError::transient(format!(
            "the broker's queueOffset {:?} is not a number",
            resp.field("queueOffset")
        ))
    })?;
    let transaction_id = match resp.field("transactionId") {
        "" => uniq_key.to_owned(),
        t => t.to_owned(),
    };
    Ok(HalfMessage {
        producer_group: producer_group.to_owned(),
        tran_state_table_offset,
        commit_log_offset,
        msg_id: uniq_key.to_owned(),
        transaction_id,
    })
}

/// Sends a transactional half message: stored, invisible to consumers until END_TRANSACTION
/// commits it (or a check-back does).
pub async fn send_half(broker: &Connection, m: &HalfSend<'_>) -> Result<HalfMessage, SendError> {
    let cmd = half_command(m)?;
    let resp = broker
        .request(cmd, TIMEOUT)
        .await
        .map_err(SendError::transient)?;
    half_sent(&resp, m.producer_group, m.topic, m.uniq_key)
}

/// The commit log offset in a broker's message id (hex: store host, port, then the offset).
pub fn commit_log_offset(offset_msg_id: &str) -> Option<i64> {
    if offset_msg_id.len() < 16 || !offset_msg_id.is_ascii() {
        return None;
    }
    let tail = &offset_msg_id[offset_msg_id.len() - 16..];
    u64::from_str_radix(tail, 16).ok().map(|v| v as i64)
}

/// The END_TRANSACTION request that commits or rolls back a half message. `from_check`: it
/// answers a check-back.
pub fn end_transaction_command(
    half: &HalfMessage,
    resolution: Resolution,
    from_check: bool,
    remark: Option<String>,
) -> Command {
    let mut cmd = Command::request(
        code::END_TRANSACTION,
        fields([
            ("producerGroup", half.producer_group.clone()),
            (
                "tranStateTableOffset",
                half.tran_state_table_offset.to_string(),
            ),
            ("commitLogOffset", half.commit_log_offset.to_string()),
            ("commitOrRollback", resolution.wire().to_string()),
            ("fromTransactionCheck", from_check.to_string()),
            ("msgId", half.msg_id.clone()),
            ("transactionId", half.transaction_id.clone()),
        ]),
    );
    cmd.remark = remark;
    cmd
}

/// Commits or rolls back a half message. Unknown, and answers to check-backs (`from_check`),
/// are one-way (the broker never answers them); a commit or rollback of the producer's own
/// waits for the broker's answer.
pub async fn end_transaction(
    broker: &Connection,
    half: &HalfMessage,
    resolution: Resolution,
    from_check: bool,
    remark: Option<String>,
) -> Result<(), String> {
    let cmd = end_transaction_command(half, resolution, from_check, remark);
    if from_check || resolution == Resolution::Unknown {
        return broker.oneway(cmd).await;
    }
    broker
        .request(cmd, TIMEOUT)
        .await?
        .ok_or_describe("END_TRANSACTION")
}

/// A check-back: the half message the broker asks about and where to answer.
#[derive(Debug, Clone)]
pub struct CheckBack {
    pub half: HalfMessage,
    pub message: MessageExt,
}

/// Reads a CHECK_TRANSACTION_STATE request.
pub fn parse_check(cmd: &Command) -> Result<CheckBack, String> {
    let message = message::decode_message(cmd.body.clone())?;
    let number = |name: &str| -> Result<i64, String> {
        cmd.field(name).parse().map_err(|_| {
            format!(
                "check-back field {name} = {:?} is not a number",
                cmd.field(name)
            )
        })
    };
    let uniq = message
        .property(prop::UNIQ_KEY)
        .unwrap_or_else(|| cmd.field("msgId"))
        .to_owned();
    let transaction_id = match cmd.field("transactionId") {
        "" => uniq.clone(),
        t => t.to_owned(),
    };
    Ok(CheckBack {
        half: HalfMessage {
            producer_group: message
                .property(prop::PGROUP)
                .unwrap_or_default()
                .to_owned(),
            tran_state_table_offset: number("tranStateTableOffset")?,
            commit_log_offset: number("commitLogOffset")?,
            msg_id: uniq,
            transaction_id,
        },
        message,
    })
}

/// Creates `topic` on `broker` with `queues` read and write queues (idempotent).
pub async fn create_topic(broker: &Connection, topic: &str, queues: i32) -> Result<(), String> {
    let resp = broker
        .request(
            Command::request(
                code::UPDATE_AND_CREATE_TOPIC,
                fields([
                    ("topic", topic.to_owned()),
                    ("defaultTopic", "TBW102".to_owned()),
                    ("readQueueNums", queues.to_string()),
                    ("writeQueueNums", queues.to_string()),
                    ("perm", "6".to_owned()),
                    ("topicFilterType", "SINGLE_TAG".to_owned()),
                    ("order", "false".to_owned()),
                    ("topicSysFlag", "0".to_owned()),
                ]),
            ),
            TIMEOUT,
        )
        .await?;
    resp.ok_or_describe(&format!("create topic {topic}"))
}

/// One pull: the messages at `offset..` of a queue and the next offset (`None` when nothing is
/// there).
pub async fn pull(
    broker: &Connection,
    group: &str,
    topic: &str,
    queue_id: i32,
    offset: i64,
) -> Result<(Vec<MessageExt>, i64), String> {
    let resp = broker
        .request(
            Command::request(
                code::PULL_MESSAGE,
                fields([
                    ("consumerGroup", group.to_owned()),
                    ("topic", topic.to_owned()),
                    ("queueId", queue_id.to_string()),
                    ("queueOffset", offset.to_string()),
                    ("maxMsgNums", "32".to_owned()),
                    ("sysFlag", "4".to_owned()),
                    ("commitOffset", "0".to_owned()),
                    ("suspendTimeoutMillis", "0".to_owned()),
                    ("subscription", "*".to_owned()),
                    ("subVersion", "0".to_owned()),
                    ("expressionType", "TAG".to_owned()),
                ]),
            ),
            TIMEOUT,
        )
        .await?;
    let next = resp.field("nextBeginOffset").parse().unwrap_or(offset);
    match resp.code {
        response::SUCCESS => Ok((message::decode_messages(resp.body.clone())?, next)),
        response::PULL_NOT_FOUND | response::PULL_RETRY_IMMEDIATELY => Ok((Vec::new(), offset)),
        response::PULL_OFFSET_MOVED => Ok((Vec::new(), next)),
        _ => Err(format!(
            "pull {topic}/{queue_id}@{offset}: code {} ({})",
            resp.code,
            resp.remark.as_deref().unwrap_or("")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_log_offset_is_the_tail_of_the_message_id() {
        assert_eq!(
            commit_log_offset("7F00000100002A9F0000000000001000"),
            Some(0x1000)
        );
        assert_eq!(commit_log_offset("short"), None);
        assert_eq!(commit_log_offset("7F00000100002A9F00000000000010zz"), None);
    }

    #[test]
    fn a_route_lists_each_masters_write_queues_and_refuses_absurd_counts() {
        let route = |n: i64| {
            format!(
                r#"{{"queueDatas":[{{"brokerName":"b","writeQueueNums":{n}}}],
                    "brokerDatas":[{{"brokerName":"b","brokerAddrs":{{0:"127.0.0.1:10911"}}}}]}}"#
            )
        };
        let r = parse_route(route(4).as_bytes()).unwrap();
        assert_eq!(r.queues.len(), 4);
        assert_eq!(r.queues[3], ("127.0.0.1:10911".to_owned(), 3));
        // Before: 2^31 - 1 queues were allocated as the name server said.
        let err = parse_route(route(i64::from(i32::MAX)).as_bytes()).unwrap_err();
        assert!(err.contains("more than 1024"), "{err}");
        assert!(parse_route(route(-1).as_bytes()).is_err());
    }

    #[test]
    fn numeric_keys_are_quoted_outside_strings() {
        let java = br#"{"brokerAddrs":{0:"127.0.0.1:10911",1:"h:2"},"s":"{0:x"}"#;
        let fixed = String::from_utf8(quote_numeric_keys(java)).unwrap();
        assert_eq!(
            fixed,
            r#"{"brokerAddrs":{"0":"127.0.0.1:10911","1":"h:2"},"s":"{0:x"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&fixed).unwrap();
        assert_eq!(v["brokerAddrs"]["0"], "127.0.0.1:10911");
    }
}

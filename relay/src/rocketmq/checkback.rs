//! Answers RocketMQ transaction check-backs from the oracle.
//!
//! The relay registers, on one connection to every master broker the name server lists, as a
//! producer of `rocketmq.producer_groups`. When a half message of one of those groups stays
//! undecided (its producer crashed between sending it and committing), the broker sends
//! CHECK_TRANSACTION_STATE over that connection; the relay looks up the transaction key (the
//! `rocketmq.key_property` property of the message, by default its first key), asks the oracle,
//! and answers END_TRANSACTION commit, rollback, or unknown (the broker asks again later).
//!
//! Half messages of the relay's own RocketMQ sink carry their key in `OUTBOX_TX_KEY`, which is
//! looked up first. One this process sent and has not settled yet is answered "unknown" without
//! asking the oracle (see [`OwnHalves`]): the sink is about to commit or roll it back itself.
//! One whose key was committed less than [`SINK_COMMIT_GRACE`] ago is answered "unknown" too, by
//! any relay: the relay that marked it sends END_TRANSACTION commit right after, and the broker
//! records that asynchronously (RocketMQ batches those records every
//! `transactionOpBatchInterval`), so a check may still be under way; answering it "commit" as
//! well makes the broker commit the message twice (seen with the broker 1.0.0). If that
//! END_TRANSACTION was lost, the next check after the grace gets "commit".
//!
//! The same race holds for the applications' own half messages: the broker may check a half
//! message again before it has recorded the commit this relay answered a moment ago (seen with
//! the broker 1.0.0: two checks 230 ms apart, both answered commit, the message shown twice).
//! A repeat check on a message this process answered "commit" less than [`ANSWER_GRACE`] ago is
//! answered "unknown" (see [`Answered`]); if the first answer was lost, the next check after the
//! grace gets "commit".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::OwnHalves;
use super::acl::Credentials;
use super::client::{self, Resolution};
use super::connection::Connection;
use super::message::{MessageExt, prop};
use super::remoting::{Command, code};
use crate::config::RocketmqConfig;
use crate::metrics::TRANSACTION_CHECKS;
use crate::oracle::{Oracle, TxStatus};

/// How long after a sink message's key was committed check-backs on it are answered "unknown".
pub const SINK_COMMIT_GRACE: Duration = Duration::from_secs(10);

/// How long after this process answered "commit" to a check on a half message a repeat check
/// on the same message is answered "unknown".
pub const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// The half messages this process answered "commit" for, and when: (producer group, the
/// message's unique id, or its transaction key without one). Entries older than the grace are
/// dropped as new ones come; check-backs are rare (crashed producers), so it stays small.
#[derive(Debug, Default, Clone)]
pub struct Answered {
    inner: Arc<Mutex<HashMap<(String, String), Instant>>>,
}

impl Answered {
    /// When this process answered "commit" for the message less than `grace` ago.
    pub fn committed_within(&self, group: &str, id: &str, grace: Duration) -> Option<Duration> {
        let map = self.inner.lock().ok()?;
        let at = map.get(&(group.to_owned(), id.to_owned()))?;
        Some(at.elapsed()).filter(|age| *age < grace)
    }

    /// Notes a "commit" answer, forgetting those older than `grace`.
    pub fn note_commit(&self, group: &str, id: &str, grace: Duration) {
        if let Ok(mut map) = self.inner.lock() {
            map.retain(|_, at| at.elapsed() < grace);
            map.insert((group.to_owned(), id.to_owned()), Instant::now());
        }
    }
}

/// The transaction key of a checked message: `OUTBOX_TX_KEY` when the relay's sink sent it,
/// else `key_property` (`KEYS`: the first key; `TRANSACTION_ID`: RocketMQ's transaction id, the
/// message's unique client id).
pub fn transaction_key<'a>(message: &'a MessageExt, key_property: &str) -> Option<&'a str> {
    if let Some(own) = message
        .property(prop::OUTBOX_TX_KEY)
        .filter(|k| !k.is_empty())
    {
        return Some(own);
    }
    match key_property {
        prop::KEYS => message.key(),
        "TRANSACTION_ID" => message.property(prop::UNIQ_KEY),
        other => message.property(other),
    }
    .filter(|k| !k.is_empty())
}

/// Runs until `shutdown`: keeps a registered connection to every master broker (in a task of
/// its own) as a producer of `groups` and answers the check-backs that arrive on them.
pub async fn run(
    config: RocketmqConfig,
    groups: Vec<String>,
    oracle: Arc<Oracle>,
    own: OwnHalves,
    shutdown: CancellationToken,
) {
    if config.name_server.is_empty() || groups.is_empty() {
        return;
    }
    tracing::info!(name_server = %config.name_server, groups = ?groups, "answering RocketMQ check-backs");
    let (tx, mut incoming) = mpsc::channel::<(Connection, Command)>(1024);
    let answered: Arc<[String]> = groups.clone().into();
    let commits = Answered::default();
    tokio::spawn(keep_registered(
        config.clone(),
        groups,
        tx,
        shutdown.clone(),
    ));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = incoming.recv() => match got {
                Some((conn, cmd)) if cmd.code == code::CHECK_TRANSACTION_STATE => {
                    let oracle = oracle.clone();
                    let key_property = config.key_property.clone();
                    let own = own.clone();
                    let groups = answered.clone();
                    let commits = commits.clone();
                    tokio::spawn(async move {
                        answer(conn, cmd, &oracle, &own, &commits, &key_property, &groups).await
                    });
                }
                Some((_, cmd)) => tracing::debug!(code = cmd.code, "ignoring a RocketMQ request"),
                None => return,
            }
        }
    }
}

/// Lists the master brokers and heartbeats each every `heartbeat_interval_ms`, reconnecting
/// what broke; requests the brokers send arrive on `incoming`.
async fn keep_registered(
    config: RocketmqConfig,
    groups: Vec<String>,
    incoming: mpsc::Sender<(Connection, Command)>,
    shutdown: CancellationToken,
) {
    let client_id = config.client_id();
    let interval = Duration::from_millis(config.heartbeat_interval_ms);
    let mut brokers: HashMap<String, Connection> = HashMap::new();
    let mut name_server: Option<Connection> = None;
    let mut reported_down = false;
    loop {
        match list_brokers(&config, &mut name_server).await {
            Ok(addrs) => {
                reported_down = false;
                for addr in addrs {
                    if brokers.get(&addr).is_none_or(Connection::is_closed) {
                        match Connection::open(
                            &addr,
                            Some(incoming.clone()),
                            client::TIMEOUT,
                            Credentials::of(&config),
                        )
                        .await
                        {
                            Ok(c) => {
                                brokers.insert(addr, c);
                            }
                            Err(e) => {
                                tracing::warn!(broker = %addr, error = %e, "cannot reach a RocketMQ broker")
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if !reported_down {
                    tracing::warn!(name_server = %config.name_server, error = %e, "cannot list RocketMQ brokers; retrying");
                    reported_down = true;
                }
            }
        }
        let mut dead = Vec::new();
        for (addr, conn) in &brokers {
            if let Err(e) = client::heartbeat(conn, &client_id, &groups).await {
                tracing::warn!(broker = %addr, error = %e, "RocketMQ heartbeat failed; reconnecting");
                dead.push(addr.clone());
            }
        }
        for addr in dead {
            brokers.remove(&addr);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The master brokers, from the first name server that answers (reusing its connection).
async fn list_brokers(
    config: &RocketmqConfig,
    name_server: &mut Option<Connection>,
) -> Result<Vec<String>, String> {
    if let Some(ns) = name_server.as_ref().filter(|c| !c.is_closed()) {
        match client::master_brokers(ns).await {
            Ok(list) => return Ok(list),
            Err(_) => *name_server = None,
        }
    }
    let (ns, list) =
        client::masters_from_any(&config.name_servers(), Credentials::of(config).as_ref()).await?;
    *name_server = Some(ns);
    Ok(list)
}

/// Answers one check-back on the connection it came on.
pub async fn answer(
    conn: Connection,
    cmd: Command,
    oracle: &Oracle,
    own: &OwnHalves,
    commits: &Answered,
    key_property: &str,
    groups: &[String],
) {
    let check = match client::parse_check(&cmd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(broker = %conn.addr(), error = %e, "unreadable RocketMQ check-back; ignored (the broker asks again)");
            return;
        }
    };
    if check.half.producer_group.is_empty() {
        tracing::warn!(broker = %conn.addr(), "a RocketMQ check-back without the PGROUP property; ignored");
        return;
    }
    // Only the groups this relay answers for (it registered as their producer): a check-back
    // for another group is not the oracle's to settle.
    if !groups.contains(&check.half.producer_group) {
        tracing::warn!(
            broker = %conn.addr(),
            group = %check.half.producer_group.chars().take(64).collect::<String>(),
            "a RocketMQ check-back for a producer group this relay does not answer for; ignored \
             (list it in rocketmq.producer_groups if it should)"
        );
        return;
    }
    let key = transaction_key(&check.message, key_property);
    let group = &check.half.producer_group;
    // The message across the broker's re-puts of it: its unique id, else its transaction key.
    let message_id = Some(check.half.msg_id.as_str())
        .filter(|id| !id.is_empty())
        .or(key)
        .unwrap_or("");
    let (resolution, status) = match key {
        None => (
            Resolution::Unknown,
            TxStatus::Unknown(format!(
                "the message has no {key_property} property to look the transaction up by; \
                 set rocketmq.key_property to the property the producer puts the key in"
            )),
        ),
        Some(key) if own.contains(key) => (
            Resolution::Unknown,
            TxStatus::Unknown(
                "this relay sent the half message and settles it itself (END_TRANSACTION pending or just sent)".into(),
            ),
        ),
        Some(_) if let Some(age) = commits.committed_within(group, message_id, ANSWER_GRACE) => (
            Resolution::Unknown,
            TxStatus::Unknown(format!(
                "this relay answered commit for this half message {} ms ago and the broker may \
                 not have recorded it yet; answering commit again would show it twice",
                age.as_millis()
            )),
        ),
        Some(key) => {
            let mut status = oracle.check(key).await;
            let from_sink = check.message.property(prop::OUTBOX_TX_KEY).is_some();
            if status == TxStatus::Committed
                && from_sink
                && let Some(age) = oracle.committed_age(key).await
                && age < SINK_COMMIT_GRACE
            {
                status = TxStatus::Unknown(format!(
                    "committed {} ms ago by the relay that sent it, whose END_TRANSACTION commit \
                     the broker may not have recorded yet; committing it from here too would \
                     show it twice",
                    age.as_millis()
                ));
            }
            let resolution = match status {
                TxStatus::Committed => Resolution::Commit,
                TxStatus::RolledBack => Resolution::Rollback,
                TxStatus::Unknown(_) => Resolution::Unknown,
            };
            (resolution, status)
        }
    };
    let key = key.unwrap_or("");
    if resolution == Resolution::Commit && !message_id.is_empty() {
        commits.note_commit(group, message_id, ANSWER_GRACE);
    }
    metrics::counter!(TRANSACTION_CHECKS, "source" => "rocketmq", "status" => status.as_str())
        .increment(1);
    let remark = match &status {
        TxStatus::Unknown(why) => {
            tracing::warn!(group = %group, key, status = status.as_str(), reason = %why, "answered a RocketMQ check-back");
            Some(why.clone())
        }
        _ => {
            tracing::info!(group = %group, key, status = status.as_str(), "answered a RocketMQ check-back");
            None
        }
    };
    if let Err(e) = client::end_transaction(&conn, &check.half, resolution, true, remark).await {
        tracing::warn!(broker = %conn.addr(), error = %e, "could not answer a RocketMQ check-back; the broker asks again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(props: &[(&str, &str)]) -> MessageExt {
        MessageExt {
            properties: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..MessageExt::default()
        }
    }

    #[test]
    fn the_sinks_own_key_comes_first_then_the_configured_property() {
        let app = message(&[(prop::KEYS, "order-1 other"), (prop::UNIQ_KEY, "U1")]);
        assert_eq!(transaction_key(&app, "KEYS"), Some("order-1"));
        assert_eq!(transaction_key(&app, "TRANSACTION_ID"), Some("U1"));
        assert_eq!(transaction_key(&app, "bizKey"), None);
        let own = message(&[(prop::KEYS, "id-1"), (prop::OUTBOX_TX_KEY, "id-1:U2")]);
        assert_eq!(transaction_key(&own, "KEYS"), Some("id-1:U2"));
    }

    #[test]
    fn a_commit_answer_is_remembered_per_group_and_message_for_the_grace_only() {
        let commits = Answered::default();
        let grace = Duration::from_millis(200);
        assert_eq!(commits.committed_within("g", "U1", grace), None);
        commits.note_commit("g", "U1", grace);
        assert!(commits.committed_within("g", "U1", grace).is_some());
        assert_eq!(commits.committed_within("g", "U2", grace), None);
        assert_eq!(commits.committed_within("other", "U1", grace), None);
        std::thread::sleep(grace);
        assert_eq!(commits.committed_within("g", "U1", grace), None);
        commits.note_commit("g", "U3", grace);
        assert_eq!(commits.inner.lock().map(|m| m.len()).unwrap_or(0), 1);
    }
}

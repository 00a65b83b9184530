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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
                    tokio::spawn(async move {
                        answer(conn, cmd, &oracle, &own, &key_property, &groups).await
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
    let group = &check.half.producer_group;
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
}

//! Answers RocketMQ transaction check-backs from the oracle.
//!
//! The relay registers, on one connection to every master broker the name server lists, as a
//! producer of `rocketmq.producer_groups`. When a half message of one of those groups stays
//! undecided (its producer crashed between sending it and committing), the broker sends
//! CHECK_TRANSACTION_STATE over that connection; the relay looks up the transaction key (the
//! `rocketmq.key_property` property of the message, by default its first key), asks the oracle,
//! and answers END_TRANSACTION commit, rollback, or unknown (the broker asks again later).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::{self, Resolution};
use super::connection::Connection;
use super::message::{MessageExt, prop};
use super::remoting::{Command, code};
use crate::config::RocketmqConfig;
use crate::oracle::{Oracle, TxStatus};

/// Counter of check-backs answered, labelled `status` (committed, rolled_back, unknown).
pub const CHECKBACKS: &str = "outbox_relay_checkbacks_total";

/// The transaction key of a checked message: `key_property` (`KEYS` means the first key).
pub fn transaction_key<'a>(message: &'a MessageExt, key_property: &str) -> Option<&'a str> {
    if key_property == prop::KEYS {
        message.key()
    } else {
        message.property(key_property).filter(|k| !k.is_empty())
    }
}

/// Runs until `shutdown`: keeps a registered connection to every master broker and answers
/// the check-backs that arrive on them.
pub async fn run(config: RocketmqConfig, oracle: Arc<Oracle>, shutdown: CancellationToken) {
    let groups = config.groups();
    if config.name_server.is_empty() || groups.is_empty() {
        return;
    }
    let client_id = config.client_id();
    let interval = Duration::from_millis(config.heartbeat_interval_ms);
    let (tx, mut incoming) = mpsc::channel::<(Connection, Command)>(1024);
    let mut brokers: HashMap<String, Connection> = HashMap::new();
    let mut name_server: Option<Connection> = None;
    let mut reported_down = false;
    tracing::info!(name_server = %config.name_server, groups = ?groups, "answering RocketMQ check-backs");
    loop {
        // Refresh the brokers and heartbeat each; drop the ones that fail (reconnected next time).
        match refresh(&config.name_server, &mut name_server).await {
            Ok(addrs) => {
                reported_down = false;
                for addr in addrs {
                    if brokers.get(&addr).is_none_or(Connection::is_closed) {
                        match Connection::open(&addr, Some(tx.clone()), client::TIMEOUT).await {
                            Ok(c) => {
                                brokers.insert(addr.clone(), c);
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
                tracing::warn!(broker = %addr, error = %e, "RocketMQ heartbeat failed");
                dead.push(addr.clone());
            }
        }
        for addr in dead {
            brokers.remove(&addr);
        }
        let next_heartbeat = tokio::time::sleep(interval);
        tokio::pin!(next_heartbeat);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut next_heartbeat => break,
                Some((conn, cmd)) = incoming.recv() => {
                    if cmd.code == code::CHECK_TRANSACTION_STATE {
                        let oracle = oracle.clone();
                        let key_property = config.key_property.clone();
                        tokio::spawn(async move { answer(conn, cmd, &oracle, &key_property).await });
                    } else {
                        tracing::debug!(code = cmd.code, "ignoring a RocketMQ request");
                    }
                }
            }
        }
    }
}

async fn refresh(addr: &str, name_server: &mut Option<Connection>) -> Result<Vec<String>, String> {
    if name_server.as_ref().is_none_or(Connection::is_closed) {
        *name_server = Some(Connection::open(addr, None, client::TIMEOUT).await?);
    }
    let ns = name_server.as_ref().ok_or("no name server connection")?;
    let result = client::master_brokers(ns).await;
    if result.is_err() {
        *name_server = None;
    }
    result
}

/// Answers one check-back on the connection it came on.
pub async fn answer(conn: Connection, cmd: Command, oracle: &Oracle, key_property: &str) {
    let check = match client::parse_check(&cmd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(broker = %conn.addr(), error = %e, "unreadable RocketMQ check-back; ignored (the broker asks again)");
            return;
        }
    };
    let (resolution, status, remark) = match transaction_key(&check.message, key_property) {
        None => (
            Resolution::Unknown,
            "unknown",
            Some(format!(
                "the message has no {key_property} property to look the transaction up by; \
                 set rocketmq.key_property to the property the producer puts the key in"
            )),
        ),
        Some(key) => match oracle.check(key).await {
            TxStatus::Committed => (Resolution::Commit, "committed", None),
            TxStatus::RolledBack => (Resolution::Rollback, "rolled_back", None),
            TxStatus::Unknown(why) => (Resolution::Unknown, "unknown", Some(why)),
        },
    };
    let key = transaction_key(&check.message, key_property).unwrap_or("");
    metrics::counter!(CHECKBACKS, "status" => status).increment(1);
    match &remark {
        Some(why) => {
            tracing::warn!(group = %check.half.producer_group, key, status, reason = %why, "answered a RocketMQ check-back")
        }
        None => {
            tracing::info!(group = %check.half.producer_group, key, status, "answered a RocketMQ check-back")
        }
    }
    if let Err(e) = client::end_transaction(&conn, &check.half, resolution, true, remark).await {
        tracing::warn!(broker = %conn.addr(), error = %e, "could not answer a RocketMQ check-back; the broker asks again");
    }
}

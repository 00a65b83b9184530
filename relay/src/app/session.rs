//! The ordinary Postgres session that holds the leader lock, and what can interrupt work.
//!
//! A relay streams only while this session is open and holds the lock ([`crate::postgres::leader`]).
//! [`Session::interrupted`] resolves when the session closes (the lock went with it) or the
//! server says it is shutting down; every step of the stream loop that may wait (on a broker, on
//! Postgres) runs against it, so losing the lock stops streaming within [`LOCK_CHECK`].

use std::time::Duration;

use tokio_postgres::Client;

use crate::postgres::{self, ShutdownWatch};

/// How often the session is checked for having closed.
pub const LOCK_CHECK: Duration = Duration::from_millis(250);

/// Why work was interrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupt {
    /// SIGTERM/SIGINT.
    Shutdown,
    /// The server is shutting down (SQLSTATE 57P), with its message.
    PostgresStopping(String),
    /// The session holding the leader lock closed: another relay may take over.
    LockLost,
}

pub struct Session {
    pub db: Client,
    stopping: ShutdownWatch,
    /// Whether this session holds the leader lock (taken by `leader::acquire`, never inferred).
    pub holds_lock: bool,
}

impl Session {
    pub fn new(db: Client, stopping: ShutdownWatch) -> Session {
        Session {
            db,
            stopping,
            holds_lock: false,
        }
    }

    /// Whether the session is gone (closed, or its server stopping).
    pub fn is_gone(&self) -> bool {
        self.db.is_closed() || self.stopping.borrow().is_some()
    }

    /// Resolves when the session closes or the server says it is stopping. Cancel-safe.
    pub async fn interrupted(&self) -> Interrupt {
        let mut stopping = self.stopping.clone();
        let stopped = async {
            loop {
                if let Some(why) = stopping.borrow_and_update().clone() {
                    return why;
                }
                if stopping.changed().await.is_err() {
                    // The connection task ended without a shutdown reason: `closed` sees it.
                    std::future::pending::<()>().await;
                }
            }
        };
        let closed = async {
            while !self.db.is_closed() {
                tokio::time::sleep(LOCK_CHECK).await;
            }
        };
        tokio::select! {
            why = stopped => Interrupt::PostgresStopping(why),
            _ = closed => Interrupt::LockLost,
        }
    }
}

/// Opens a session; `Err` carries the driver error for the policy to judge.
pub async fn open(pg: &crate::pgtls::PgTarget) -> Result<Session, tokio_postgres::Error> {
    let (db, stopping) = postgres::connect_watched(pg).await?;
    Ok(Session::new(db, stopping))
}

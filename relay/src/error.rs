//! The one error policy: what each failure means for the relay, decided here and nowhere else.
//!
//! Every error type of the core path says, through [`Classify::action`], which of four things
//! the supervisor (`app/`) does about it:
//! - [`Action::Retry`]: the same step again after a backoff (the slot is busy in another
//!   process, a transient server condition);
//! - [`Action::ReconnectPostgres`]: a connection to Postgres is gone or the server is stopping:
//!   reconnect (with backoff) and resume from the slot;
//! - [`Action::RebuildSink`]: the sink can deliver nothing more (a fatal producer error, an
//!   aborted Kafka transaction): drop it, build a new one, re-read everything unconfirmed;
//! - [`Action::Stop`]: retrying cannot help (bad configuration, a missing privilege, a poison
//!   row under `halt`, a fenced producer): stop, with a message that names the fix.
//!
//! Wrapping errors delegate to what they wrap, so an error is judged by what it is, never by
//! where in an enum tree it arrived.

use crate::pipeline::PipelineError;
use crate::replication::ReplicationError;
use crate::sink::SinkError;

/// What the supervisor does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Retry,
    ReconnectPostgres,
    RebuildSink,
    Stop,
}

/// An error that knows what it means for the relay.
pub trait Classify {
    fn action(&self) -> Action;
}

/// What a Postgres SQLSTATE means (`None`: no answer from the server, the connection failed).
pub fn postgres_action(sqlstate: Option<&str>) -> Action {
    match sqlstate {
        None => Action::ReconnectPostgres,
        // 08: connection exception; 57P: admin/crash shutdown, cannot connect now.
        Some(c) if c.starts_with("08") || c.starts_with("57P") => Action::ReconnectPostgres,
        // 53: insufficient resources (too many connections, out of memory, disk full);
        // 55006: object in use (the slot is still held by the previous walsender);
        // 40: serialization failure / deadlock; 55P03: lock not available.
        Some(c) if c.starts_with("53") || c.starts_with("40") => Action::Retry,
        Some("55006") | Some("55P03") => Action::Retry,
        Some(_) => Action::Stop,
    }
}

/// A SQLSTATE that an operator must fix (a privilege, a column, a table): retrying alone will
/// not help, but the fix can be applied while the relay waits.
pub fn needs_operator(sqlstate: &str) -> bool {
    // 42501: insufficient privilege; 42703: undefined column; 42P01: undefined table;
    // 42883: undefined function; 3F000: invalid schema name.
    matches!(sqlstate, "42501" | "42703" | "42P01" | "42883" | "3F000")
}

impl Classify for tokio_postgres::Error {
    fn action(&self) -> Action {
        postgres_action(self.code().map(|c| c.code()))
    }
}

impl Classify for ReplicationError {
    fn action(&self) -> Action {
        match self {
            ReplicationError::Io(_) | ReplicationError::Connect { .. } => Action::ReconnectPostgres,
            ReplicationError::Silent { .. } | ReplicationError::ReadOnly { .. } => {
                Action::ReconnectPostgres
            }
            // Worth another round if any server failed for a reason retrying can end.
            ReplicationError::NoHost { failures } => {
                if failures.iter().any(|f| f.action() != Action::Stop) {
                    Action::ReconnectPostgres
                } else {
                    Action::Stop
                }
            }
            ReplicationError::Server(s) => postgres_action(Some(&s.code)),
            ReplicationError::Auth(_)
            | ReplicationError::Tls(_)
            | ReplicationError::Decode(_)
            | ReplicationError::Protocol(_)
            | ReplicationError::TooLarge { .. } => Action::Stop,
        }
    }
}

impl Classify for SinkError {
    fn action(&self) -> Action {
        match self {
            SinkError::Broken(_) | SinkError::Aborted(_) | SinkError::Closed(_) => {
                Action::RebuildSink
            }
            SinkError::Unavailable { .. } => Action::Retry,
            SinkError::Fenced(_)
            | SinkError::MissingTopic { .. }
            | SinkError::CreateTopic { .. }
            | SinkError::Rejected { .. } => Action::Stop,
        }
    }
}

impl Classify for PipelineError {
    fn action(&self) -> Action {
        match self {
            PipelineError::PostgresStopping(_) => Action::ReconnectPostgres,
            PipelineError::SinkBroken(_)
            | PipelineError::TransactionAborted(_)
            | PipelineError::MarkingStopped => Action::RebuildSink,
            PipelineError::Poison { .. }
            | PipelineError::DeadLetter { .. }
            | PipelineError::Schema(_)
            | PipelineError::Order(_)
            | PipelineError::Fenced(_) => Action::Stop,
        }
    }
}

impl Classify for crate::source::SlotError {
    fn action(&self) -> Action {
        use crate::source::SlotError;
        match self {
            SlotError::Query { sqlstate, .. } => postgres_action(sqlstate.as_deref()),
            SlotError::Replication(e) => e.action(),
            SlotError::Pipeline(e) => e.action(),
            SlotError::Setup(_) => Action::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ReplicationError;

    #[test]
    fn a_multi_host_failure_is_retried_when_any_host_may_recover() {
        let auth = || ReplicationError::Auth("no pg_hba.conf entry".into());
        let busy = ReplicationError::Server(crate::replication::client::ServerError {
            severity: "FATAL".into(),
            code: "53300".into(),
            message: "too many connections".into(),
            detail: None,
            hint: None,
        });
        let standby = ReplicationError::ReadOnly {
            target: "b:5432".into(),
        };
        let retried = ReplicationError::NoHost {
            failures: vec![busy, auth()],
        };
        assert_eq!(retried.action(), Action::ReconnectPostgres);
        let retried = ReplicationError::NoHost {
            failures: vec![auth(), standby],
        };
        assert_eq!(retried.action(), Action::ReconnectPostgres);
        let refused = ReplicationError::NoHost {
            failures: vec![auth(), auth()],
        };
        assert_eq!(refused.action(), Action::Stop, "{refused}");
    }

    #[test]
    fn postgres_states_map_to_one_action_each() {
        assert_eq!(postgres_action(None), Action::ReconnectPostgres);
        assert_eq!(postgres_action(Some("57P01")), Action::ReconnectPostgres);
        assert_eq!(postgres_action(Some("08006")), Action::ReconnectPostgres);
        assert_eq!(postgres_action(Some("55006")), Action::Retry);
        assert_eq!(postgres_action(Some("53300")), Action::Retry);
        assert_eq!(postgres_action(Some("42501")), Action::Stop);
        assert_eq!(postgres_action(Some("28P01")), Action::Stop);
    }

    #[test]
    fn wrapped_errors_are_judged_by_what_they_wrap() {
        let io = ReplicationError::Io(std::io::Error::other("reset"));
        assert_eq!(io.action(), Action::ReconnectPostgres);
        let stopping = PipelineError::PostgresStopping("57P01".into());
        assert_eq!(stopping.action(), Action::ReconnectPostgres);
        let slot = crate::source::SlotError::Pipeline(PipelineError::PostgresStopping("x".into()));
        assert_eq!(slot.action(), Action::ReconnectPostgres);
        let broken = crate::source::SlotError::Pipeline(PipelineError::SinkBroken("x".into()));
        assert_eq!(broken.action(), Action::RebuildSink);
        let setup = crate::source::SlotError::Setup("wal_level".into());
        assert_eq!(setup.action(), Action::Stop);
    }
}

//! Running the relay in production: the admin HTTP listener ([`http`]: metrics, probes, the
//! oracle's endpoints), readiness ([`health`]), metric names and the recorder ([`metrics`]), the
//! slot and backlog gauges ([`monitor`]), retention of delivered rows ([`retention`]) and
//! `outbox-relay check` ([`check`]). Everything may use these; they use nothing of the flow but
//! its read-only views (the slot's state, the configuration).

pub mod check;
pub mod health;
pub mod http;
pub mod metrics;
pub mod monitor;
pub mod retention;

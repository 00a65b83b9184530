//! Running the relay in production: the admin HTTP listener ([`http`]: metrics, probes, the
//! oracle's endpoints), the broker probe behind readiness ([`probe`]), the
//! slot and backlog gauges ([`monitor`]), retention of delivered rows ([`retention`]) and
//! `outbox-relay check` ([`check`]). Everything may use these; they use nothing of the flow but
//! its read-only views (the slot's state, the configuration).

pub mod check;
pub mod http;
pub mod monitor;
pub mod probe;
pub mod retention;

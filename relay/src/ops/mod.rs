//! Running the relay in production: the admin HTTP listener ([`http`]: metrics, probes), the
//! transaction oracle's own authenticated listener ([`oracle_http`]), the broker probe behind readiness ([`probe`]), the
//! slot and backlog gauges ([`monitor`]), retention of delivered rows ([`retention`]) and
//! `outbox-relay check` ([`check`]). Everything may use these; they use nothing of the flow but
//! its read-only views (the slot's state, the configuration).

pub mod check;
pub mod http;
pub mod monitor;
pub mod oracle_http;
pub mod probe;
pub mod retention;

//! `outbox-relay run`: the supervisor that keeps the rooms running.
//!
//! WAL → replication → pipeline → sink → acks → marking → watermark → standby status update.
//! The supervisor owns one [`Session`] (the ordinary Postgres connection holding the leader
//! lock), one pipeline with its sink and marking task, and streams with them ([`stream`]).
//! Whatever fails, it asks the one error policy ([`crate::error`]) what to do: retry after a
//! backoff, reconnect Postgres, rebuild the sink (everything unconfirmed is read again from the
//! slot), or stop with the error's advice. SIGTERM/SIGINT stop reading, wait (bounded) for
//! in-flight acknowledgements, confirm the final position and exit cleanly.
//!
//! Invariants: the slot is never read without the leader lock held by the current session
//! ([`Session::holds_lock`] is set only by `leader::acquire`); a pipeline whose first-start
//! snapshot failed half-way is never reused (its watermark would hold a batch that never ends).

pub mod redrive;
pub mod session;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DeliveryMode, SinkKind, redact_url};
use crate::error::{Action, Classify, postgres_action};
use crate::exactly_once::position::{Origin, SourcePosition};
use crate::health::Health;
use crate::marking;
use crate::pipeline::{Pipeline, PipelineError};
use crate::postgres::leader;
use crate::replication::driver::{DriverSettings, StreamDriver};
use crate::replication::{Lsn, ReplicationClient, ReplicationError};
use crate::retry::{backoff, sleep_or_shutdown};
use crate::rocketmq::OwnHalves;
use crate::sink::kafka::KafkaSink;
use crate::sink::rocketmq::RocketMqSink;
use crate::sink::{AnySink, SinkError};
use crate::source::schema;
use crate::source::{self, SlotError};
use session::Session;

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to Postgres ({url}): {message}")]
    Connect {
        url: String,
        message: String,
        sqlstate: Option<String>,
    },
    #[error("cannot take the leader lock: {message}")]
    Leader {
        message: String,
        sqlstate: Option<String>,
    },
    #[error(
        "the Postgres session holding the leader lock closed; streaming stops until it is taken again"
    )]
    LockLost,
    #[error(
        "POSTGRES CHANGED UNDER THE RELAY: the server now answering is system {} timeline {}, the \
         positions this relay holds came from system {} timeline {} (a failover or promotion, or \
         postgres.url now reaches another server). Dropping them: streaming resumes from this \
         server's own slot (or, without one, from a new slot and every undelivered row), so \
         nothing is skipped; messages in flight may be published again",
        to.0, to.1, from.0, from.1
    )]
    IdentityChanged {
        from: (String, u32),
        to: (String, u32),
    },
    #[error("{0} (a step of the stream loop was cut short: the pipeline is built afresh)")]
    CutShort(Box<RunError>),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("cannot create the Kafka producer: {0}; check the [kafka] settings")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(
        "cannot start exactly-once delivery: {0}; check kafka.brokers and that the broker supports \
         transactions (Kafka 2.5 or later), or set delivery = \"at_least_once\""
    )]
    ExactlyOnce(SinkError),
    /// The NATS or RabbitMQ client cannot be set up (a URL or credentials file it cannot use).
    #[error("{0}")]
    Nats(String),
}

impl Classify for RunError {
    fn action(&self) -> Action {
        match self {
            RunError::Connect { sqlstate, .. } | RunError::Leader { sqlstate, .. } => {
                postgres_action(sqlstate.as_deref())
            }
            RunError::LockLost => Action::ReconnectPostgres,
            RunError::IdentityChanged { .. } => Action::Retry,
            RunError::CutShort(e) => e.action(),
            RunError::Slot(e) => e.action(),
            RunError::Pipeline(e) => e.action(),
            RunError::Replication(e) => e.action(),
            RunError::Kafka(_) | RunError::Nats(_) => Action::Stop,
            // The producer could not reach the brokers (retryable) or was fenced (stop).
            RunError::ExactlyOnce(e) => e.action(),
        }
    }
}

/// What to do about a failed connection: the server answered (a wrong user, password or
/// database), or nothing did (not running, a wrong host or port, a firewall).
fn connect_fix(e: &tokio_postgres::Error) -> &'static str {
    if e.code().is_some() {
        "check the user, password and database in postgres.url (RELAY_POSTGRES__URL) and the \
         server's pg_hba.conf"
    } else {
        "is Postgres running and listening there? Check the host and port in postgres.url \
         (RELAY_POSTGRES__URL) and the server's listen_addresses"
    }
}

impl RunError {
    fn connect(url: String, e: &tokio_postgres::Error) -> RunError {
        RunError::Connect {
            url,
            message: format!("{}; {}", crate::postgres::describe(e), connect_fix(e)),
            sqlstate: e.code().map(|c| c.code().to_owned()),
        }
    }

    /// The error itself, without the "cut short" wrapping.
    fn root(&self) -> &RunError {
        match self {
            RunError::CutShort(inner) => inner.root(),
            other => other,
        }
    }

    /// The slot is active in another process (the previous relay's walsender, not yet gone).
    fn slot_busy(&self) -> bool {
        let repl = match self {
            RunError::Replication(r) | RunError::Slot(SlotError::Replication(r)) => r,
            _ => return false,
        };
        repl.sqlstate() == Some("55006")
    }
}

/// A pipeline with its marking task.
struct Built {
    pipeline: Pipeline<AnySink>,
    marking: tokio::task::JoinHandle<()>,
}

impl Drop for Built {
    fn drop(&mut self) {
        self.marking.abort();
    }
}

/// A pipeline to build afresh before streaming again.
struct Rebuild {
    /// Exactly-once: the last committed Kafka position, when known (after a clean abort).
    known: Option<SourcePosition>,
    /// The position confirmed so far.
    confirmed: Lsn,
}

struct Supervisor {
    config: Config,
    shutdown: CancellationToken,
    own: OwnHalves,
    health: Arc<Health>,
    session: Option<Session>,
    built: Option<Built>,
    rebuild: Option<Rebuild>,
    delays: backon::ExponentialBackoff,
    /// Whether the slot was found held by another process (logged once, until it is free).
    standby: bool,
    /// The server (system id, timeline) the pipeline's positions came from; `None` until it
    /// first streams. Positions are only good on the server that gave them: Postgres skips
    /// transactions committed below a start position above the slot's own.
    identity: Option<(String, u32)>,
}

/// Runs the relay until `shutdown` is cancelled or an error the policy stops on. `own`: the
/// RocketMQ sink registers its unsettled half messages there (for the check-back responder).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    own: OwnHalves,
    health: Arc<Health>,
) -> Result<(), RunError> {
    let brokers = match config.sink {
        SinkKind::Kafka => config.kafka.brokers.clone(),
        SinkKind::Rocketmq => config.rocketmq.name_server.clone(),
        SinkKind::Nats => crate::config::redact_url(&config.nats.url),
        SinkKind::Rabbitmq => crate::config::redact_url(&config.rabbitmq.url),
    };
    tracing::info!(
        postgres = %redact_url(&config.postgres.url),
        slot = %config.postgres.slot,
        publication = %config.postgres.publication,
        sink = ?config.sink,
        %brokers,
        "starting outbox-relay"
    );
    let mut sup = Supervisor {
        delays: backoff(&config.retry).build(),
        config,
        shutdown,
        own,
        health,
        session: None,
        built: None,
        rebuild: None,
        standby: false,
        identity: None,
    };
    sup.preflight().await?;
    let result = loop {
        match sup.step().await {
            Ok(()) => break Ok(()),
            Err(e) => {
                if let Some(end) = sup.recover(e).await {
                    break end;
                }
            }
        }
    };
    if let Some(b) = &sup.built {
        let c = b.pipeline.counters;
        tracing::info!(
            transactions = c.transactions,
            rows = c.rows,
            confirmed = c.completed,
            "outbox-relay stopped"
        );
    }
    result
}

impl Supervisor {
    /// Connects (waiting for Postgres to come up) and checks the database is set up: errors
    /// that retrying cannot fix stop the relay before anything is built.
    async fn preflight(&mut self) -> Result<(), RunError> {
        loop {
            match self.open_session().await {
                Ok(true) => break,
                Ok(false) => return Ok(()),
                Err(e) if e.action() == Action::Stop => return Err(e),
                Err(e) => {
                    if self
                        .wait_after(&e, "Postgres is not reachable yet; retrying")
                        .await
                    {
                        return Ok(());
                    }
                }
            }
        }
        let db = &self.session.as_ref().expect("opened").db;
        schema::preflight(db, &self.config).await?;
        schema::marking_preflight(db, &self.config).await?;
        Ok(())
    }

    /// Opens a new session if there is none or it is gone. `Ok(false)`: shut down meanwhile.
    async fn open_session(&mut self) -> Result<bool, RunError> {
        if self.session.as_ref().is_some_and(|s| !s.is_gone()) {
            return Ok(true);
        }
        self.session = None;
        let url = redact_url(&self.config.postgres.url);
        let pg = self.config.pg_target();
        tokio::select! {
            s = session::open(&pg) => {
                self.session = Some(s.map_err(|e| RunError::connect(url, &e))?);
                Ok(true)
            }
            _ = self.shutdown.cancelled() => Ok(false),
        }
    }

    /// One pass: session, leader lock, pipeline, stream. `Ok` only when shut down.
    async fn step(&mut self) -> Result<(), RunError> {
        if !self.open_session().await? || !self.take_lock().await? {
            return Ok(());
        }
        self.build().await?;
        self.stream().await
    }

    /// Takes the leader lock unless this session holds it. `Ok(false)`: shut down while waiting.
    async fn take_lock(&mut self) -> Result<bool, RunError> {
        let session = self.session.as_mut().expect("opened");
        if session.holds_lock {
            return Ok(true);
        }
        match leader::acquire(&session.db, &self.config.postgres.slot, &self.shutdown).await {
            Ok(Some(waited)) => {
                session.holds_lock = true;
                // Another relay streamed meanwhile: what this pipeline knows is stale.
                if waited && let Some(b) = &self.built {
                    self.rebuild = Some(Rebuild {
                        known: None,
                        confirmed: b.pipeline.flushable(),
                    });
                }
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(RunError::Leader {
                message: format!(
                    "{}; the relay does not read the slot without it",
                    crate::postgres::describe(&e)
                ),
                sqlstate: e.code().map(|c| c.code().to_owned()),
            }),
        }
    }

    /// Builds the pipeline if there is none or a rebuild is due.
    async fn build(&mut self) -> Result<(), RunError> {
        if self.built.is_some() && self.rebuild.is_none() {
            return Ok(());
        }
        let known = self.rebuild.as_ref().and_then(|r| r.known);
        // The old sink goes first: an exactly-once producer must not overlap its successor.
        self.built = None;
        let db = &self.session.as_ref().expect("opened").db;
        let mut built = build_pipeline(&self.config, db, known, &self.own, &self.health).await?;
        if let Some(r) = self.rebuild.take() {
            built.pipeline.start_at(r.confirmed);
        }
        self.built = Some(built);
        Ok(())
    }

    /// Connects the replication stream, prepares the slot and streams until stopped.
    async fn stream(&mut self) -> Result<(), RunError> {
        let (config, shutdown) = (&self.config, &self.shutdown);
        let session = self.session.as_ref().expect("opened");
        let pipeline = &mut self.built.as_mut().expect("built").pipeline;
        let timeout = Duration::from_millis(config.postgres.replication_timeout_ms);
        let pg = config.pg_target();
        let known = self.identity.clone();
        let prepare = async {
            let mut repl = ReplicationClient::connect_with_timeout(&pg, Some(timeout)).await?;
            repl.set_max_message_bytes(
                usize::try_from(config.postgres.max_message_bytes).unwrap_or(usize::MAX),
            );
            let id = repl.identify_system().await?;
            tracing::info!(system_id = %id.system_id, timeline = id.timeline, wal_position = %id.xlog_pos, "replication connection ready");
            let here = (id.system_id, id.timeline);
            if let Some(from) = known
                && from != here
            {
                return Err(RunError::IdentityChanged { from, to: here });
            }
            if let Ok(system_id) = here.0.parse() {
                let origin = Origin {
                    system_id,
                    timeline: here.1,
                };
                if pipeline.covers_without_origin() {
                    // A record of a relay before 0.2: its server is the one the state table
                    // names, when it names one (otherwise it is trusted, as before).
                    let recorded = source::slot::recorded_server(&session.db, config).await;
                    pipeline.assume_covered_origin(recorded.and_then(|(id, tli)| {
                        Some(Origin {
                            system_id: id.parse().ok()?,
                            timeline: u32::try_from(tli).ok()?,
                        })
                    }));
                }
                let switch_point = match pipeline.covered_origin() {
                    Some(from) if from.system_id == system_id && from.timeline < here.1 => {
                        // Without the history the position is dropped: duplicates, not loss.
                        repl.timeline_switch_point(here.1, from.timeline)
                            .await
                            .unwrap_or_else(|e| {
                                tracing::warn!(error = %e, "TIMELINE_HISTORY failed");
                                None
                            })
                    }
                    _ => None,
                };
                pipeline.enter_server(origin, switch_point);
            }
            let start =
                source::prepare(&session.db, &mut repl, config, pipeline, (&here.0, here.1))
                    .await?;
            let stream = repl
                .start_replication(
                    &config.postgres.slot,
                    start,
                    &config.postgres.publication,
                    !config.outbox.message_prefix.is_empty(),
                )
                .await?;
            Ok::<_, RunError>((stream, here))
        };
        let prepared = tokio::select! {
            r = prepare => r,
            _ = shutdown.cancelled() => return Ok(()),
            i = session.interrupted() => Err(stream::interrupt_error(i).unwrap_or(RunError::LockLost)),
        };
        let replication = match prepared {
            Ok((s, here)) => {
                self.identity = Some(here);
                s
            }
            Err(e) => {
                // A first-start snapshot cut short leaves a batch that never ends.
                if pipeline.has_unfinished_batch() {
                    self.rebuild = Some(Rebuild {
                        known: pipeline.committed_position(),
                        confirmed: pipeline.flushable(),
                    });
                }
                return Err(e);
            }
        };
        tracing::info!(slot = %config.postgres.slot, from = %pipeline.flushable(), "streaming");
        let driver = StreamDriver::spawn(
            replication,
            pipeline.flushable(),
            DriverSettings {
                status_interval: Duration::from_millis(config.postgres.status_interval_ms),
                timeout,
            },
        );
        self.delays = backoff(&config.retry).build();
        self.standby = false;
        self.health.set_streaming(true);
        let streamed = stream::run(driver, pipeline, session, config, shutdown).await;
        self.health.set_streaming(false);
        streamed
    }

    /// Applies the error policy to `e`. `Some(result)`: the relay stops with it.
    async fn recover(&mut self, e: RunError) -> Option<Result<(), RunError>> {
        if self.shutdown.is_cancelled() {
            return Some(Ok(()));
        }
        match e.action() {
            Action::Stop => return Some(Err(e)),
            Action::RebuildSink => {
                // The old producer can deliver nothing more. A new one takes over from the
                // position confirmed so far; whatever was in flight is read again from the slot.
                // After a clean abort the last committed Kafka position is known here; after a
                // broken producer the new one reads it back (a commit may have been cut short).
                if let Some(b) = &self.built {
                    let p = &b.pipeline;
                    let clean_abort =
                        matches!(e, RunError::Pipeline(PipelineError::TransactionAborted(_)));
                    tracing::error!(error = %e, confirmed = %p.flushable(), in_flight = p.in_flight(),
                        "the sink failed; starting a new one (unconfirmed messages are sent again)");
                    self.rebuild = Some(Rebuild {
                        known: if clean_abort {
                            p.committed_position()
                        } else {
                            None
                        },
                        confirmed: p.flushable(),
                    });
                } else {
                    tracing::error!(error = %e, "cannot build the sink; trying again");
                }
                let wait = self.delays.next().unwrap_or(Duration::from_secs(30));
                if sleep_or_shutdown(wait, &self.shutdown).await {
                    return Some(Ok(()));
                }
            }
            Action::Retry if matches!(e, RunError::IdentityChanged { .. }) => {
                tracing::error!("{e}");
                // A new pipeline, confirming nothing the old server gave until this one does.
                self.identity = None;
                self.rebuild = Some(Rebuild {
                    known: None,
                    confirmed: Lsn::ZERO,
                });
            }
            Action::Retry | Action::ReconnectPostgres => {
                if matches!(e.root(), RunError::LockLost)
                    && let Some(s) = &mut self.session
                {
                    s.holds_lock = false;
                }
                if let Some(b) = &mut self.built {
                    let p = &mut b.pipeline;
                    p.abandon_open_transaction();
                    if self.config.delivery == DeliveryMode::ExactlyOnce
                        && (p.counters.rows > 0 || p.in_flight() > 0)
                    {
                        // Postgres will send every unconfirmed transaction again; rows already in
                        // the open Kafka transaction would go into it twice. A new producer
                        // aborts it (same transactional id) and resumes from the last committed
                        // position.
                        self.rebuild = Some(Rebuild {
                            known: p.committed_position(),
                            confirmed: p.flushable(),
                        });
                    }
                    // A step cut short (a completion or a Kafka commit under way) or a batch left
                    // open (a redrive or snapshot): the books cannot be trusted. Build afresh; an
                    // exactly-once producer reads the committed position back (a commit cut
                    // short may have succeeded).
                    if matches!(e, RunError::CutShort(_)) || p.has_unfinished_batch() {
                        self.rebuild = Some(Rebuild {
                            known: None,
                            confirmed: p.flushable(),
                        });
                    }
                }
                if self
                    .wait_after(
                        &e,
                        "lost the connection to Postgres; reconnecting (position kept by the slot)",
                    )
                    .await
                {
                    return Some(Ok(()));
                }
            }
        }
        None
    }

    /// Logs `e` and sleeps the next backoff (a busy slot is polled every second); true if shut
    /// down meanwhile.
    async fn wait_after(&mut self, e: &RunError, what: &str) -> bool {
        let mut wait = self.delays.next().unwrap_or(Duration::from_secs(30));
        if e.slot_busy() {
            wait = wait.min(leader::STANDBY_POLL);
            if !self.standby {
                self.standby = true;
                tracing::info!(slot = %self.config.postgres.slot, poll = ?wait, "the slot is active in another process; waiting for it to be released");
            }
        } else {
            self.standby = false;
            tracing::warn!(error = %e, retry_in = ?wait, "{what}");
        }
        sleep_or_shutdown(wait, &self.shutdown).await
    }
}

/// Builds the sink, the marking task and the pipeline that joins them, and loads the aggregates
/// blocked under `block_key`. Exactly-once: `known` is the last committed Kafka position when
/// the caller knows it (after a clean abort); otherwise it is read from the progress topic.
async fn build_pipeline(
    config: &Config,
    db: &tokio_postgres::Client,
    known: Option<SourcePosition>,
    own: &OwnHalves,
    health: &Arc<Health>,
) -> Result<Built, RunError> {
    let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
    let (completions_tx, completions_rx) = mpsc::unbounded_channel();
    let (sink, settler, covered) = match config.sink {
        SinkKind::Kafka => {
            let mut sink = KafkaSink::new(config, deliveries_tx.clone())?;
            let covered = match sink.init_transactions(config, known.is_none()).await {
                Ok(covered) => covered,
                Err(SinkError::Fenced(why)) => return Err(PipelineError::Fenced(why).into()),
                Err(e) => return Err(RunError::ExactlyOnce(e)),
            };
            (AnySink::Kafka(sink), None, covered)
        }
        SinkKind::Rocketmq => {
            let sink = RocketMqSink::new(config, deliveries_tx.clone(), own.clone());
            let settler = sink.settler();
            (AnySink::Rocketmq(sink), Some(settler), None)
        }
        SinkKind::Nats => {
            let sink = crate::sink::nats::NatsSink::new(config, deliveries_tx.clone())
                .await
                .map_err(RunError::Nats)?;
            (AnySink::Nats(sink), None, None)
        }
        SinkKind::Rabbitmq => {
            let sink = crate::sink::rabbitmq::RabbitmqSink::new(config, deliveries_tx.clone())
                .map_err(RunError::Nats)?;
            (AnySink::Rabbitmq(sink), None, None)
        }
    };
    let marking = tokio::spawn(marking::run(
        config.clone(),
        deliveries_rx,
        completions_tx,
        settler,
        health.clone(),
    ));
    let mut pipeline = Pipeline::new(config, sink, deliveries_tx, completions_rx);
    pipeline.set_health(health.clone());
    if config.delivery == DeliveryMode::ExactlyOnce {
        let covered = known.or(covered).unwrap_or_default();
        tracing::info!(
            progress_topic = %config.exactly_once.progress_topic,
            committed = %covered,
            "exactly-once: rows the committed Kafka transactions hold are not sent again"
        );
        pipeline.set_covered(covered);
    }
    let mut built = Built { pipeline, marking };
    redrive::load_blocked(db, config, &mut built.pipeline)
        .await
        .map_err(|e| SlotError::query("reading the aggregates blocked by failed rows", e))?;
    Ok(built)
}

//! The `outbox-relay` command line: `run` and `check`; without a command, the help.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::config::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional-outbox relay: Postgres logical replication to Kafka, RocketMQ, RabbitMQ or NATS JetStream",
    arg_required_else_help = true,
    after_help = AFTER_HELP
)]
struct Cli {
    /// Configuration file (TOML). Default: config/relay.toml if it exists. RELAY_* variables override it.
    #[arg(long, global = true, env = "RELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream the outbox to the broker.
    Run,
    /// Check Postgres, the outbox schema and the broker; print PASS/FAIL with fixes.
    Check,
}

/// What a newcomer needs after the command list: the two settings to give first, and where the
/// rest are.
const AFTER_HELP: &str = "\
The two settings to give first (config file key, or environment variable):
  postgres.url     RELAY_POSTGRES__URL    the database with the outbox table (sql/ applied),
                                          e.g. postgres://relay@db:5432/app
  kafka.brokers    RELAY_KAFKA__BROKERS   the Kafka bootstrap servers, e.g. kafka:9092
                                          (other brokers: sink = rocketmq | rabbitmq | nats)

Try:
  outbox-relay check    checks Postgres, the outbox schema and the broker; names each fix
  outbox-relay run      streams until SIGTERM; metrics at http://127.0.0.1:8080/metrics

Every setting, its default and its RELAY_* name: config/relay.toml and the README.";

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    if !config.ignored_env.is_empty() {
        tracing::warn!(
            variables = %config.ignored_env.join(", "),
            "ignoring RELAY_* environment variables that name no configuration key (Kubernetes \
             sets RELAY_SERVICE_HOST, RELAY_PORT, ... for a Service named relay); configuration \
             keys use a section and '__', e.g. RELAY_POSTGRES__URL"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Check => {
                let results = outbox_relay::ops::check::run_checks(&config).await;
                if outbox_relay::ops::check::print_report(&results) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Command::Run => {
                let metrics = match outbox_relay::metrics::install() {
                    Ok(handle) => Some(handle),
                    Err(e) => {
                        tracing::warn!("{e}; /metrics will answer 404");
                        None
                    }
                };
                let shutdown = CancellationToken::new();
                tokio::spawn(wait_for_signal(shutdown.clone()));
                let oracle = outbox_relay::ops::http::oracle(&config);
                let health = std::sync::Arc::new(outbox_relay::health::Health::new(
                    std::time::Duration::from_millis(config.health.stall_ms),
                ));
                health.set_streaming(false); // the series exists (0) before the first stream
                let state = outbox_relay::ops::http::AdminState {
                    metrics,
                    health: health.clone(),
                };
                match outbox_relay::ops::http::start(&config, state, shutdown.clone()).await {
                    Ok(Some(addr)) => tracing::info!(
                        %addr,
                        "admin HTTP listener: GET /metrics, /healthz, /readyz"
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!("outbox-relay: {e}");
                        return ExitCode::from(2);
                    }
                }
                let guarded = outbox_relay::ops::oracle_http::OracleState::new(&config, oracle.clone());
                match outbox_relay::ops::oracle_http::start(&config, guarded, shutdown.clone()).await {
                    Ok(Some(addr)) => tracing::info!(
                        %addr,
                        "transaction oracle over HTTP (bearer token): GET /v1/transactions/{{key}}, /v1/dtm/query-prepared"
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!("outbox-relay: {e}");
                        return ExitCode::from(2);
                    }
                }
                tokio::spawn(outbox_relay::ops::probe::probe_broker(
                    config.clone(),
                    health.clone(),
                    shutdown.clone(),
                ));
                tokio::spawn(outbox_relay::ops::monitor::run(config.clone(), shutdown.clone()));
                tokio::spawn(outbox_relay::ops::retention::run(config.clone(), shutdown.clone()));
                let own = outbox_relay::rocketmq::OwnHalves::default();
                let own_sink = config.sink == outbox_relay::config::SinkKind::Rocketmq;
                tokio::spawn(outbox_relay::rocketmq::checkback::run(
                    config.rocketmq.clone(),
                    config.rocketmq.groups(own_sink),
                    oracle.clone(),
                    own.clone(),
                    shutdown.clone(),
                ));
                {
                    let config = config.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        outbox_relay::ops::http::purge_loop(&config, oracle, shutdown).await
                    });
                }
                match outbox_relay::app::run(config, shutdown, own, health).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!("outbox-relay: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    });
    // Work still blocked on a broker (a metadata request waiting out its timeout on a blocking
    // thread) must not hold the exit: what mattered is confirmed already.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

//! `saga-coordinator`: the saga engine as a service with an HTTP API. See
//! `orchestrator::service` for what runs and `orchestrator::service::config`
//! for the settings.

use std::path::PathBuf;

use clap::Parser;
use orchestrator::service::http::{App, router};
use orchestrator::service::{Config, Engine};
use schemas::process::{redact_url, shutdown_signal};

/// Runs a saga coordinator: loads the definitions, drives sagas, serves the
/// HTTP API.
#[derive(Debug, Parser)]
#[command(name = "saga-coordinator", version, about)]
struct Args {
    /// A TOML configuration file.
    #[arg(long, short, env = "SAGA_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// The address to listen on (default 127.0.0.1:8090).
    #[arg(long)]
    listen: Option<String>,
    /// `sqlite:path` (default sqlite:saga-coordinator.db) or `postgres://...`.
    #[arg(long)]
    database_url: Option<String>,
    /// A definition file (.yaml, .yml, .json) or a directory of them.
    #[arg(long)]
    definitions: Option<PathBuf>,
    /// `sql` (default: the SQL broker on the same database), `kafka` or `nats`.
    #[arg(long)]
    broker: Option<String>,
    /// The topic participants reply to (default saga.replies).
    #[arg(long)]
    reply_topic: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("saga-coordinator: {}", chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let env = Config::from_env(|k| std::env::var(k).ok())?;
    let flags = Config {
        listen: args.listen,
        database_url: args.database_url,
        definitions: args.definitions,
        broker: args.broker,
        reply_topic: args.reply_topic,
        ..Config::default()
    };
    let config = file.overlay(env).overlay(flags);
    // Checked before anything starts, so a bad address fails at once.
    let addr = config.listen_addr()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let engine = Engine::start(&config).await?;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            engine.shutdown().await;
            return Err(format!("cannot listen on {addr}: {e}").into());
        }
    };
    let bound = listener.local_addr()?;
    // The address is printed on its own line so that scripts (and tests)
    // that ask for port 0 learn the one bound.
    println!("listening on http://{bound}");
    tracing::info!(%bound, database = %redact_url(config.database_url()), auth = config.token.is_some(), "saga coordinator listening");
    let mut app = App::new(
        engine.coordinator().clone(),
        engine.database().clone(),
        Some(metrics),
    );
    if let Some(token) = &config.token {
        app = app.with_token(token.clone());
    }
    let app = router(app);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    engine.shutdown().await;
    served?;
    Ok(())
}

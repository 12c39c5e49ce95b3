//! `schema-registry`: the registry as a server speaking the Confluent Schema
//! Registry REST API. See the crate docs and [`schemas::config`] for the
//! settings.

use std::path::PathBuf;

use clap::Parser;
use schemas::config::Config;
use schemas::process::{redact_url, shutdown_signal};
use schemas::server::{ServerOptions, router, serve};
use schemas::{Registry, Store};

/// Runs the schema registry.
#[derive(Debug, Parser)]
#[command(name = "schema-registry", version, about)]
struct Args {
    /// A TOML configuration file.
    #[arg(long, short, env = "SCHEMA_REGISTRY_CONFIG")]
    config: Option<PathBuf>,
    /// The address to listen on (default 127.0.0.1:8081).
    #[arg(long)]
    listen: Option<String>,
    /// `sqlite:path`, `sqlite::memory:` or `postgres://...`.
    #[arg(long)]
    database_url: Option<String>,
    /// The URL clients reach the registry at (put into schema URLs).
    #[arg(long)]
    base_url: Option<String>,
    /// The largest schema accepted, in bytes.
    #[arg(long)]
    max_schema_bytes: Option<usize>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("schema-registry: {e}");
            std::process::ExitCode::FAILURE
        }
    }
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
        base_url: args.base_url,
        max_schema_bytes: args.max_schema_bytes,
        ..Config::default()
    };
    let config = file.overlay(env).overlay(flags);
    let listener = tokio::net::TcpListener::bind(config.listen_addr()?).await?;
    let bound = listener.local_addr()?;
    let options = config.registry_options(bound)?;
    let store = Store::connect(config.database_url()).await?;
    let registry = Registry::open(store.clone(), options).await?;
    tracing::info!(%bound, database = %redact_url(config.database_url()), auth = config.token.is_some(), "schema registry listening");
    let app = router(
        registry,
        ServerOptions {
            token: config.token.clone(),
        },
    );
    serve(listener, app, shutdown_signal()).await?;
    store.close().await;
    Ok(())
}

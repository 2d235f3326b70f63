//! The `kstash` command line: `kstash dev` (embedded Kafka, dev credentials) and `kstash serve`
//! (a real Kafka cluster). Everything else lives in the library.
#![deny(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kstash::config::{Config, Mode};
use kstash::kafka::embedded::EmbeddedCluster;

#[derive(Parser)]
#[command(
    name = "kstash",
    version,
    about = "Kafka-backed HTTP message queue speaking the QStash v2 API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on an in-process Kafka cluster with the QStash dev token and keys.
    Dev {
        /// Port to listen on (127.0.0.1); 0 picks a free one.
        #[arg(long)]
        port: Option<u16>,
        /// TOML config file layered over the defaults.
        #[arg(long, env = "KSTASH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run against a real Kafka cluster (kafka.brokers / KSTASH_KAFKA_BROKERS).
    Serve {
        /// TOML config file layered over the defaults.
        #[arg(long, env = "KSTASH_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (mode, file, port) = match cli.command {
        Command::Dev { port, config } => (Mode::Dev, config, port),
        Command::Serve { config } => (Mode::Serve, config, None),
    };
    let mut config = Config::load(mode, file.as_deref())?;
    if let Some(port) = port {
        config.server.listen.set_port(port);
    }
    let embedded = match mode {
        Mode::Dev => Some(Arc::new(EmbeddedCluster::start()?)),
        Mode::Serve => None,
    };
    let running = kstash::server::start(config.clone(), embedded).await?;
    if mode == Mode::Dev {
        banner(&config, running.addr())?;
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

/// The dev banner goes to stdout, where a user (or a script) looks for the URL and credentials.
fn banner(config: &Config, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "kstash dev server (embedded Kafka: in-memory, nothing persists)"
    )?;
    writeln!(out, "  QSTASH_URL=http://{addr}")?;
    writeln!(out, "  QSTASH_TOKEN={}", config.auth.tokens.join(","))?;
    writeln!(
        out,
        "  QSTASH_CURRENT_SIGNING_KEY={}",
        config.signing.current_key
    )?;
    writeln!(out, "  QSTASH_NEXT_SIGNING_KEY={}", config.signing.next_key)?;
    writeln!(out, "  loopback destinations are allowed; Ctrl-C stops")?;
    out.flush()
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

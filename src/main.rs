//! The `chitram` command: a thin CLI over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use chitram::app::{self, Application};
use chitram::config::Settings;
use chitram::placement::ring::Ring;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chitram", version, about = "A self-hosted image store over a sharded, replicated object store")]
struct Cli {
    /// TOML configuration file (the embedded default applies without one).
    #[arg(long, global = true, env = "CHITRAM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, start the background workers, and serve HTTP.
    Serve,
    /// Apply the metadata migrations and exit.
    Migrate,
    /// Show each shard's weight, vnodes and expected share of the keys.
    Ring,
}

#[tokio::main]
async fn main() -> ExitCode {
    chitram::telemetry::init();
    let cli = Cli::parse();
    let result = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => run(cli.command, settings).await,
        Err(error) => Err(error.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", chitram::telemetry::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Serve => {
            let app = Application::build(&settings).await?;
            app.run_until_stopped(shutdown_signal()).await?;
            tracing::info!("stopped");
        }
        Command::Migrate => {
            app::open_metadata(&settings.database.url).await?;
            println!("migrations applied to {}", settings.database.url.split('@').next_back().unwrap_or_default());
        }
        Command::Ring => {
            let ring = Ring::new(settings.ring_members(), settings.placement.vnodes_per_weight)?;
            print!("{}", chitram::placement::report::ring_report(&ring));
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

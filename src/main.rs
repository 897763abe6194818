//! The `chitram` command: a thin CLI over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use chitram::app::{self, Application};
use chitram::commands;
use chitram::config::Settings;
use chitram::telemetry::LogColor;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chitram", version, about = "A self-hosted image store over a sharded, replicated object store")]
struct Cli {
    /// TOML configuration file (the embedded default applies without one).
    #[arg(long, global = true, env = "CHITRAM_CONFIG")]
    config: Option<PathBuf>,
    /// Colour in the logs: `auto` colours only a terminal, and not when NO_COLOR is set.
    #[arg(long, global = true, value_enum, default_value_t = LogColor::Auto, value_name = "WHEN")]
    log_color: LogColor,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, start the background workers, and serve HTTP.
    Serve,
    /// Apply the metadata migrations and exit (creating the database if needed).
    Migrate,
    /// Print the effective configuration (the default, then --config, then CHITRAM__*
    /// environment overrides) as TOML, secrets masked.
    Config,
    /// Show each shard's weight, vnodes, state and share of the keys; with --compare, what a
    /// new config would move.
    Ring {
        /// A new config: print the expected movement and the exact rebalance plan.
        #[arg(long, value_name = "NEW.toml")]
        compare: Option<PathBuf>,
    },
    /// Move stored blobs onto their current write sets (copy, verify, record, then remove the
    /// surplus copy), with a progress bar; safe while the service runs, and resumable.
    Rebalance {
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check every recorded copy, restore blobs below the replication factor, and find orphans.
    Scrub {
        /// Record bad copies, restore under-replicated blobs, and delete orphans.
        #[arg(long)]
        repair: bool,
        /// Read every copy and check its SHA-256 (slower), not just its size.
        #[arg(long)]
        checksums: bool,
    },
    /// Thumbnails and previews.
    Variants {
        #[command(subcommand)]
        command: VariantsCommand,
    },
}

#[derive(Subcommand)]
enum VariantsCommand {
    /// Make every configured variant that is missing or stale (a new name, a changed spec)
    /// ahead of traffic, with a progress bar; resumable (Ctrl-C, then run it again).
    Backfill,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    chitram::telemetry::init(cli.log_color);
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
            println!("migrations applied to {}", chitram::redact::redact_url(&settings.database.url));
        }
        Command::Config => print!("{}", settings.to_masked_toml()?),
        Command::Ring { compare } => {
            let new = compare.map(|path| Settings::load(Some(&path))).transpose()?;
            return finish(commands::ring(&settings, new.as_ref()).await?);
        }
        Command::Rebalance { dry_run } => return finish(commands::rebalance(&settings, dry_run).await?),
        Command::Scrub { repair, checksums } => return finish(commands::scrub(&settings, repair, checksums).await?),
        Command::Variants { command: VariantsCommand::Backfill } => {
            return finish(commands::variants_backfill(&settings).await?);
        }
    }
    Ok(())
}

/// Prints a command's report; a report of problems left unresolved exits with status 1.
fn finish(outcome: commands::Outcome) -> Result<(), Box<dyn std::error::Error>> {
    print!("{}", outcome.report);
    if outcome.ok { Ok(()) } else { Err("problems remain (see above)".into()) }
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

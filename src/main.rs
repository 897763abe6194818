//! The `chitram` command: a thin CLI over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use chitram::app::{self, Application};
use chitram::commands;
use chitram::commands::accounts::{self as account_commands, QuotaArg};
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
        /// Before removing a surplus copy, read the copies that stay and check their SHA-256
        /// (slower: reads what it keeps), not just their size.
        #[arg(long)]
        verify: bool,
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
    /// Manage users (no server needed: this works on the database directly).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Manage API keys (no server needed).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Thumbnails and previews.
    Variants {
        #[command(subcommand)]
        command: VariantsCommand,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create a user and a first API key for it (printed once).
    Create {
        name: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
        /// Read a login password from standard input (its first line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users with their usage and quota.
    List,
    /// Set a user's own quota: a number of bytes (KiB, MiB, GiB, TiB allowed) or images,
    /// `unlimited`, or `default` to follow auth.default_quota_*. At least one of the two.
    #[command(group(clap::ArgGroup::new("limit").required(true).multiple(true).args(["bytes", "images"])))]
    SetQuota {
        name: String,
        #[arg(long)]
        bytes: Option<QuotaArg>,
        #[arg(long)]
        images: Option<QuotaArg>,
    },
    /// Disable a user: their keys and tokens stop working, their images stay.
    Disable { name: String },
    /// Enable a disabled user again.
    Enable { name: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key for a user (printed once).
    Create {
        #[arg(long)]
        user: String,
        /// What the key is for.
        #[arg(long, default_value = "created with the CLI")]
        name: String,
    },
    /// List a user's keys (never the keys themselves).
    List {
        #[arg(long)]
        user: String,
    },
    /// Revoke a key by its id.
    Revoke { id: uuid::Uuid },
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
    let result = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => {
            let telemetry = &settings.telemetry;
            match chitram::telemetry::init(cli.log_color, telemetry.log_format, telemetry.otlp_endpoint.as_deref()) {
                Ok(traces) => {
                    let result = run(cli.command, settings).await;
                    // Sends the spans still buffered (a blocking call: off the async threads).
                    if let Some(traces) = traces {
                        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
                    }
                    result
                }
                Err(error) => Err(error.into()),
            }
        }
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
        Command::Rebalance { dry_run, verify } => {
            return finish(commands::rebalance(&settings, dry_run, verify).await?);
        }
        Command::Scrub { repair, checksums } => return finish(commands::scrub(&settings, repair, checksums).await?),
        Command::Users { command } => return finish(users(command, &settings).await?),
        Command::Keys { command } => return finish(keys(command, &settings).await?),
        Command::Variants { command: VariantsCommand::Backfill } => {
            return finish(commands::variants_backfill(&settings).await?);
        }
    }
    Ok(())
}

async fn users(command: UsersCommand, settings: &Settings) -> Result<commands::Outcome, Box<dyn std::error::Error>> {
    Ok(match command {
        UsersCommand::Create { name, admin, password_stdin } => {
            let password = password_stdin.then(read_password).transpose()?;
            account_commands::create_user(settings, &name, admin, password).await?
        }
        UsersCommand::List => account_commands::list_users(settings).await?,
        UsersCommand::SetQuota { name, bytes, images } => {
            account_commands::set_quota(settings, &name, bytes, images).await?
        }
        UsersCommand::Disable { name } => account_commands::set_disabled(settings, &name, true).await?,
        UsersCommand::Enable { name } => account_commands::set_disabled(settings, &name, false).await?,
    })
}

async fn keys(command: KeysCommand, settings: &Settings) -> Result<commands::Outcome, Box<dyn std::error::Error>> {
    Ok(match command {
        KeysCommand::Create { user, name } => account_commands::create_key(settings, &user, &name).await?,
        KeysCommand::List { user } => account_commands::list_keys(settings, &user).await?,
        KeysCommand::Revoke { id } => account_commands::revoke_key(settings, id).await?,
    })
}

/// The first line of standard input, without its line ending. From a terminal, a prompt says
/// that what is typed shows (pipe the password in to keep it off the screen).
fn read_password() -> std::io::Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprint!("password (it shows as you type; pipe it in to hide it): ");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
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

//! The `kamigate` binary: parses the command line, loads configuration, and hands over to
//! the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kamigate::code::{Check, Format, Preset, SpecError, MAX_CODE_LENGTH};
use kamigate::config::Config;
use kamigate::error::timestamp;
use kamigate::gateway::Gateway;
use kamigate::pause::{Action, PauseOrder, ResumeOrder, Target};
use kamigate::sku::{check_id, MAX_ID_LEN};

/// A claim allocates and frees many small buffers (HTTP, JSON, engine replies) across the
/// runtime's threads; mimalloc's per-thread free lists serve them with far less contention
/// than the system allocator's arenas, which took a fifth of the gateway's CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kamigate", version, about = "Redemption gateway for card keys")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the public, merchant and admin APIs until SIGTERM or Ctrl-C.
    #[command(after_help = "Examples:\n  \
        kamigate serve\n  \
        KAMIGATE_REDIS_URL=redis://127.0.0.1:6379 KAMIGATE_DATABASE_URL=postgres://kamigate@127.0.0.1/kamigate kamigate serve\n  \
        kamigate serve --config /etc/kamigate/kamigate.toml")]
    Serve {
        /// TOML configuration file; KAMIGATE_* environment variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stream a file of codes (a code per line, .csv or .ndjson) into a SKU, through the
    /// ledger.
    #[command(after_help = "Examples:\n  \
        kamigate import codes.txt --sku gift-50 --batch 2026-12-supplier-a\n  \
        kamigate import codes.csv --sku gift-50 --batch b-7 --pending --config kamigate.toml")]
    Import {
        /// The file; its extension picks the format (.csv, .ndjson/.jsonl, else a code per line).
        file: PathBuf,
        /// The SKU to import into; create it first (PUT /v1/skus/{sku} on the admin listener).
        #[arg(long)]
        sku: String,
        /// Batch id: the same id again adds nothing.
        #[arg(long)]
        batch: String,
        /// Leave the batch pending (not for sale) until activated.
        #[arg(long)]
        pending: bool,
        /// TOML configuration file (as for serve): it names the ledger and the engine.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Load ledger keys Redis lacks (Redis only: the embedded engine warms itself on start).
    #[command(after_help = "Examples:\n  \
        KAMIGATE_REDIS_URL=redis://127.0.0.1:6379 kamigate warm\n  \
        kamigate warm --sku gift-50 --config kamigate.toml")]
    Warm {
        /// Only this SKU (default: every SKU the ledger has).
        #[arg(long)]
        sku: Option<String>,
        /// TOML configuration file (as for serve): it names the ledger and Redis.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Compare Redis with the ledger key by key; with --repair, fix what the ledger is ahead
    /// on (never rolling back a change only the engine has).
    #[command(after_help = "Examples:\n  \
        kamigate reconcile --config kamigate.toml\n  \
        kamigate reconcile --sku gift-50 --repair --config kamigate.toml")]
    Reconcile {
        /// Only this SKU (default: every SKU the ledger has).
        #[arg(long)]
        sku: Option<String>,
        /// Set keys to the ledger's state where the ledger is ahead (otherwise only report).
        #[arg(long)]
        repair: bool,
        /// TOML configuration file (as for serve): it names the ledger and Redis.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Seal every stored code under the current data key, and migrate a ledger that still
    /// stores codes in clear; resumable, safe to interrupt, claims go on meanwhile.
    ///
    /// With --new-key, a fresh data key is first added to <data dir>/data.key as the one
    /// that seals; older keys stay to open what they sealed. With the embedded engine and a
    /// gateway running on the data dir, use POST /v1/rekey on its admin listener instead.
    #[command(after_help = "Examples:\n  \
        kamigate rekey --config kamigate.toml\n  \
        kamigate rekey --new-key d2 --config kamigate.toml\n  \
        kamigate rekey --index --sku gift-50")]
    Rekey {
        /// Only this SKU (default: every SKU the ledger has).
        #[arg(long)]
        sku: Option<String>,
        /// Also key the code digests anew under the current index key: a full re-index,
        /// needed after the index key changed (codes under the old one are not found until
        /// then).
        #[arg(long)]
        index: bool,
        /// Add a fresh data key with this id (lower-case letters and digits) to the key file
        /// first, as the sealing key.
        #[arg(long)]
        new_key: Option<String>,
        /// TOML configuration file (as for serve): it names the ledger, Redis and data dir.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Pause claims or redemptions of one SKU (--sku) or of every SKU (--gateway).
    ///
    /// Recorded in the ledger, so every gateway sharing it refuses new claims or redemptions
    /// with 503 ERR_PAUSED within its pause_refresh_ms (500 ms by default), also after a
    /// restart; requests retried after an answer from before the pause still get that
    /// answer. Only the ledger is needed: this works while Redis is down. Pausing what is
    /// paused already keeps its start and takes the new reason and expected duration.
    #[command(after_help = "Examples:\n  \
        kamigate pause claims --sku gift-50 --reason 'supplier reports batch b-7 leaked' --expected 30m\n  \
        kamigate pause redemptions --gateway --reason 'brute force from many networks' --by alice\n  \
        kamigate pause all --sku gift-50 --reason 'codes rejected by the issuer'")]
    Pause {
        /// What to pause.
        #[arg(value_parser = ["claims", "redemptions", "all"])]
        action: String,
        /// The SKU to pause.
        #[arg(long, required_unless_present = "gateway", conflicts_with = "gateway")]
        sku: Option<String>,
        /// Pause it for every SKU.
        #[arg(long)]
        gateway: bool,
        /// Why: one line, recorded in the pause history.
        #[arg(long)]
        reason: String,
        /// How long you expect the pause to last (30s, 15m, 2h): past it the pause shows as
        /// overdue (GET /v1/pauses, kamigate_pause_expected_end_timestamp_seconds).
        #[arg(long, value_parser = humantime::parse_duration)]
        expected: Option<std::time::Duration>,
        /// Who pauses, as recorded [default: cli:$USER].
        #[arg(long)]
        by: Option<String>,
        /// TOML configuration file (as for serve): it names the ledger.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Resume claims or redemptions of one SKU (--sku) or of every SKU (--gateway).
    ///
    /// Lifts the pause in the ledger; every gateway serves again within its
    /// pause_refresh_ms. A SKU paused on its own stays paused when a gateway-wide pause is
    /// lifted, and the other way round.
    #[command(after_help = "Examples:\n  \
        kamigate resume claims --sku gift-50 --reason 'leaked codes voided'\n  \
        kamigate resume all --gateway")]
    Resume {
        /// What to resume.
        #[arg(value_parser = ["claims", "redemptions", "all"])]
        action: String,
        /// The SKU to resume.
        #[arg(long, required_unless_present = "gateway", conflicts_with = "gateway")]
        sku: Option<String>,
        /// Resume the gateway-wide pause.
        #[arg(long)]
        gateway: bool,
        /// Why: one line, recorded in the pause history.
        #[arg(long)]
        reason: Option<String>,
        /// Who resumes, as recorded [default: cli:$USER].
        #[arg(long)]
        by: Option<String>,
        /// TOML configuration file (as for serve): it names the ledger.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List the pauses in force and the latest pauses and resumes, newest first.
    #[command(
        after_help = "Examples:\n  kamigate pauses\n  kamigate pauses --sku gift-50 --limit 20"
    )]
    Pauses {
        /// Only the history of this SKU.
        #[arg(long)]
        sku: Option<String>,
        /// Most history entries to show (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// TOML configuration file (as for serve): it names the ledger.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print random codes, one per line, in the format's display form (grouped as the SKU
    /// shows its codes).
    ///
    /// The options are those of a SKU's "format" (PUT /v1/skus/{sku}), so every code printed
    /// validates under a SKU created with the same options: --preset, --charset, --length
    /// (both min_length and max_length), --group (group_size), --check ("check":"luhn") and
    /// --case-sensitive; or the whole "format" object with --format; or the current format
    /// of an existing SKU with --sku.
    #[command(after_help = "Examples:\n  \
        kamigate gen --count 1000 > codes.txt\n  \
        kamigate gen --preset crockford32 --length 16 --group 4 --check --count 5\n  \
        kamigate gen --charset 0123456789 --length 12 --group 0 --check\n  \
        kamigate gen --format '{\"preset\":\"crockford32\",\"min_length\":10,\"max_length\":10}'\n  \
        kamigate gen --sku gift-50 --count 1000 --config kamigate.toml")]
    Gen {
        /// How many codes.
        #[arg(long, default_value_t = 10)]
        count: u64,
        #[command(flatten)]
        format: GenFormat,
        /// Use this SKU's current format, as its ledger records it, instead of the options
        /// above.
        #[arg(long, conflicts_with_all = ["preset", "charset", "length", "group", "check", "case_sensitive", "format"])]
        sku: Option<String>,
        /// TOML configuration file (as for serve): it names the ledger (with --sku).
        #[arg(long, requires = "sku")]
        config: Option<PathBuf>,
    },
}

/// The format options of `kamigate gen`: a SKU's format, spelled as flags.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
struct GenFormat {
    /// The preset the format starts from [default: crockford32, or default with --charset].
    #[arg(long, value_parser = ["default", "crockford32"])]
    preset: Option<String>,
    /// The symbols codes are made of, in check-character order (with --preset default).
    #[arg(long)]
    charset: Option<String>,
    /// Code length, including the check character.
    #[arg(long, default_value_t = 16)]
    length: usize,
    /// Insert '-' every N characters for display (0: none).
    #[arg(long, default_value_t = 4)]
    group: usize,
    /// Append a Luhn mod N check character (N: the charset's size), which catches every
    /// single-character typo.
    #[arg(long)]
    check: bool,
    /// Keep letters' case (a --charset may then hold lower-case letters).
    #[arg(long)]
    case_sensitive: bool,
    /// A SKU's whole "format" object, as JSON, instead of the options above.
    #[arg(long, value_name = "JSON", conflicts_with_all = ["preset", "charset", "length", "group", "check", "case_sensitive"])]
    format: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Import {
            file,
            sku,
            batch,
            pending,
            config,
        } => operate(config, |config| async move {
            let report = kamigate::commands::import(&config, &file, &sku, &batch, !pending).await?;
            println!(
                "batch {batch}: {} accepted, {} rejected, {} duplicate ({}{}{})",
                report.accepted,
                report.rejected,
                report.duplicate,
                if pending { "pending" } else { "active" },
                report
                    .format_version
                    .map(|v| format!(", format version {v}"))
                    .unwrap_or_default(),
                if report.replayed {
                    ", imported before: nothing added"
                } else {
                    ""
                },
            );
            for (line, reason) in report.lines.iter().take(20) {
                println!("  line {line}: {reason}");
            }
            Ok(())
        }),
        Command::Reconcile {
            sku,
            repair,
            config,
        } => operate(config, |config| async move {
            for r in kamigate::commands::reconcile(&config, sku.as_deref(), repair).await? {
                println!(
                    "{}: {} checked, {} missing in engine, {} ledger ahead, {} engine ahead, \
                     {} deferred (events in flight), {} repaired",
                    r.sku,
                    r.checked,
                    r.missing_in_engine,
                    r.ledger_ahead,
                    r.engine_ahead,
                    r.deferred,
                    r.repaired
                );
                for d in r.differences.iter().take(50) {
                    println!("  {} {} ({})", d.key_id, d.kind, d.action);
                }
            }
            Ok(())
        }),
        Command::Rekey {
            sku,
            index,
            new_key,
            config,
        } => operate(config, |config| async move {
            let done =
                kamigate::commands::rekey(&config, sku.as_deref(), index, new_key.as_deref())
                    .await?;
            let r = done.report;
            println!(
                "{} SKUs, {} keys: {} sealed anew under data key {} ({} of them stored in \
                 clear before), {} digests keyed anew under index key {}, {} blacklists \
                 sealed anew, {} did not open",
                r.skus,
                r.keys,
                r.resealed,
                done.data_key,
                r.migrated,
                r.reindexed,
                done.index_key,
                r.blacklists,
                r.failed
            );
            if r.stale_digests > 0 {
                println!(
                    "{} digests are under another index key: run kamigate rekey --index",
                    r.stale_digests
                );
            }
            Ok(())
        }),
        Command::Warm { sku, config } => operate(config, |config| async move {
            for (sku, report) in kamigate::commands::warm(&config, sku.as_deref()).await? {
                println!(
                    "{sku}: {} loaded, {} already present",
                    report.loaded, report.present
                );
            }
            Ok(())
        }),
        Command::Pause {
            action,
            sku,
            gateway: _,
            reason,
            expected,
            by,
            config,
        } => operate(config, |config| async move {
            let order = PauseOrder {
                target: target(sku),
                actions: Action::parse_many(&action)?,
                reason,
                by: actor(by),
                expected_duration_ms: expected.map(|d| d.as_millis() as u64),
            };
            for (pause, already) in kamigate::commands::pause(&config, &order).await? {
                println!(
                    "paused {} {}{}{}",
                    pause.action.as_str(),
                    describe(&pause.target),
                    pause
                        .expected_end_ms
                        .map(|t| format!(", expected to end at {}", timestamp(t)))
                        .unwrap_or_default(),
                    if already {
                        format!(
                            " (paused already since {}: reason and expected end updated)",
                            timestamp(pause.since_ms)
                        )
                    } else {
                        String::new()
                    },
                );
            }
            println!(
                "running gateways enforce it within their pause_refresh_ms (500 ms by default)"
            );
            Ok(())
        }),
        Command::Resume {
            action,
            sku,
            gateway: _,
            reason,
            by,
            config,
        } => operate(config, |config| async move {
            let target = target(sku);
            let order = ResumeOrder {
                target: target.clone(),
                actions: Action::parse_many(&action)?,
                reason,
                by: actor(by),
            };
            for (action, lifted) in kamigate::commands::resume(&config, &order).await? {
                match lifted {
                    Some(p) => println!(
                        "resumed {} {} (paused since {})",
                        action.as_str(),
                        describe(&target),
                        timestamp(p.since_ms)
                    ),
                    None => println!("{} {} was not paused", action.as_str(), describe(&target)),
                }
            }
            Ok(())
        }),
        Command::Pauses { sku, limit, config } => operate(config, |config| async move {
            let (in_force, history) =
                kamigate::commands::pauses(&config, sku.as_deref(), limit).await?;
            if in_force.is_empty() {
                println!("nothing is paused");
            }
            for p in &in_force {
                println!(
                    "PAUSED {} {} since {} by {}{}: {}",
                    p.action.as_str(),
                    describe(&p.target),
                    timestamp(p.since_ms),
                    p.by,
                    p.expected_end_ms
                        .map(|t| format!(", expected end {}", timestamp(t)))
                        .unwrap_or_default(),
                    p.reason
                );
            }
            for e in &history {
                let target = if e.sku.is_empty() {
                    "of every SKU".to_owned()
                } else {
                    format!("of SKU {}", e.sku)
                };
                println!(
                    "{} {} {} {} by {}{}",
                    timestamp(e.at_ms.max(0) as u64),
                    e.kind,
                    e.action,
                    target,
                    e.actor,
                    e.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }),
        Command::Gen {
            count,
            format,
            sku: None,
            config: _,
        } => match format.build() {
            Ok(format) => match gen(count, &format) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            },
            Err(message) => {
                eprintln!("kamigate gen: {message}");
                ExitCode::from(2)
            }
        },
        Command::Gen {
            count,
            sku: Some(sku),
            config,
            ..
        } => operate(config, |config| async move {
            let format = kamigate::commands::sku_format(&config, &sku).await?;
            gen(count, &format).map_err(kamigate::commands::CommandError::Output)
        }),
    }
}

/// The target of `pause` and `resume`: clap requires exactly one of `--sku` and `--gateway`.
fn target(sku: Option<String>) -> Target {
    sku.map_or(Target::Gateway, Target::Sku)
}

/// "of SKU gift-50" or "of every SKU".
fn describe(target: &Target) -> String {
    match target {
        Target::Gateway => "of every SKU".to_owned(),
        Target::Sku(sku) => format!("of SKU {sku}"),
    }
}

/// Who a change from the command line is recorded as made by: `--by`, else `cli:$USER`
/// (when that is a valid identifier), else `cli`.
fn actor(by: Option<String>) -> String {
    by.unwrap_or_else(|| {
        std::env::var("USER")
            .ok()
            .map(|user| format!("cli:{user}"))
            .filter(|by| check_id("by", by, MAX_ID_LEN).is_ok())
            .unwrap_or_else(|| "cli".to_owned())
    })
}

/// Loads the configuration, sets up logs and a runtime, and runs `body` on it.
fn run<F, Fut>(file: Option<PathBuf>, body: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let config = match Config::load(file.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kamigate: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(config.log_json);
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(body(config)),
        Err(e) => {
            eprintln!("kamigate: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(file: Option<PathBuf>) -> ExitCode {
    run(file, |config| async move {
        let engine = if config.redis_url.is_some() {
            "redis"
        } else {
            "embedded"
        };
        let log_json = config.log_json;
        let stop = stop_signals();
        // A gateway waiting for Redis or PostgreSQL at start can be stopped like a running one.
        let started = tokio::select! {
            started = Gateway::start(config) => started,
            _ = stopped(stop.clone()) => {
                tracing::info!("stopped before serving");
                return ExitCode::SUCCESS;
            }
        };
        let gateway = match started {
            Ok(gateway) => gateway,
            Err(e) => {
                eprintln!("kamigate: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(kept) = &gateway.tokens_file {
            // Shown once, to a person at a terminal; stderr that is not one, or JSON logs,
            // is a log stream shipped elsewhere, which tokens must never reach: the log
            // names the file instead.
            if kept.fresh && !log_json && std::io::stderr().is_terminal() {
                eprintln!("merchant token: {}", gateway.merchant_token);
                eprintln!("admin token:    {}", gateway.admin_token);
                eprintln!("(shown once; kept in {})", kept.path.display());
            } else {
                tracing::info!(
                    file = %kept.path.display(),
                    "bearer tokens not configured: using the generated ones kept in the file"
                );
            }
        }
        tracing::info!(
            public = %gateway.public_addr,
            admin = %gateway.admin_addr,
            engine,
            "kamigate is serving"
        );
        let app = gateway.app.clone();
        gateway
            .run_until(async move {
                // Ctrl-C at a terminal: the operator wants it stopped, not drained.
                if stopped(stop).await == Signal::Interrupt && std::io::stdin().is_terminal() {
                    app.hurry();
                }
            })
            .await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Runs an operator command with the configuration `serve` would use.
fn operate<F, Fut>(file: Option<PathBuf>, command: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<(), kamigate::commands::CommandError>>,
{
    run(file, |config| async move {
        match command(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kamigate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Which signal asked the gateway to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM: a service manager or orchestrator.
    Terminate,
}

/// Listens for SIGTERM and SIGINT from now until one comes, for [`stopped`]. One listener
/// for the gateway's whole life: a listener made later does not see a signal that came
/// before it, and one made per phase (starting, serving) lost a SIGTERM sent between them,
/// once readiness already answered, and the gateway never stopped.
fn stop_signals() -> tokio::sync::watch::Receiver<Option<Signal>> {
    let (tell, stop) = tokio::sync::watch::channel(None);
    let first = first_signal();
    tokio::spawn(async move {
        let _ = tell.send(Some(first.await));
    });
    stop
}

/// Resolves once [`stop_signals`] heard a signal, at once if it already has.
async fn stopped(mut stop: tokio::sync::watch::Receiver<Option<Signal>>) -> Signal {
    match stop.wait_for(Option::is_some).await {
        Ok(signal) => signal.unwrap_or(Signal::Terminate),
        // The listener ended without a signal: only when the runtime itself is going.
        Err(_) => std::future::pending().await,
    }
}

/// Registers for SIGTERM and SIGINT before it returns (a signal sent after that is seen
/// whenever the future is first polled), and resolves on the first to come. A listener
/// that cannot be made waits for good, as if its signal never came.
#[cfg(unix)]
fn first_signal() -> impl std::future::Future<Output = Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt()).ok();
    let terminate = signal(SignalKind::terminate()).ok();
    let next = |listener: Option<tokio::signal::unix::Signal>| async move {
        match listener {
            Some(mut listener) => {
                listener.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    async move {
        tokio::select! {
            _ = next(interrupt) => Signal::Interrupt,
            _ = next(terminate) => Signal::Terminate,
        }
    }
}

/// Resolves on Ctrl-C (no SIGTERM off Unix).
#[cfg(not(unix))]
fn first_signal() -> impl std::future::Future<Output = Signal> {
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        Signal::Interrupt
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_logs())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Colours only for a person at a terminal: escape codes in a file or a log shipper are
/// noise, and `NO_COLOR` (set and not empty, per no-color.org) turns them off anyway.
fn colour_logs() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Prints `count` fresh codes of `format`, one per line, in its display form.
fn gen(count: u64, format: &Format) -> std::io::Result<()> {
    use std::io::Write;
    let mut rng = rand::rng();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for _ in 0..count {
        writeln!(out, "{}", format.generate(&mut rng))?;
    }
    out.flush()
}

impl GenFormat {
    /// The format these options describe, the very one a SKU created with the same options
    /// has; or why there is none, in terms of the flags given.
    fn build(&self) -> Result<Format, String> {
        if let Some(json) = &self.format {
            // The user wrote the JSON: its own field names are the right words.
            let format: Format =
                serde_json::from_str(json).map_err(|e| format!("--format: {e}"))?;
            format
                .validate_spec()
                .map_err(|e| format!("--format: {e}"))?;
            return Ok(format);
        }
        let preset = match (self.preset.as_deref(), &self.charset) {
            (Some("crockford32"), _) | (None, None) => Preset::Crockford32,
            _ => Preset::Default,
        };
        let format = Format {
            preset,
            charset: self.charset.clone(),
            min_length: self.length,
            max_length: self.length,
            group_size: self.group,
            case_sensitive: self.case_sensitive,
            check: if self.check { Check::Luhn } else { Check::None },
            ..Format::default()
        };
        format.validate_spec().map_err(|e| flag_message(&e))?;
        Ok(format)
    }
}

/// A format spec error in terms of `kamigate gen`'s flags rather than the JSON fields that
/// `SpecError`'s `Display` names: a person who typed `--group 20` must not be told about
/// `group_size`.
fn flag_message(e: &SpecError) -> String {
    match e {
        SpecError::PresetCharset => "--charset cannot be used with --preset crockford32, which \
            fixes its charset: use --preset default with --charset"
            .to_owned(),
        SpecError::PresetCaseSensitive => "--case-sensitive cannot be used with --preset \
            crockford32, which is case-insensitive: give a --charset instead"
            .to_owned(),
        SpecError::EmptyCharset => "--charset must not be empty".to_owned(),
        SpecError::CharsetSymbol { position } => format!(
            "--charset: character {position} is not allowed: only printable ASCII other than \
             space and '-' may be used"
        ),
        SpecError::CharsetLowerCase { position, symbol } => format!(
            "--charset: character {position} ({symbol:?}) is lower-case, but codes are \
             upper-cased before checking: use upper-case letters or add --case-sensitive"
        ),
        SpecError::CharsetDuplicate { position, symbol } => format!(
            "--charset: character {position} ({symbol:?}) is a duplicate: each symbol may \
             appear once"
        ),
        SpecError::CharsetTooSmall => "--charset needs at least 2 symbols".to_owned(),
        SpecError::MinLengthZero => "--length must be at least 1".to_owned(),
        SpecError::MaxLengthTooLong => format!("--length must be at most {MAX_CODE_LENGTH}"),
        // --length sets both ends, so they cannot cross; said in its terms all the same.
        SpecError::LengthsCrossed { .. } => "--length is not a usable length".to_owned(),
        SpecError::GroupTooLarge { max } => {
            format!("--group must be 0 (no grouping) or at most --length ({max})")
        }
        SpecError::CheckTooShort => "--check needs --length of at least 2 (the check \
            character is part of the code)"
            .to_owned(),
        // Flags always make a format of this build's version.
        SpecError::Version(_) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use kamigate::code::Format;
    use serde_json::json;

    use super::{Cli, Command};

    /// `--help` of every subcommand explains each of its flags and shows examples.
    #[test]
    fn every_flag_is_described_and_every_subcommand_has_examples() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            let examples = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(examples.starts_with("Examples:"), "{name}: no examples");
            assert!(
                examples.contains(&format!("kamigate {name}")),
                "{name}: {examples}"
            );
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" {
                    continue;
                }
                let described = arg
                    .get_help()
                    .is_some_and(|h| !h.to_string().trim().is_empty());
                assert!(described, "{name} --{id} has no description");
            }
        }
    }

    /// The format `kamigate gen ARGS` would print codes of, or its error message.
    fn gen_format(args: &[&str]) -> Result<Format, String> {
        let cli = Cli::try_parse_from(["kamigate", "gen"].iter().chain(args))
            .map_err(|e| format!("clap refused {args:?}: {e}"))?;
        match cli.command {
            Command::Gen { format, .. } => format.build(),
            _ => unreachable!("parsed as gen"),
        }
    }

    fn sku_format(format: serde_json::Value) -> Format {
        serde_json::from_value(format).expect("a SKU's format")
    }

    /// Codes from `gen` validate under a SKU created with the same options, because the
    /// options make the very same format.
    #[test]
    fn gen_options_make_the_format_a_sku_with_the_same_options_has() {
        let cases = [
            (
                vec![
                    "--preset",
                    "crockford32",
                    "--length",
                    "16",
                    "--group",
                    "4",
                    "--check",
                ],
                json!({"preset":"crockford32","min_length":16,"max_length":16,"group_size":4,"check":"luhn"}),
            ),
            (
                vec![],
                json!({"preset":"crockford32","min_length":16,"max_length":16,"group_size":4}),
            ),
            (
                vec![
                    "--charset",
                    "0123456789",
                    "--length",
                    "12",
                    "--group",
                    "0",
                    "--check",
                ],
                json!({"charset":"0123456789","min_length":12,"max_length":12,"check":"luhn"}),
            ),
            (
                vec!["--preset", "default", "--length", "8", "--group", "2"],
                json!({"preset":"default","min_length":8,"max_length":8,"group_size":2}),
            ),
            (
                vec!["--charset", "abcXYZ", "--case-sensitive", "--length", "6"],
                json!({"charset":"abcXYZ","case_sensitive":true,"min_length":6,"max_length":6,"group_size":4}),
            ),
            (
                vec![
                    "--format",
                    r#"{"preset":"crockford32","min_length":10,"max_length":10}"#,
                ],
                json!({"preset":"crockford32","min_length":10,"max_length":10}),
            ),
        ];
        for (args, sku) in cases {
            let format = gen_format(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let sku = sku_format(sku);
            assert_eq!(format, sku, "{args:?}");
            let code = format.generate(&mut rand::rng());
            let canonical = sku
                .validate(&code)
                .expect("a gen code validates under the SKU");
            assert_eq!(
                sku.display(&canonical),
                code,
                "gen prints the SKU's display form"
            );
        }
    }

    /// A mistake in gen's flags is told in terms of those flags, never of the JSON fields
    /// (`group_size`, `min_length`, …) the user did not write.
    #[test]
    fn gen_errors_name_the_flags_given() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["--length", "0"], &["--length", "at least 1"]),
            (&["--length", "300"], &["--length", "at most 256"]),
            (
                &["--length", "16", "--group", "20"],
                &["--group", "--length (16)"],
            ),
            (
                &["--length", "1", "--group", "0", "--check"],
                &["--check", "--length"],
            ),
            (
                &["--preset", "crockford32", "--charset", "ABC"],
                &["--charset", "--preset"],
            ),
            (&["--case-sensitive"], &["--case-sensitive", "--charset"]),
            (&["--charset", ""], &["--charset", "empty"]),
            (&["--charset", "A"], &["--charset", "2 symbols"]),
            (
                &["--charset", "ABA"],
                &["--charset", "character 3", "duplicate"],
            ),
            (&["--charset", "AB C"], &["--charset", "character 3"]),
            (&["--charset", "abc"], &["--charset", "--case-sensitive"]),
        ];
        let internal = [
            "group_size",
            "min_length",
            "max_length",
            "case_sensitive",
            "\"charset\"",
            "\"check\"",
            "luhn",
        ];
        for (args, expected) in cases {
            let message = match gen_format(args) {
                Err(message) => message,
                Ok(format) => panic!("{args:?} accepted: {format:?}"),
            };
            for word in *expected {
                assert!(
                    message.contains(word),
                    "{args:?}: {message:?} lacks {word:?}"
                );
            }
            for word in internal {
                assert!(
                    !message.contains(word),
                    "{args:?}: {message:?} names {word}"
                );
            }
        }
        // The JSON's own words are the right ones for --format.
        let message = gen_format(&["--format", r#"{"group_size":300}"#]).unwrap_err();
        assert!(message.starts_with("--format: "), "{message}");
        assert!(message.contains("group_size"), "{message}");
        let message = gen_format(&["--format", r#"{"groups":4}"#]).unwrap_err();
        assert!(
            message.contains("--format") && message.contains("groups"),
            "{message}"
        );
        // --format and --sku stand alone; --config is the ledger's, for --sku.
        let refused = gen_format(&["--format", "{}", "--length", "8"]).unwrap_err();
        assert!(refused.contains("--length"), "{refused}");
        let refused = gen_format(&["--sku", "gift-50", "--group", "0"]).unwrap_err();
        assert!(refused.contains("--group"), "{refused}");
        let refused = gen_format(&["--config", "kamigate.toml"]).unwrap_err();
        assert!(refused.contains("--sku"), "{refused}");
    }
}

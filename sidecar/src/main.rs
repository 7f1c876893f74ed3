//! The `wg-sidecar` binary: parse flags, set up logging, dispatch, map SIGTERM (and, for `run`,
//! `POST /quitquitquit`) to shutdown.

use anyhow::Context;
use clap::Parser;
use wg_sidecar::cli::{Cli, Command, LogFormat};

/// Exit no later than this after SIGTERM.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_millis(900);

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WG_SIDECAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Completes on SIGTERM or SIGINT (also as PID 1, where default dispositions do nothing).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    } else {
        tracing::error!("cannot install signal handlers; running until killed");
        std::future::pending::<()>().await;
    }
}

/// The default log filter: `info`, without the libraries' own lines. The Vault client logs an
/// error for every 404 (an empty folder in a listing is not an error here); the WireGuard
/// libraries log ERROR for a kernel without WireGuard (then the userspace device is used), for a
/// packet to a peer that has not connected yet, and one INFO line per peer configured (10 000 at
/// a large gateway's start). Every failure they have reaches the sidecar as a value and is logged
/// with its context, so a healthy system logs no ERROR (issue 18). `WG_SIDECAR_LOG` brings them
/// back, e.g. `info,defguard_boringtun=debug`.
const DEFAULT_LOG_FILTER: &str =
    "info,vaultrs=off,rustify=off,defguard_wireguard_rs=off,defguard_boringtun=off";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    wg_sidecar::tunnel::set_userspace_threads(usize::from(cli.userspace_threads));
    match cli.command {
        Command::Init(args) => wg_sidecar::init::init(&args)
            .await
            .context("wg-sidecar init failed"),
        Command::Run(args) => {
            let cfg = args.into_config().context("invalid flags")?;
            // The signal (or `POST /quitquitquit`, which is handled exactly like it) is watched
            // by its own task, so a busy control loop cannot delay it; a watchdog guarantees
            // exit 0 within a second even if cleanup hangs (the TUN device disappears with the
            // process anyway).
            // With `--drain-timeout`, SIGTERM first waits for the app's connections to end (classic
            // mode: the app is stopped at the same time); `/quitquitquit` is the app saying it is
            // done and stops at once.
            let request = wg_sidecar::health::ShutdownRequest::new();
            let requested = request.clone();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let drain = cfg.drain_timeout;
            let interface = cfg.interface.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = shutdown_signal() => {
                        if !drain.is_zero() {
                            tokio::select! {
                                _ = wg_sidecar::lifecycle::drain(drain, &interface) => {}
                                () = requested.raised() => {}
                            }
                        }
                    }
                    () = requested.raised() => {}
                }
                std::thread::spawn(|| {
                    std::thread::sleep(SHUTDOWN_DEADLINE);
                    tracing::warn!("cleanup exceeded the shutdown deadline; exiting now");
                    std::process::exit(0);
                });
                let _ = tx.send(());
            });
            wg_sidecar::run::run(cfg, request, async {
                let _ = rx.await;
            })
            .await
            .context("wg-sidecar run failed")
        }
        Command::Gateway(args) => {
            let cfg = args.into_config().context("invalid flags")?;
            wg_sidecar::gateway::run(cfg, shutdown_signal())
                .await
                .context("wg-sidecar gateway failed")
        }
        Command::Keys(args) => wg_sidecar::keys::run(*args)
            .await
            .context("wg-sidecar keys failed"),
        Command::Vault(args) => wg_sidecar::bootstrap::run(*args)
            .await
            .context("wg-sidecar vault failed"),
        Command::Wait(args) => {
            let waited = wg_sidecar::lifecycle::wait_ready(args.addr, args.timeout)
                .await
                .context("wg-sidecar wait failed")?;
            tracing::info!(
                waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                "the sidecar is ready; the app starts"
            );
            Ok(())
        }
    }
}

//! `wg-injector` entry point: parse the command line, set up logging and hand over to the
//! subcommand. The only place that turns errors into an exit status.

use clap::Parser;
use wg_injector::cli::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid --log-filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let settings = args.into_settings()?;
            init_logging(settings.log_format, &settings.log_filter)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(wg_injector::server::run(settings))?;
            Ok(())
        }
        Command::Inject(args) => std::process::exit(wg_injector::offline::run(&args, false)?),
        Command::Uninject(args) => std::process::exit(wg_injector::offline::run(&args, true)?),
    }
}

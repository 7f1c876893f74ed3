//! `wg-injector` entry point: parse the command line and hand over to the subcommand.

use clap::Parser;
use wg_injector::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(wg_injector::webhook::run(args)),
        Command::Inject(args) => std::process::exit(wg_injector::offline::run(&args, false)?),
        Command::Uninject(args) => std::process::exit(wg_injector::offline::run(&args, true)?),
    }
}

//! `wg-bench` entry point: `run` (the whole load benchmark), `floor` (the floor server, started
//! by `run`), `write-section` (update one section of `docs/benchmarks.md`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Load benchmark of the wg-injector webhook against a floor server on the same stack.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every cell against `wg-injector serve` and the floor server; print the figures.
    Run(RunArgs),
    /// Serve the floor server (prints its caBundle on stdout, like `wg-injector serve --self-signed`).
    Floor {
        /// Loopback address to listen on.
        #[arg(long, env = "WG_BENCH_LISTEN", default_value = "127.0.0.1:9443")]
        listen: SocketAddr,
    },
    /// Replace (or append) one `## ` section of a Markdown file with the content of a file.
    WriteSection {
        /// The Markdown document (created when missing).
        #[arg(long, env = "WG_BENCH_DOC")]
        file: PathBuf,
        /// The section title (without `## `).
        #[arg(long)]
        title: String,
        /// File holding the new section body.
        #[arg(long)]
        body: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The `wg-injector` binary (default: beside this binary).
    #[arg(long, env = "WG_BENCH_INJECTOR")]
    injector: Option<PathBuf>,
    /// Pod sizes in KiB.
    #[arg(
        long,
        env = "WG_BENCH_POD_KIB",
        value_delimiter = ',',
        default_value = "2,10,64"
    )]
    pod_kib: Vec<usize>,
    /// Open-loop rates (requests per second); a closed-loop max run follows them.
    #[arg(
        long,
        env = "WG_BENCH_RATES",
        value_delimiter = ',',
        default_value = "100,1000"
    )]
    rates: Vec<u32>,
    /// Seconds measured per cell and server.
    #[arg(long, env = "WG_BENCH_SECONDS", default_value_t = 4.0)]
    seconds: f64,
    /// Closed-loop workers (connections for HTTP/1.1, streams for HTTP/2).
    #[arg(long, env = "WG_BENCH_WORKERS", default_value_t = 32)]
    workers: usize,
    /// Open-loop workers (most requests in flight).
    #[arg(long, env = "WG_BENCH_OPEN_LOOP_WORKERS", default_value_t = 32)]
    open_loop_workers: usize,
    /// TLS connections shared by the HTTP/2 workers.
    #[arg(long, env = "WG_BENCH_H2_CONNECTIONS", default_value_t = 4)]
    h2_connections: usize,
    /// Write the Markdown section body here.
    #[arg(long, env = "WG_BENCH_MARKDOWN")]
    markdown: Option<PathBuf>,
    /// The command recorded in the report.
    #[arg(long, env = "WG_BENCH_COMMAND", default_value = "make bench")]
    command: String,
    /// How the two server binaries were built, recorded in the report.
    #[arg(
        long,
        env = "WG_BENCH_BUILD",
        default_value = "the binaries given, as built by the caller"
    )]
    build: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Floor { listen } => {
            anyhow::ensure!(
                listen.ip().is_loopback(),
                "--listen must be a loopback address, got {listen}"
            );
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(wg_bench::floor::run(listen))?;
        }
        Command::WriteSection { file, title, body } => {
            let text = std::fs::read_to_string(&body)
                .map_err(|e| anyhow::anyhow!("failed to read {}: {e}", body.display()))?;
            wg_bench::doc::write_section(&file, &title, &text)?;
        }
        Command::Run(args) => {
            let me = std::env::current_exe()?;
            let injector = match args.injector {
                Some(path) => path,
                None => me.with_file_name("wg-injector"),
            };
            anyhow::ensure!(
                args.seconds > 0.0 && args.seconds <= 30.0,
                "--seconds must be in (0, 30], got {}",
                args.seconds
            );
            let settings = wg_bench::suite::Settings {
                injector,
                floor: me,
                pod_kib: args.pod_kib,
                rates: args.rates,
                duration: Duration::from_secs_f64(args.seconds),
                workers: args.workers,
                open_loop_workers: args.open_loop_workers,
                h2_connections: args.h2_connections,
                log_dir: std::env::temp_dir(),
                command: args.command,
                build: args.build,
            };
            let report = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(wg_bench::suite::run(&settings))?;
            let markdown = report.markdown();
            println!("\n{markdown}");
            if let Some(path) = args.markdown {
                std::fs::write(&path, &markdown)
                    .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}

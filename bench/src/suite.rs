//! The whole benchmark in one go: start `wg-injector serve --self-signed` and the floor server
//! on loopback, check that each answers the review as it must, warm both up, run every cell on
//! both (ours first, then the floor, so both see the same machine state), sample memory, and
//! build the [`Report`].
//!
//! Owns the list of cells and their order. Never targets anything but 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::load::{self, ClientTls, Plan, Protocol, Rate, Target};
use crate::payload::{self, Payload};
use crate::process::{Memory, ServerProcess};
use crate::report::{MemoryFigures, Report, Row, Summary};
use crate::Error;

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `wg-injector` binary.
    pub injector: PathBuf,
    /// The `wg-bench` binary (runs `wg-bench floor`).
    pub floor: PathBuf,
    /// Pod sizes in KiB.
    pub pod_kib: Vec<usize>,
    /// Open-loop rates, requests per second (a closed-loop max run follows them).
    pub rates: Vec<u32>,
    /// Measured time per cell and server.
    pub duration: Duration,
    /// Closed-loop workers (connections for HTTP/1.1, streams for HTTP/2).
    pub workers: usize,
    /// Open-loop workers (the most requests in flight at once).
    pub open_loop_workers: usize,
    /// TLS connections shared by the HTTP/2 workers.
    pub h2_connections: usize,
    /// Where the servers' logs go.
    pub log_dir: PathBuf,
    /// The command line recorded in the report.
    pub command: String,
    /// How both server binaries were built (recorded in the report).
    pub build: String,
}

fn free_loopback_port() -> Result<SocketAddr, Error> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| {
        Error::ServerNotReady {
            what: "benchmark",
            reason: format!("no free loopback port: {e}"),
        }
    })?;
    listener.local_addr().map_err(|e| Error::ServerNotReady {
        what: "benchmark",
        reason: e.to_string(),
    })
}

struct Server {
    process: ServerProcess,
    target: Target,
}

async fn start(
    what: &'static str,
    program: &std::path::Path,
    mut args: Vec<String>,
    log_dir: &std::path::Path,
    check: &Payload,
) -> Result<Server, Error> {
    let addr = free_loopback_port()?;
    args.push("--listen".to_owned());
    args.push(addr.to_string());
    let log = log_dir.join(format!("wg-bench-{}-{what}.log", std::process::id()));
    let process = ServerProcess::start(what, program, &args, log)?;
    let tls =
        ClientTls::new(&process.ca_pem).map_err(|reason| Error::BadCaBundle { what, reason })?;
    let target = Target { addr, tls };
    // The injector prints its caBundle before it binds: retry for a bounded 10 s.
    let mut last = None;
    for _ in 0..100 {
        match load::probe(&target, Protocol::Http1, &check.body).await {
            Ok(answer) => {
                last = None;
                let text = String::from_utf8_lossy(&answer).into_owned();
                let patched = text.contains("\"patchType\":\"JSONPatch\"");
                let allowed = text.contains("\"allowed\":true");
                let must_patch = what == "wg-injector";
                if !allowed || patched != must_patch {
                    return Err(Error::WrongAnswer {
                        what,
                        reason: format!(
                            "expected allowed: true with{} a patch, got {text}",
                            if must_patch { "" } else { "out" }
                        ),
                    });
                }
                break;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(e) = last {
        return Err(Error::ServerNotReady {
            what,
            reason: e.to_string(),
        });
    }
    Ok(Server { process, target })
}

/// Samples the largest `VmRSS` of some processes until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u64>>,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut peaks = vec![0; pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    if let Some(m) = Memory::of(*pid) {
                        *peak = (*peak).max(m.rss_kib);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peaks
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

async fn measure(server: &Server, plan: &Plan, body: &payload::Payload) -> Result<Summary, Error> {
    let sampler = Sampler::start(vec![server.process.pid()]);
    let measured = load::run(&server.target, plan, body.bodies()).await;
    let peak = sampler.finish().first().copied().unwrap_or(0);
    Ok(Summary::of(&measured?, peak))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
    // Other work on the machine skews the figures: record how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    format!("{cpu}, {cores} cores, Linux {kernel}, load average {load} at the start")
}

/// Every cell, in the order they run: each Pod size × HTTP/1.1, HTTP/2 × each rate then max;
/// then new connections per request (10 KiB Pods) with full handshakes, and resumed at max.
fn cells(
    settings: &Settings,
    payloads: &[Payload],
    check: &Payload,
) -> Vec<(Payload, Protocol, Rate)> {
    let mut cells = Vec::new();
    for p in payloads {
        for protocol in [Protocol::Http1, Protocol::Http2] {
            for rate in settings
                .rates
                .iter()
                .map(|&r| Rate::PerSecond(r))
                .chain([Rate::Max])
            {
                cells.push((p.clone(), protocol, rate));
            }
        }
    }
    let fresh = payloads
        .iter()
        .find(|p| p.label == "10 KiB")
        .unwrap_or(check);
    for rate in settings
        .rates
        .iter()
        .map(|&r| Rate::PerSecond(r))
        .chain([Rate::Max])
    {
        cells.push((
            fresh.clone(),
            Protocol::NewConnection { resume: false },
            rate,
        ));
    }
    cells.push((
        fresh.clone(),
        Protocol::NewConnection { resume: true },
        Rate::Max,
    ));
    // The patch memo's miss path: distinct Pods, so (nearly) every review computes its patch.
    for p in payloads {
        if let Some(kib) = p.label.strip_suffix(" KiB").and_then(|k| k.parse().ok()) {
            cells.push((payload::distinct(kib), Protocol::Http1, Rate::Max));
        }
    }
    cells
}

fn setup(settings: &Settings) -> String {
    format!(
        "Servers: {}. Each cell runs {:.0} s per server, ours first, on loopback with TLS (ECDSA P-256 certificate from `--self-signed`). Every cell but the `distinct` ones sends one Pod per size again and again, as a Deployment's rollout does, so from the third review on the injector sends the patch from its memo (see docs/operations.md, \"The patch memo\"); the `distinct` cells cycle through {} Pods that differ in their `wg-injector.io/routes` annotation, far more than the memo holds, so they measure the injector computing every patch (not a target, shown for honesty). Open-loop rates use {} workers and measure latency from the intended send time (no coordinated omission); `max` is a closed loop with {} workers (HTTP/1.1: one connection each; HTTP/2: streams over {} connections). New-connection cells use HTTP/1.1 with `Connection: close` and count the TCP + TLS handshake in the latency; \"full handshake\" disables client session resumption like Go's default client (the kube-apiserver's). Servers run with their default logging (info).",
        settings.build,
        settings.duration.as_secs_f64(),
        payload::DISTINCT_PODS,
        settings.open_loop_workers,
        settings.workers,
        settings.h2_connections
    )
}

/// Run the whole benchmark, printing one line per cell as it goes.
pub async fn run(settings: &Settings) -> Result<Report, Error> {
    let date = jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M UTC")
        .to_string();
    let machine = machine();
    let payloads: Vec<Payload> = settings
        .pod_kib
        .iter()
        .map(|&k| payload::payload(k))
        .collect();
    let check = payload::payload(10);
    for p in &payloads {
        println!(
            "payload {}: Pod {} bytes, AdmissionReview {} bytes",
            p.label,
            p.pod_bytes,
            p.body.len()
        );
    }
    let ours = start(
        "wg-injector",
        &settings.injector,
        vec!["serve".to_owned(), "--self-signed".to_owned()],
        &settings.log_dir,
        &check,
    )
    .await?;
    let floor = start(
        "floor",
        &settings.floor,
        vec!["floor".to_owned()],
        &settings.log_dir,
        &check,
    )
    .await?;
    // Let start-up settle before reading the idle figures.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ours_start = ours.process.memory().unwrap_or_default();
    let floor_start = floor.process.memory().unwrap_or_default();
    println!(
        "idle after start-up: wg-injector VmRSS {} KiB, floor VmRSS {} KiB",
        ours_start.rss_kib, floor_start.rss_kib
    );
    // Warm-up: one closed-loop second per server, not recorded.
    let warm = Plan {
        protocol: Protocol::Http1,
        rate: Rate::Max,
        workers: settings.workers,
        h2_connections: settings.h2_connections,
        duration: Duration::from_secs(1),
    };
    for server in [&ours, &floor] {
        load::run(&server.target, &warm, check.bodies()).await?;
    }
    let cells = cells(settings, &payloads, &check);
    let mut rows = Vec::new();
    for (p, protocol, rate) in cells {
        let plan = Plan {
            protocol,
            rate,
            workers: match rate {
                Rate::Max => settings.workers,
                Rate::PerSecond(_) => settings.open_loop_workers,
            },
            h2_connections: settings.h2_connections,
            duration: settings.duration,
        };
        let ours_summary = measure(&ours, &plan, &p).await?;
        let floor_summary = measure(&floor, &plan, &p).await?;
        let row = Row {
            pod: p.label.clone(),
            protocol,
            rate,
            ours: ours_summary,
            floor: floor_summary,
        };
        println!("{}", row.line());
        rows.push(row);
    }
    // Idle: 3 s after the last answer (the injector gives freed memory back after 1 s quiet).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ours_end = ours.process.memory().unwrap_or_default();
    let floor_end = floor.process.memory().unwrap_or_default();
    println!(
        "after the run: wg-injector VmRSS {} KiB VmHWM {} KiB; floor VmRSS {} KiB VmHWM {} KiB",
        ours_end.rss_kib, ours_end.hwm_kib, floor_end.rss_kib, floor_end.hwm_kib
    );
    Ok(Report {
        machine,
        date,
        command: settings.command.clone(),
        setup: setup(settings),
        rows,
        memory: MemoryFigures {
            idle_start_kib: ours_start.rss_kib,
            idle_after_kib: ours_end.rss_kib,
            hwm_kib: ours_end.hwm_kib,
            floor: [floor_start.rss_kib, floor_end.rss_kib, floor_end.hwm_kib],
        },
    })
}

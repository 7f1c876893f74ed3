//! Gateway scale benchmark: reconcile time and resident memory for N peers on a real userspace
//! WireGuard interface (BoringTun in this process, as in `wg-sidecar gateway`).
//!
//! Run as root: `cargo run --release -p wg-sidecar --example bench_gateway -- 1000 10000`.
//! The program re-executes itself inside a network namespace it creates (and deletes), so the
//! interface never appears on the host. Prints one line per figure.
#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Instant,
};

use ipnet::IpNet;
use jiff::Timestamp;
use wg_sidecar::{
    gateway::{apply_diff, desired_peers, diff, PeerTable},
    keys::{generate_keypair, PeerRecord},
    tunnel::{Tunnel, WgTunnel},
};

const INNER: &str = "WG_BENCH_GATEWAY_INNER";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn records(n: u32) -> Vec<(String, PeerRecord)> {
    (0..n)
        .map(|i| {
            let (_, public_key) = generate_keypair();
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 2)) + i);
            (
                format!("bench/sa-{i:06}"),
                PeerRecord {
                    public_key,
                    addresses: vec![IpNet::from(IpAddr::V4(addr))],
                    next_public_key: None,
                    activate_at: None,
                    rotates_at: None,
                    preshared_key: None,
                    pod: None,
                    version: 1,
                },
            )
        })
        .collect()
}

fn bench(n: u32) {
    let name = format!("wgb{}", std::process::id() % 100_000);
    let (private, _) = generate_keypair();
    let rss_before = rss_kib();
    let mut tunnel =
        WgTunnel::create_listening(&name, 1420, &["10.99.0.1/16".parse().unwrap()], &private, 0)
            .unwrap();
    let mut recs = records(n);
    let now = Timestamp::now();
    let mut running = PeerTable::new();

    let t = Instant::now();
    let desired = desired_peers(&recs, now);
    let d = diff(&running, &desired.peers);
    let pure = t.elapsed();
    let t = Instant::now();
    apply_diff(&mut tunnel, &mut running, &d, Some(5)).unwrap();
    let apply = t.elapsed();
    assert_eq!(tunnel.peer_stats().unwrap().len(), n as usize);
    println!(
        "peers={n} initial: desired+diff {:.1} ms, apply {:.1} ms, total {:.1} ms",
        pure.as_secs_f64() * 1e3,
        apply.as_secs_f64() * 1e3,
        (pure + apply).as_secs_f64() * 1e3
    );

    let t = Instant::now();
    let desired = desired_peers(&recs, now);
    let d = diff(&running, &desired.peers);
    assert!(d.is_empty());
    println!(
        "peers={n} unchanged reconcile (desired+diff, nothing applied): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // 1% churn: rotate the key of every hundredth identity.
    let churn = (n / 100).max(1);
    for (_, r) in recs.iter_mut().step_by(100) {
        r.public_key = generate_keypair().1;
    }
    let t = Instant::now();
    let desired = desired_peers(&recs, now);
    let d = diff(&running, &desired.peers);
    apply_diff(&mut tunnel, &mut running, &d, Some(5)).unwrap();
    println!(
        "peers={n} churn of {churn} keys (remove+add): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let t = Instant::now();
    let stats = tunnel.peer_stats().unwrap();
    println!(
        "peers={n} statistics read (the 1 s tick): {:.1} ms for {} peers",
        t.elapsed().as_secs_f64() * 1e3,
        stats.len()
    );
    let rss_after = rss_kib();
    println!(
        "peers={n} RSS: {} KiB with the interface and peers (+{} KiB over {} KiB before; {:.2} KiB/peer)",
        rss_after,
        rss_after.saturating_sub(rss_before),
        rss_before,
        rss_after.saturating_sub(rss_before) as f64 / f64::from(n)
    );
    tunnel.remove().unwrap();
}

fn main() {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("peer counts"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    if std::env::var_os(INNER).is_some() {
        // One size per process, so each RSS figure starts from a fresh process.
        for n in sizes {
            bench(n);
        }
        return;
    }
    let ns = format!("wgbench{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success();
    assert!(ok, "creating a network namespace needs root");
    let me = std::env::current_exe().unwrap();
    let mut failed = false;
    for n in sizes {
        let st = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&me)
            .arg(n.to_string())
            .env(INNER, "1")
            .env("RUST_LOG", "off")
            .status()
            .unwrap();
        failed |= !st.success();
    }
    let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    assert!(!failed, "a benchmark run failed");
}

//! Sidecar benchmark (root; network namespaces made here): exec → `/ready` 200 including Vault
//! login and first handshake, peak RSS, and TCP throughput (iperf3) through the tunnel against
//! wireguard-go ↔ wireguard-go (alternating runs, medians) and plain veth on the same topology. Prints figures; asserts
//! nothing about them. Run: `cargo bench -p wg-sidecar --bench sidecar`.
#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::too_many_lines,
    missing_docs
)]

#[path = "../tests/lab/mod.rs"]
mod lab;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use lab::{keypair, spawn_sidecar, veth, wait_for, write_secret_file, Netns, OpenBao, WgGoPeer};
use serde_json::json;

const ROUNDS: usize = 15;
/// Alternating throughput rounds (sidecar, wireguard-go) of `IPERF_SECS` each.
const TPUT_ROUNDS: usize = 5;
const IPERF_SECS: u64 = 5;

fn iperf(pod: &Netns, gw: &Netns, target: &str) -> f64 {
    let mut server = gw
        .command(lab::find_binary("iperf3").unwrap())
        .args(["-s", "-1", "-B", target])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = pod.run("iperf3", &["-c", target, "-t", "5", "-J"]).unwrap();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e6
}

/// CPU time (user + system) of `pid` in seconds, from `/proc/PID/stat` (clock ticks of 10 ms).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of the file (utime, stime) are 11 and 12 after the command name.
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

/// One iperf3 run to 10.77.0.1; also the CPU share (percent of one core) of the pod-side
/// WireGuard process `pid` over the run.
fn iperf_cpu(pod: &Netns, gw: &Netns, pid: u32) -> (f64, f64) {
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    let mbps = iperf(pod, gw, "10.77.0.1");
    let cpu = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    (mbps, cpu)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        })
        .unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    lab::require_root();
    let pod = Netns::new("bpod").unwrap();
    let gw = Netns::new("bgw").unwrap();
    veth(&pod, "192.168.77.2/24", &gw, "192.168.77.1/24").unwrap();
    let dir = lab::scratch();
    let bao = OpenBao::start(&pod).unwrap();
    let (pp, ppub) = keypair();
    let gkey = keypair();
    bao.put(
        "wg/keys/shop/web",
        &json!({"private_key": pp, "address": "10.77.0.2/32"}),
    )
    .unwrap();
    bao.put(
        "wg/gateways/corp",
        &json!({"public_key": gkey.1, "endpoints": "192.168.77.1:51820"}),
    )
    .unwrap();
    let gwpeer = WgGoPeer::start_with_key(&gw, "10.77.0.1/24", 51820, &gkey).unwrap();
    gwpeer.set_peer(&ppub, "10.77.0.2/32", None).unwrap();
    let token = dir.path().join("token");
    write_secret_file(&token, "devroot");
    let curl = lab::find_binary("curl").unwrap();
    let args = |ifname: &str| -> Vec<String> {
        [
            "run",
            "--interface",
            ifname,
            "--gateway",
            "corp",
            "--routes",
            "10.77.0.0/24",
            "--vault-addr",
            "http://127.0.0.1:8200",
            "--vault-auth",
            "token",
            "--vault-token-file",
            token.to_str().unwrap(),
            "--vault-key-path",
            "wg/keys/shop/web",
            "--health-addr",
            "127.0.0.1:9901",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };

    // 1. exec → /ready 200 (polled back to back with curl from inside the pod namespace).
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for i in 0..ROUNDS {
        let ifname = lab::unique("bs");
        let log = dir.path().join(format!("s{i}.log"));
        let start = Instant::now();
        let mut s = spawn_sidecar(&pod, &args(&ifname), &log).unwrap();
        let ok = wait_for(Duration::from_secs(10), || {
            let out = Command::new(lab::find_binary("ip").unwrap())
                .args(["netns", "exec", &pod.name])
                .arg(&curl)
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:9901/ready",
                ])
                .output()
                .unwrap();
            out.stdout == b"200"
        });
        let t = start.elapsed();
        assert!(
            ok,
            "not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        times.push(t.as_secs_f64() * 1000.0);
        rss.push(vm_hwm_kib(s.pid()) as f64 / 1024.0);
        s.terminate(Duration::from_secs(2)).unwrap();
    }
    let mut sorted = times.clone();
    println!(
        "startup exec->/ready 200 (ms) over {ROUNDS} runs: median {:.0}, min {:.0}, max {:.0}",
        median(&mut sorted),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    println!(
        "peak RSS right after ready (MiB): median {:.1}, max {:.1}",
        median(&mut rss.clone()),
        rss.iter().copied().fold(0.0, f64::max)
    );

    // 2. throughput, alternating on one topology so that both sides see the same machine load:
    // wg-sidecar (BoringTun userspace) in the pod as 10.77.0.2 and wireguard-go in the pod as
    // 10.77.0.3 run side by side, both peers of the same wireguard-go gateway (10.77.0.1); a
    // metric-0 route for 10.77.0.0/24 in the pod picks which one carries the iperf3 run.
    let ifname = lab::unique("bs");
    let log = dir.path().join("tput.log");
    let s = spawn_sidecar(&pod, &args(&ifname), &log).unwrap();
    assert!(wait_for(Duration::from_secs(10), || pod
        .http_get("http://127.0.0.1:9901/ready")
        .unwrap()
        .0
        == 200));
    let podkey = keypair();
    gwpeer.set_peer(&podkey.1, "10.77.0.3/32", None).unwrap();
    let podgo = WgGoPeer::start_with_key(&pod, "10.77.0.3/32", 51821, &podkey).unwrap();
    let mut c = Command::new(lab::find_binary("ip").unwrap());
    c.args(["netns", "exec", &pod.name])
        .arg(lab::find_binary("wg").unwrap())
        .args([
            "set",
            &podgo.ifname,
            "peer",
            &gkey.1,
            "endpoint",
            "192.168.77.1:51820",
            "allowed-ips",
            "10.77.0.0/24",
        ]);
    lab::run(&mut c).unwrap();
    let via = |dev: &str| {
        pod.ip(&[
            "route",
            "replace",
            "10.77.0.0/24",
            "dev",
            dev,
            "metric",
            "0",
        ])
        .unwrap();
    };
    let (mut side, mut go) = (Vec::new(), Vec::new());
    for round in 1..=TPUT_ROUNDS {
        via(&ifname);
        let (a, a_cpu) = iperf_cpu(&pod, &gw, s.pid());
        via(&podgo.ifname);
        let (b, b_cpu) = iperf_cpu(&pod, &gw, podgo.process.pid());
        println!(
            "  round {round}: wg-sidecar {a:.0} Mbit/s (CPU {a_cpu:.0} %), wireguard-go {b:.0} Mbit/s (CPU {b_cpu:.0} %), ratio {:.2}",
            a / b
        );
        side.push(a);
        go.push(b);
    }
    let peak_after_iperf = vm_hwm_kib(s.pid()) as f64 / 1024.0;
    drop(s);
    drop(podgo);
    let (sidecar_mbps, go_mbps) = (median(&mut side), median(&mut go));

    // 3. plain veth.
    let veth_mbps = iperf(&pod, &gw, "192.168.77.1");

    println!("peak RSS after the iperf3 runs (MiB): {peak_after_iperf:.1}");
    println!(
        "iperf3 TCP {IPERF_SECS} s, netns + veth, 2 cores, median of {TPUT_ROUNDS} alternating runs each:"
    );
    println!("  wg-sidecar (BoringTun userspace) -> wireguard-go: {sidecar_mbps:.0} Mbit/s");
    println!("  wireguard-go -> wireguard-go:                     {go_mbps:.0} Mbit/s");
    println!(
        "  ratio sidecar / wireguard-go:                     {:.2}",
        sidecar_mbps / go_mbps
    );
    println!("  plain veth:                                       {veth_mbps:.0} Mbit/s");
}

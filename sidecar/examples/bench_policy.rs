//! Egress policy scale benchmark: 10 000 peers (Pods) × 10 NetworkPolicies selecting each, from
//! the NetworkPolicy objects to rules in the kernel, through the functions the gateway uses
//! (`policy::compile` per peer, then `Nat::set_peer_policies`).
//!
//! Run as root: `cargo run --release -p wg-sidecar --example bench_policy -- 10000 10`.
//! The program re-executes itself inside a network namespace it creates (and deletes), so the
//! table never appears on the host. Prints one line per figure.
#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Instant,
};

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use wg_sidecar::{
    nat::{Nat, PeerAddresses},
    policy::{compile, Egress},
};

const INNER: &str = "WG_BENCH_POLICY_INNER";

/// `policies` NetworkPolicies in namespace `shop`, each selecting `app=web` and allowing one /32
/// on TCP 443 and one port of its own: a selected Pod's union is `2 × policies` rules.
fn network_policies(policies: usize) -> Vec<NetworkPolicy> {
    (0..policies)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("egress-{i}"), "namespace": "shop"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "policyTypes": ["Egress"],
                    "egress": [{
                        "to": [{"ipBlock": {"cidr": format!("10.20.{}.{}/32", i / 200, i % 200 + 2)}}],
                        "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8000 + i}],
                    }],
                },
            }))
            .unwrap()
        })
        .collect()
}

fn bench(peers: u32, policies: usize) {
    let objects = network_policies(policies);
    let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
    let start = Instant::now();
    let compiled: Vec<(PeerAddresses, Egress)> = (0..peers)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 203, 0, 2)) + i);
            let c = compile(&objects, "shop", &labels);
            (PeerAddresses::new([IpAddr::V4(a)]).unwrap(), c.egress)
        })
        .collect();
    let compile_time = start.elapsed();
    let networks: Vec<IpNet> = vec!["10.20.0.0/16".parse().unwrap()];
    let pool: Vec<IpNet> = vec!["10.203.0.0/16".parse().unwrap()];
    let mut nat = Nat::install_with("wgbench0", &pool, &networks, false).unwrap();
    let refs: Vec<(PeerAddresses, Option<&Egress>)> =
        compiled.iter().map(|(p, e)| (p.clone(), Some(e))).collect();
    let start = Instant::now();
    let done = nat.set_peer_policies(&refs).unwrap();
    let apply_time = start.elapsed();
    let counts = nat.rule_counts();
    println!("peers {peers} x policies {policies}");
    println!(
        "compile (policy::compile per peer): {:.1} ms ({:.2} µs per peer)",
        compile_time.as_secs_f64() * 1e3,
        compile_time.as_secs_f64() * 1e6 / f64::from(peers)
    );
    println!(
        "apply (Nat::set_peer_policies): {:.0} ms in {} transactions",
        apply_time.as_secs_f64() * 1e3,
        done.transactions
    );
    println!(
        "reconcile total: {:.0} ms",
        (compile_time + apply_time).as_secs_f64() * 1e3
    );
    println!(
        "kernel rules: {} in peer chains ({} per peer), {} base, {} map entries",
        counts.peer_rules,
        counts.peer_rules / usize::try_from(peers).unwrap().max(1),
        counts.base_rules,
        counts.map_entries
    );
    // One more policy edit that touches every peer's rules (the worst change), and one peer's.
    let mut one = compiled[0].1.clone();
    if let Egress::Allowed(rules) = &mut one {
        rules.pop();
    }
    let start = Instant::now();
    nat.set_peer_policies(&[(compiled[0].0.clone(), Some(&one))])
        .unwrap();
    println!(
        "change: one peer's rules rewritten among {peers}: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    nat.remove().unwrap();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let peers: u32 = args.next().map_or(10_000, |a| a.parse().expect("peers"));
    let policies: usize = args.next().map_or(10, |a| a.parse().expect("policies"));
    if std::env::var_os(INNER).is_some() {
        bench(peers, policies);
        return;
    }
    let ns = format!("wgpolbench{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success();
    assert!(ok, "creating a network namespace needs root");
    let st = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(std::env::current_exe().unwrap())
        .args([peers.to_string(), policies.to_string()])
        .env(INNER, "1")
        .status()
        .unwrap();
    let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    assert!(st.success(), "the benchmark failed");
}

//! The load generator against the floor server over real TLS on loopback: every transport and
//! both loop kinds answer every request, and open-loop runs send what their rate says.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use wg_bench::load::{self, ClientTls, Plan, Protocol, Rate, Target};

async fn floor() -> Target {
    let (tls, ca_pem) = wg_bench::floor::self_signed_tls().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        wg_injector::server::serve(
            listener,
            wg_bench::floor::router(),
            tls,
            &wg_injector::server::Limits::default(),
            std::future::pending(),
        )
        .await;
    });
    Target {
        addr,
        tls: ClientTls::new(&ca_pem).unwrap(),
    }
}

fn plan(protocol: Protocol, rate: Rate) -> Plan {
    Plan {
        protocol,
        rate,
        workers: 4,
        h2_connections: 2,
        duration: Duration::from_millis(300),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_gets_every_request_answered_in_a_closed_loop() {
    let target = floor().await;
    let body = wg_bench::payload::payload(2).body;
    for protocol in [
        Protocol::Http1,
        Protocol::Http2,
        Protocol::NewConnection { resume: false },
        Protocol::NewConnection { resume: true },
    ] {
        let m = load::run(
            &target,
            &plan(protocol, Rate::Max),
            std::slice::from_ref(&body),
        )
        .await
        .unwrap();
        assert_eq!(m.errors, 0, "{protocol:?}");
        assert!(m.ok >= 10, "{protocol:?}: only {} answers", m.ok);
        assert_eq!(m.latencies_ns.len() as u64, m.ok);
        assert!(m.quantile(0.5) > Duration::ZERO);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_sends_rate_times_duration_requests() {
    let target = floor().await;
    let body = wg_bench::payload::payload(2).body;
    let m = load::run(
        &target,
        &plan(Protocol::Http1, Rate::PerSecond(200)),
        std::slice::from_ref(&body),
    )
    .await
    .unwrap();
    // 300 ms at 200/s: tickets at 0, 5, …, 295 ms.
    assert_eq!(m.ok + m.errors, 60);
    assert_eq!(m.errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_of_the_floor_returns_allowed_without_a_patch() {
    let target = floor().await;
    let body = wg_bench::payload::payload(10).body;
    let answer = load::probe(&target, Protocol::Http2, &body).await.unwrap();
    let text = String::from_utf8(answer.to_vec()).unwrap();
    assert!(text.contains("\"allowed\":true"), "{text}");
    assert!(!text.contains("patch"), "{text}");
}

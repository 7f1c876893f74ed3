//! The Pod's lifecycle around the app in classic mode (the sidecar is an ordinary container):
//! hold the app until the tunnel is up, keep the tunnel while the app drains.
//!
//! * **Hold**: `wg-sidecar wait` is the sidecar container's `postStart` hook. The kubelet starts
//!   a Pod's containers in order and does not start the next one until the previous one's
//!   `postStart` hook has returned, so with the sidecar first the app starts only once `/ready`
//!   answers 200 (Istio's `holdApplicationUntilProxyStarts` works the same way). A hook that
//!   fails (the timeout) makes the kubelet kill and restart the sidecar container.
//! * **Drain**: in classic mode the kubelet sends SIGTERM to every container at once, so a
//!   sidecar that stopped at once would take the tunnel from an app still finishing its work.
//!   With `--drain-timeout` the sidecar keeps running after SIGTERM while the app is active: while
//!   another process of the Pod holds a TCP socket (the Pod's containers share one network
//!   namespace, so its socket table shows the app's listening and connected sockets) or the
//!   tunnel interface carried a packet (its kernel counters: a short request between two polls
//!   leaves no socket to see, but it moves them). It stops once neither was seen for [`QUIET`],
//!   or when the timeout passes. `POST /quitquitquit` (the app saying it is done) does not
//!   drain. Native sidecars need neither: the kubelet starts them before and stops them after
//!   the app containers.
//!
//! Owns: the socket count (a pure parse of `/proc/net/tcp{,6}` against the process's own socket
//! inodes, no crate: two fixed-format kernel tables, and the `procfs` crate would bring far more
//! than this needs), the drain wait and the readiness wait. Must never: stop the tunnel itself
//! (the caller does, after [`drain`] returns).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long the app must be seen inactive (no foreign TCP socket, no packet through the tunnel)
/// before the drain ends: an app between two requests of its shutdown work is idle a moment.
pub const QUIET: Duration = Duration::from_secs(3);

/// How often the socket table is read during a drain.
const DRAIN_TICK: Duration = Duration::from_millis(200);

/// TCP states that hold no connection any more: `TIME_WAIT` (06) and `CLOSE` (07).
const GONE_STATES: [&str; 2] = ["06", "07"];

/// The TCP sockets in `tables` (the text of `/proc/net/tcp` and `/proc/net/tcp6`) that belong to
/// another process: a real socket (inode ≠ 0) in a state that still holds a connection or a
/// listener, whose inode is not in `own`. Lines that do not parse are skipped.
#[must_use]
pub fn foreign_tcp_sockets<S: std::hash::BuildHasher>(
    tables: &[&str],
    own: &HashSet<u64, S>,
) -> usize {
    tables
        .iter()
        .flat_map(|t| t.lines().skip(1))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let state = *fields.get(3)?;
            let inode: u64 = fields.get(9)?.parse().ok()?;
            (inode != 0 && !GONE_STATES.contains(&state) && !own.contains(&inode)).then_some(inode)
        })
        .collect::<HashSet<u64>>()
        .len()
}

/// The inodes of this process's sockets (`/proc/self/fd/*` → `socket:[N]`).
fn own_socket_inodes() -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Foreign TCP sockets in this network namespace now.
fn foreign_now() -> usize {
    let v4 = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/self/net/tcp6").unwrap_or_default();
    foreign_tcp_sockets(&[&v4, &v6], &own_socket_inodes())
}

/// The bytes `interface` carried both ways (its kernel counters; `None` if unreadable).
fn tunnel_bytes(interface: &str) -> Option<u64> {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{interface}/statistics/{what}"))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    Some(read("tx_bytes")? + read("rx_bytes")?)
}

/// Keeps the caller (and so the tunnel on `interface`) running while the app is active, for at
/// most `timeout`; returns how long it waited.
pub async fn drain(timeout: Duration, interface: &str) -> Duration {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut quiet_since: Option<Instant> = None;
    let mut logged = false;
    let mut bytes = tunnel_bytes(interface);
    loop {
        let now = Instant::now();
        if now >= deadline {
            tracing::warn!(
                timeout_s = timeout.as_secs_f64(),
                sockets = foreign_now(),
                "drain timeout reached with the app's connections still open; stopping the tunnel"
            );
            break;
        }
        let sockets = foreign_now();
        let now_bytes = tunnel_bytes(interface);
        let moved = now_bytes != bytes;
        bytes = now_bytes;
        if sockets == 0 && !moved {
            let since = *quiet_since.get_or_insert(now);
            if now.duration_since(since) >= QUIET {
                break;
            }
        } else {
            quiet_since = None;
            if !logged {
                tracing::info!(
                    sockets,
                    timeout_s = timeout.as_secs_f64(),
                    "draining: the tunnel stays up while the app is active (connections or tunnel traffic)"
                );
                logged = true;
            }
        }
        tokio::time::sleep(DRAIN_TICK.min(deadline - now)).await;
    }
    let waited = start.elapsed();
    tracing::info!(
        waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        "drain done"
    );
    waited
}

/// Why `wg-sidecar wait` gave up.
#[derive(Debug, thiserror::Error)]
#[error("the sidecar at {addr} was not ready within {timeout:?} (last answer: {last})")]
pub struct NotReady {
    /// The health address asked.
    pub addr: SocketAddr,
    /// How long it waited.
    pub timeout: Duration,
    /// The last status line or connection error.
    pub last: String,
}

/// `GET /ready` on `addr` until it answers 200 or `timeout` passes (the `postStart` hook).
///
/// # Errors
/// [`NotReady`] with the last answer when the timeout passes.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<Duration, NotReady> {
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    while start.elapsed() < timeout {
        match tokio::time::timeout(Duration::from_secs(2), ready_status(addr)).await {
            Ok(Ok((200, _))) => return Ok(start.elapsed()),
            Ok(Ok((code, why))) => last = format!("HTTP {code}: {why}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => "no answer within 2s".clone_into(&mut last),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(NotReady {
        addr,
        timeout,
        last,
    })
}

/// Longest `/ready` answer read: the status line, the headers and the reason (`not ready: …`),
/// which [`NotReady`] carries so the kubelet's `FailedPostStartHook` event says why.
const READY_ANSWER_MAX: u64 = 2048;

/// The status code and the body's first line of one `GET /ready` (HTTP/1.0, the connection
/// closes after the answer).
async fn ready_status(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    (&mut s)
        .take(READY_ANSWER_MAX)
        .read_to_end(&mut answer)
        .await?;
    let answer = String::from_utf8_lossy(&answer);
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            let line = answer.lines().next().unwrap_or_default();
            std::io::Error::other(format!("not an HTTP answer: {line:?}"))
        })?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| {
        body.lines().next().unwrap_or_default().trim()
    });
    Ok((code, body.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:26AD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2002 1 0000000000000000 100 0 0 10 0
   2: 0200A8C0:C350 0100A8C0:0050 01 00000000:00000000 00:00000000 00000000  1000        0 3003 1 0000000000000000 20 4 30 10 -1
   3: 0200A8C0:C351 0100A8C0:0050 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0000000000000000
   4: 0200A8C0:C352 0100A8C0:0050 07 00000000:00000000 00:00000000 00000000  1000        0 4004 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2002 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5005 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn counts_listening_and_connected_sockets_of_others_once_each() {
        let own: HashSet<u64> = [1001].into();
        // 2002 (listening, in both tables once each by inode), 3003 (established), 5005;
        // not 1001 (ours), the TIME_WAIT line (inode 0) or the CLOSE one.
        assert_eq!(foreign_tcp_sockets(&[TCP, TCP6], &own), 3);
    }

    #[test]
    fn only_our_own_sockets_count_as_none() {
        let own: HashSet<u64> = [1001, 2002, 3003, 5005].into();
        assert_eq!(foreign_tcp_sockets(&[TCP, TCP6], &own), 0);
        assert_eq!(
            foreign_tcp_sockets(&["header only\n", "garbage line"], &own),
            0
        );
    }

    #[test]
    fn this_process_sees_its_own_listener_as_its_own() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let own = own_socket_inodes();
        let v4 = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        let port = format!(":{:04X} ", listener.local_addr().unwrap().port());
        let line = v4.lines().find(|l| l.contains(&port)).unwrap();
        let inode: u64 = line.split_whitespace().nth(9).unwrap().parse().unwrap();
        assert!(own.contains(&inode), "{line}");
    }

    #[tokio::test]
    async fn waiting_for_a_sidecar_that_never_answers_fails_naming_the_address() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let e = wait_ready(addr, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
    }

    #[tokio::test]
    async fn a_sidecar_that_is_not_ready_fails_the_wait_with_its_reason() {
        // What the kubelet's FailedPostStartHook event then shows.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = [0u8; 256];
                let _ = s.read(&mut req).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.0 503 Service Unavailable\r\ncontent-length: 64\r\n\r\n\
                          not ready: refused by gateway corp: namespace shop is not selected\n",
                    )
                    .await;
            }
        });
        let e = wait_ready(addr, Duration::from_millis(500))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "HTTP 503: not ready: refused by gateway corp: namespace shop is not selected"
            ),
            "{e}"
        );
    }
}

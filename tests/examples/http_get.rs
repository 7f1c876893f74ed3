//! `http-get [--post] URL`: a tiny HTTP/1.0 client with no dependencies beyond `std`, statically linked
//! into a `FROM scratch` image (`images/http-get.Containerfile`) that plays the application
//! container of an injected Pod in the runtime test (`tests/tests/runtime.rs`).
//!
//! It prints the response body on stdout and exits 0 on a 2xx answer, 1 on any other status,
//! and 2 when it cannot connect (the OS error, e.g. `No route to host (os error 113)`, goes to
//! stderr). It must never retry or resolve names: the test wants one connection attempt to an
//! IP literal, so a kill-switch refusal is seen as it happens. `--post` sends an empty `POST`
//! instead of a `GET` (a run-once Pod's app asks the sidecar to stop with it, see
//! docs/sidecar.md, "Jobs and run-once Pods").

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// How long one connect, read or write may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Splits `http://IP:PORT/PATH` into the socket address and the path.
fn parse(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = authority
        .parse::<SocketAddr>()
        .map_err(|e| format!("{url}: the host must be IP:PORT ({e})"))?;
    Ok((addr, format!("/{path}")))
}

fn request(method: &str, url: &str) -> Result<(u16, Vec<u8>), (u8, String)> {
    let (addr, path) = parse(url).map_err(|e| (2, e))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| (2, format!("connect to {addr} failed: {e}")))?;
    let io = |e: std::io::Error| (2, format!("talking to {addr} failed: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(io)?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| (1, "response has no header end".to_owned()))?;
    let status_line = String::from_utf8_lossy(&response[..head_end]);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| (1, format!("bad status line: {status_line}")))?;
    Ok((status, response[head_end + 4..].to_vec()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (method, url) = match args.as_slice() {
        [url] => ("GET", url),
        [flag, url] if flag == "--post" => ("POST", url),
        _ => {
            eprintln!("usage: http-get [--post] http://IP:PORT/PATH");
            return ExitCode::from(2);
        }
    };
    match request(method, url) {
        Ok((status, body)) => {
            let _ = std::io::stdout().write_all(&body);
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("HTTP status {status}");
                ExitCode::from(1)
            }
        }
        Err((code, message)) => {
            eprintln!("{message}");
            ExitCode::from(code)
        }
    }
}

//! Server processes started by the benchmark: spawn, read the caBundle they print, read their
//! memory from `/proc/PID/status`, and kill them (by PID, on drop).
//!
//! Owns only the processes it started. Never signals anything else.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Error;

/// A running server started by the benchmark; killed and reaped on drop.
#[derive(Debug)]
pub struct ServerProcess {
    /// Which server (`wg-injector` or `floor`).
    pub what: &'static str,
    child: Child,
    /// PEM of the CA that signed the server's certificate.
    pub ca_pem: String,
    /// Where the server's stderr (its logs) goes.
    pub log: PathBuf,
}

impl ServerProcess {
    /// Start `program args…`, send its stderr to `log`, and wait (at most 30 s) for the
    /// base64 caBundle it prints as its first stdout line.
    pub fn start(
        what: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, Error> {
        use base64::Engine as _;
        let spawn_error = |source| Error::SpawnServer {
            what,
            program: program.to_owned(),
            source,
        };
        let stderr = std::fs::File::create(&log).map_err(spawn_error)?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(spawn_error)?;
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep reading so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut server = Self {
            what,
            child,
            ca_pem: String::new(),
            log,
        };
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(line)) if !line.trim().is_empty() => line,
            Ok(Ok(_)) => {
                return Err(Error::ServerNotReady {
                    what,
                    reason: format!(
                        "it exited without printing a caBundle (see {})",
                        server.log.display()
                    ),
                })
            }
            Ok(Err(e)) => {
                return Err(Error::ServerNotReady {
                    what,
                    reason: format!("reading its stdout failed: {e}"),
                })
            }
            Err(_) => {
                return Err(Error::ServerNotReady {
                    what,
                    reason: "no caBundle on stdout within 30 s".to_owned(),
                })
            }
        };
        let pem = base64::engine::general_purpose::STANDARD
            .decode(line.trim())
            .map_err(|e| Error::BadCaBundle {
                what,
                reason: e.to_string(),
            })?;
        server.ca_pem = String::from_utf8(pem).map_err(|e| Error::BadCaBundle {
            what,
            reason: e.to_string(),
        })?;
        Ok(server)
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Current memory of the process.
    #[must_use]
    pub fn memory(&self) -> Option<Memory> {
        Memory::of(self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident size so far.
    pub hwm_kib: u64,
}

impl Memory {
    /// Read the memory of `pid`; `None` when the process is gone.
    #[must_use]
    pub fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        Some(Self::parse(&status))
    }

    /// Parse the text of `/proc/PID/status`.
    #[must_use]
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_the_vmrss_and_vmhwm_lines() {
        let status = "Name:\twg-injector\nVmHWM:\t   12345 kB\nVmRSS:\t    6789 kB\nThreads:\t3\n";
        assert_eq!(
            Memory::parse(status),
            Memory {
                rss_kib: 6789,
                hwm_kib: 12345
            }
        );
    }

    #[test]
    fn the_memory_of_this_process_is_nonzero() {
        let me = Memory::of(std::process::id()).expect("own /proc status");
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib, "{me:?}");
    }
}

//! The command line of `wg-injector`: one binary, three subcommands.
//!
//! Owns flag names, their `WG_INJECTOR_*` environment twins and the validation that turns
//! [`ServeArgs`] into [`ServeSettings`] (bad combinations refused with a message naming the
//! flag). Nothing else in the crate reads flags or the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::server::Limits;
use crate::Error;

/// The `wg-injector` command line.
#[derive(Debug, Parser)]
#[command(
    name = "wg-injector",
    version,
    about = "Injects a WireGuard sidecar into Kubernetes Pods."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the mutating admission webhook over HTTPS.
    Serve(Box<ServeArgs>),
    /// Inject the sidecar into the Pods and Pod templates of YAML/JSON files (like `istioctl kube-inject`).
    Inject(crate::offline::FileArgs),
    /// Remove exactly what `inject` added.
    Uninject(crate::offline::FileArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Text,
}

/// Arguments of `wg-injector serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (HTTPS).
    #[arg(long, env = "WG_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM serving certificate chain (leaf first); reloaded when the file changes.
    #[arg(long, env = "WG_INJECTOR_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the serving certificate; reloaded when the file changes.
    #[arg(long, env = "WG_INJECTOR_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Generate a CA and serving certificate in memory and print the caBundle (base64 PEM) on
    /// stdout. For local runs; not with --tls-cert/--tls-key.
    #[arg(long, env = "WG_INJECTOR_SELF_SIGNED")]
    pub self_signed: bool,
    /// Names (DNS or IP) of the generated serving certificate, comma-separated.
    #[arg(
        long,
        env = "WG_INJECTOR_SELF_SIGNED_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    pub self_signed_names: Vec<String>,
    /// Injector configuration file (YAML); built-in defaults when absent.
    #[arg(long, env = "WG_INJECTOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Seconds between checks of --tls-cert/--tls-key for new content.
    #[arg(
        long,
        env = "WG_INJECTOR_CERT_RELOAD_INTERVAL",
        default_value_t = 5,
        value_name = "SECONDS"
    )]
    pub cert_reload_interval: u64,
    /// Connections served at once.
    #[arg(long, env = "WG_INJECTOR_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds allowed for a TLS handshake.
    #[arg(
        long,
        env = "WG_INJECTOR_TLS_HANDSHAKE_TIMEOUT",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub tls_handshake_timeout: u64,
    /// Seconds allowed for request headers (and for the first bytes after the handshake).
    #[arg(
        long,
        env = "WG_INJECTOR_HEADER_READ_TIMEOUT",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub header_read_timeout: u64,
    /// Seconds allowed to read a request body and answer it.
    #[arg(
        long,
        env = "WG_INJECTOR_REQUEST_TIMEOUT",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub request_timeout: u64,
    /// Seconds between SIGTERM and closing the listener: `/readyz` answers 503 while requests
    /// are still served, so the Pod leaves the Service before it stops accepting (0: close at
    /// once). Keep the Pod's terminationGracePeriodSeconds above this plus 10 s of draining.
    #[arg(
        long,
        env = "WG_INJECTOR_SHUTDOWN_DELAY",
        default_value_t = 5,
        value_name = "SECONDS"
    )]
    pub shutdown_delay: u64,
    /// Patches of fresh injections kept for Pods of the same template (docs/operations.md,
    /// "The patch memo"); 0 turns the memo off.
    #[arg(
        long,
        env = "WG_INJECTOR_PATCH_MEMO_ENTRIES",
        default_value_t = crate::memo::DEFAULT_CAPACITY
    )]
    pub patch_memo_entries: usize,
    /// Log format.
    #[arg(long, env = "WG_INJECTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `wg_injector=debug`).
    #[arg(long, env = "WG_INJECTOR_LOG", default_value = "info")]
    pub log_filter: String,
    /// Self-managed certificates and apiserver version discovery (see [`crate::cluster`]).
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateSource {
    /// PEM files, polled for changes every `reload_interval`.
    Files {
        /// `--tls-cert`.
        cert: PathBuf,
        /// `--tls-key`.
        key: PathBuf,
        /// `--cert-reload-interval`.
        reload_interval: Duration,
    },
    /// Generated at startup for these names (`--self-signed`).
    SelfSigned {
        /// `--self-signed-names`.
        names: Vec<String>,
    },
    /// Generated, stored in a Secret, renewed and published by the injector
    /// (`--cert-mode self-managed`, see [`crate::cluster::SelfManaged`]).
    SelfManaged,
}

/// Validated settings of `serve`; tests build this directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSettings {
    /// `--listen`.
    pub listen: SocketAddr,
    /// The serving certificate.
    pub certificate: CertificateSource,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// Connection limits and timeouts.
    pub limits: Limits,
    /// `--patch-memo-entries`.
    pub patch_memo_entries: usize,
    /// `--log-format`.
    pub log_format: LogFormat,
    /// `--log-filter`.
    pub log_filter: String,
    /// Self-managed certificates and version discovery flags.
    pub cluster: crate::cluster::ClusterArgs,
}

fn seconds(flag: &'static str, value: u64) -> Result<Duration, Error> {
    if value == 0 {
        return Err(Error::InvalidFlag {
            flag,
            reason: "must be at least 1 second".to_owned(),
        });
    }
    Ok(Duration::from_secs(value))
}

impl ServeArgs {
    /// Check the flags together and build the settings.
    pub fn into_settings(self) -> Result<ServeSettings, Error> {
        let self_managed = self.cluster.cert_mode == crate::cluster::CertMode::SelfManaged;
        if self_managed && (self.self_signed || self.tls_cert.is_some() || self.tls_key.is_some()) {
            return Err(Error::InvalidFlag {
                flag: "--cert-mode",
                reason:
                    "self-managed cannot be combined with --tls-cert, --tls-key or --self-signed"
                        .to_owned(),
            });
        }
        let certificate = if self_managed {
            CertificateSource::SelfManaged
        } else {
            match (self.self_signed, self.tls_cert, self.tls_key) {
                (true, Some(_), _) => {
                    return Err(Error::InvalidFlag {
                        flag: "--tls-cert",
                        reason: "cannot be combined with --self-signed".to_owned(),
                    })
                }
                (true, None, Some(_)) => {
                    return Err(Error::InvalidFlag {
                        flag: "--tls-key",
                        reason: "cannot be combined with --self-signed".to_owned(),
                    })
                }
                (true, None, None) => {
                    let names: Vec<String> = self
                        .self_signed_names
                        .into_iter()
                        .map(|n| n.trim().to_owned())
                        .filter(|n| !n.is_empty())
                        .collect();
                    if names.is_empty() {
                        return Err(Error::InvalidFlag {
                            flag: "--self-signed-names",
                            reason: "needs at least one DNS name or IP address".to_owned(),
                        });
                    }
                    CertificateSource::SelfSigned { names }
                }
                (false, Some(cert), Some(key)) => CertificateSource::Files {
                    cert,
                    key,
                    reload_interval: seconds("--cert-reload-interval", self.cert_reload_interval)?,
                },
                (false, None, Some(_)) => {
                    return Err(Error::InvalidFlag {
                        flag: "--tls-cert",
                        reason: "is required with --tls-key".to_owned(),
                    })
                }
                (false, Some(_), None) => {
                    return Err(Error::InvalidFlag {
                        flag: "--tls-key",
                        reason: "is required with --tls-cert".to_owned(),
                    })
                }
                (false, None, None) => return Err(Error::InvalidFlag {
                    flag: "--tls-cert",
                    reason:
                        "--tls-cert and --tls-key are required (or --self-signed for local runs)"
                            .to_owned(),
                }),
            }
        };
        if self.max_connections == 0 {
            return Err(Error::InvalidFlag {
                flag: "--max-connections",
                reason: "must be at least 1".to_owned(),
            });
        }
        let limits = Limits {
            max_connections: self.max_connections,
            tls_handshake_timeout: seconds("--tls-handshake-timeout", self.tls_handshake_timeout)?,
            header_read_timeout: seconds("--header-read-timeout", self.header_read_timeout)?,
            request_timeout: seconds("--request-timeout", self.request_timeout)?,
            shutdown_delay: Duration::from_secs(self.shutdown_delay),
            ..Limits::default()
        };
        Ok(ServeSettings {
            listen: self.listen,
            certificate,
            config: self.config,
            limits,
            patch_memo_entries: self.patch_memo_entries,
            log_format: self.log_format,
            log_filter: self.log_filter,
            cluster: self.cluster,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings(argv: &[&str]) -> Result<ServeSettings, Error> {
        let mut full = vec!["wg-injector", "serve"];
        full.extend_from_slice(argv);
        let Command::Serve(serve) = Cli::try_parse_from(full).unwrap().command else {
            panic!("not serve");
        };
        serve.into_settings()
    }

    fn refused_flag(argv: &[&str]) -> &'static str {
        match settings(argv) {
            Err(Error::InvalidFlag { flag, .. }) => flag,
            other => panic!("expected a refusal for {argv:?}, got {other:?}"),
        }
    }

    #[test]
    fn cert_and_key_files_make_a_reloading_source_with_default_limits() {
        let s = settings(&["--tls-cert", "/t/tls.crt", "--tls-key", "/t/tls.key"]).unwrap();
        assert_eq!(
            s.certificate,
            CertificateSource::Files {
                cert: "/t/tls.crt".into(),
                key: "/t/tls.key".into(),
                reload_interval: Duration::from_secs(5),
            }
        );
        assert_eq!(s.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(s.limits.max_connections, 1024);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.patch_memo_entries, crate::memo::DEFAULT_CAPACITY);
    }

    #[test]
    fn the_patch_memo_can_be_sized_or_turned_off() {
        let off = settings(&["--self-signed", "--patch-memo-entries", "0"]).unwrap();
        assert_eq!(off.patch_memo_entries, 0);
        let big = settings(&["--self-signed", "--patch-memo-entries", "4096"]).unwrap();
        assert_eq!(big.patch_memo_entries, 4096);
    }

    #[test]
    fn self_signed_uses_loopback_names_by_default() {
        let s = settings(&["--self-signed", "--listen", "127.0.0.1:9443"]).unwrap();
        assert_eq!(
            s.certificate,
            CertificateSource::SelfSigned {
                names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
            }
        );
    }

    #[test]
    fn bad_combinations_are_refused_naming_the_flag() {
        assert_eq!(refused_flag(&[]), "--tls-cert");
        assert_eq!(refused_flag(&["--tls-key", "k"]), "--tls-cert");
        assert_eq!(refused_flag(&["--tls-cert", "c"]), "--tls-key");
        assert_eq!(
            refused_flag(&["--self-signed", "--tls-cert", "c"]),
            "--tls-cert"
        );
        assert_eq!(
            refused_flag(&["--self-signed", "--tls-key", "k"]),
            "--tls-key"
        );
        assert_eq!(
            refused_flag(&["--self-signed", "--self-signed-names", ","]),
            "--self-signed-names"
        );
        assert_eq!(
            refused_flag(&["--self-signed", "--max-connections", "0"]),
            "--max-connections"
        );
        assert_eq!(
            refused_flag(&["--self-signed", "--request-timeout", "0"]),
            "--request-timeout"
        );
        let message = settings(&["--tls-cert", "c"]).unwrap_err().to_string();
        assert!(message.contains("--tls-key"), "{message}");
    }

    #[test]
    fn every_serve_flag_has_an_environment_twin() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().unwrap_or_else(|| panic!("--{id} has no env"));
            let expected = format!("WG_INJECTOR_{}", id.to_uppercase());
            let env = env.to_str().unwrap();
            assert!(
                env == expected || (id == "log_filter" && env == "WG_INJECTOR_LOG"),
                "--{id} reads {env}, expected {expected}"
            );
        }
    }
}

//! The command line of `wg-injector`: one binary, three subcommands.

use clap::{Parser, Subcommand};

/// Injects a WireGuard sidecar into Kubernetes Pods.
#[derive(Debug, Parser)]
#[command(name = "wg-injector", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the mutating admission webhook over HTTPS.
    Serve(crate::webhook::ServeArgs),
    /// Inject the sidecar into the Pods and Pod templates of YAML/JSON files (like `istioctl kube-inject`).
    Inject(crate::offline::FileArgs),
    /// Remove exactly what `inject` added.
    Uninject(crate::offline::FileArgs),
}

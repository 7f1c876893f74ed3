//! The HTTPS admission webhook server. OWNED BY: webhook helper.

/// Arguments of `wg-injector serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

/// Run the webhook until SIGTERM.
pub async fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve is not implemented yet")
}

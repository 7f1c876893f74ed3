//! `wg-sidecar init`: the init container that installs the kill switch.
//!
//! Owns: turning `InitArgs` into kill-switch routes, idempotently (a re-run changes nothing).
//! Must never: contact Vault or create the WireGuard interface.

use crate::{cli::InitArgs, error::Result, routes::Routes};

/// Installs the kill switch for every tunnelled CIDR (or does nothing with `--kill-switch false`).
pub async fn init(args: &InitArgs) -> Result<()> {
    let cidrs: Vec<_> = args.routes.iter().map(ipnet::IpNet::trunc).collect();
    if !args.kill_switch {
        tracing::warn!(routes = ?cidrs, "kill switch disabled: traffic for the tunnelled CIDRs may leave by the default route while the tunnel is down");
        return Ok(());
    }
    Routes::connect()?.install_kill_switch(&cidrs).await?;
    tracing::info!(routes = ?cidrs, metric = crate::routes::KILL_SWITCH_METRIC, "kill switch installed");
    Ok(())
}

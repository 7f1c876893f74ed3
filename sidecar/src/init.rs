//! `wg-sidecar init`: the init container that installs the Pod's policy routing and kill switch.
//!
//! Owns: turning `InitArgs` into the rules of [`crate::routes`] (the exempt CIDRs to `main`,
//! everything unmarked to the tunnel's table) and the kill-switch routes in that table,
//! idempotently (a re-run changes nothing).
//! Must never: contact Vault or create the WireGuard interface.

use crate::{
    cli::InitArgs,
    error::Result,
    routes::{Routes, KILL_SWITCH_METRIC, TABLE},
};

/// Installs the rules, then the kill switch for every tunnelled CIDR and DNS server (not with
/// `--kill-switch false`).
pub async fn init(args: &InitArgs) -> Result<()> {
    let cidrs = crate::cli::tunnelled(&args.routes, &args.dns);
    let exclude: Vec<_> = args.exclude.iter().map(ipnet::IpNet::trunc).collect();
    let routes = Routes::connect()?;
    routes.install_rules(&cidrs, &exclude).await?;
    if !args.kill_switch {
        tracing::warn!(routes = %crate::logfmt::list(&cidrs), "kill switch disabled: traffic for the tunnelled CIDRs may leave by the default route while the tunnel is down");
        return Ok(());
    }
    routes.install_kill_switch(&cidrs).await?;
    tracing::info!(routes = %crate::logfmt::list(&cidrs), exclude = %crate::logfmt::list(&exclude), table = TABLE, metric = KILL_SWITCH_METRIC, "policy routing and kill switch installed");
    Ok(())
}

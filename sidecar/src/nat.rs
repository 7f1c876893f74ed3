//! The gateway's forwarding and masquerading: IP forwarding sysctls and one nftables table.
//!
//! Owns: the ruleset text (pure, unit-tested) and applying/removing it atomically through the
//! `nft` tool (one `nft -f -` transaction on stdin: the table is created, flushed and refilled,
//! so re-applying is idempotent), and turning on IP forwarding in the gateway's namespace.
//! Must never: touch any table but its own (`wg_gateway_<interface>`), or leave a half-applied
//! ruleset (nft applies a file as one transaction).
//!
//! Why the `nft` tool and not a netlink crate: the Rust nftables netlink crates (`nftnl` needs
//! the C libnftnl; `rustables` is pure Rust but young and has no masquerade-with-interface-match
//! helpers we could rely on) would add risk for a handful of rules written once at startup. The
//! gateway image therefore ships `nft` (and its libraries) next to `wg-sidecar`; a missing `nft`
//! is a startup error naming `--nft`, unless `--masquerade false`.

use std::{
    fmt::Write as _,
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use ipnet::IpNet;

use crate::error::{Result, SidecarError};

/// The nftables table name for `interface` (only `[A-Za-z0-9_]`).
#[must_use]
pub fn table_name(interface: &str) -> String {
    let clean: String = interface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("wg_gateway_{clean}")
}

/// The ruleset: traffic from the tunnel `sources` leaving by any interface other than the tunnel
/// is masqueraded (the private network needs no route back to the tunnel pool), and forwarded
/// traffic is accepted in both directions.
#[must_use]
pub fn ruleset(interface: &str, sources: &[IpNet]) -> String {
    let t = table_name(interface);
    let mut s = format!("table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n");
    s.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for net in sources {
        let fam = if net.addr().is_ipv4() { "ip" } else { "ip6" };
        let _ = writeln!(
            s,
            "    {fam} saddr {} oifname != \"{interface}\" masquerade",
            net.trunc()
        );
    }
    s.push_str("  }\n");
    s.push_str("  chain forward {\n    type filter hook forward priority filter; policy accept;\n");
    let _ = writeln!(
        s,
        "    iifname \"{interface}\" accept\n    oifname \"{interface}\" ct state established,related accept"
    );
    s.push_str("  }\n}\n");
    s
}

fn nft(nft_bin: &Path, script: &str, op: &'static str) -> Result<()> {
    let err = |reason: String| SidecarError::Nat { op, reason };
    let mut child = Command::new(nft_bin)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run {} (see --nft): {e}", nft_bin.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(format!(
            "nft exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The installed NAT table; [`Nat::remove`] deletes it.
#[derive(Debug)]
pub struct Nat {
    nft_bin: std::path::PathBuf,
    table: String,
}

impl Nat {
    /// Installs (or re-installs) the table for `interface` and `sources`.
    pub fn install(nft_bin: &Path, interface: &str, sources: &[IpNet]) -> Result<Self> {
        nft(nft_bin, &ruleset(interface, sources), "install")?;
        Ok(Self {
            nft_bin: nft_bin.to_owned(),
            table: table_name(interface),
        })
    }

    /// Deletes the table.
    pub fn remove(&self) -> Result<()> {
        nft(
            &self.nft_bin,
            &format!("delete table inet {}\n", self.table),
            "remove",
        )
    }
}

/// Turns on IPv4 (and with `ipv6`, IPv6) forwarding in this network namespace.
pub fn enable_forwarding(ipv6: bool) -> Result<()> {
    let mut files = vec!["/proc/sys/net/ipv4/ip_forward"];
    if ipv6 {
        files.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for f in files {
        let current = std::fs::read_to_string(f).unwrap_or_default();
        if current.trim() == "1" {
            continue;
        }
        std::fs::write(f, "1").map_err(|e| SidecarError::Nat {
            op: "enable forwarding for",
            reason: format!(
                "{f}: {e} (set the sysctl in the Pod spec, or run with NET_ADMIN and a writable /proc/sys)"
            ),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{ruleset, table_name};

    #[test]
    fn the_ruleset_masquerades_tunnel_sources_leaving_by_other_interfaces() {
        let r = ruleset(
            "wg0",
            &[
                "10.99.0.1/16".parse().unwrap(),
                "fd99::1/64".parse().unwrap(),
            ],
        );
        assert!(
            r.contains("ip saddr 10.99.0.0/16 oifname != \"wg0\" masquerade"),
            "{r}"
        );
        assert!(
            r.contains("ip6 saddr fd99::/64 oifname != \"wg0\" masquerade"),
            "{r}"
        );
        // Idempotent: the table is (re)created and deleted before being defined again.
        assert!(r.starts_with("table inet wg_gateway_wg0\ndelete table inet wg_gateway_wg0\n"));
    }

    #[test]
    fn table_names_only_hold_safe_characters() {
        assert_eq!(table_name("wg-gw.0"), "wg_gateway_wg_gw_0");
    }
}

//! `wg-sidecar vault bootstrap`: the Vault policies and Kubernetes-auth roles of one gateway, so
//! that no workload needs a role or a policy of its own.
//!
//! Owns: the pure [`plan`] (policy texts and role specs, golden-tested) and writing it with an
//! admin token. Pods log in to ONE role (`wg-pod` by default) bound to every service account of
//! every namespace; its policy is *templated* on the caller's Kubernetes-auth alias metadata, so a
//! Pod can read only `wg/keys/<its namespace>/<its service account>`, the gateways' verdicts on
//! its own namespace and service account, and the gateways' public records. The gateway and the
//! rotation job get their own roles, bound to the chart's service accounts.
//! Must never: read or write key material, or weaken a policy it finds (it overwrites its own
//! policies and roles with exactly the plan; nothing else is touched).

use crate::{
    error::Result,
    keys::{GatewayLayoutArgs, LayoutArgs, VaultArgs},
    vault::Vault,
};

/// `wg-sidecar vault …`
#[derive(Debug, Clone, clap::Args)]
pub struct VaultCommandArgs {
    /// The operation.
    #[command(subcommand)]
    pub op: VaultOp,
}

/// Vault administration.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum VaultOp {
    /// Write the policies and Kubernetes-auth roles of a gateway and its Pods (idempotent).
    Bootstrap(BootstrapArgs),
}

/// Flags of `vault bootstrap` (each also `WG_SIDECAR_<FLAG>`).
#[derive(Debug, Clone, clap::Args)]
pub struct BootstrapArgs {
    /// The gateway profile: its public record is `<gateways-prefix>/<name>`.
    #[arg(long, env = "WG_SIDECAR_GATEWAY")]
    pub gateway: String,
    /// Namespace the gateway chart is installed in.
    #[arg(long, env = "WG_SIDECAR_GATEWAY_NAMESPACE")]
    pub gateway_namespace: String,
    /// The gateway's service account (default: the chart's name for a release called like the
    /// gateway: `<gateway>-wg-gateway`, or `<gateway>` when it already contains `wg-gateway`).
    #[arg(long, env = "WG_SIDECAR_GATEWAY_SERVICE_ACCOUNT")]
    pub gateway_service_account: Option<String>,
    /// The rotation job's service account (default: the gateway's plus `-rotate`).
    #[arg(long, env = "WG_SIDECAR_ROTATE_SERVICE_ACCOUNT")]
    pub rotate_service_account: Option<String>,
    /// The one role every injected Pod logs in to (the injector chart's `config.vault.roleTemplate`).
    #[arg(long, env = "WG_SIDECAR_POD_ROLE", default_value = "wg-pod")]
    pub pod_role: String,
    /// The gateway's role (the gateway chart's `vault.role`).
    #[arg(long, env = "WG_SIDECAR_GATEWAY_ROLE", default_value = "wg-gateway")]
    pub gateway_role: String,
    /// The rotation job's role (the gateway chart's `rotation.vaultRole`).
    #[arg(
        long,
        env = "WG_SIDECAR_ROTATE_ROLE",
        default_value = "wg-gateway-rotate"
    )]
    pub rotate_role: String,
    /// Kubernetes-auth mount the roles are written to (it must be enabled and configured).
    #[arg(
        long,
        env = "WG_SIDECAR_KUBERNETES_AUTH_MOUNT",
        default_value = "kubernetes"
    )]
    pub kubernetes_auth_mount: String,
    /// Audience the projected tokens carry.
    #[arg(long, env = "WG_SIDECAR_TOKEN_AUDIENCE", default_value = "vault")]
    pub audience: String,
    /// Lifetime of the Vault tokens the roles issue.
    #[arg(long, env = "WG_SIDECAR_TOKEN_TTL", default_value = "10m")]
    pub token_ttl: String,
    /// Where the gateway records live.
    #[command(flatten)]
    pub gateway_layout: GatewayLayoutArgs,
    /// Record layout.
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Vault connection (an admin token: `--vault-auth token --vault-token-file …`).
    #[command(flatten)]
    pub vault: VaultArgs,
}

/// One Kubernetes-auth role.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoleSpec {
    /// Role name.
    pub name: String,
    /// `bound_service_account_names`.
    pub service_accounts: Vec<String>,
    /// `bound_service_account_namespaces`.
    pub namespaces: Vec<String>,
    /// `token_policies`.
    pub policies: Vec<String>,
}

/// Everything `bootstrap` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `(name, HCL)` of each policy.
    pub policies: Vec<(String, String)>,
    /// The roles.
    pub roles: Vec<RoleSpec>,
}

/// The gateway chart's service-account name for a release called `gateway`.
#[must_use]
pub fn chart_service_account(gateway: &str) -> String {
    if gateway.contains("wg-gateway") {
        gateway.to_owned()
    } else {
        format!("{gateway}-wg-gateway")
    }
}

/// The policies and roles for `args`; `accessor` is the Kubernetes-auth mount's accessor (the
/// templated policy names the caller's alias metadata through it).
#[must_use]
pub fn plan(args: &BootstrapArgs, accessor: &str) -> Plan {
    let kv = args.vault.vault_kv_mount.trim_matches('/');
    let gw = &args.gateway;
    let gateway_record = format!("{kv}/data/{}/{gw}", args.gateway_layout.gateways_prefix);
    let meta = |field: &str| format!("{{{{identity.entity.aliases.{accessor}.metadata.{field}}}}}");
    let ns = meta("service_account_namespace");
    let sa = meta("service_account_name");
    let peers = args.layout.peers_prefix.trim_end_matches('/');
    let addresses = args.layout.addresses_prefix.trim_end_matches('/');
    let verdicts = args.layout.verdicts_prefix.trim_end_matches('/');
    let pod_policy = format!(
        "# Written by `wg-sidecar vault bootstrap`: every injected Pod, scoped to its own\n\
         # namespace and service account by the Kubernetes-auth alias metadata. A Pod publishes\n\
         # its public record below its own namespace and service account (any gateway), claims a\n\
         # free tunnel address (create only: a claim is never overwritten or deleted by a Pod),\n\
         # reads a static identity's per-Pod key, reads what any gateway says about refusing its\n\
         # own namespace and service account, and reads the gateways' public records.\n\
         path \"{kv}/data/{peers}/+/{ns}/{sa}/*\" {{ capabilities = [\"create\", \"update\", \"read\"] }}\n\
         path \"{kv}/data/{verdicts}/+/{ns}/{sa}/*\" {{ capabilities = [\"read\"] }}\n\
         path \"{kv}/data/{addresses}/+/*\" {{ capabilities = [\"create\"] }}\n\
         path \"{kv}/metadata/{addresses}/*\" {{ capabilities = [\"list\"] }}\n\
         path \"{kv}/data/{keys}/{ns}/{sa}/*\" {{ capabilities = [\"read\"] }}\n\
         path \"{kv}/data/{gateways}/*\" {{ capabilities = [\"read\"] }}\n",
        gateways = args.gateway_layout.gateways_prefix,
        keys = args.layout.keys_prefix,
    );
    let gateway_policy = format!(
        "# Written by `wg-sidecar vault bootstrap`: the gateway {gw} reads its Pods' records and\n\
         # claims, releases them when a Pod is gone, writes its verdicts on refused Pods (and\n\
         # deletes them), reads its keys, and publishes its endpoints in its own public record\n\
         # (`--endpoints`: check-and-set, created when absent; no other gateway's record).\n\
         path \"{kv}/data/{peers}/{gw}/*\" {{ capabilities = [\"read\"] }}\n\
         path \"{kv}/metadata/{peers}/{gw}/*\" {{ capabilities = [\"list\", \"read\", \"delete\"] }}\n\
         path \"{kv}/metadata/{peers}/{gw}\" {{ capabilities = [\"list\"] }}\n\
         path \"{kv}/data/{addresses}/{gw}/*\" {{ capabilities = [\"read\"] }}\n\
         path \"{kv}/metadata/{addresses}/{gw}/*\" {{ capabilities = [\"list\", \"read\", \"delete\"] }}\n\
         path \"{kv}/metadata/{addresses}/{gw}\" {{ capabilities = [\"list\"] }}\n\
         path \"{kv}/data/{verdicts}/{gw}/*\" {{ capabilities = [\"create\", \"update\", \"read\"] }}\n\
         path \"{kv}/metadata/{verdicts}/{gw}/*\" {{ capabilities = [\"list\", \"read\", \"delete\"] }}\n\
         path \"{kv}/metadata/{verdicts}/{gw}\" {{ capabilities = [\"list\"] }}\n\
         path \"{gateway_record}\" {{ capabilities = [\"create\", \"update\", \"read\"] }}\n\
         path \"{kv}/data/{gateway_keys}/{gw}\" {{ capabilities = [\"read\"] }}\n",
        gateway_keys = args.gateway_layout.gateway_keys_prefix,
    );
    let rotate_policy = format!(
        "# Written by `wg-sidecar vault bootstrap`: the rotation job writes with check-and-set.\n\
         path \"{kv}/data/wg/*\" {{ capabilities = [\"create\", \"update\", \"read\"] }}\n\
         path \"{kv}/metadata/wg/*\" {{ capabilities = [\"list\", \"read\"] }}\n"
    );
    let gateway_sa = args
        .gateway_service_account
        .clone()
        .unwrap_or_else(|| chart_service_account(gw));
    let rotate_sa = args
        .rotate_service_account
        .clone()
        .unwrap_or_else(|| format!("{gateway_sa}-rotate"));
    // Each role has the policy of its own name.
    let pod_policy_name = args.pod_role.clone();
    let gateway_policy_name = args.gateway_role.clone();
    let rotate_policy_name = args.rotate_role.clone();
    Plan {
        roles: vec![
            RoleSpec {
                name: args.pod_role.clone(),
                service_accounts: vec!["*".into()],
                namespaces: vec!["*".into()],
                policies: vec![pod_policy_name.clone()],
            },
            RoleSpec {
                name: args.gateway_role.clone(),
                service_accounts: vec![gateway_sa],
                namespaces: vec![args.gateway_namespace.clone()],
                policies: vec![gateway_policy_name.clone()],
            },
            RoleSpec {
                name: args.rotate_role.clone(),
                service_accounts: vec![rotate_sa],
                namespaces: vec![args.gateway_namespace.clone()],
                policies: vec![rotate_policy_name.clone()],
            },
        ],
        policies: vec![
            (pod_policy_name, pod_policy),
            (gateway_policy_name, gateway_policy),
            (rotate_policy_name, rotate_policy),
        ],
    }
}

/// `wg-sidecar vault …`
pub async fn run(args: VaultCommandArgs) -> Result<()> {
    match args.op {
        VaultOp::Bootstrap(args) => bootstrap(&args).await,
    }
}

async fn bootstrap(args: &BootstrapArgs) -> Result<()> {
    let vault = Vault::new(args.vault.settings()?)?;
    vault.login().await?;
    let accessor = vault.auth_accessor(&args.kubernetes_auth_mount).await?;
    let plan = plan(args, &accessor);
    for (name, hcl) in &plan.policies {
        vault.write_policy(name, hcl).await?;
        println!(
            "{}",
            serde_json::json!({"kind": "policy", "name": name, "written": true})
        );
    }
    for role in &plan.roles {
        vault
            .write_kubernetes_role(
                &args.kubernetes_auth_mount,
                role,
                &args.audience,
                &args.token_ttl,
            )
            .await?;
        println!(
            "{}",
            serde_json::json!({"kind": "role", "mount": args.kubernetes_auth_mount, "name": role.name,
                "service_accounts": role.service_accounts, "namespaces": role.namespaces,
                "policies": role.policies, "written": true})
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: BootstrapArgs,
    }

    fn args(extra: &[&str]) -> BootstrapArgs {
        let argv = [
            "x",
            "--gateway",
            "vpn-gateway",
            "--gateway-namespace",
            "vpn",
            "--vault-addr",
            "http://127.0.0.1:1",
        ]
        .iter()
        .chain(extra)
        .copied();
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn pods_get_one_role_whose_policy_is_scoped_to_their_own_namespace_and_service_account() {
        let p = plan(&args(&[]), "auth_kubernetes_1a2b");
        let pod = &p.roles[0];
        assert_eq!(pod.name, "wg-pod");
        assert_eq!(
            (pod.service_accounts.as_slice(), pod.namespaces.as_slice()),
            (&["*".to_owned()][..], &["*".to_owned()][..])
        );
        let (name, hcl) = &p.policies[0];
        assert_eq!(name, "wg-pod");
        assert_eq!(pod.policies, std::slice::from_ref(name));
        let id = "{{identity.entity.aliases.auth_kubernetes_1a2b.metadata.service_account_namespace}}/{{identity.entity.aliases.auth_kubernetes_1a2b.metadata.service_account_name}}";
        let expected = [
            format!("path \"secret/data/wg/peers/+/{id}/*\" {{ capabilities = [\"create\", \"update\", \"read\"] }}"),
            format!("path \"secret/data/wg/verdicts/+/{id}/*\" {{ capabilities = [\"read\"] }}"),
            "path \"secret/data/wg/addresses/+/*\" { capabilities = [\"create\"] }".to_owned(),
            "path \"secret/metadata/wg/addresses/*\" { capabilities = [\"list\"] }".to_owned(),
            format!("path \"secret/data/wg/keys/{id}/*\" {{ capabilities = [\"read\"] }}"),
            "path \"secret/data/wg/gateways/*\" { capabilities = [\"read\"] }".to_owned(),
        ];
        for line in &expected {
            assert!(hcl.contains(line.as_str()), "missing {line}\n{hcl}");
        }
        // Nothing else: no path over other identities, no delete, claims never updated.
        assert_eq!(hcl.matches("path ").count(), expected.len(), "{hcl}");
        let rules: String = hcl.lines().filter(|l| l.starts_with("path ")).collect();
        assert!(!rules.contains("delete"), "{hcl}");
        assert_eq!(rules.matches("update").count(), 1, "{hcl}");
    }

    #[test]
    fn the_gateway_and_rotation_roles_bind_the_charts_service_accounts() {
        let p = plan(&args(&[]), "acc");
        assert_eq!(p.roles[1].name, "wg-gateway");
        assert_eq!(p.roles[1].service_accounts, ["vpn-gateway-wg-gateway"]);
        assert_eq!(p.roles[1].namespaces, ["vpn"]);
        assert_eq!(p.roles[2].name, "wg-gateway-rotate");
        assert_eq!(
            p.roles[2].service_accounts,
            ["vpn-gateway-wg-gateway-rotate"]
        );
        let gw = &p.policies[1].1;
        assert!(
            gw.contains(
                "path \"secret/data/wg/gateway-keys/vpn-gateway\" { capabilities = [\"read\"] }"
            ),
            "{gw}"
        );
        assert!(
            gw.contains("path \"secret/metadata/wg/peers/vpn-gateway/*\" { capabilities = [\"list\", \"read\", \"delete\"] }"),
            "{gw}"
        );
        // Its own verdicts only: written and deleted below <verdicts>/<gateway>.
        for line in [
            "path \"secret/data/wg/verdicts/vpn-gateway/*\" { capabilities = [\"create\", \"update\", \"read\"] }",
            "path \"secret/metadata/wg/verdicts/vpn-gateway/*\" { capabilities = [\"list\", \"read\", \"delete\"] }",
            "path \"secret/metadata/wg/verdicts/vpn-gateway\" { capabilities = [\"list\"] }",
        ] {
            assert!(gw.contains(line), "missing {line}\n{gw}");
        }
        assert_eq!(
            gw.matches("wg/verdicts").count(),
            3,
            "no other verdicts path: {gw}"
        );
        // Its own public record only: read, and written (created when absent) for `--endpoints`.
        assert!(
            gw.contains("path \"secret/data/wg/gateways/vpn-gateway\" { capabilities = [\"create\", \"update\", \"read\"] }"),
            "{gw}"
        );
        assert_eq!(
            gw.matches("wg/gateways").count(),
            1,
            "no other gateway record, no folder wildcard: {gw}"
        );
        // Writes only below its own folders and to its own public record.
        for line in gw
            .lines()
            .filter(|l| l.starts_with("path ") && (l.contains("update") || l.contains("create")))
        {
            assert!(
                line.contains("wg/verdicts/vpn-gateway/")
                    || line.contains("wg/gateways/vpn-gateway\""),
                "unexpected write: {line}"
            );
        }
        // A release named like the chart keeps its name; explicit accounts win.
        assert_eq!(chart_service_account("corp-wg-gateway"), "corp-wg-gateway");
        let p = plan(
            &args(&["--gateway-service-account", "gw", "--vault-kv-mount", "kv"]),
            "acc",
        );
        assert_eq!(p.roles[1].service_accounts, ["gw"]);
        assert_eq!(p.roles[2].service_accounts, ["gw-rotate"]);
        assert!(p.policies[1]
            .1
            .contains("path \"kv/data/wg/gateways/vpn-gateway\""));
    }
}

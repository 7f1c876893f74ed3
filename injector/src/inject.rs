//! The pure injection core: from a Pod, its parsed annotations and the injector config to the
//! injected Pod (and back with [`uninject`]).
//!
//! This module owns the shape of the injected spec: container names, volumes, mount paths,
//! the sidecar's argument list (see `docs/sidecar-cli.md`), probes, resources, the
//! securityContext, the `wg-injector.io/tunnel` label and the `wg-injector.io/status`
//! annotation. It must never do IO, read the environment, or put a key, token or secret into
//! args, env, annotations or labels: the sidecar reads secrets from mounted files or Vault.
//!
//! Ordering: `wg-init` is the FIRST init container, so the kill switch is in place before any
//! other init container (`istio-init`, `vault-agent-init`, …) can send a packet; in native mode
//! `wg-sidecar` follows it directly, so the tunnel is up (startup probe on `/ready`) before
//! those init containers run. In classic mode `wg-sidecar` is the first app container.
//!
//! Idempotence: `uninject` recognises the injected containers from the containers themselves
//! (name and `wg-sidecar` subcommand), not from the status annotation, so injecting an injected
//! Pod yields the same Pod (an empty patch), and a spoofed status annotation changes nothing.
//!
//! Reinvocation (`reinvocationPolicy: IfNeeded`, or an injected template created again): the
//! injection is planned on `uninject(p)` and then takes from the containers `p` already carries
//! what another webhook changed there and injection does not decide ([`Injection::keep_edits`]):
//! `image` and `imagePullPolicy` (an image mirror), `resources` (a policy engine, a VPA), env vars
//! of names it does not render, volumeMounts of volumes it does not add, `envFrom`,
//! `workingDir`, `volumeDevices`, `resizePolicy`, the tty fields, and the `securityContext`
//! fields it leaves unset (`seLinuxOptions`, `appArmorProfile`, …). Everything it decides is
//! re-asserted: `args`, `command`, its env names, `ports`, probes, `lifecycle`,
//! `restartPolicy`, `terminationMessagePolicy`, the `securityContext` fields it sets, its
//! volumes (sources included), its mounts, the order (`wg-init` first), the tunnel label and the
//! status annotation. The Pod's other labels, annotations, containers and volumes were never
//! touched. So `inject(inject(p)) == inject(p)`, and `uninject(inject(p)) == uninject(p)`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, HostPathVolumeSource, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, Pod, PodDNSConfig, PodDNSConfigOption, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::admission::Denial;
use crate::annotations::{
    self, InjectionSpec, KeySource, SidecarMode, NAMESPACE_PLACEHOLDER, POD_PLACEHOLDER,
    SERVICE_ACCOUNT_PLACEHOLDER, STATUS, TUNNEL_LABEL,
};
use crate::config::{Config, GatewayProfile, TunDevice};
use crate::patch::Parts;
use crate::routes;

/// The routes / kill-switch init container.
pub const INIT_CONTAINER: &str = "wg-init";
/// The WireGuard sidecar container.
pub const SIDECAR_CONTAINER: &str = "wg-sidecar";
/// In-memory emptyDir for the UAPI socket.
pub const RUNTIME_VOLUME: &str = "wg-runtime";
/// Projected service-account token for Vault login.
pub const TOKEN_VOLUME: &str = "wg-token";
/// The Secret holding the keys (`key-source: secret:<name>`).
pub const KEYS_VOLUME: &str = "wg-keys";
/// The ConfigMap holding Vault's CA bundle (`vault.caConfigMap`).
pub const VAULT_CA_VOLUME: &str = "wg-vault-ca";
/// `hostPath` `/dev/net/tun` (`tunDevice: hostPath`).
pub const TUN_VOLUME: &str = "wg-tun";
/// Every volume name the injector may add.
pub const INJECTED_VOLUMES: &[&str] = &[
    RUNTIME_VOLUME,
    TOKEN_VOLUME,
    KEYS_VOLUME,
    VAULT_CA_VOLUME,
    TUN_VOLUME,
];

/// Where the runtime emptyDir is mounted.
pub const RUNTIME_DIR: &str = "/var/run/wireguard";
/// Where the projected token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/wg-injector";
/// The projected token file.
pub const TOKEN_FILE: &str = "/var/run/secrets/wg-injector/token";
/// Where the keys Secret is mounted.
pub const KEYS_DIR: &str = "/var/run/secrets/wg-keys";
/// Where Vault's CA ConfigMap is mounted.
pub const VAULT_CA_DIR: &str = "/var/run/secrets/wg-vault-ca";
/// The TUN device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// The sidecar's health/metrics port.
pub const HEALTH_PORT: i32 = 9901;
/// Name of the health port.
pub const HEALTH_PORT_NAME: &str = "wg-health";
/// The sidecar binary in its image (the classic-mode `postStart` hook runs it).
pub const SIDECAR_BINARY: &str = "/usr/local/bin/wg-sidecar";
/// How long the classic-mode `postStart` hook holds the app for the tunnel (the startup probe's
/// budget: 120 failures, one a second).
pub const HOLD_TIMEOUT: &str = "120s";
/// Kubernetes' `terminationGracePeriodSeconds` when a Pod sets none.
pub const DEFAULT_GRACE_SECONDS: i64 = 30;
// The Pod identity env of `wg-sidecar` (downward API), on every injected sidecar whatever its
// key source: they are names, never secrets; the sidecar's clap reads them as `--pod-namespace`,
// `--service-account`, `--pod-name` and `--pod-uid` (so they are not rendered as args), and with
// `key-source: vault` it registers its key born in the Pod under
// `<peers>/<gateway>/<namespace>/<serviceAccount>/<pod-uid>`. One list for both key sources
// keeps the contract in one place and gives a file-key sidecar the same names for its logs.
/// Env var (downward API `metadata.namespace`) with the Pod's namespace; also expanded by the
/// kubelet in the args (`{namespace}`).
pub const NAMESPACE_ENV: &str = "WG_POD_NAMESPACE";
/// Env var (downward API `spec.serviceAccountName`) with the Pod's service account; also
/// expanded by the kubelet in the args (`{serviceAccount}`).
pub const SERVICE_ACCOUNT_ENV: &str = "WG_POD_SERVICE_ACCOUNT";
/// Env var (downward API `metadata.name`) with the Pod's name; also expanded by the kubelet in
/// the args (`{pod}` in a Vault path).
pub const POD_NAME_ENV: &str = "WG_POD_NAME";
/// Env var (downward API `metadata.uid`) with the Pod's UID: the sidecar's registration in Vault.
pub const POD_UID_ENV: &str = "WG_POD_UID";

/// Admission warning sent with every injection.
pub const PRIVILEGED_WARNING: &str = "wg-injector: the injected containers add the NET_ADMIN capability, which puts this Pod at the `privileged` Pod Security level";

/// Admission warning for a run-once Pod (`restartPolicy` `Never` or `OnFailure`, as a Job's)
/// injected in classic mode, where `wg-sidecar` is an ordinary container that never exits.
#[must_use]
pub fn classic_run_once_warning() -> String {
    format!("wg-injector: in classic mode the sidecar never exits by itself: the Pod completes only after a container POSTs http://localhost:{HEALTH_PORT}/quitquitquit (or use Kubernetes >= 1.29)")
}

/// Whether `pod` runs to completion (`restartPolicy` `Never` or `OnFailure`) rather than
/// forever (`Always`, the default).
#[must_use]
pub fn runs_once(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .is_some_and(|p| p == "Never" || p == "OnFailure")
}

/// The longest drain of a classic-mode sidecar after SIGTERM: the Pod's grace period, after
/// which the kubelet kills every container anyway.
#[must_use]
pub fn drain_seconds(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(DEFAULT_GRACE_SECONDS)
        .max(0)
}

/// Classic mode's `postStart` hook: the kubelet starts the next container (the app) only once
/// `wg-sidecar wait` has seen `/ready` answer 200 (the sidecar is the first container).
fn hold_until_ready() -> Lifecycle {
    Lifecycle {
        post_start: Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec![
                    SIDECAR_BINARY.to_owned(),
                    "wait".to_owned(),
                    format!("--addr=127.0.0.1:{HEALTH_PORT}"),
                    format!("--timeout={HOLD_TIMEOUT}"),
                ]),
            }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    }
}

/// The injected Pod and what the user should be told.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The Pod with the sidecar.
    pub pod: Pod,
    /// Admission warnings.
    pub warnings: Vec<String>,
    /// The resolved placement.
    pub mode: SidecarMode,
}

/// The `wg-injector.io/status` annotation (informational only).
#[derive(Debug, Serialize)]
struct Status<'a> {
    version: &'a str,
    mode: &'a str,
    containers: Vec<&'a str>,
    volumes: Vec<&'a str>,
    /// Set when the injector set the Pod's resolver: what [`uninject`] restores.
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<StatusDns<'a>>,
}

/// The Pod's `dnsPolicy` before the injector set `None` (absent: it had none).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusDns<'a> {
    policy_before: Option<&'a str>,
}

/// Most `nameservers` a Pod's `dnsConfig` may list (Kubernetes validation).
pub const MAX_NAMESERVERS: usize = 3;
/// Most search domains, and their total length, that every Kubernetes version accepts (1.28
/// raised them to 32 and 2048).
pub const MAX_SEARCHES: usize = 6;
/// See [`MAX_SEARCHES`].
pub const MAX_SEARCH_CHARS: usize = 256;

/// The Pod's resolver when its DNS servers are reached through the tunnel: `dnsPolicy: None`
/// and this `dnsConfig`, so the app asks the tunnel's servers and never the cluster's for a
/// tunnelled name (issue 17: private names leaked to cluster DNS).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolver {
    /// The `dnsConfig` set.
    pub config: PodDNSConfig,
    /// The Pod's `dnsPolicy` before (recorded in the status annotation for [`uninject`]).
    pub policy_before: Option<String>,
}

/// A profile's `dnsSearches` and `dnsOptions`, validated (the error names the key and value).
///
/// # Errors
/// A search domain that is not a DNS name, more than [`MAX_SEARCHES`] or [`MAX_SEARCH_CHARS`],
/// or an option that is not `name` or `name:value`.
pub fn dns_settings(
    profile: &GatewayProfile,
) -> Result<(Vec<String>, Vec<PodDNSConfigOption>), String> {
    for search in &profile.dns_searches {
        crate::annotations::validate_dns_name(search.trim_end_matches('.')).map_err(|()| {
            format!("dnsSearches: {search:?} is not a DNS name (e.g. corp.example.com)")
        })?;
    }
    let chars: usize = profile.dns_searches.iter().map(String::len).sum();
    if profile.dns_searches.len() > MAX_SEARCHES || chars > MAX_SEARCH_CHARS {
        return Err(format!(
            "dnsSearches: {} domains, {chars} characters; Kubernetes before 1.28 accepts at most {MAX_SEARCHES} and {MAX_SEARCH_CHARS}",
            profile.dns_searches.len()
        ));
    }
    let options = profile
        .dns_options
        .iter()
        .map(|o| {
            let (name, value) = match o.split_once(':') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (o.as_str(), None),
            };
            let bad =
                name.is_empty() || o.contains(char::is_whitespace) || value.as_deref() == Some("");
            if bad {
                return Err(format!(
                    "dnsOptions: {o:?} is not name or name:value (e.g. ndots:2, edns0)"
                ));
            }
            Ok(PodDNSConfigOption {
                name: Some(name.to_owned()),
                value,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((profile.dns_searches.clone(), options))
}

/// Whether the Pod chose its own resolver (`dnsPolicy: None` or a `dnsConfig`): then the
/// injector leaves it and warns.
#[must_use]
pub fn has_own_resolver(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|s| s.dns_config.is_some() || s.dns_policy.as_deref() == Some("None"))
}

/// The resolver for `dns` (see [`Resolver`]); `None` without DNS servers, or when the Pod has
/// its own (a warning then says which servers it does not use).
fn tunnel_resolver(
    pod: &Pod,
    dns: &[std::net::IpAddr],
    profile: &GatewayProfile,
    warnings: &mut Vec<String>,
) -> Result<Option<Resolver>, Denial> {
    if dns.is_empty() {
        return Ok(None);
    }
    let servers = dns.iter().map(ToString::to_string).collect::<Vec<_>>();
    if dns.len() > MAX_NAMESERVERS {
        return Err(deny(
            "invalid_annotation",
            format!(
                "{} DNS servers ({}): a Pod's dnsConfig holds at most {MAX_NAMESERVERS} (Kubernetes validation); list at most {MAX_NAMESERVERS} in {}",
                dns.len(),
                servers.join(","),
                crate::annotations::DNS
            ),
        ));
    }
    if has_own_resolver(pod) {
        warnings.push(format!(
            "wg-injector: the Pod sets its own DNS (dnsPolicy None or dnsConfig), so the injector leaves it: it resolves through its own servers, not the tunnel's {}",
            servers.join(",")
        ));
        return Ok(None);
    }
    let (searches, options) = dns_settings(profile).map_err(|e| deny("invalid_config", e))?;
    Ok(Some(Resolver {
        config: PodDNSConfig {
            nameservers: Some(servers),
            searches: (!searches.is_empty()).then_some(searches),
            options: (!options.is_empty()).then_some(options),
        },
        policy_before: pod.spec.as_ref().and_then(|s| s.dns_policy.clone()),
    }))
}

fn deny(reason: &'static str, message: String) -> Denial {
    Denial { reason, message }
}

/// What injection adds to a Pod, before it is placed: built by [`plan`], placed into an owned
/// Pod by [`Injection::apply`] (the offline CLI, [`inject`]) or into a borrowed view of one by
/// [`Injection::place`] (the webhook, which only needs the patch and so never clones the Pod).
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// The gateway profile: the value of the `wg-injector.io/tunnel` label.
    pub gateway: String,
    /// The `wg-injector.io/status` annotation.
    pub status: String,
    /// The `wg-init` init container.
    pub init: Container,
    /// The `wg-sidecar` container.
    pub sidecar: Container,
    /// The volumes, appended after the Pod's own.
    pub volumes: Vec<Volume>,
    /// The Pod's resolver, when its DNS goes through the tunnel.
    pub resolver: Option<Resolver>,
    /// The resolved placement.
    pub mode: SidecarMode,
    /// Admission warnings.
    pub warnings: Vec<String>,
}

impl Injection {
    /// Place the injection into `pod` (which carries none of it).
    ///
    /// Keep in step with [`Injection::place`]: the two are the same placement, one on an owned
    /// Pod and one on a view; debug builds check that they give the same patch.
    pub fn apply(self, mut pod: Pod) -> Outcome {
        let metadata = &mut pod.metadata;
        metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(TUNNEL_LABEL.to_owned(), self.gateway);
        metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(STATUS.to_owned(), self.status);
        let pod_spec = pod.spec.get_or_insert_with(Default::default);
        let inits = pod_spec.init_containers.get_or_insert_with(Vec::new);
        inits.insert(0, self.init);
        match self.mode {
            SidecarMode::Native => inits.insert(1, self.sidecar),
            _ => pod_spec.containers.insert(0, self.sidecar),
        }
        pod_spec
            .volumes
            .get_or_insert_with(Vec::new)
            .extend(self.volumes);
        if let Some(resolver) = self.resolver {
            pod_spec.dns_policy = Some("None".to_owned());
            pod_spec.dns_config = Some(resolver.config);
        }
        Outcome {
            pod,
            warnings: self.warnings,
            mode: self.mode,
        }
    }

    /// Reinvocation: carry into the injected containers what another webhook changed in the
    /// ones `pod` already carries and injection does not decide (see the module docs; `pod` is
    /// the Pod before [`uninject`]). A Pod without them changes nothing.
    pub fn keep_edits(&mut self, pod: &Pod) {
        if let Some(found) = injected_container(pod, INIT_CONTAINER) {
            keep_container_edits(&mut self.init, found);
        }
        if let Some(found) = injected_container(pod, SIDECAR_CONTAINER) {
            keep_container_edits(&mut self.sidecar, found);
        }
    }

    /// The parts of `pod` that injection changes, as they are after [`Injection::apply`],
    /// borrowing the Pod's own elements: what the webhook diffs against
    /// [`Parts::of`]`(pod)`. `None` when the Pod has no spec.
    #[must_use]
    pub fn place<'a>(&'a self, pod: &'a Pod) -> Option<Parts<'a>> {
        let mut parts = Parts::of(pod)?;
        let mut labels = pod.metadata.labels.clone().unwrap_or_default();
        labels.insert(TUNNEL_LABEL.to_owned(), self.gateway.clone());
        parts.labels = Some(Cow::Owned(labels));
        let mut annotations = pod.metadata.annotations.clone().unwrap_or_default();
        annotations.insert(STATUS.to_owned(), self.status.clone());
        parts.annotations = Some(Cow::Owned(annotations));
        let inits = parts.init_containers.get_or_insert_with(Vec::new);
        inits.insert(0, &self.init);
        match self.mode {
            SidecarMode::Native => inits.insert(1, &self.sidecar),
            _ => parts.containers.insert(0, &self.sidecar),
        }
        parts
            .volumes
            .get_or_insert_with(Vec::new)
            .extend(&self.volumes);
        if let Some(resolver) = &self.resolver {
            parts.dns_policy = Some(Cow::Borrowed("None"));
            parts.dns_config = Some(Cow::Borrowed(&resolver.config));
        }
        Some(parts)
    }
}

/// Deny `routes` (the Pod's, or its profile's when it sets none) that cover what the sidecar
/// must reach outside the tunnel before the tunnel is up ([`routes::lockout`]): the config's
/// cluster networks and DNS, Vault's address, and `endpoints` (the Pod's or its profile's). A
/// profile's routes were checked against its own endpoints at config load; they meet the Pod's
/// `endpoints` annotation only here. Overlapping routes were refused before (annotation parse,
/// config load).
fn check_lockout(
    gateway: &str,
    spec: &InjectionSpec,
    routes: &[ipnet::IpNet],
    endpoints: &[annotations::Endpoint],
    config: &Config,
) -> Result<(), Denial> {
    let endpoints_origin = if spec.endpoints.is_some() {
        format!("annotation {}", annotations::ENDPOINTS)
    } else {
        format!("config gateways.{gateway}.endpoints")
    };
    let protected = config.protected(endpoints, &endpoints_origin);
    let Some(lockout) = routes::lockout(routes, &protected) else {
        return Ok(());
    };
    let message = if spec.routes.is_some() {
        format!("{}: {lockout}", annotations::ROUTES)
    } else {
        let defaults: Vec<String> = routes.iter().map(ToString::to_string).collect();
        format!(
            "{} (not set, so gateway profile {gateway:?} gives {}): {lockout}",
            annotations::ROUTES,
            defaults.join(",")
        )
    };
    Err(deny("bootstrap_lockout", message))
}

/// What the Pod's policy routing keeps outside the tunnel (`--exclude` of `wg-init` and
/// `wg-sidecar run`): what the sidecar must reach before the tunnel is up
/// ([`Config::protected`]: the cluster's networks and DNS servers, and Vault's address and the
/// gateway endpoints when they are IP literals) wherever a route covers it, without what
/// another exclusion already holds. Only the full tunnel covers any (a narrower route over one
/// is denied by [`check_lockout`]). A host name cannot be exempted by CIDR: with the full tunnel
/// it is reached outside only when its address lies in a configured cluster network (a Vault
/// Service in `cluster.serviceCIDRs`).
fn exclusions(routes: &[ipnet::IpNet], protected: &[routes::Protected]) -> Vec<ipnet::IpNet> {
    let mut covered: Vec<ipnet::IpNet> = protected
        .iter()
        .map(|p| p.net)
        .filter(|net| routes.iter().any(|r| r.contains(net)))
        .collect();
    covered.sort();
    covered.dedup();
    let all = covered.clone();
    covered.retain(|net| !all.iter().any(|o| o != net && o.contains(net)));
    covered
}

/// Inject the sidecar into `pod`. Pure: no IO. An already injected Pod comes back unchanged;
/// one that another webhook changed keeps the changes injection does not decide
/// ([`Injection::keep_edits`]).
pub fn inject(pod: &Pod, spec: &InjectionSpec, config: &Config) -> Result<Outcome, Denial> {
    let base = uninject(pod);
    let mut injection = plan(&base, spec, config)?;
    injection.keep_edits(pod);
    Ok(injection.apply(base))
}

/// The container named `name` that injection added to `pod` (init containers first, so a Pod
/// that moved between classic and native mode is found either way).
fn injected_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name && is_injected(c))
}

/// `ours`, as [`plan`] renders it, with what `found` (the same container in the Pod, after other
/// webhooks) holds where injection does not decide. Destructured field by field, so a field a
/// new Kubernetes version adds is a compile error until someone decides whose it is.
fn keep_container_edits(ours: &mut Container, found: &Container) {
    let Container {
        // Ours: what runs and how the kubelet treats it.
        name: _,
        args: _,
        command: _,
        lifecycle: _,
        liveness_probe: _,
        ports: _,
        readiness_probe: _,
        restart_policy: _,
        startup_probe: _,
        termination_message_policy: _,
        // Merged: ours first, then the Pod's of other names.
        env,
        volume_mounts,
        security_context,
        // The Pod's when it has one, else ours.
        image,
        image_pull_policy,
        resources,
        // The Pod's: injection renders none.
        env_from,
        resize_policy,
        stdin,
        stdin_once,
        termination_message_path,
        tty,
        volume_devices,
        working_dir,
    } = found.clone();

    let our_env: Vec<String> = ours.env.iter().flatten().map(|e| e.name.clone()).collect();
    let other_env: Vec<EnvVar> = env
        .into_iter()
        .flatten()
        .filter(|e| !our_env.contains(&e.name))
        .collect();
    if !other_env.is_empty() {
        ours.env.get_or_insert_with(Vec::new).extend(other_env);
    }
    let our_paths: Vec<String> = ours
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    let other_mounts: Vec<VolumeMount> = volume_mounts
        .into_iter()
        .flatten()
        .filter(|m| {
            !INJECTED_VOLUMES.contains(&m.name.as_str()) && !our_paths.contains(&m.mount_path)
        })
        .collect();
    if !other_mounts.is_empty() {
        ours.volume_mounts
            .get_or_insert_with(Vec::new)
            .extend(other_mounts);
    }
    if let Some(theirs) = security_context {
        ours.security_context = Some(overlay_security_context(
            ours.security_context.take().unwrap_or_default(),
            theirs,
        ));
    }

    ours.image = image.or(ours.image.take());
    ours.image_pull_policy = image_pull_policy.or(ours.image_pull_policy.take());
    ours.resources = resources.or(ours.resources.take());

    ours.env_from = env_from;
    ours.resize_policy = resize_policy;
    ours.stdin = stdin;
    ours.stdin_once = stdin_once;
    ours.termination_message_path = termination_message_path;
    ours.tty = tty;
    ours.volume_devices = volume_devices;
    ours.working_dir = working_dir;
}

/// Every field `ours` sets, else the Pod's (`theirs`).
fn overlay_security_context(ours: SecurityContext, theirs: SecurityContext) -> SecurityContext {
    let SecurityContext {
        allow_privilege_escalation,
        app_armor_profile,
        capabilities,
        privileged,
        proc_mount,
        read_only_root_filesystem,
        run_as_group,
        run_as_non_root,
        run_as_user,
        se_linux_options,
        seccomp_profile,
        windows_options,
    } = ours;
    SecurityContext {
        allow_privilege_escalation: allow_privilege_escalation
            .or(theirs.allow_privilege_escalation),
        app_armor_profile: app_armor_profile.or(theirs.app_armor_profile),
        capabilities: capabilities.or(theirs.capabilities),
        privileged: privileged.or(theirs.privileged),
        proc_mount: proc_mount.or(theirs.proc_mount),
        read_only_root_filesystem: read_only_root_filesystem.or(theirs.read_only_root_filesystem),
        run_as_group: run_as_group.or(theirs.run_as_group),
        run_as_non_root: run_as_non_root.or(theirs.run_as_non_root),
        run_as_user: run_as_user.or(theirs.run_as_user),
        se_linux_options: se_linux_options.or(theirs.se_linux_options),
        seccomp_profile: seccomp_profile.or(theirs.seccomp_profile),
        windows_options: windows_options.or(theirs.windows_options),
    }
}

/// What [`inject`] adds to `pod`, which must carry none of it (see [`is_pristine`]; [`inject`]
/// passes the [`uninject`]ed Pod). Denies conflicts and bad values. `spec` is taken as given: the
/// admission checks pass it through [`crate::identity::resolve`] first (shared keys denied,
/// `{pod}` of a Secret name filled in).
// The injected spec reads top to bottom in one place, in the order of DESIGN.md.
#[allow(clippy::too_many_lines)]
pub fn plan(pod: &Pod, spec: &InjectionSpec, config: &Config) -> Result<Injection, Denial> {
    check_conflicts(pod)?;

    let gateway = spec.gateway.as_deref().unwrap_or(&config.default_gateway);
    let profile =
        config.gateway(gateway).ok_or_else(|| {
            deny(
                "unknown_gateway",
                format!(
                "annotation {}={gateway:?} is invalid: no such gateway profile; configured are: {}",
                annotations::GATEWAY,
                config.gateways.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            )
        })?;
    let routes = spec
        .routes
        .clone()
        .unwrap_or_else(|| profile.routes.clone());
    if routes.is_empty() {
        return Err(deny(
            "no_routes",
            format!(
                "no routes to tunnel: set annotation {} or routes in gateway profile {gateway:?}",
                annotations::ROUTES
            ),
        ));
    }
    let dns = spec.dns.clone().unwrap_or_else(|| profile.dns.clone());
    let endpoints = spec
        .endpoints
        .clone()
        .unwrap_or_else(|| profile.endpoints.clone());
    check_lockout(gateway, spec, &routes, &endpoints, config)?;
    let exclude_args: Vec<String> = exclusions(&routes, &config.protected(&endpoints, "endpoints"))
        .iter()
        .map(|net| format!("--exclude={net}"))
        .collect();
    let mtu = spec.mtu.unwrap_or(config.defaults.mtu);
    let keepalive = spec.keepalive.unwrap_or(config.defaults.keepalive);
    let kill_switch = spec.kill_switch.unwrap_or(config.defaults.kill_switch);
    let mut warnings = vec![PRIVILEGED_WARNING.to_owned()];
    let mode = match spec.sidecar_mode.unwrap_or(config.defaults.sidecar_mode) {
        SidecarMode::Auto if config.native_sidecars => SidecarMode::Native,
        SidecarMode::Auto | SidecarMode::Classic => SidecarMode::Classic,
        SidecarMode::Native => {
            if !config.native_sidecars {
                warnings.push("wg-injector: sidecar-mode native was requested but the injector config says this cluster has no native sidecars (Kubernetes < 1.29): the Pod may never start".to_owned());
            }
            SidecarMode::Native
        }
    };
    if mode == SidecarMode::Classic && runs_once(pod) {
        warnings.push(classic_run_once_warning());
    }
    let resolver = tunnel_resolver(pod, &dns, profile, &mut warnings)?;
    let resources = resources(spec, config)?;

    let join = |items: Vec<String>| items.join(",");
    let routes_arg = join(routes.iter().map(ToString::to_string).collect());
    // On `wg-init` too: the kill switch covers the DNS servers before the sidecar starts.
    let dns_arg = (!dns.is_empty()).then(|| {
        format!(
            "--dns={}",
            join(dns.iter().map(ToString::to_string).collect())
        )
    });
    let security = security_context();

    let init = Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(config.images.sidecar.clone()),
        image_pull_policy: Some(config.images.pull_policy.clone()),
        args: Some(
            [
                vec!["init".to_owned(), format!("--routes={routes_arg}")],
                exclude_args.clone(),
                dns_arg.clone().into_iter().collect(),
                vec![format!("--kill-switch={kill_switch}")],
            ]
            .concat(),
        ),
        resources: Some(resources.clone()),
        security_context: Some(security.clone()),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };

    let mut args = vec!["run".to_owned(), format!("--gateway={gateway}")];
    if !endpoints.is_empty() {
        args.push(format!(
            "--endpoints={}",
            join(endpoints.iter().map(ToString::to_string).collect())
        ));
    }
    args.push(format!("--routes={routes_arg}"));
    args.extend(exclude_args);
    args.extend(dns_arg);
    args.push(format!("--mtu={mtu}"));
    args.push(format!("--keepalive={keepalive}"));
    args.push(format!("--kill-switch={kill_switch}"));
    let mut mounts = vec![mount(RUNTIME_VOLUME, RUNTIME_DIR, false)];
    let mut volumes = vec![Volume {
        name: RUNTIME_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_owned()),
            size_limit: Some(Quantity("1Mi".to_owned())),
        }),
        ..Volume::default()
    }];
    match &spec.key_source {
        KeySource::Vault => {
            let v = &config.vault;
            let role = spec.vault_role.as_deref().unwrap_or(&v.role_template);
            // A static identity only; without one the sidecar's key is born in the Pod.
            let key_path = spec.vault_path.as_deref().or(v.key_path_template());
            args.push("--key-source=vault".to_owned());
            args.push(format!("--vault-addr={}", v.address));
            if let Some(ca) = &v.ca_file {
                args.push(format!("--vault-ca-file={ca}"));
            }
            if let Some(cm) = &v.ca_config_map {
                args.push(format!("--vault-ca-file={VAULT_CA_DIR}/ca.crt"));
                mounts.push(mount(VAULT_CA_VOLUME, VAULT_CA_DIR, true));
                volumes.push(Volume {
                    name: VAULT_CA_VOLUME.to_owned(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: cm.clone(),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                });
            }
            args.push(format!("--vault-auth-mount={}", v.auth_mount));
            args.push(format!("--vault-role={}", expand_placeholders(role)));
            args.push(format!("--vault-token-file={TOKEN_FILE}"));
            args.push(format!("--vault-kv-mount={}", v.kv_mount));
            if let Some(path) = key_path {
                args.push(format!("--vault-key-path={}", expand_placeholders(path)));
            } else if let Some(interval) = &v.key_rotation_interval {
                // Only a key born in the Pod rotates in place; a static identity is fixed.
                args.push(format!("--key-rotation-interval={}", interval.trim()));
            }
            if let Some(gw_path) = &profile.vault_gateway_path {
                args.push(format!("--vault-gateway-path={gw_path}"));
            }
            mounts.push(mount(TOKEN_VOLUME, TOKEN_DIR, true));
            volumes.push(Volume {
                name: TOKEN_VOLUME.to_owned(),
                projected: Some(ProjectedVolumeSource {
                    default_mode: Some(0o400),
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(v.token_audience.clone()),
                            expiration_seconds: Some(v.token_expiration_seconds),
                            path: "token".to_owned(),
                        }),
                        ..VolumeProjection::default()
                    }]),
                }),
                ..Volume::default()
            });
        }
        KeySource::Secret(name) => {
            args.push("--key-source=file".to_owned());
            args.push(format!("--key-dir={KEYS_DIR}"));
            mounts.push(mount(KEYS_VOLUME, KEYS_DIR, true));
            volumes.push(Volume {
                name: KEYS_VOLUME.to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(name.clone()),
                    default_mode: Some(0o400),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
    }
    // Both families: `[::]` with IPv4-mapped addresses (the sidecar falls back to 0.0.0.0
    // where the Pod has no IPv6), so kubelet probes work on IPv4, IPv6 and dual-stack clusters.
    args.push(format!("--health-addr=[::]:{HEALTH_PORT}"));
    // Classic mode: the app is stopped together with the sidecar, which keeps the tunnel while
    // the app still holds connections (native sidecars are stopped after the app).
    if mode == SidecarMode::Classic {
        args.push(format!("--drain-timeout={}s", drain_seconds(pod)));
    }
    if config.tun_device == TunDevice::HostPath {
        mounts.push(mount(TUN_VOLUME, TUN_PATH, false));
        volumes.push(Volume {
            name: TUN_VOLUME.to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: TUN_PATH.to_owned(),
                type_: Some("CharDevice".to_owned()),
            }),
            ..Volume::default()
        });
    }

    let sidecar = Container {
        name: SIDECAR_CONTAINER.to_owned(),
        image: Some(config.images.sidecar.clone()),
        image_pull_policy: Some(config.images.pull_policy.clone()),
        args: Some(args),
        env: Some(identity_env()),
        ports: Some(vec![ContainerPort {
            name: Some(HEALTH_PORT_NAME.to_owned()),
            container_port: HEALTH_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        restart_policy: (mode == SidecarMode::Native).then(|| "Always".to_owned()),
        lifecycle: (mode == SidecarMode::Classic).then(hold_until_ready),
        startup_probe: Some(probe("/ready", 1, 120)),
        readiness_probe: Some(probe("/ready", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        resources: Some(resources),
        security_context: Some(security),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let status = Status {
        version: env!("CARGO_PKG_VERSION"),
        mode: mode.as_str(),
        containers: vec![INIT_CONTAINER, SIDECAR_CONTAINER],
        volumes: volumes.iter().map(|v| v.name.as_str()).collect(),
        dns: resolver.as_ref().map(|r| StatusDns {
            policy_before: r.policy_before.as_deref(),
        }),
    };
    let status = serde_json::to_string(&status).unwrap_or_default();

    Ok(Injection {
        gateway: gateway.to_owned(),
        status,
        init,
        sidecar,
        volumes,
        resolver,
        mode,
        warnings,
    })
}

/// Remove exactly what [`inject`] added. A Pod without the injected containers only loses a
/// (spoofed) status annotation; user containers or volumes that merely share our names are kept.
#[must_use]
pub fn uninject(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    let mut found = false;
    let dns_before = status_dns(&pod);
    if let Some(spec) = pod.spec.as_mut() {
        if let Some(inits) = spec.init_containers.as_mut() {
            let before = inits.len();
            inits.retain(|c| !is_injected(c));
            found |= inits.len() != before;
            if inits.is_empty() {
                spec.init_containers = None;
            }
        }
        let before = spec.containers.len();
        spec.containers.retain(|c| !is_injected(c));
        found |= spec.containers.len() != before;
        if found {
            if let Some(volumes) = spec.volumes.as_mut() {
                volumes.retain(|v| !INJECTED_VOLUMES.contains(&v.name.as_str()));
                if volumes.is_empty() {
                    spec.volumes = None;
                }
            }
            if let Some(before) = dns_before {
                spec.dns_config = None;
                spec.dns_policy = before.policy;
            }
        }
    }
    let metadata = &mut pod.metadata;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(STATUS);
        if annotations.is_empty() {
            metadata.annotations = None;
        }
    }
    if found {
        if let Some(labels) = metadata.labels.as_mut() {
            labels.remove(TUNNEL_LABEL);
            if labels.is_empty() {
                metadata.labels = None;
            }
        }
    }
    pod
}

/// What the status annotation says of a resolver the injector set.
struct DnsBefore {
    /// The Pod's `dnsPolicy` before (`None`: it had none).
    policy: Option<String>,
}

/// [`DnsBefore`] from the status annotation; `None` when the injector did not set the resolver
/// (or the annotation is gone).
fn status_dns(pod: &Pod) -> Option<DnsBefore> {
    let status = pod.metadata.annotations.as_ref()?.get(STATUS)?;
    let value: serde_json::Value = serde_json::from_str(status).ok()?;
    let dns = value.get("dns")?;
    Some(DnsBefore {
        policy: dns.get("policyBefore")?.as_str().map(str::to_owned),
    })
}

/// Whether `pod` carries nothing [`uninject`] would remove (no injected container, no status
/// annotation), so that `uninject(pod) == pod` and [`plan`] can work on it directly.
#[must_use]
pub fn is_pristine(pod: &Pod) -> bool {
    !is_injected_pod(pod)
        && !pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(STATUS))
}

/// Whether `pod` carries the injected containers (decided from the containers, not the status
/// annotation).
#[must_use]
pub fn is_injected_pod(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers.iter().any(is_injected)
            || spec.init_containers.iter().flatten().any(is_injected)
    })
}

/// The gateway profile the injected `wg-sidecar` container of `pod` tunnels to: the
/// `--gateway=` argument [`plan`] renders. `None` when the Pod has no such container (one named
/// `wg-sidecar` that runs `wg-sidecar run --gateway=…`, as [`is_injected_pod`] recognises it).
#[must_use]
pub fn sidecar_gateway(pod: &Pod) -> Option<&str> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.name == SIDECAR_CONTAINER && is_injected(c))
        .find_map(|c| {
            c.args
                .iter()
                .flatten()
                .find_map(|a| a.strip_prefix("--gateway="))
        })
}

/// A container is ours when it has our name and runs the matching `wg-sidecar` subcommand.
fn is_injected(c: &Container) -> bool {
    let first = c.args.as_ref().and_then(|a| a.first()).map(String::as_str);
    (c.name == INIT_CONTAINER && first == Some("init"))
        || (c.name == SIDECAR_CONTAINER && first == Some("run"))
}

/// Refuse a Pod whose own containers, volumes or labels take what injection adds (names, the
/// health port, the tunnel label). [`plan`] runs it first.
pub(crate) fn check_conflicts(pod: &Pod) -> Result<(), Denial> {
    if let Some(spec) = &pod.spec {
        let all = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers);
        for c in all.clone() {
            if c.name == INIT_CONTAINER || c.name == SIDECAR_CONTAINER {
                return Err(deny(
                    "name_conflict",
                    format!(
                        "the Pod already has a container named {:?} that the injector did not add; rename it (the names {INIT_CONTAINER} and {SIDECAR_CONTAINER} are reserved for the injected containers)",
                        c.name
                    ),
                ));
            }
            if let Some(port) = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.container_port == HEALTH_PORT)
            {
                return Err(deny(
                    "port_conflict",
                    format!(
                        "container {:?} declares port {} which the injected wg-sidecar uses for its health checks; use another port",
                        c.name, port.container_port
                    ),
                ));
            }
        }
        if let Some(v) = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| INJECTED_VOLUMES.contains(&v.name.as_str()))
        {
            return Err(deny(
                "name_conflict",
                format!(
                    "the Pod already has a volume named {:?}; rename it (the volume names {} are reserved for the injector)",
                    v.name,
                    INJECTED_VOLUMES.join(", ")
                ),
            ));
        }
    }
    if let Some(value) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TUNNEL_LABEL))
    {
        return Err(deny(
            "reserved_label",
            format!("label {TUNNEL_LABEL}={value:?} is set by the injector from the gateway; remove it from the Pod (use annotation {} to choose the gateway)", annotations::GATEWAY),
        ));
    }
    Ok(())
}

fn resources(spec: &InjectionSpec, config: &Config) -> Result<ResourceRequirements, Denial> {
    let d = &config.defaults.resources;
    let o = &spec.resources;
    let pick =
        |over: &Option<String>, default: &Option<String>| over.clone().or_else(|| default.clone());
    let cpu_request = pick(&o.cpu_request, &d.cpu_request);
    let cpu_limit = pick(&o.cpu_limit, &d.cpu_limit);
    let memory_request = pick(&o.memory_request, &d.memory_request);
    let memory_limit = pick(&o.memory_limit, &d.memory_limit);
    for (what, req_key, lim_key, req, lim) in [
        (
            "cpu",
            annotations::SIDECAR_CPU_REQUEST,
            annotations::SIDECAR_CPU_LIMIT,
            &cpu_request,
            &cpu_limit,
        ),
        (
            "memory",
            annotations::SIDECAR_MEMORY_REQUEST,
            annotations::SIDECAR_MEMORY_LIMIT,
            &memory_request,
            &memory_limit,
        ),
    ] {
        if let (Some(r), Some(l)) = (req, lim) {
            let (rv, lv) = (
                annotations::parse_quantity(r).unwrap_or(0.0),
                annotations::parse_quantity(l).unwrap_or(f64::INFINITY),
            );
            if rv > lv {
                return Err(deny(
                    "bad_annotation",
                    format!("the sidecar {what} request {r} exceeds its limit {l}: allowed is a request at most the limit (annotations {req_key} and {lim_key}, or the injector defaults)"),
                ));
            }
        }
    }
    let map = |cpu: Option<String>, memory: Option<String>| {
        let m: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), Quantity(v))))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    Ok(ResourceRequirements {
        requests: map(cpu_request, memory_request),
        limits: map(cpu_limit, memory_limit),
        ..ResourceRequirements::default()
    })
}

fn security_context() -> SecurityContext {
    SecurityContext {
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: Some(vec!["NET_ADMIN".to_owned()]),
        }),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        // NET_ADMIN only reaches the effective set of uid 0: Kubernetes has no ambient
        // capabilities, so a non-root user could not create the TUN device or routes.
        run_as_user: Some(0),
        run_as_non_root: Some(false),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(HEALTH_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// The Pod identity env of `wg-sidecar` (see [`POD_UID_ENV`]).
fn identity_env() -> Vec<EnvVar> {
    vec![
        field_env(NAMESPACE_ENV, "metadata.namespace"),
        field_env(SERVICE_ACCOUNT_ENV, "spec.serviceAccountName"),
        field_env(POD_NAME_ENV, "metadata.name"),
        field_env(POD_UID_ENV, "metadata.uid"),
    ]
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Turn `{namespace}` / `{serviceAccount}` / `{pod}` into Kubernetes `$(VAR)` references that
/// the kubelet expands from the downward-API env of the sidecar.
fn expand_placeholders(template: &str) -> String {
    template
        .replace(NAMESPACE_PLACEHOLDER, &format!("$({NAMESPACE_ENV})"))
        .replace(
            SERVICE_ACCOUNT_PLACEHOLDER,
            &format!("$({SERVICE_ACCOUNT_ENV})"),
        )
        .replace(POD_PLACEHOLDER, &format!("$({POD_NAME_ENV})"))
}

/// Expand `$(VAR)` references in container args the way the kubelet does (`$$` escapes a `$`;
/// unknown variables are left as written). For tests that run the injected containers outside
/// Kubernetes (e.g. podman) and must pass the same argument list.
#[must_use]
pub fn expand_kubelet_vars(arg: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            if let Some(value) = vars.get(name) {
                out.push_str(value);
            } else {
                out.push_str("$(");
                out.push_str(name);
                out.push(')');
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kubelet_variable_expansion_fills_known_names_and_keeps_unknown_ones() {
        let vars: BTreeMap<String, String> =
            [("WG_POD_NAMESPACE".to_owned(), "shop".to_owned())].into();
        assert_eq!(
            expand_kubelet_vars("wg/keys/$(WG_POD_NAMESPACE)/$(X)", &vars),
            "wg/keys/shop/$(X)"
        );
        assert_eq!(
            expand_kubelet_vars("a$$(WG_POD_NAMESPACE)b$", &vars),
            "a$(WG_POD_NAMESPACE)b$"
        );
    }

    /// A cluster with kubeadm's networks and Vault at a Service IP.
    fn kubeadm_cluster() -> Config {
        Config::from_yaml_str(
            "cluster:\n  podCIDRs: [10.244.0.0/16]\n  serviceCIDRs: [10.96.0.0/12, 'fd00:10:96::/112']\n  dns: [10.96.0.10]\nvault:\n  address: https://10.96.0.20:8200\ngateways:\n  default:\n    endpoints: ['192.0.2.1:51820']\n    routes: [10.20.0.0/16]\n",
        )
        .unwrap()
    }

    fn routed(pairs: &[(&str, &str)], config: &Config) -> Result<Outcome, Denial> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        let mut pod: Pod = serde_yaml_ng::from_str(
            "metadata: {name: web}\nspec:\n  containers: [{name: app, image: nginx}]\n",
        )
        .unwrap();
        pod.metadata.annotations = Some(map);
        let spec = annotations::parse(pod.metadata.annotations.as_ref().unwrap()).unwrap();
        inject(&pod, &spec, config)
    }

    #[test]
    fn a_route_over_the_service_network_is_denied_naming_both_cidrs_and_the_fix() {
        let d = routed(&[(annotations::ROUTES, "10.0.0.0/8")], &kubeadm_cluster()).unwrap_err();
        assert_eq!(d.reason, "bootstrap_lockout");
        assert_eq!(
            d.message,
            "wg-injector.io/routes: 10.0.0.0/8 covers the cluster's Service network 10.96.0.0/12 (config cluster.serviceCIDRs): \
             the sidecar could not reach Vault or cluster DNS before the tunnel is up; it also overlaps the cluster's Pod network \
             10.244.0.0/16 (config cluster.podCIDRs), the cluster DNS server 10.96.0.10 (config cluster.dns), Vault's address \
             10.96.0.20 (config vault.address); route narrower prefixes that leave it out, such as \
             10.0.0.0/10,10.64.0.0/11,10.128.0.0/10,10.192.0.0/11 (6 more make up the rest of 10.0.0.0/8)"
        );
    }

    #[test]
    fn routes_over_each_protected_thing_are_denied() {
        let config = kubeadm_cluster();
        for (routes, covered) in [
            ("10.244.0.0/24", "lies inside the cluster's Pod network 10.244.0.0/16"),
            ("fd00:10::/32", "covers the cluster's Service network fd00:10:96::/112"),
            ("10.96.0.10/32", "lies inside the cluster's Service network 10.96.0.0/12"),
            ("192.0.2.0/24", "covers the gateway endpoint 192.0.2.1 (192.0.2.1:51820 of config gateways.default.endpoints)"),
        ] {
            let d = routed(&[(annotations::ROUTES, routes)], &config).unwrap_err();
            assert_eq!(d.reason, "bootstrap_lockout", "{routes}");
            assert!(d.message.contains(covered), "{routes}: {covered:?} missing from {}", d.message);
        }
        // Vault and cluster DNS outside the cluster networks are protected on their own.
        let outside = Config::from_yaml_str(
            "cluster:\n  dns: [192.168.0.53]\nvault:\n  address: 'https://[fd00:99::20]:8200'\n",
        )
        .unwrap();
        let d = routed(&[(annotations::ROUTES, "192.168.0.0/16")], &outside).unwrap_err();
        assert!(
            d.message
                .contains("covers the cluster DNS server 192.168.0.53 (config cluster.dns)"),
            "{}",
            d.message
        );
        let d = routed(&[(annotations::ROUTES, "fd00:99::/64")], &outside).unwrap_err();
        assert!(
            d.message
                .contains("covers Vault's address fd00:99::20 (config vault.address)"),
            "{}",
            d.message
        );
    }

    #[test]
    fn the_pods_own_endpoint_inside_the_profiles_default_routes_is_denied() {
        let d = routed(
            &[(annotations::ENDPOINTS, "10.20.0.1:51820")],
            &kubeadm_cluster(),
        )
        .unwrap_err();
        assert_eq!(d.reason, "bootstrap_lockout");
        assert!(
            d.message.starts_with("wg-injector.io/routes (not set, so gateway profile \"default\" gives 10.20.0.0/16): 10.20.0.0/16 covers the gateway endpoint 10.20.0.1 (10.20.0.1:51820 of annotation wg-injector.io/endpoints)"),
            "{}",
            d.message
        );
    }

    #[test]
    fn the_full_tunnel_and_narrow_routes_pass_and_no_cluster_config_checks_nothing() {
        let config = kubeadm_cluster();
        for routes in [
            "0.0.0.0/0",
            "::/0",
            "0.0.0.0/0,::/0",
            "10.20.0.0/16,fd00:20::/64",
        ] {
            routed(&[(annotations::ROUTES, routes)], &config)
                .unwrap_or_else(|d| panic!("{routes}: {}", d.message));
        }
        routed(&[(annotations::ROUTES, "10.0.0.0/8")], &Config::default()).unwrap();
    }

    /// The `--exclude` args of `wg-init` and of `wg-sidecar`.
    fn excludes(outcome: &Outcome) -> (Vec<String>, Vec<String>) {
        let spec = outcome.pod.spec.as_ref().unwrap();
        let of = |name: &str| {
            spec.init_containers
                .iter()
                .flatten()
                .chain(&spec.containers)
                .find(|c| c.name == name)
                .unwrap()
                .args
                .iter()
                .flatten()
                .filter_map(|a| a.strip_prefix("--exclude=").map(str::to_owned))
                .collect::<Vec<_>>()
        };
        (of(INIT_CONTAINER), of(SIDECAR_CONTAINER))
    }

    #[test]
    fn the_full_tunnel_exempts_what_the_sidecar_needs_on_init_and_run_and_narrow_routes_exempt_nothing(
    ) {
        let config = kubeadm_cluster();
        let full = routed(&[(annotations::ROUTES, "0.0.0.0/0,::/0")], &config).unwrap();
        let (init, run) = excludes(&full);
        // Cluster DNS and Vault (10.96.0.10, 10.96.0.20) lie in the Service network already.
        assert_eq!(
            init,
            [
                "10.96.0.0/12",
                "10.244.0.0/16",
                "192.0.2.1/32",
                "fd00:10:96::/112"
            ]
        );
        assert_eq!(run, init);
        let v4 = routed(&[(annotations::ROUTES, "0.0.0.0/0")], &config).unwrap();
        assert_eq!(
            excludes(&v4).0,
            ["10.96.0.0/12", "10.244.0.0/16", "192.0.2.1/32"]
        );
        let narrow = routed(&[(annotations::ROUTES, "10.20.0.0/16")], &config).unwrap();
        assert_eq!(excludes(&narrow), (vec![], vec![]));
        // Vault by IP literal outside any cluster network is exempted on its own; a host name
        // cannot be.
        let outside = Config::from_yaml_str(
            "vault:\n  address: 'https://[fd00:99::20]:8200'\ngateways:\n  default:\n    endpoints: ['vpn.example.com:51820']\n    routes: ['::/0']\n",
        )
        .unwrap();
        assert_eq!(
            excludes(&routed(&[], &outside).unwrap()).1,
            ["fd00:99::20/128"]
        );
    }

    fn pod_with_restart_policy(mode: &str, restart_policy: Option<&str>) -> Pod {
        let mut pod: Pod = serde_yaml_ng::from_str(&format!(
            "metadata: {{name: once, annotations: {{wg-injector.io/sidecar-mode: {mode}}}}}\nspec:\n  containers: [{{name: app, image: busybox}}]\n"
        ))
        .unwrap();
        pod.spec.as_mut().unwrap().restart_policy = restart_policy.map(str::to_owned);
        pod
    }

    fn warnings_of(pod: &Pod, config: &Config) -> Vec<String> {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let spec = annotations::parse(&annotations).unwrap();
        inject(pod, &spec, config).unwrap().warnings
    }

    #[test]
    fn a_run_once_pod_in_classic_mode_is_warned_that_it_completes_only_after_quitquitquit() {
        for restart_policy in ["Never", "OnFailure"] {
            // `auto` on a cluster without native sidecars resolves to classic, like `classic`.
            for mode in ["classic", "auto"] {
                let pod = pod_with_restart_policy(mode, Some(restart_policy));
                let warnings = warnings_of(&pod, &Config::default());
                assert_eq!(
                    warnings,
                    [PRIVILEGED_WARNING.to_owned(), classic_run_once_warning()],
                    "{mode} {restart_policy}"
                );
            }
        }
        let warning = classic_run_once_warning();
        assert!(
            warning.contains(&format!("http://localhost:{HEALTH_PORT}/quitquitquit")),
            "{warning}"
        );
        assert!(!warning.contains('\n'), "one line: {warning}");
    }

    #[test]
    fn a_run_once_pod_in_native_mode_gets_no_quitquitquit_warning() {
        let native_cluster = Config {
            native_sidecars: true,
            ..Config::default()
        };
        for (mode, config) in [
            ("native", &native_cluster),
            ("auto", &native_cluster),
            // Asked for native on a classic cluster: warned about that, not about completion.
            ("native", &Config::default()),
        ] {
            let pod = pod_with_restart_policy(mode, Some("Never"));
            let warnings = warnings_of(&pod, config);
            assert!(
                !warnings.contains(&classic_run_once_warning()),
                "{mode}: {warnings:?}"
            );
        }
    }

    #[test]
    fn a_pod_that_restarts_always_gets_no_quitquitquit_warning_in_classic_mode() {
        for restart_policy in [Some("Always"), None] {
            let pod = pod_with_restart_policy("classic", restart_policy);
            assert_eq!(
                warnings_of(&pod, &Config::default()),
                [PRIVILEGED_WARNING],
                "{restart_policy:?}"
            );
        }
    }

    /// `pod` injected in `mode`, then changed by `edit` as another webhook would.
    fn injected_then_edited(mode: &str, edit: impl Fn(&mut Container)) -> Pod {
        let pod = pod_with_restart_policy(mode, None);
        let spec = annotations::parse(pod.metadata.annotations.as_ref().unwrap()).unwrap();
        let config = Config {
            native_sidecars: true,
            ..Config::default()
        };
        let mut injected = inject(&pod, &spec, &config).unwrap().pod;
        let pod_spec = injected.spec.as_mut().unwrap();
        for c in pod_spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(&mut pod_spec.containers)
            .filter(|c| is_injected(c))
        {
            edit(c);
        }
        injected
    }

    fn reinjected(pod: &Pod, mode: &str) -> Pod {
        let mut annotations = pod.metadata.annotations.clone().unwrap();
        annotations.insert(annotations::SIDECAR_MODE.to_owned(), mode.to_owned());
        let spec = annotations::parse(&annotations).unwrap();
        let config = Config {
            native_sidecars: true,
            ..Config::default()
        };
        inject(pod, &spec, &config).unwrap().pod
    }

    #[test]
    fn a_mirror_image_survives_a_reinvocation_that_moves_the_sidecar_to_another_mode() {
        let mirrored = injected_then_edited("native", |c| {
            c.image = Some("mirror.example.internal/wg-sidecar:1".to_owned());
        });
        let classic = reinjected(&mirrored, "classic");
        let spec = classic.spec.as_ref().unwrap();
        assert_eq!(spec.containers[0].name, SIDECAR_CONTAINER);
        assert_eq!(spec.init_containers.as_ref().unwrap().len(), 1);
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers[..1])
        {
            assert_eq!(
                c.image.as_deref(),
                Some("mirror.example.internal/wg-sidecar:1"),
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn a_second_webhooks_mount_over_ours_or_of_our_volumes_is_dropped_and_its_own_kept() {
        let edited = injected_then_edited("native", |c| {
            let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
            mounts.push(mount("other", RUNTIME_DIR, false));
            mounts.push(mount(RUNTIME_VOLUME, "/elsewhere", false));
            mounts.push(mount("trust", "/etc/ssl/certs", true));
        });
        let again = reinjected(&edited, "native");
        let sidecar = injected_container(&again, SIDECAR_CONTAINER).unwrap();
        let paths: Vec<&str> = sidecar
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(paths, [RUNTIME_DIR, TOKEN_DIR, TUN_PATH, "/etc/ssl/certs"]);
        let init = injected_container(&again, INIT_CONTAINER).unwrap();
        assert_eq!(
            init.volume_mounts.as_ref().unwrap(),
            &[
                mount("other", RUNTIME_DIR, false),
                mount("trust", "/etc/ssl/certs", true)
            ],
            "wg-init mounts nothing of its own: only the mount of our volume goes"
        );
        assert_eq!(reinjected(&again, "native"), again, "and it stays that way");
    }

    #[test]
    fn templates_become_downward_api_references() {
        assert_eq!(
            expand_placeholders("wg/keys/{namespace}/{serviceAccount}/{pod}"),
            "wg/keys/$(WG_POD_NAMESPACE)/$(WG_POD_SERVICE_ACCOUNT)/$(WG_POD_NAME)"
        );
    }

    fn sidecar_of(annotations: &str, config: &Config) -> Container {
        let pod: Pod = serde_yaml_ng::from_str(&format!(
            "metadata: {{name: web-0, annotations: {{{annotations}}}}}\nspec:\n  containers: [{{name: app}}]\n"
        ))
        .unwrap();
        let spec = annotations::parse(pod.metadata.annotations.as_ref().unwrap()).unwrap();
        plan(&pod, &spec, config).unwrap().sidecar
    }

    fn env_names(c: &Container) -> Vec<(String, String)> {
        c.env
            .iter()
            .flatten()
            .map(|e| {
                let field = e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
                (e.name.clone(), field.field_path.clone())
            })
            .collect()
    }

    #[test]
    fn every_sidecar_gets_the_pod_identity_from_the_downward_api_and_no_literal_value() {
        let expected = [
            ("WG_POD_NAMESPACE", "metadata.namespace"),
            ("WG_POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            ("WG_POD_NAME", "metadata.name"),
            ("WG_POD_UID", "metadata.uid"),
        ]
        .map(|(n, f)| (n.to_owned(), f.to_owned()));
        for annotations in [
            "wg-injector.io/key-source: vault",
            "wg-injector.io/key-source: 'secret:wg-keys'",
        ] {
            let sidecar = sidecar_of(annotations, &Config::default());
            assert_eq!(env_names(&sidecar), expected, "{annotations}");
            assert!(
                sidecar.env.iter().flatten().all(|e| e.value.is_none()),
                "{annotations}: names from the downward API only"
            );
        }
    }

    #[test]
    fn by_default_no_vault_key_path_is_rendered_so_the_key_is_born_in_the_pod() {
        let args = sidecar_of("wg-injector.io/inject: 'true'", &Config::default())
            .args
            .unwrap();
        assert!(args.contains(&"--key-source=vault".to_owned()), "{args:?}");
        assert!(
            !args.iter().any(|a| a.starts_with("--vault-key-path")),
            "{args:?}"
        );
    }

    #[test]
    fn a_configured_key_rotation_interval_reaches_keys_born_in_the_pod_but_never_a_static_identity()
    {
        let rotating = Config {
            vault: crate::config::VaultSettings {
                key_rotation_interval: Some("24h".to_owned()),
                ..crate::config::VaultSettings::default()
            },
            ..Config::default()
        };
        let interval = |annotations: &str, config: &Config| {
            sidecar_of(annotations, config)
                .args
                .unwrap()
                .into_iter()
                .find(|a| a.starts_with("--key-rotation-interval"))
        };
        assert_eq!(
            interval("wg-injector.io/inject: 'true'", &rotating).as_deref(),
            Some("--key-rotation-interval=24h")
        );
        assert_eq!(
            interval("wg-injector.io/vault-path: 'wg/static/{pod}'", &rotating),
            None,
            "a static identity's key is fixed"
        );
        assert_eq!(
            interval("wg-injector.io/inject: 'true'", &Config::default()),
            None,
            "off by default"
        );
    }

    #[test]
    fn a_static_vault_path_is_rendered_from_the_annotation_or_the_configured_template() {
        let key_path = |annotations: &str, config: &Config| {
            sidecar_of(annotations, config)
                .args
                .unwrap()
                .into_iter()
                .find(|a| a.starts_with("--vault-key-path="))
        };
        let templated = Config {
            vault: crate::config::VaultSettings {
                key_path_template: "wg/keys/{namespace}/{pod}".to_owned(),
                ..crate::config::VaultSettings::default()
            },
            ..Config::default()
        };
        assert_eq!(
            key_path("wg-injector.io/inject: 'true'", &templated).as_deref(),
            Some("--vault-key-path=wg/keys/$(WG_POD_NAMESPACE)/$(WG_POD_NAME)")
        );
        for config in [&Config::default(), &templated] {
            assert_eq!(
                key_path("wg-injector.io/vault-path: 'wg/static/{pod}'", config).as_deref(),
                Some("--vault-key-path=wg/static/$(WG_POD_NAME)"),
                "the annotation wins"
            );
        }
    }
}

//! Running a Pod's containers under podman + runc the way a kubelet would: each Kubernetes
//! `Container` (plus its Pod's volumes and securityContext) becomes one `podman run` argument
//! list, field by field, all joining one network namespace the test created.
//!
//! This module owns that translation ([`run_args`]) and the container guard ([`Container`]).
//! It must never loosen what the spec asks for: a field it cannot translate faithfully
//! (privileged, hostPath other than a character device, subPath, lifecycle hooks, …) is an
//! error, never silently dropped. It never pulls images (`--pull=never`) and removes only the
//! containers it started, by the name it gave them.
//!
//! Translation table (Kubernetes → podman):
//!
//! | Pod spec | podman run |
//! |---|---|
//! | `capabilities.drop: [ALL]`, `add: [X]` | `--cap-drop ALL --cap-add X` |
//! | `allowPrivilegeEscalation: false` | `--security-opt no-new-privileges` |
//! | `readOnlyRootFilesystem: true` | `--read-only --read-only-tmpfs=false` (no extra writable /tmp, /run) |
//! | `seccompProfile: RuntimeDefault` | podman's default seccomp profile (no flag; `Unconfined` → `seccomp=unconfined`) |
//! | `runAsUser` / `runAsGroup` (container, else Pod) | `--user UID:GID` |
//! | `emptyDir` | a bind mount of a per-Pod folder the caller made (memory-backed under `/dev/shm` for `medium: Memory`) |
//! | `projected` / `secret` / `configMap` | a read-only bind mount of a folder the caller filled |
//! | `hostPath` of type `CharDevice` | `--device HOST:CONTAINER` (runc allows the device in the device cgroup, as it does for `/dev/net/tun` under containerd) |
//! | `env` value / downward API `fieldRef` | `--env NAME=VALUE` from the Pod's own metadata |
//! | `$(VAR)` in `command`/`args` | expanded like the kubelet ([`wg_injector::inject::expand_kubelet_vars`]) |
//! | `resources.limits.memory` / `.cpu`, `requests.cpu` | `--memory`, `--cpus`, `--cpu-shares` |
//! | the Pod network | `--network ns:/run/netns/NAME` |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::{Container as KubeContainer, Pod, SecurityContext, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// podman's global flags on this machine kind (see LAB.md): runc (crun fails on cgroups hybrid
/// mode), cgroupfs, file events.
pub const GLOBAL_FLAGS: &[&str] = &[
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
    "--events-backend",
    "file",
];

/// `podman run` flags every container needs here (LAB.md): the machine's default rlimits are
/// above what runc may set for a container.
pub const ULIMIT_FLAGS: &[&str] = &[
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
];

/// A `podman` command with [`GLOBAL_FLAGS`].
pub fn podman() -> anyhow::Result<Command> {
    let mut command = Command::new(crate::lab::find_binary("podman")?);
    command.args(GLOBAL_FLAGS);
    Ok(command)
}

/// Runs `podman ARGS…` and returns its output; fails naming the command when it exits non-zero.
pub fn podman_ok(args: &[&str]) -> anyhow::Result<Output> {
    let out = podman()?
        .args(args)
        .output()
        .context("failed to start podman")?;
    if !out.status.success() {
        bail!(
            "podman {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// What the "kubelet" provides to every container of one Pod.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The Pod's network namespace (`/run/netns/NAME`).
    pub netns: PathBuf,
    /// Host folders backing the Pod's volumes (emptyDir, projected, secret, configMap), by
    /// volume name. The caller makes them (memory-backed) and fills the read-only ones.
    pub volume_dirs: BTreeMap<String, PathBuf>,
    /// Prefix of container names (`PREFIX-CONTAINER`), unique per test.
    pub name_prefix: String,
}

impl Sandbox {
    /// The podman container name of a Pod container.
    #[must_use]
    pub fn container_name(&self, container: &str) -> String {
        format!("{}-{container}", self.name_prefix)
    }
}

/// The value of a downward-API `fieldRef` taken from the Pod itself.
fn field_value(pod: &Pod, field_path: &str) -> anyhow::Result<String> {
    let value = match field_path {
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.name" => pod.metadata.name.clone(),
        // The apiserver assigns it; an offline-injected manifest must carry one for the sidecar
        // to register (`WG_POD_UID`).
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref().map(|s| {
            s.service_account_name
                .clone()
                .unwrap_or_else(|| "default".to_owned())
        }),
        other => bail!("downward API field {other} is not translated"),
    };
    value.with_context(|| format!("the Pod has no {field_path}"))
}

/// The container's environment as the kubelet resolves it (in order, later wins).
pub fn environment(pod: &Pod, container: &KubeContainer) -> anyhow::Result<Vec<(String, String)>> {
    if container.env_from.is_some() {
        bail!("container {}: envFrom is not translated", container.name);
    }
    let mut out = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().with_context(|| {
                    format!(
                        "container {}: env {} uses a valueFrom other than fieldRef",
                        container.name, var.name
                    )
                })?;
                field_value(pod, &field.field_path)?
            }
            (None, None) => String::new(),
            (Some(_), Some(_)) => bail!("env {} has both value and valueFrom", var.name),
        };
        out.push((var.name.clone(), value));
    }
    Ok(out)
}

/// The effective securityContext fields, container over Pod.
fn user_flag(pod: &Pod, sc: Option<&SecurityContext>) -> anyhow::Result<Option<String>> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_sc.and_then(|p| p.run_as_user));
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_sc.and_then(|p| p.run_as_group));
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or_else(|| pod_sc.and_then(|p| p.run_as_non_root))
        .unwrap_or(false);
    match uid {
        Some(0) if non_root => bail!("runAsNonRoot with runAsUser 0: the kubelet refuses this"),
        None if non_root => bail!("runAsNonRoot without runAsUser is not translated (the kubelet would check the image's USER)"),
        Some(uid) => Ok(Some(match gid {
            Some(gid) => format!("{uid}:{gid}"),
            None => uid.to_string(),
        })),
        None => Ok(None),
    }
}

fn security_flags(pod: &Pod, c: &KubeContainer, args: &mut Vec<String>) -> anyhow::Result<()> {
    let sc = c.security_context.as_ref();
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    if sc.and_then(|s| s.privileged).unwrap_or(false) {
        bail!(
            "container {}: privileged is refused by this translation",
            c.name
        );
    }
    if let Some(caps) = sc.and_then(|s| s.capabilities.as_ref()) {
        for cap in caps.drop.iter().flatten() {
            args.extend(["--cap-drop".to_owned(), cap.clone()]);
        }
        for cap in caps.add.iter().flatten() {
            args.extend(["--cap-add".to_owned(), cap.clone()]);
        }
    }
    if sc.and_then(|s| s.allow_privilege_escalation) == Some(false) {
        args.extend(["--security-opt".to_owned(), "no-new-privileges".to_owned()]);
    }
    if sc.and_then(|s| s.read_only_root_filesystem) == Some(true) {
        args.extend([
            "--read-only".to_owned(),
            "--read-only-tmpfs=false".to_owned(),
        ]);
    }
    let seccomp = sc
        .and_then(|s| s.seccomp_profile.as_ref())
        .or_else(|| pod_sc.and_then(|p| p.seccomp_profile.as_ref()));
    match seccomp.map(|p| p.type_.as_str()) {
        // podman applies its default profile unless told otherwise: that is RuntimeDefault.
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => {
            args.extend(["--security-opt".to_owned(), "seccomp=unconfined".to_owned()]);
        }
        Some(other) => bail!(
            "container {}: seccompProfile {other} is not translated",
            c.name
        ),
    }
    if let Some(user) = user_flag(pod, sc)? {
        args.extend(["--user".to_owned(), user]);
    }
    Ok(())
}

fn volume<'a>(pod: &'a Pod, name: &str) -> anyhow::Result<&'a Volume> {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == name))
        .with_context(|| format!("volumeMount {name} names no volume of the Pod"))
}

fn mount_flags(
    pod: &Pod,
    c: &KubeContainer,
    sandbox: &Sandbox,
    args: &mut Vec<String>,
) -> anyhow::Result<()> {
    for m in c.volume_mounts.iter().flatten() {
        if m.sub_path.is_some() || m.sub_path_expr.is_some() || m.mount_propagation.is_some() {
            bail!(
                "container {}: volumeMount {} uses subPath or mountPropagation, not translated",
                c.name,
                m.name
            );
        }
        let v = volume(pod, &m.name)?;
        let mut read_only = m.read_only.unwrap_or(false);
        if let Some(host) = &v.host_path {
            if host.type_.as_deref() != Some("CharDevice") {
                bail!(
                    "volume {}: only hostPath of type CharDevice is translated",
                    v.name
                );
            }
            let mode = if read_only { "r" } else { "rw" };
            args.extend([
                "--device".to_owned(),
                format!("{}:{}:{mode}", host.path, m.mount_path),
            ]);
            continue;
        }
        if v.projected.is_some() || v.secret.is_some() || v.config_map.is_some() {
            // The kubelet mounts these read-only whatever the mount says.
            read_only = true;
        } else if v.empty_dir.is_none() {
            bail!("volume {}: only emptyDir, projected, secret, configMap and CharDevice hostPath volumes are translated", v.name);
        }
        let dir = sandbox
            .volume_dirs
            .get(&v.name)
            .with_context(|| format!("the sandbox has no folder for volume {}", v.name))?;
        let mut spec = format!(
            "type=bind,source={},destination={}",
            dir.display(),
            m.mount_path
        );
        if read_only {
            spec.push_str(",ro=true");
        }
        args.extend(["--mount".to_owned(), spec]);
    }
    Ok(())
}

/// Kubernetes quantity → bytes (`64Mi`, `1Gi`, `500M`, plain bytes).
fn bytes(q: &Quantity) -> anyhow::Result<u64> {
    let s = q.0.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("memory quantity {s} is not translated"))?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => bail!("memory unit {other} is not translated"),
    };
    Ok(n * mult)
}

/// Kubernetes CPU quantity → millicores (`10m`, `1`, `0.5`).
fn millicores(q: &Quantity) -> anyhow::Result<u64> {
    let s = q.0.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m
            .parse()
            .with_context(|| format!("cpu quantity {s} is not translated"));
    }
    let cores: f64 = s
        .parse()
        .with_context(|| format!("cpu quantity {s} is not translated"))?;
    // Rounded to whole millicores like the apiserver does; quantities are small and positive.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((cores * 1000.0).round() as u64)
}

fn resource_flags(c: &KubeContainer, args: &mut Vec<String>) -> anyhow::Result<()> {
    let Some(r) = &c.resources else { return Ok(()) };
    if let Some(limits) = &r.limits {
        if let Some(mem) = limits.get("memory") {
            args.extend(["--memory".to_owned(), bytes(mem)?.to_string()]);
        }
        if let Some(cpu) = limits.get("cpu") {
            let m = millicores(cpu)?;
            args.extend(["--cpus".to_owned(), format!("{}.{:03}", m / 1000, m % 1000)]);
        }
    }
    if let Some(cpu) = r.requests.as_ref().and_then(|q| q.get("cpu")) {
        // The kubelet's conversion: shares = millicores * 1024 / 1000, at least 2.
        let shares = (millicores(cpu)? * 1024 / 1000).max(2);
        args.extend(["--cpu-shares".to_owned(), shares.to_string()]);
    }
    // requests.memory only informs scheduling and OOM ranking: no runtime flag to translate.
    Ok(())
}

/// The `podman run` arguments (after `run`) for `container` of `pod` inside `sandbox`,
/// detached (`-d`) when `detach`. The image must already be in local storage.
pub fn run_args(
    pod: &Pod,
    container: &KubeContainer,
    sandbox: &Sandbox,
    detach: bool,
) -> anyhow::Result<Vec<String>> {
    let c = container;
    if c.lifecycle.is_some()
        || c.volume_devices.is_some()
        || c.stdin == Some(true)
        || c.tty == Some(true)
    {
        bail!(
            "container {}: lifecycle, volumeDevices, stdin and tty are not translated",
            c.name
        );
    }
    if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
        bail!("container {}: hostPort is not translated", c.name);
    }
    let image = c
        .image
        .as_ref()
        .with_context(|| format!("container {} has no image", c.name))?;
    let mut args: Vec<String> = vec![
        "--pull=never".to_owned(),
        "--name".to_owned(),
        sandbox.container_name(&c.name),
        "--network".to_owned(),
        format!("ns:{}", sandbox.netns.display()),
    ];
    args.extend(ULIMIT_FLAGS.iter().map(|f| (*f).to_owned()));
    if detach {
        args.push("-d".to_owned());
    }
    if let Some(hostname) = &pod.metadata.name {
        args.extend(["--hostname".to_owned(), hostname.clone()]);
    }
    security_flags(pod, c, &mut args)?;
    mount_flags(pod, c, sandbox, &mut args)?;
    resource_flags(c, &mut args)?;
    let env = environment(pod, c)?;
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    for (name, value) in &env {
        args.extend(["--env".to_owned(), format!("{name}={value}")]);
    }
    if let Some(dir) = &c.working_dir {
        args.extend(["--workdir".to_owned(), dir.clone()]);
    }
    let expand = |list: &Option<Vec<String>>| -> Vec<String> {
        list.iter()
            .flatten()
            .map(|a| wg_injector::inject::expand_kubelet_vars(a, &vars))
            .collect()
    };
    let command = expand(&c.command);
    if let Some((first, rest)) = command.split_first() {
        args.extend(["--entrypoint".to_owned(), first.clone()]);
        args.push(image.clone());
        args.extend(rest.iter().cloned());
    } else {
        args.push(image.clone());
    }
    args.extend(expand(&c.args));
    Ok(args)
}

/// Finds a container of `pod` (init or regular) by name.
pub fn find_container<'a>(pod: &'a Pod, name: &str) -> anyhow::Result<&'a KubeContainer> {
    let spec = pod.spec.as_ref().context("the Pod has no spec")?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
        .with_context(|| format!("the Pod has no container {name}"))
}

/// A podman container this test started, removed (`podman rm -f`) on drop.
#[derive(Debug)]
pub struct Container {
    /// The podman container name.
    pub name: String,
}

impl Container {
    /// Starts `container` detached; the guard removes it on drop.
    pub fn start(pod: &Pod, container: &KubeContainer, sandbox: &Sandbox) -> anyhow::Result<Self> {
        let guard = Self {
            name: sandbox.container_name(&container.name),
        };
        let _ = podman_ok(&["rm", "-f", "--ignore", &guard.name]);
        let args = run_args(pod, container, sandbox, true)?;
        let mut full = vec!["run".to_owned()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        podman_ok(&refs)?;
        Ok(guard)
    }

    /// Runs `container` to completion (like an init container or a one-shot app) and returns
    /// (exit code, stdout, stderr); the container is removed afterwards.
    pub fn run_to_end(
        pod: &Pod,
        container: &KubeContainer,
        sandbox: &Sandbox,
    ) -> anyhow::Result<(i32, String, String)> {
        let guard = Self {
            name: sandbox.container_name(&container.name),
        };
        let _ = podman_ok(&["rm", "-f", "--ignore", &guard.name]);
        let args = run_args(pod, container, sandbox, false)?;
        let out = podman()?
            .arg("run")
            .args(&args)
            .output()
            .context("failed to start podman run")?;
        drop(guard);
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `podman logs` of the container.
    #[must_use]
    pub fn logs(&self) -> String {
        podman_ok(&["logs", &self.name]).map_or_else(
            |e| e.to_string(),
            |o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            },
        )
    }

    /// Whether the container is running.
    #[must_use]
    pub fn is_running(&self) -> bool {
        podman_ok(&["inspect", "--format", "{{.State.Running}}", &self.name])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
    }

    /// `podman stop -t SECS` (SIGTERM, then SIGKILL after the grace period, like the kubelet).
    pub fn stop(&self, grace_seconds: u32) -> anyhow::Result<()> {
        podman_ok(&["stop", "-t", &grace_seconds.to_string(), &self.name])?;
        Ok(())
    }

    /// `podman inspect` of one Go-template field.
    pub fn inspect(&self, format: &str) -> anyhow::Result<String> {
        let out = podman_ok(&["inspect", "--format", format, &self.name])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman_ok(&["rm", "-f", "-t", "0", "--ignore", &self.name]);
    }
}

/// Whether a local image exists (`podman image exists`).
pub fn image_exists(reference: &str) -> anyhow::Result<bool> {
    Ok(podman()?
        .args(["image", "exists", reference])
        .status()
        .context("failed to start podman")?
        .success())
}

/// The workspace version, which tags the images `scripts/build-images.sh` builds.
#[must_use]
pub fn image_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Runs `scripts/build-images.sh` (static release build + podman build, incremental), unless
/// `WG_E2E_USE_BUILT_IMAGES=1` says the images in local storage are current (for iterating on a
/// test; the images must then exist, which the caller checks).
pub fn build_images(root: &Path) -> anyhow::Result<()> {
    if std::env::var_os("WG_E2E_USE_BUILT_IMAGES").is_some_and(|v| v == "1") {
        return Ok(());
    }
    let status = Command::new("bash")
        .arg(root.join("scripts/build-images.sh"))
        .current_dir(root)
        .status()
        .context("failed to run scripts/build-images.sh")?;
    if !status.success() {
        bail!("scripts/build-images.sh failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            netns: PathBuf::from("/run/netns/p1"),
            volume_dirs: [
                ("rt".to_owned(), PathBuf::from("/dev/shm/rt")),
                ("tok".to_owned(), PathBuf::from("/dev/shm/tok")),
            ]
            .into(),
            name_prefix: "t1".to_owned(),
        }
    }

    const POD: &str = r"
metadata: {name: web, namespace: shop, uid: 0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d}
spec:
  serviceAccountName: web
  volumes:
  - {name: rt, emptyDir: {medium: Memory}}
  - name: tok
    projected: {sources: [{serviceAccountToken: {path: token, audience: vault}}]}
  - {name: tun, hostPath: {path: /dev/net/tun, type: CharDevice}}
  containers:
  - name: side
    image: localhost/x:1
    args: [run, '--key=wg/$(NS)/$(SA)']
    env:
    - {name: NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: SA, valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}}
    - {name: UID, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}
    resources: {requests: {cpu: 10m}, limits: {memory: 64Mi}}
    securityContext:
      capabilities: {drop: [ALL], add: [NET_ADMIN]}
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      runAsUser: 0
      seccompProfile: {type: RuntimeDefault}
    volumeMounts:
    - {name: rt, mountPath: /var/run/wireguard}
    - {name: tok, mountPath: /var/run/secrets/t, readOnly: true}
    - {name: tun, mountPath: /dev/net/tun}
";

    #[test]
    fn the_security_context_volumes_env_and_resources_become_podman_flags() {
        let p = pod(POD);
        let c = find_container(&p, "side").unwrap();
        let args = run_args(&p, c, &sandbox(), true).unwrap().join(" ");
        for want in [
            "--network ns:/run/netns/p1",
            "--cap-drop ALL --cap-add NET_ADMIN",
            "--security-opt no-new-privileges",
            "--read-only --read-only-tmpfs=false",
            "--user 0",
            "--mount type=bind,source=/dev/shm/rt,destination=/var/run/wireguard ",
            "--mount type=bind,source=/dev/shm/tok,destination=/var/run/secrets/t,ro=true",
            "--device /dev/net/tun:/dev/net/tun:rw",
            "--memory 67108864",
            "--cpu-shares 10",
            "--env NS=shop --env SA=web --env UID=0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d",
            "--pull=never",
        ] {
            assert!(args.contains(want), "missing {want:?} in {args}");
        }
        assert!(
            args.ends_with("localhost/x:1 run --key=wg/shop/web"),
            "{args}"
        );
        assert!(!args.contains("seccomp=unconfined"), "{args}");
    }

    #[test]
    fn privileged_containers_and_unknown_host_paths_are_refused_not_dropped() {
        let p = pod(&POD.replace("runAsUser: 0", "runAsUser: 0\n      privileged: true"));
        let c = find_container(&p, "side").unwrap();
        assert!(run_args(&p, c, &sandbox(), true).is_err());
        let p = pod(&POD.replace("type: CharDevice", "type: Directory"));
        let c = find_container(&p, "side").unwrap();
        let err = run_args(&p, c, &sandbox(), true).unwrap_err();
        assert!(err.to_string().contains("CharDevice"), "{err}");
    }

    #[test]
    fn run_as_non_root_with_uid_zero_is_refused_like_the_kubelet_does() {
        let p = pod(&POD.replace("runAsUser: 0", "runAsUser: 0\n      runAsNonRoot: true"));
        let c = find_container(&p, "side").unwrap();
        assert!(run_args(&p, c, &sandbox(), true).is_err());
    }

    #[test]
    fn quantities_translate_to_bytes_and_millicores() {
        assert_eq!(bytes(&Quantity("64Mi".into())).unwrap(), 64 << 20);
        assert_eq!(bytes(&Quantity("500M".into())).unwrap(), 500_000_000);
        assert_eq!(millicores(&Quantity("250m".into())).unwrap(), 250);
        assert_eq!(millicores(&Quantity("1.5".into())).unwrap(), 1500);
    }
}

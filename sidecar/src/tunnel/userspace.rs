//! The embedded BoringTun device of userspace mode.
//!
//! Owns: creating the BoringTun device (TUN interface plus its worker threads) with the
//! sidecar's own [`DeviceConfig`] instead of the library default, and bringing the link up.
//! Also takes SIGTERM away from the device (its signalfd is replaced: the sidecar stops it).
//! Configuration (key, MTU, addresses, peers) still goes through `defguard_wireguard_rs` over
//! the device's UAPI socket. Must never: configure keys or peers itself, or touch routes.

use defguard_boringtun::device::{DeviceConfig, DeviceHandle};

/// How the BoringTun device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserspaceConfig {
    /// Worker threads (each one an event loop over the TUN queue(s) and UDP sockets).
    pub threads: usize,
    /// One connected UDP socket per peer (instead of `send_to` on the listening socket).
    pub connected_socket: bool,
    /// One TUN queue per worker thread (`IFF_MULTI_QUEUE`).
    pub multi_queue: bool,
}

impl UserspaceConfig {
    /// The library default `DeviceConfig::default()` uses.
    pub const LIBRARY_DEFAULT: Self = Self {
        threads: 4,
        connected_socket: true,
        multi_queue: true,
    };
}

/// Creates the TUN interface `name` served by a BoringTun device configured by `cfg`, and sets
/// the link up. Dropping the returned handle stops the device (and so removes the interface).
pub(super) fn create(name: &str, cfg: UserspaceConfig) -> std::io::Result<DeviceHandle> {
    let config = DeviceConfig {
        n_threads: cfg.threads.max(1),
        use_connected_socket: cfg.connected_socket,
        use_multi_queue: cfg.multi_queue,
        ..DeviceConfig::default()
    };
    let before = signalfds();
    let handle = DeviceHandle::new(name, config).map_err(std::io::Error::other)?;
    // BoringTun stops the device on SIGTERM/SIGINT through a signalfd of its own, racing the
    // sidecar's handler for the signal: the tunnel could vanish at the first SIGTERM, before a
    // drain (see `lifecycle`) or the gateway's shutdown delay. The sidecar decides when to stop.
    for fd in signalfds().difference(&before) {
        neutralize_signalfd(*fd)?;
    }
    // The TUN interface starts down; Linux does not bring it up when addresses are assigned.
    super::link::set_up(name)?;
    Ok(handle)
}

/// The signalfd descriptors of this process (`/proc/self/fd/N` → `anon_inode:[signalfd]`).
fn signalfds() -> std::collections::BTreeSet<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return std::collections::BTreeSet::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[signalfd]")
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Puts `/dev/null` in place of the device's signalfd `fd`: the signalfd's file is released, so
/// epoll forgets it and the device's "exit on signal" handler never runs; the device still owns
/// the number and closes it on drop (now the `/dev/null` copy).
#[allow(unsafe_code)]
fn neutralize_signalfd(fd: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 on two open descriptors: `null` is ours and stays open for the call, `fd` is
    // a signalfd the device just created and keeps; dup2 atomically replaces what `fd` refers
    // to and touches no memory.
    let res = unsafe { nix::libc::dup2(null.as_raw_fd(), fd) };
    if res < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

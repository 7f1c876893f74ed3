//! The real-node fixture itself (`wg_e2e::node::Node`): up from nothing with Node Ready measured,
//! a Pod run by the kubelet, and a teardown that leaves no mount, netns, cgroup or host sysctl
//! changed. The user's path on such a node is `tests/tests/node.rs`.
//!
//! Run: `cargo test -p wg-e2e --test node_fixture -- --nocapture` (as root, after
//! `bash scripts/lab-install.sh` and `bash scripts/build-images.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use wg_e2e::node::{Node, PAUSE_IMAGE};

#[test]
fn a_node_comes_up_runs_a_pod_and_leaves_nothing_behind() {
    let node = Node::start(&[]).unwrap();
    eprintln!(
        "node Ready after {:.2} s from nothing",
        node.ready_after.as_secs_f64()
    );
    let t = Instant::now();
    node.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: probe, namespace: default}}\nspec:\n  containers:\n  - {{name: c, image: {PAUSE_IMAGE}, imagePullPolicy: Never}}\n"
    ))
    .unwrap();
    Node::wait_for("the Pod Ready", Duration::from_secs(60), || {
        let pod = node.kubectl_json(&["get", "pod", "probe"])?;
        Ok((pod["status"]["containerStatuses"][0]["ready"] == true).then_some(pod))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log_of("kubelet")));
    eprintln!(
        "Pod Ready {:.2} s after it was posted",
        t.elapsed().as_secs_f64()
    );
    let left = node.stop();
    assert!(left.0.is_empty(), "left behind: {:#?}", left.0);
}

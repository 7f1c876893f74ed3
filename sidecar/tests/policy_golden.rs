//! Golden tests of the NetworkPolicy compilation (`wg_sidecar::policy::compile`): every case in
//! `tests/testdata/policy/*.yaml` holds a Pod (namespace, labels) and the cluster's policies; the
//! snapshot is what that Pod may reach through the tunnel, which policies select it, and what was
//! dropped. Compiling twice gives the same result (order of the input does not matter).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use wg_sidecar::policy::compile;

#[derive(serde::Deserialize)]
struct Case {
    pod: PodCase,
    policies: Vec<NetworkPolicy>,
}

#[derive(serde::Deserialize)]
struct PodCase {
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[test]
fn every_policy_case_compiles_to_its_snapshot() {
    insta::glob!("testdata/policy/*.yaml", |path| {
        let case: Case = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let compiled = compile(&case.policies, &case.pod.namespace, &case.pod.labels);
        let mut reversed = case.policies.clone();
        reversed.reverse();
        assert_eq!(
            compile(&reversed, &case.pod.namespace, &case.pod.labels),
            compiled,
            "{}: the order of the policies changed the result",
            path.display()
        );
        insta::with_settings!({snapshot_path => "testdata/policy/snapshots", prepend_module_to_snapshot => false}, {
            insta::assert_yaml_snapshot!(compiled);
        });
    });
}

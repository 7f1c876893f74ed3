//! The offline CLI (`inject` / `uninject` over YAML or JSON files). OWNED BY: core helper.

/// Arguments of `wg-injector inject` and `uninject`.
#[derive(Debug, clap::Args)]
pub struct FileArgs {}

/// Run `inject` (or `uninject` when `remove`), returning the process exit code.
pub fn run(_args: &FileArgs, _remove: bool) -> anyhow::Result<i32> {
    anyhow::bail!("inject is not implemented yet")
}

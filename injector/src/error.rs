//! The crate's one error enum. A denial is not an error: see [`crate::admission::Denial`].

/// Everything that can fail in `wg-injector` outside of admission decisions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Placeholder until the first real variant lands.
    #[error("not implemented yet: {0}")]
    NotImplemented(&'static str),
}

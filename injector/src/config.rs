//! The injector's configuration (gateway profiles, images, defaults): one typed struct that
//! tests build directly. OWNED BY: core helper.

/// The injector's configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {}

//! inject: owned by the core helper.

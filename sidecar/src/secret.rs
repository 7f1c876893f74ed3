//! A string holding key material or a token.
//!
//! Owns: the wrapper every private key, preshared key and Vault token travels in.
//! Must never: print its content (`Debug` and `Display` show `[redacted]`), or outlive its use
//! without being wiped (the buffer is zeroized on drop).

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// A secret string, wiped on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value; surrounding whitespace (a trailing newline in a mounted file) is removed.
    #[must_use]
    pub fn new(mut value: String) -> Self {
        let trimmed = value.trim();
        if trimmed.len() == value.len() {
            return Self(Zeroizing::new(value));
        }
        let owned = trimmed.to_owned();
        value.zeroize();
        Self(Zeroizing::new(owned))
    }

    /// The secret value. Callers must not log or copy it into unwiped buffers.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-very-secret".to_owned());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn surrounding_whitespace_from_mounted_files_is_trimmed() {
        let s = Secret::new("abc\n".to_owned());
        assert_eq!(s.expose(), "abc");
    }
}

//! How values appear in log fields: as plain text a log pipeline can match
//! (`"endpoint":"10.0.0.1:51820"`, `"routes":"10.0.0.0/8,fd00::/8"`), never as Rust debug strings
//! (`Some(…)`, `[…]`).

use std::fmt::Display;

/// The items joined by commas; `none` when there are none.
#[must_use]
pub fn list<T: Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The value, or `none`.
#[must_use]
pub fn opt<T: Display>(value: Option<T>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_options_read_as_plain_values() {
        let nets: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
            "fd00::/8".parse().unwrap_or_else(|_| unreachable!()),
        ];
        assert_eq!(list(&nets), "10.0.0.0/8,fd00::/8");
        assert_eq!(list::<u8>(&[]), "none");
        let endpoint: Option<std::net::SocketAddr> = "10.0.0.1:51820".parse().ok();
        assert_eq!(opt(endpoint), "10.0.0.1:51820");
        assert_eq!(opt(None::<u8>), "none");
    }
}

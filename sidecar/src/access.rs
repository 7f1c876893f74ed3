//! Who may use a gateway at all: the namespace selector and the service-account list of
//! `wg-sidecar gateway --allow-namespace-selector … --allow-service-accounts …` (chart values
//! `access.namespaceSelector`, `access.serviceAccounts`).
//!
//! Owns: parsing a label selector in kubectl's syntax (`team=payments,env in (prod)`: `k=v`,
//! `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`, `k`, `!k`) into kube's typed
//! [`Selector`] (which also matches and prints it), parsing the `namespace/name` list, and the
//! pure decision [`Access::check`] for one Pod given its namespace's labels. A Pod may use the
//! gateway when its namespace matches the selector (empty: every namespace) **and**, when a list
//! is given, its `namespace/serviceAccount` is in it.
//! Must never: do IO, or decide without the namespace's labels when a selector needs them (it
//! answers [`Decision::Unknown`] instead).

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Expression, Selector, SelectorExt};

use crate::error::{Result, SidecarError};

/// The gateway's access rules (validated; built by [`Access::parse`], or directly in tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Namespaces whose labels match may use the gateway (`None`: every namespace).
    namespace_selector: Option<Selector>,
    /// `(namespace, service account)` pairs that may use the gateway (`None`: every one).
    service_accounts: Option<BTreeSet<(String, String)>>,
}

/// The decision for one Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The Pod may use the gateway.
    Allowed,
    /// The selector needs the namespace's labels and they are not known (yet).
    Unknown,
    /// The namespace's labels do not match the selector (shown as the selector's text).
    NamespaceNotSelected(String),
    /// The Pod's service account is not in the list.
    ServiceAccountNotAllowed,
}

fn is_label_name(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.starts_with(ok)
        && s.ends_with(ok)
        && s.chars().all(|c| ok(c) || matches!(c, '-' | '.'))
}

fn is_dns_label(s: &str) -> bool {
    is_dns_subdomain(s) && s.len() <= 63 && !s.contains('.')
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn check_key(key: &str) -> std::result::Result<String, String> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    };
    if ok {
        Ok(key.to_owned())
    } else {
        Err(format!(
            "{key:?} is not a label key ([prefix/]name: up to 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit)"
        ))
    }
}

/// A label value: empty, or a label name.
fn check_value(value: &str) -> std::result::Result<String, String> {
    if value.is_empty() || is_label_name(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a label value"))
    }
}

/// The requirements of `text`: split at commas outside parentheses.
fn requirements(text: &str) -> std::result::Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0u32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested parentheses".into()),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("')' without '('".into()),
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'(' without ')'".into());
    }
    out.push(&text[start..]);
    Ok(out)
}

/// One requirement: `!k`, `k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`.
fn requirement(part: &str) -> std::result::Result<Expression, String> {
    let p = part.trim();
    if p.is_empty() {
        return Err("an empty requirement (two commas in a row, or a comma at an end)".into());
    }
    if p.contains(['<', '>']) {
        return Err(format!(
            "{p:?}: '<' and '>' are not label-selector operators"
        ));
    }
    if let Some(key) = p.strip_prefix('!') {
        if !key.contains(['=', '(']) {
            return Ok(Expression::DoesNotExist(check_key(key.trim())?));
        }
    }
    if let Some((k, v)) = p.split_once("!=") {
        return Ok(Expression::NotEqual(
            check_key(k.trim())?,
            check_value(v.trim())?,
        ));
    }
    if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
        return Ok(Expression::Equal(
            check_key(k.trim())?,
            check_value(v.trim())?,
        ));
    }
    let key_end = p
        .find(|c: char| c.is_whitespace() || c == '(')
        .unwrap_or(p.len());
    let key = check_key(&p[..key_end])?;
    let rest = p[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(Expression::Exists(key));
    }
    let (notin, after) = if let Some(a) = rest.strip_prefix("notin") {
        (true, a)
    } else if let Some(a) = rest.strip_prefix("in") {
        (false, a)
    } else {
        return Err(format!(
            "{p:?}: expected =, ==, !=, in (…) or notin (…) after the key"
        ));
    };
    let list = after
        .trim()
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(|| format!("{p:?}: the values of in/notin go in parentheses: k in (a,b)"))?;
    let values = list
        .split(',')
        .map(|v| check_value(v.trim()))
        .collect::<std::result::Result<BTreeSet<String>, String>>()?;
    if list.trim().is_empty() {
        return Err(format!("{p:?}: in/notin needs at least one value"));
    }
    Ok(if notin {
        Expression::NotIn(key, values)
    } else {
        Expression::In(key, values)
    })
}

/// Parses a label selector in kubectl's syntax; empty text is the selector that matches
/// everything. The error says which part is wrong.
pub fn parse_selector(text: &str) -> std::result::Result<Selector, String> {
    if text.trim().is_empty() {
        return Ok(Selector::default());
    }
    requirements(text)?
        .into_iter()
        .map(requirement)
        .collect::<std::result::Result<Vec<Expression>, String>>()
        .map(|e| e.into_iter().collect())
}

impl Access {
    /// Validates `--allow-namespace-selector` and `--allow-service-accounts`; errors name the
    /// flag and the value.
    pub fn parse(selector: &str, service_accounts: &[String]) -> Result<Self> {
        let bad = |m: String| SidecarError::InvalidConfig(m);
        let parsed = parse_selector(selector).map_err(|why| {
            bad(format!(
                "--allow-namespace-selector {selector:?} is not a label selector: {why} (kubectl \
                 syntax, e.g. \"team=payments,env in (prod,staging)\")"
            ))
        })?;
        let mut list = BTreeSet::new();
        for raw in service_accounts {
            let v = raw.trim();
            if v.is_empty() {
                continue;
            }
            match v.split_once('/') {
                Some((ns, sa)) if is_dns_label(ns) && is_dns_subdomain(sa) => {
                    list.insert((ns.to_owned(), sa.to_owned()));
                }
                _ => {
                    return Err(bad(format!(
                        "--allow-service-accounts: {v:?} is not namespace/name (e.g. shop/web)"
                    )))
                }
            }
        }
        Ok(Self {
            namespace_selector: (!parsed.selects_all()).then_some(parsed),
            service_accounts: (!list.is_empty()).then_some(list),
        })
    }

    /// True when namespaces' labels matter (the gateway watches Namespaces only then).
    #[must_use]
    pub fn needs_namespaces(&self) -> bool {
        self.namespace_selector.is_some()
    }

    /// True when every Pod may use the gateway.
    #[must_use]
    pub fn allows_all(&self) -> bool {
        self.namespace_selector.is_none() && self.service_accounts.is_none()
    }

    /// The selector as kubectl prints it (empty: every namespace).
    #[must_use]
    pub fn selector_text(&self) -> String {
        self.namespace_selector
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// The service-account list as `namespace/name,…` (empty: every one).
    #[must_use]
    pub fn service_accounts_text(&self) -> String {
        self.service_accounts
            .iter()
            .flatten()
            .map(|(ns, sa)| format!("{ns}/{sa}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether a Pod of `namespace` running as `service_account` may use the gateway;
    /// `namespace_labels` are its namespace's labels (`None`: not known).
    #[must_use]
    pub fn check(
        &self,
        namespace: &str,
        service_account: &str,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Decision {
        if let Some(sel) = &self.namespace_selector {
            match namespace_labels {
                None => return Decision::Unknown,
                Some(l) if !sel.matches(l) => {
                    return Decision::NamespaceNotSelected(sel.to_string())
                }
                Some(_) => {}
            }
        }
        if let Some(list) = &self.service_accounts {
            if !list.contains(&(namespace.to_owned(), service_account.to_owned())) {
                return Decision::ServiceAccountNotAllowed;
            }
        }
        Decision::Allowed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_kubectl_operator_parses_to_its_typed_expression_and_prints_back() {
        let s = parse_selector(
            "team=payments, tier==web,env in (prod, staging),track notin (canary),\
             example.com/vpn,!legacy,owner!=ops",
        )
        .unwrap();
        let e: Vec<Expression> = s.clone().into_iter().collect();
        let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        assert_eq!(
            e,
            vec![
                Expression::Equal("team".into(), "payments".into()),
                Expression::Equal("tier".into(), "web".into()),
                Expression::In("env".into(), set(&["prod", "staging"])),
                Expression::NotIn("track".into(), set(&["canary"])),
                Expression::Exists("example.com/vpn".into()),
                Expression::DoesNotExist("legacy".into()),
                Expression::NotEqual("owner".into(), "ops".into()),
            ]
        );
        assert_eq!(
            s.to_string(),
            "team=payments,tier=web,env in (prod,staging),track notin (canary),example.com/vpn,!legacy,owner!=ops"
        );
        // What it prints parses to the same selector.
        assert_eq!(parse_selector(&s.to_string()).unwrap(), s);
        assert!(parse_selector("  ").unwrap().selects_all());
        assert_eq!(
            parse_selector("env in(prod)").unwrap(),
            parse_selector("env in (prod)").unwrap()
        );
    }

    #[test]
    fn a_malformed_selector_is_refused_with_the_part_at_fault() {
        for (text, part) in [
            ("team=payments,", "empty requirement"),
            ("env in (prod", "'(' without ')'"),
            ("env in prod", "parentheses"),
            ("env in ()", "at least one value"),
            ("env within (a)", "after the key"),
            ("Team Payments=x", "label key"),
            ("team=pay ments", "label value"),
            ("replicas>1", "'<' and '>'"),
            ("-bad", "label key"),
        ] {
            let e = parse_selector(text).unwrap_err();
            assert!(e.contains(part), "{text:?}: {e}");
        }
        let e = Access::parse("env in (prod", &[]).unwrap_err().to_string();
        assert!(
            e.contains("--allow-namespace-selector") && e.contains("env in (prod"),
            "{e}"
        );
        let e = Access::parse("", &["shop/web".into(), "web".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--allow-service-accounts") && e.contains("\"web\""),
            "{e}"
        );
    }

    #[test]
    fn a_pod_needs_a_selected_namespace_and_a_listed_service_account() {
        let a = Access::parse(
            "team=payments,env in (prod)",
            &["shop/web".into(), " bank/api ".into()],
        )
        .unwrap();
        assert!(a.needs_namespaces() && !a.allows_all());
        assert_eq!(a.service_accounts_text(), "bank/api,shop/web");
        let payments = labels(&[("team", "payments"), ("env", "prod")]);
        assert_eq!(a.check("shop", "web", Some(&payments)), Decision::Allowed);
        assert_eq!(
            a.check("shop", "admin", Some(&payments)),
            Decision::ServiceAccountNotAllowed
        );
        assert_eq!(
            a.check("shop", "web", Some(&labels(&[("team", "payments")]))),
            Decision::NamespaceNotSelected("team=payments,env in (prod)".into())
        );
        assert_eq!(a.check("shop", "web", None), Decision::Unknown);
        // A list alone needs no namespace labels; nothing at all allows everything.
        let sa_only = Access::parse("", &["shop/web".into()]).unwrap();
        assert!(!sa_only.needs_namespaces());
        assert_eq!(sa_only.check("shop", "web", None), Decision::Allowed);
        assert_eq!(
            sa_only.check("bank", "web", None),
            Decision::ServiceAccountNotAllowed
        );
        let all = Access::parse(" ", &[String::new()]).unwrap();
        assert!(all.allows_all());
        assert_eq!(all.check("any", "any", None), Decision::Allowed);
    }
}
